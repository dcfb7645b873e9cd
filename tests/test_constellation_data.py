"""daqd's configuration and data in a Constellation: the controller's `initialize` map, CDTP
senders found by CHIRP, and the full run with real constellationdaq 1.0.2 satellites.

Every case runs in a private network namespace (see tests/test_constellation.py), so CHIRP never
leaves the test.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from daqd.config import parse_config
from daqd.errors import ConfigError
from tests.conftest import wait_for
from tests.peers import peer_python
from tests.test_cdtp import Proc
from tests.test_constellation import (
    GROUP,
    PROBE_SCRIPT,
    IsolatedDaqd,
    ask,
    cdtp_publisher,
    control,
    needs_netns,
    satellite_config,
)


def send_udp(daqd: IsolatedDaqd, address: str, n: int) -> None:
    """`n` datagrams to `address` ("host:port") from inside daqd's namespace."""
    host, port = address.rsplit(":", 1)
    code = (
        "import socket, sys\n"
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        f"for k in range({n}): s.sendto(b'dgram %d' % k, ({host!r}, {int(port)}))\n"
    )
    subprocess.run(daqd.in_namespace(sys.executable, "-c", code), check=True, timeout=30)


@needs_netns
async def test_initialize_applies_the_controllers_receivers(tmp_path: Path) -> None:
    """`initialize` with `receiver` / `publisher` arrays replaces the file's, validated by the
    same models: a bad one is answered INVALID naming the table, entry and key, and daqd stays
    as it was; a good one is what launch starts and a run goes through; an initialize without
    them goes back to the file's."""
    daqd = IsolatedDaqd(tmp_path, satellite_config(tmp_path, "sat1"), "sat1")
    probe = await Proc.start(*daqd.in_namespace(sys.executable, PROBE_SCRIPT))
    port = daqd.cmd_port

    async def cscp(command: str, payload: Any = None) -> dict[str, Any]:
        reply: dict[str, Any] = await ask(
            probe, "cscp", port=port, command=command, payload=payload
        )
        return reply

    async def state_is(state: str) -> None:
        deadline = time.monotonic() + 20
        while (await cscp("get_state"))["text"] != state:
            assert time.monotonic() < deadline, f"not in {state} within 20 s"
            await asyncio.sleep(0.02)

    udp = {"type": "udp", "name": "u1", "listen": "127.0.0.1:0", "publish_to": ["disk"]}
    try:
        await state_is("INIT")
        bad = await cscp("initialize", {"receiver": [{**udp, "lisen": "x"}], "answer": 1})
        assert bad["type"] == "INVALID", bad
        assert bad["text"].startswith("Invalid configuration: initialize from probe: ")
        assert '[[receiver]] #1 (name "u1"): key "lisen": unknown key' in bad["text"]
        bad = await cscp("initialize", {"receiver": [{**udp, "publish_to": ["nowhere"]}]})
        assert bad["type"] == "INVALID", bad
        assert "nowhere" in bad["text"] and '[[receiver]] #1 (name "u1")' in bad["text"]
        bad = await cscp("initialize", {"publisher": "disk"})
        assert bad["type"] == "INVALID", bad
        assert "publisher must be an array of tables" in bad["text"]
        evil = {**udp, "type": "packetstream", "name": "p1", "handler": "evil.py:Evil"}
        bad = await cscp("initialize", {"receiver": [evil]})
        assert bad["type"] == "INVALID", bad
        assert 'key "handler": refusing to load code given by initialize from probe' in bad["text"]
        assert (await cscp("get_config"))["payload"] == {}  # nothing was taken
        status = daqd.status()
        assert status["state"] == "INIT" and sorted(status["receivers"]) == ["ss"]

        good = await cscp("initialize", {"receiver": [udp], "_autonomy": {"role": "NONE"}})
        assert good["type"] == "SUCCESS" and good["payload"] == "initialize", good
        await state_is("INIT")
        assert (await cscp("get_role"))["text"] == "NONE"
        status = daqd.status()
        assert sorted(status["receivers"]) == ["u1"], status["receivers"]
        assert (await cscp("launch"))["type"] == "SUCCESS"
        await state_is("ORBIT")
        u1 = daqd.status()["receivers"]["u1"]
        assert u1["state"] == "running", u1
        assert (await cscp("start", "r1"))["type"] == "SUCCESS"
        await state_is("RUN")
        send_udp(daqd, u1["addresses"]["listen"], 5)
        await wait_for(lambda: daqd.status()["receivers"]["u1"]["records"] == 5, 20, "5 records")
        assert (await cscp("stop"))["type"] == "SUCCESS"
        await state_is("ORBIT")
        last = daqd.status()["last_run"]
        assert (last["run_id"], last["condition"], last["records"]) == ("r1", "GOOD", {"u1": 5})

        assert (await cscp("land"))["type"] == "SUCCESS"
        await state_is("INIT")
        assert (await cscp("initialize", {}))["type"] == "SUCCESS"  # the file's again
        await state_is("INIT")
        assert sorted(daqd.status()["receivers"]) == ["ss"]
        assert "cscp_invalid_config" in json.dumps(daqd.status()["constellation"]["errors"])
    finally:
        await probe.stop()
        daqd.stop()


