"""Two daqd and a real Constellation controller on three hosts: network namespaces made by the
test, joined by veth pairs on private subnets (10.213.x.0/24, addresses only inside them).

    host A: daqd "hosta", UDP in -> cdtp publisher "out" (port 23999)
    host B: daqd "hostb", cdtp receiver "in" (discover = true, receive_from = ["daqd.out"])
            -> file publisher
    host C: constellationdaq's ScriptableController (tests/constellation_control.py), and the
            bridge br0 of the control network 10.213.1.0/24 that A and B are plugged into, so
            CHIRP's multicast reaches all three

A and B are also joined directly by the data link 10.213.2.0/24. B finds A's publisher by its
CHIRP DATA offer (at A's control-network address, where A's beacons come from); a policy route on
B sends the connections to port 23999 across the data link, and only those: heartbeats, commands
and beacons stay on the control network.

The controller finds both by CHIRP and takes them through a run; in the run the test cuts the A-B
data link (`ip link set a1 down`) while A keeps receiving UDP, until A's publisher gives up on it
(data_timeout_s), then restores it. That run ends flagged on both sides, each record accounted
for by a named reason on each side, and the next run is GOOD with every record on B.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import wait_for
from tests.test_cdtp import Proc
from tests.test_constellation import GROUP, IsolatedDaqd, Netns, needs_netns, peer

__all__ = ["peer"]  # the fixture, used by name

CONTROL_SCRIPT = str(Path(__file__).with_name("constellation_control.py"))
DATA_PORT = 23999
UDP_PORT = 17001

# Datagrams at a steady rate until a line comes on stdin; then the count sent, as JSON.
UDP_SENDER = """
import json, socket, sys, threading, time
rate, size, port = (int(a) for a in sys.argv[1:4])
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.readline(), stop.set()), daemon=True).start()
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
payload = bytes(size)
sent = 0
began = time.monotonic()
while not stop.is_set():
    due = int((time.monotonic() - began) * rate)
    while sent < due:
        sock.sendto(payload, ("127.0.0.1", port))
        sent += 1
    time.sleep(0.002)
print(json.dumps({"sent": sent}), flush=True)
"""

HOST_A = f"""
[daemon]
name = "hosta"
drain_timeout_s = 20

[[receiver]]
type = "udp"
name = "raw"
listen = "127.0.0.1:{UDP_PORT}"
publish_to = ["out"]

[[publisher]]
type = "cdtp"
name = "out"
endpoint = "tcp://*:{DATA_PORT}"
# a receiver that takes nothing for a second ends the CDTP run: what follows is counted, not held
data_timeout_s = 1
eor_timeout_s = 15
sndhwm = 4
payload_threshold_kib = 16

[constellation]
group = "{GROUP}"
interface = ["a0"]
"""


def host_b(directory: Path) -> str:
    return f"""
[daemon]
name = "hostb"
drain_timeout_s = 20

[[receiver]]
type = "cdtp"
name = "in"
discover = true
receive_from = ["daqd.out"]
eor_timeout_s = 15
publish_to = ["disk"]

[[publisher]]
type = "file"
name = "disk"
directory = "{directory}"

[constellation]
group = "{GROUP}"
interface = ["b0"]
"""


def veth(left: Netns, left_dev: str, right: Netns, right_dev: str) -> None:
    left.run(
        "ip", "link", "add", left_dev, "type", "veth",
        "peer", "name", right_dev, "netns", str(right.holder.pid),
    )  # fmt: skip


def up(ns: Netns, dev: str, address: str | None = None) -> None:
    if address is not None:
        ns.run("ip", "addr", "add", address, "dev", dev)
    ns.run("ip", "link", "set", dev, "up")


class Controller:
    """tests/constellation_control.py in host C's namespace."""

    def __init__(self, proc: Proc) -> None:
        self.proc = proc

    async def ask(self, op: str, timeout_s: float = 60.0, **args: Any) -> dict[str, Any]:
        await self.proc.say(json.dumps({"op": op, **args}))
        return await self.proc.line(timeout_s)

    async def transition(self, name: str, cmd: str, state: str, payload: Any = None) -> None:
        out = await self.ask(
            "transition", name=name, cmd=cmd, payload=payload, state=state, timeout=45
        )
        assert out["ok"], (name, cmd, out)