def test_discover_needs_the_constellation_table() -> None:
    """`discover = true` without [constellation] (CHIRP runs in the satellite) and a cdtp receiver
    with neither senders nor discover are config errors naming the receiver and key."""
    rx = '[[receiver]]\ntype = "cdtp"\nname = "rx"\ndiscover = true\n'
    with pytest.raises(ConfigError) as err:
        parse_config('[daemon]\nname = "d"\n' + rx, "c.toml")
    assert str(err.value) == (
        'c.toml: [[receiver]] #1 (name "rx"): key "discover": needs a [constellation] table '
        "(CHIRP runs in the satellite) (line 6)"
    )
    parse_config('[daemon]\nname = "d"\n' + rx + '[constellation]\ngroup = "g"\n')
    with pytest.raises(ConfigError) as err:
        parse_config('[daemon]\nname = "d"\n[[receiver]]\ntype = "cdtp"\nname = "rx"\n', "c.toml")
    assert "no senders: give senders (endpoints), or discover = true" in str(err.value)
    with pytest.raises(ConfigError) as err:
        parse_config(
            '[daemon]\nname = "d"\n' + rx + 'process = true\n[constellation]\ngroup = "g"\n'
        )
    assert "discover takes CHIRP from the daemon: not with process = true" in str(err.value)


def pair_configs(tmp: Path) -> tuple[str, str]:
    """daqd `a` (UDP in -> cdtp publisher `pub`, offered as DATA `daqd.pub`) and daqd `b` (cdtp
    receiver finding `daqd.pub` by CHIRP -> run files), both staying in ORBIT."""
    a = f"""
[daemon]
name = "a"
drain_timeout_s = 5

[[receiver]]
type = "udp"
name = "in"
listen = "127.0.0.1:0"
publish_to = ["pub"]

{cdtp_publisher("pub")}
[constellation]
group = "{GROUP}"
interface = ["lo"]
wait_for_controller = false
"""
    b = f"""
[daemon]
name = "b"
drain_timeout_s = 5

[[receiver]]
type = "cdtp"
name = "rx"
discover = true
receive_from = ["daqd.pub"]
eor_timeout_s = 3
publish_to = ["disk"]

[[publisher]]
type = "file"
name = "disk"
directory = "{tmp / "data"}"

[constellation]
group = "{GROUP}"
interface = ["lo"]
wait_for_controller = false
"""
    return a, b


@needs_netns
async def test_cdtp_receiver_finds_its_senders_by_chirp(tmp_path: Path) -> None:
    """A `cdtp` receiver with `discover = true` connects to the DATA offer of the name in
    `receive_from` (another daqd's publisher), takes two runs from it GOOD with every record,
    counts an offer it does not want, and closes the link when that daqd DEPARTs."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    conf_a, conf_b = pair_configs(tmp_path / "b")
    b = IsolatedDaqd(tmp_path / "b", conf_b, "b")
    a = IsolatedDaqd(tmp_path / "a", conf_a, "a", netns_pid=b.proc.pid)
    probe = await Proc.start(*b.in_namespace(sys.executable, PROBE_SCRIPT))
    try:

        def rx() -> dict[str, Any]:
            status: dict[str, Any] = b.status()["receivers"]["rx"]
            return status

        await wait_for(lambda: "discovered daqd.pub" in rx()["addresses"], 20, "the DATA offer")
        pub_port = a.status()["publishers"]["pub"]["addresses"]["endpoint"].rsplit(":", 1)[1]
        assert rx()["addresses"]["discovered daqd.pub"] == f"tcp://127.0.0.1:{pub_port}"
        listen = a.status()["receivers"]["in"]["addresses"]["listen"]
        for k, n in enumerate((20, 7)):
            run_id = f"r{k}"
            control(b, "CTRL", {"transition": "start", "args": {"run_id": run_id}})
            control(a, "CTRL", {"transition": "start", "args": {"run_id": run_id}})
            send_udp(a, listen, n)
            total = sum((20, 7)[: k + 1])
            await wait_for(lambda t=total: a.status()["receivers"]["in"]["records"] == t, 20, "UDP")
            control(a, "CTRL", {"transition": "stop"})
            control(b, "CTRL", {"transition": "stop"})
            sent, got = a.status()["last_run"], b.status()["last_run"]
            assert (sent["condition"], got["condition"]) == ("GOOD", "GOOD"), (sent, got)
            assert got["records"] == {"daqd.pub": n}
            assert sent["accounting"]["publishers"]["pub"]["delivered"] == n

        # an offer of another sender of the group: counted, not connected
        me = {"host": "Other.x", "group": GROUP}
        await ask(probe, "chirp_open")
        await ask(probe, "send", type="OFFER", service="DATA", port=4999, **me)
        await wait_for(
            lambda: rx().get("extra", {}).get("offers_not_wanted", 0) >= 1, 20, "the count"
        )
        assert sorted(rx()["addresses"]) == ["discovered daqd.pub"]

        assert a.stop() == 0  # DEPARTs: the link goes
        await wait_for(lambda: not rx()["addresses"], 20, "the link closed")
        assert rx()["state"] == "running"
        assert rx()["extra"]["offers_taken"] == 1
    finally:
        await probe.stop()
        a.stop()
        b.stop()


CHAIN_SCRIPT = str(Path(__file__).with_name("constellation_chain.py"))
TX = "PyRandomTransmitter.tx"


@pytest.fixture(scope="session")
def constellation_python() -> str:
    return str(peer_python("constellation"))


@needs_netns
@pytest.mark.slow
@pytest.mark.interop
async def test_real_transmitter_daqd_devnull_receiver_chain(
    constellation_python: str, tmp_path: Path
) -> None:
    """A real ScriptableController finds daqd, a real SatellitePyRandomTransmitter (its own
    process) and a PyDevNullReceiver in one group and takes all three through initialize ->
    launch -> start -> stop (two runs) -> land -> launch; daqd's receiver and publisher come from the controller's
    map, daqd receives the transmitter's data by CHIRP discovery and the DevNullReceiver finds
    daqd's publisher by CHIRP: every run GOOD on every side, the record counts equal. A garbage
    CSCP request comes first. In a third run the transmitter is killed: its DYNAMIC role makes
    daqd interrupt to SAFE and mark the run DEGRADED with the reason."""
    config = f"""
[daemon]
name = "chain"
drain_timeout_s = 5