def ledger(daqd: IsolatedDaqd) -> dict[str, Any]:
    last: dict[str, Any] = daqd.status()["last_run"]
    return last


def balanced(publisher: dict[str, Any]) -> bool:
    dropped = sum(publisher["drops"].values())
    return bool(publisher["offered"] == publisher["delivered"] + dropped)


@pytest.mark.slow
@pytest.mark.interop
@needs_netns
async def test_link_cut_between_two_daqd_hosts(peer: str, tmp_path: Path) -> None:
    a, b, c = Netns(), Netns(), Netns()
    daqd_a = daqd_b = None
    ctrl = sender = None
    try:
        # the control network: A and B plugged into C's bridge; the data link: A-B directly
        c.run("ip", "link", "add", "br0", "type", "bridge", "mcast_snooping", "0")
        veth(c, "ca", a, "a0")
        veth(c, "cb", b, "b0")
        for dev in ("ca", "cb"):
            c.run("ip", "link", "set", dev, "master", "br0")
            up(c, dev)
        up(c, "br0", "10.213.1.3/24")
        up(a, "a0", "10.213.1.1/24")
        up(b, "b0", "10.213.1.2/24")
        veth(a, "a1", b, "b1")
        up(a, "a1", "10.213.2.1/24")
        up(b, "b1", "10.213.2.2/24")
        # B reaches A's data port (at A's control-network address, from A's DATA offer) across
        # the data link; everything else between them goes through the bridge
        b.run("ip", "route", "add", "10.213.1.1/32", "via", "10.213.2.1", "table", "100")
        b.run("ip", "rule", "add", "ipproto", "tcp", "dport", str(DATA_PORT), "table", "100")
        for ns, dev in ((a, "a0"), (b, "b0"), (c, "br0"), (a, "a1"), (b, "b1")):
            ns.wait_carrier(dev)  # constellationdaq skips a link without carrier

        (tmp_path / "a").mkdir()
        (tmp_path / "b").mkdir()
        daqd_a = IsolatedDaqd(tmp_path / "a", HOST_A, "hosta", netns_pid=a.holder.pid)
        daqd_b = IsolatedDaqd(
            tmp_path / "b", host_b(tmp_path / "data"), "hostb", netns_pid=b.holder.pid
        )
        ctrl = Controller(
            await Proc.start(
                *c.argv(peer, CONTROL_SCRIPT),
                stdin_json={"group": GROUP, "interface": ["br0"]},
            )
        )
        assert (await ctrl.proc.line())["ready"]
        found = await ctrl.ask("await", names=["Daqd.hosta", "Daqd.hostb"], timeout=30)
        assert found["ok"], found
        assert found["states"] == {"Daqd.hosta": "INIT", "Daqd.hostb": "INIT"}
        for cmd, state in (("initialize", "INIT"), ("launch", "ORBIT")):
            for name in ("Daqd.hostb", "Daqd.hosta"):
                await ctrl.transition(name, cmd, state, {} if cmd == "initialize" else None)
        found = await wait_for(
            lambda: daqd_b.status()["receivers"]["in"]["addresses"].get("discovered daqd.out"),
            20,
            "B's receiver to find A's publisher by CHIRP",
        )
        assert found == f"tcp://10.213.1.1:{DATA_PORT}"

        def publisher_a() -> dict[str, Any]:
            out: dict[str, Any] = daqd_a.status()["publishers"]["out"]
            return out

        async def run(run_id: str, cut: bool) -> int:
            nonlocal sender
            for name in ("Daqd.hostb", "Daqd.hosta"):  # the receiving side first
                await ctrl.transition(name, "start", "RUN", run_id)
            sender = await Proc.start(
                *a.argv(sys.executable, "-c", UDP_SENDER, "2000", "4000", str(UDP_PORT))
            )
            delivered = publisher_a()["records"]
            await wait_for(
                lambda: publisher_a()["records"] > delivered + 500, 30, "records reaching B"
            )
            if cut:
                a.run("ip", "link", "set", "a1", "down")
                await wait_for(
                    lambda: publisher_a()["extra"]["state"] == "aborted",
                    30,
                    "A's publisher to give up on the cut link",
                )
                a.run("ip", "link", "set", "a1", "up")
                a.wait_carrier("a1")
                received = daqd_a.status()["receivers"]["raw"]["records"]
                await wait_for(
                    lambda: daqd_a.status()["receivers"]["raw"]["records"] > received + 500,
                    30,
                    "A still receiving UDP after the cut",
                )
            else:
                await wait_for(
                    lambda: publisher_a()["records"] > delivered + 2000, 30, "more records"
                )
            await sender.say("stop")
            sent: int = (await sender.line())["sent"]
            await sender.end()
            # A ends its run first (its EOR closes the run on B), then B
            for name in ("Daqd.hosta", "Daqd.hostb"):
                await ctrl.transition(name, "stop", "ORBIT")
            return sent

        # ----- run 1: the data link cut and restored ------------------------------------------
        sent = await run("cut_1", cut=True)
        la, lb = ledger(daqd_a), ledger(daqd_b)
        assert (la["run_id"], lb["run_id"]) == ("cut_1", "cut_1")
        rx_a = la["accounting"]["receivers"]["raw"]
        pub_a = la["accounting"]["publishers"]["out"]
        rx_b = lb["accounting"]["receivers"]["in"]
        disk = lb["accounting"]["publishers"]["disk"]
        # A: every datagram received or counted by the kernel; every record delivered to the
        # link or dropped by name (the run's records after the link gave out: aborted)
        assert rx_a["received"] + rx_a["drops"].get("kernel", 0) == sent, (sent, rx_a)
        assert pub_a["offered"] == rx_a["received"]
        assert balanced(pub_a), pub_a
        assert pub_a["drops"]["aborted"] > 0 and pub_a["errors"] == {"data_timeout": 1}, pub_a
        assert "INCOMPLETE" in la["condition"] and "DEGRADED" in la["condition"], la
        assert any("aborted" in reason for reason in la["reasons"]), la["reasons"]
        # B: exactly what A delivered arrived, and went to disk; what A numbered and sent no more
        # (its EOR's data_records say how many) B counts as missed; the run is flagged by both
        assert rx_b["received"] == pub_a["delivered"], (rx_b, pub_a)
        numbered = publisher_a()["extra"]["seq"]  # A's last CDTP sequence number of the run
        assert pub_a["delivered"] < numbered <= pub_a["offered"]
        assert rx_b["drops"] == {"missed": numbered - rx_b["received"]}, rx_b
        missed = numbered - rx_b["received"]
        assert f"receiver in: {missed} input lost (missed) -> INCOMPLETE" in lb["reasons"], lb
        assert disk["offered"] == disk["delivered"] == rx_b["received"], disk
        assert lb["condition"] != "GOOD" and "INCOMPLETE" in lb["condition"], lb
        report = daqd_b.status()["receivers"]["in"]["extra"]["last_run"]
        [flawed] = report["not_good"]
        assert flawed["sender"] == "daqd.out" and "ABORTED" in flawed["condition"], report
        assert flawed["records"] == rx_b["received"]

        # ----- run 2: GOOD on both hosts, every record on B ------------------------------------
        sent = await run("good_2", cut=False)
        la, lb = ledger(daqd_a), ledger(daqd_b)
        assert (la["condition"], lb["condition"]) == ("GOOD", "GOOD"), (la, lb)
        rx_a = la["accounting"]["receivers"]["raw"]
        pub_a = la["accounting"]["publishers"]["out"]
        rx_b = lb["accounting"]["receivers"]["in"]
        assert rx_a["received"] == sent == pub_a["delivered"] == rx_b["received"], (la, lb)
        assert lb["accounting"]["publishers"]["disk"]["delivered"] == sent
        # the control network was never cut: B followed A's heartbeats throughout
        seen_by_b = daqd_b.status()["constellation"]
        assert seen_by_b["remote_heartbeats"]["Daqd.hosta"]["state"] == "ORBIT"
        assert seen_by_b["autonomy_interrupts"] == 0 and seen_by_b["autonomy_marks"] == 0
        states = (await ctrl.ask("states"))["states"]
        assert states == {"Daqd.hosta": "ORBIT", "Daqd.hostb": "ORBIT"}
    finally:
        for proc in (sender, ctrl.proc if ctrl else None):
            if proc is not None:
                await proc.stop()
        for daqd in (daqd_a, daqd_b):
            if daqd is not None:
                assert daqd.stop() == 0, daqd.log()
        for ns in (a, b, c):
            ns.close()
    for daqd in (daqd_a, daqd_b):
        assert "Traceback" not in daqd.log()