[constellation]
group = "{GROUP}"
interface = ["lo"]
"""
    daqd = IsolatedDaqd(tmp_path, config, "chain")
    tx_bin = str(Path(constellation_python).with_name("SatellitePyRandomTransmitter"))
    tx_log = open(tmp_path / "tx.log", "wb")  # noqa: SIM115 (closed below)
    tx = subprocess.Popen(
        daqd.in_namespace(tx_bin, "-g", GROUP, "-n", "tx", "-i", "lo", "-l", "WARNING"),
        stdout=tx_log,
        stderr=subprocess.STDOUT,
    )
    daqd_map = {
        "_autonomy": {"role": "DYNAMIC"},
        # as a controller's file can give them: a map of name -> table (no arrays of tables)
        "receiver": {
            "rx": {
                "type": "cdtp",
                "discover": True,
                "receive_from": [TX],
                "eor_timeout_s": 3,
                "publish_to": ["pub"],
            }
        },
        "publisher": {"pub": {"type": "cdtp", "endpoint": "tcp://127.0.0.1:0"}},
    }
    settings = {
        "group": GROUP,
        "daqd": "chain",
        "tx": "tx",
        "cmd_port": daqd.cmd_port,
        "sender": "daqd.pub",
        "records": 2000,
        "runs": ["run1", "run2", "run3"],
        "land_after": "run2",
        "kill_in": "run3",
        "tx_config": {
            "block_size": 64,
            "_autonomy": {"role": "DYNAMIC", "max_heartbeat_interval": 1},
        },
        "daqd_config": daqd_map,
    }
    began = time.monotonic()
    driver = await Proc.start(
        *daqd.in_namespace(constellation_python, CHAIN_SCRIPT), stdin_json=settings
    )
    try:
        out = await driver.line(timeout_s=60)
        assert out["garbage"][0][0] == "ERROR", out  # not CSCP: answered, and it goes on
        assert out["garbage"][1] == ["SUCCESS", "INIT"], out
        out = await driver.line(timeout_s=180)
        assert out["initialize"] == {"tx": True, "null": True, "daqd": True}, out
        assert set(out["states"].values()) == {"ORBIT"}, out
        assert sorted(daqd.status()["receivers"]) == ["rx"]

        counts = []
        for run_id in ("run1", "run2"):
            out = await driver.line(timeout_s=180)
            assert out["run"] == run_id, out
            assert set(out["states"].values()) == {"ORBIT"}, out
            status = daqd.status()
            last = status["last_run"]
            assert (last["run_id"], last["condition"]) == (run_id, "GOOD"), last
            n = last["records"][TX]
            assert n >= settings["records"]
            # the transmitter's own EOR (condition GOOD, data_records = the last seq) as daqd saw it
            sender = status["receivers"]["rx"]["extra"]["senders"][TX]
            assert (sender["run_id"], sender["condition"], sender["seq"]) == (run_id, "GOOD", n)
            assert (sender["records"], sender["missed"]) == (n, 0)
            assert last["accounting"]["publishers"]["pub"]["delivered"] == n
            # the DevNullReceiver: daqd's EOR GOOD, every record, none missed
            assert out["eors"] == [["daqd.pub", "GOOD", n]], out
            assert out["null"] == ["EOR_RECEIVED", n, 0], out
            counts.append(n)
            if run_id == "run2":  # land all three, launch again: run3 is found again by CHIRP
                out = await driver.line(timeout_s=180)
                assert set(out["landed"].values()) == {"INIT"}, out
                assert set(out["states"].values()) == {"ORBIT"}, out
            await driver.say("go")

        out = await driver.line(timeout_s=180)
        assert out == {"running": "run3"}
        before = sum(counts)  # what came after the relaunch: run3's, from the rediscovered sender
        await wait_for(
            lambda: daqd.status()["receivers"]["rx"]["records"] > before + 100,
            60,
            "data of run3",
        )
        killed = time.monotonic()
        tx.kill()
        tx.wait(30)
        await wait_for(lambda: daqd.status()["state"] == "SAFE", 60, "daqd interrupted to SAFE")
        acted_s = time.monotonic() - killed
        await driver.say("go")
        out = await driver.line(timeout_s=120)
        status = daqd.status()
        seen = status["constellation"]
        assert seen["remote_heartbeats"][TX]["state"] == "DEAD"
        # (the DevNullReceiver's own interrupt, SAFE with a DYNAMIC role, may count here too)
        assert seen["autonomy_interrupts"] >= 1 and seen["autonomy_marks"] == 1, seen
        assert f"{TX} shows no signs of life" in seen["status"]
        last = status["last_run"]
        assert last["run_id"] == "run3" and last["records"][TX] > 100, last
        flags = set(last["condition"].split("|"))
        assert {"INTERRUPTED", "DEGRADED"} <= flags, last
        assert f"marked constellation.peer_lost:{TX} -> DEGRADED" in last["reasons"], last
        # what daqd took of the transmitter before it died went on to the DevNullReceiver
        assert last["accounting"]["publishers"]["pub"]["delivered"] == last["records"][TX]
        assert out["killed_run"] == "run3"
        assert [e[0] for e in out["eors"]] == ["daqd.pub"]
        assert out["eors"][0][1] != "GOOD"
        print(
            f"chain test: {time.monotonic() - began:.1f} s in all; records per GOOD run {counts}; "
            f"daqd acted {acted_s:.1f} s after the kill; run3 {last['condition']}"
        )
        assert (await driver.line(timeout_s=60)) == {"done": True}
    finally:
        await driver.stop()
        if tx.poll() is None:
            tx.kill()
            tx.wait()
        tx_log.close()
        daqd.stop()
