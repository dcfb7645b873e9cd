"""daqd as a Constellation satellite, against the real constellationdaq 1.0.2 controller.

Each test makes its own network namespace (`unshare -n`, then `ip link set lo up`) for `daqd serve`,
so that CHIRP's multicast on port 7123 never leaves the test; the peer joins that namespace with
`nsenter --net=/proc/<daqd pid>/ns/net`. daqctl still reaches daqd through its IPC control socket,
which is a file and so crosses network namespaces: the tests use it to check what daqd itself says
beside what the controller sees.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from daqd.config import parse_config
from daqd.control_client import ControlClient
from daqd.errors import ConfigError, ControlError
from daqd.protocols import chirp
from tests.conftest import DAQD, wait_for, wait_until
from tests.peers import peer_python
from tests.test_cdtp import Proc

PEER_SCRIPT = str(Path(__file__).with_name("constellation_peer.py"))
GROUP = "edda"


def _namespaces_permitted() -> str | None:
    """None if this process may make a network namespace with a working lo, else why not."""
    if not shutil.which("unshare") or not shutil.which("nsenter") or not shutil.which("ip"):
        return "unshare, nsenter or ip is not installed"
    probe = subprocess.run(
        ["unshare", "-n", "ip", "link", "set", "lo", "up"], capture_output=True, text=True
    )
    if probe.returncode != 0:
        return f"network namespaces are not permitted here: {probe.stderr.strip()}"
    return None


NO_NAMESPACES = _namespaces_permitted()
needs_netns = pytest.mark.skipif(NO_NAMESPACES is not None, reason=str(NO_NAMESPACES))


class IsolatedDaqd:
    """`daqd serve` alone in a fresh network namespace, with its control socket in `runtime`."""

    def __init__(self, tmp: Path, config: str, name: str, netns_pid: int | None = None) -> None:
        self.runtime = tmp / "run"
        self.runtime.mkdir()
        self.name = name
        self.config_path = tmp / f"{name}.toml"
        self.config_path.write_text(config)
        self.log_path = tmp / f"{name}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (closed in stop)
        # unshare and sh exec (or nsenter into the namespace of `netns_pid`): the pid is daqd's,
        # and /proc/<pid>/ns/net its namespace
        serve = f'exec "{DAQD}" serve "{self.config_path}"'
        if netns_pid is None:
            argv = ["unshare", "-n", "sh", "-c", f"ip link set lo up && {serve}"]
        else:
            argv = ["nsenter", f"--net=/proc/{netns_pid}/ns/net", "sh", "-c", serve]
        self.proc = subprocess.Popen(
            argv,
            env=self._env(),
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self.cmd_port = int(wait_until(self._port, 30.0, "the satellite's control port"))

    def _env(self) -> dict[str, str]:
        env = {**os.environ, "RUNTIME_DIRECTORY": str(self.runtime)}
        env.pop("NOTIFY_SOCKET", None)
        env.pop("DAQD_NAME", None)
        return env

    def _port(self) -> int | None:
        if self.proc.poll() is not None:
            raise AssertionError(f"daqd exited with {self.proc.returncode}:\n{self.log()}")
        found = re.search(r"control port (\d+)", self.log())
        return int(found.group(1)) if found else None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def status(self) -> dict[str, Any]:
        with ControlClient(f"ipc://{self.runtime}/{self.name}.ctl", timeout_s=10.0) as c:
            result: dict[str, Any] = c.request("STAT", {})
        return result

    def in_namespace(self, *argv: str) -> list[str]:
        return ["nsenter", f"--net=/proc/{self.proc.pid}/ns/net", *argv]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(30)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"daqd did not stop within 30 s of SIGTERM:\n{self.log()}"
            ) from None
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self._log.close()
        return rc


def satellite_config(tmp: Path, name: str, extra: str = "") -> str:
    return f"""
[daemon]
name = "{name}"
drain_timeout_s = 5

[[receiver]]
type = "slowsignal"
name = "ss"
listen = "127.0.0.1:0"
format = "record"
publish_to = ["disk"]

[[publisher]]
type = "file"
name = "disk"
directory = "{tmp / "data"}"

[constellation]
group = "{GROUP}"
interface = ["lo"]
{extra}
"""


@pytest.fixture
def isolated(tmp_path: Path) -> Iterator[IsolatedDaqd]:
    daqd = IsolatedDaqd(tmp_path, satellite_config(tmp_path, "sat1"), "sat1")
    try:
        yield daqd
    finally:
        daqd.stop()


@pytest.fixture(scope="session")
def peer() -> str:
    return str(peer_python("constellation"))


# ----- settings ------------------------------------------------------------------------------
def test_constellation_table_is_checked() -> None:
    base = '[daemon]\nname = "d1"\n'
    config = parse_config(base + '[constellation]\ngroup = "edda"\ninterface = ["lo"]\n')
    assert config.constellation is not None
    assert config.constellation.group == "edda" and config.constellation.interface == ["lo"]
    assert config.constellation.cmd_port == 0 and config.constellation.wait_for_controller
    assert parse_config(base).constellation is None
    with pytest.raises(ConfigError, match=r"\[constellation\].*group"):
        parse_config(base + "[constellation]\n")
    with pytest.raises(ConfigError, match=r"\[constellation\].*cmd_port"):
        parse_config(base + '[constellation]\ngroup = "g"\ncmd_port = 70000\n')
    with pytest.raises(ConfigError, match=r"not a Constellation name"):
        parse_config('[daemon]\nname = "a.b"\n[constellation]\ngroup = "g"\n')
    assert parse_config(
        '[daemon]\nname = "a.b"\n[constellation]\ngroup = "g"\nname = "ab"\n'
    ).constellation


def test_daqd_check_validates_the_table(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[daemon]\nname = "d1"\n[constellation]\ngroup = "g"\nname = "x.y"\n')
    out = subprocess.run([DAQD, "check", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert "[constellation]" in out.stdout + out.stderr and "name" in out.stdout + out.stderr


# ----- the real controller -------------------------------------------------------------------
@pytest.mark.interop
@needs_netns
async def test_real_controller_drives_daqd_after_garbage(peer: str, isolated: IsolatedDaqd) -> None:
    assert isolated.status()["state"] == "INIT"  # waits for the controller's initialize
    proc = await Proc.start(
        *isolated.in_namespace(peer, PEER_SCRIPT),
        stdin_json={"group": GROUP, "name": "sat1", "cmd_port": isolated.cmd_port, "run_id": "r_1"},
    )
    try:
        replies = (await proc.line())["garbage"]
        kinds = [r[0] for r in replies]
        assert kinds == [
            "ERROR",  # one frame
            "ERROR",  # not msgpack
            "ERROR",  # four frames
            "INVALID",  # a reply type sent as a request
            "UNKNOWN",  # no such command
            "INCOMPLETE",  # start with an int
            "INCOMPLETE",  # start with a run id the spec refuses
            "INCOMPLETE",  # get_name with a payload
            "INVALID",  # land in INIT
            "SUCCESS",  # GET_STATE in capitals: still served after all that
        ], replies
        assert replies[4][1] == "Unknown command: no_such_command"
        assert replies[6][1].startswith("Wrong argument:")
        assert replies[8][1].startswith("Transition not allowed")
        assert replies[9][1:3] == ["INIT", 0x20]
        assert replies[9][3] == ["last_changed", "last_changed_iso"]
        # each counted by reason, and daqctl status shows it
        seen = isolated.status()["constellation"]
        assert seen["errors"] == {
            "cscp_malformed": 3,
            "cscp_not_request": 1,
            "cscp_unknown": 1,
            "cscp_wrong_argument": 3,
        }
        assert seen["requests"] == 10 and seen["name"] == "Daqd.sat1"

        found = await proc.line()
        got = found["found"]
        assert found["states"] == {"Daqd.sat1": "INIT"}  # from its heartbeats
        assert got["get_name"][0] == "Daqd.sat1"
        assert got["get_state"][:2] == ["INIT", 0x20]
        commands = got["get_commands"][1]
        for name in ("get_name", "get_state", "get_status", "get_config", "get_run_id",
                     "get_version", "get_role", "get_commands", "initialize", "launch", "land",
                     "start", "stop", "shutdown", "ss_pause", "ss_resume", "ss_stats"):  # fmt: skip
            assert name in commands, name
        assert all(d.endswith(("No arguments.",)) or "Arguments:" in d for d in commands.values())
        assert got["get_role"][:2] == ["DYNAMIC", 6]

        expected = {
            "initialize": "INIT",
            "launch": "ORBIT",
            "start": "RUN",
            "stop": "ORBIT",
            "land": "INIT",
        }
        for step, state in expected.items():
            line = await proc.line()
            assert line["step"] == step
            assert line["reply"] == [True, "transitioning", step]
            assert line["state"] == state  # the controller's await_state ended there
            status = isolated.status()  # daqctl's view of the same daemon
            assert status["state"] == state
            if step == "initialize":
                assert line["config"] == {"_autonomy": {"role": "TRANSIENT"}, "answer": 42}
                assert line["role"] == ["TRANSIENT", 4]
            if step == "start":
                assert line["run_id"] == "r_1"
                assert status["run"]["run_id"] == "r_1"
            if step == "stop":
                assert status["run"] is None
                assert status["last_run"]["run_id"] == "r_1"
                assert status["last_run"]["condition"] == "GOOD"
                assert line["status"] == "run r_1 ended GOOD"
            await proc.say("go")
        bad = await proc.line()
        assert bad["bad_start"][0] is False  # the controller reports the refusal
        assert (await proc.line())["done"] is True
        assert await proc.end() == 0
    finally:
        await proc.stop()
    assert isolated.status()["state"] == "INIT"
    assert isolated.stop() == 0
    log = isolated.log()
    assert "Traceback" not in log
    assert "CSCP: malformed request" in log  # counted and logged, rate-limited


@pytest.mark.interop
@needs_netns
async def test_real_listener_gets_logs_and_metrics(peer: str, isolated: IsolatedDaqd) -> None:
    """constellationdaq's own monitoring listener finds daqd's CMDP by CHIRP and receives its
    metrics, the lists of metrics and log components it asked for, and daqd's log lines."""
    proc = await Proc.start(
        *isolated.in_namespace(peer, PEER_SCRIPT),
        stdin_json={
            "mode": "listen",
            "group": GROUP,
            "until": "transition launch",
            "metrics": ["STATE", "RUN_ID", "RX_RECORDS", "TX_RECORDS", "DROPPED"],
        },
    )
    try:
        ready = (await proc.line())["ready"]
        assert {"STATE", "RUN_ID", "RX_RECORDS", "TX_RECORDS", "DROPPED"} <= set(ready), ready
        assert control(isolated, "CTRL", {"transition": "launch"})["state"] == "ORBIT"
        out = await proc.line()
    finally:
        await proc.stop()
    lines = [line for line in out["logs"] if "transition launch" in line[3]]
    assert lines == [["Daqd.sat1", "INFO", "RUNSTATE", "transition launch: INIT -> launching"]]
    assert all(line[0] == "Daqd.sat1" and line[1] in ("INFO", "WARNING") for line in out["logs"])
    metrics = out["metrics"]
    assert metrics["RX_RECORDS"] == ["Daqd.sat1", 0, "records"]
    assert metrics["STATE"][1] in (0x20, 0x30)
    assert "RX_RECORDS" in out["notifications"]["STAT"]
    assert "RUNSTATE" in out["notifications"]["LOG"]


DATA_CONFIG = """
[daemon]
name = "sat2"
drain_timeout_s = 5

[[receiver]]
type = "udp"
name = "raw"
listen = "127.0.0.1:17001"   # the test's own network namespace: no port is taken
publish_to = ["pub"]

[[publisher]]
type = "cdtp"
name = "pub"
endpoint = "tcp://127.0.0.1:0"

[constellation]
group = "edda"
interface = ["lo"]
"""


@pytest.mark.interop
@needs_netns
async def test_real_receiver_satellite_finds_our_cdtp_publisher(peer: str, tmp_path: Path) -> None:
    """A Constellation receiver satellite (constellationdaq's ReceiverSatellite) told to receive
    from `daqd.pub` finds our CDTP publisher by its CHIRP DATA offer; the real controller runs both
    through a run, and every datagram daqd received arrives there, in order, with BOR and EOR."""
    daqd = IsolatedDaqd(tmp_path, DATA_CONFIG, "sat2")
    try:
        proc = await Proc.start(
            *daqd.in_namespace(peer, PEER_SCRIPT),
            stdin_json={
                "mode": "receive",
                "group": GROUP,
                "name": "sat2",
                "sender": "daqd.pub",
                "udp_port": 17001,
                "count": 50,
            },
        )
        try:
            out = await proc.line(timeout_s=120)
        finally:
            await proc.stop()
        assert out["bor"] == ["daqd.pub"]
        assert [r[1] for r in out["records"]] == list(range(1, 51))
        assert [r[2] for r in out["records"]] == [[(b"datagram %d" % k).hex()] for k in range(50)]
        assert out["eor"] == [["daqd.pub", "GOOD"]]
        assert set(out["states"].values()) == {"ORBIT"}
        last = daqd.status()["last_run"]
        assert last["run_id"] == "run_x" and last["condition"] == "GOOD"
        assert last["accounting"]["publishers"]["pub"]["delivered"] == 50
    finally:
        daqd.stop()


# ----- CHIRP, CHP and the commands, seen by a scripted client in the namespace ---------------
PROBE_SCRIPT = str(Path(__file__).with_name("constellation_probe.py"))


async def ask(proc: Proc, op: str, **args: Any) -> Any:
    await proc.say(json.dumps({"op": op, **args}))
    return await proc.line()


async def until(proc: Proc, port: int, command: str, want: Any, timeout_s: float = 20.0) -> Any:
    """Ask `command` over CSCP until its payload is `want` (the beacons are UDP: give them time)."""
    deadline = time.monotonic() + timeout_s
    while True:
        reply = await ask(proc, "cscp", port=port, command=command)
        if reply["payload"] == want or time.monotonic() > deadline:
            return reply
        await asyncio.sleep(0.05)


def control(daqd: IsolatedDaqd, code: str, args: dict[str, Any]) -> Any:
    with ControlClient(f"ipc://{daqd.runtime}/{daqd.name}.ctl", timeout_s=10.0) as c:
        return c.request(code, args)


@needs_netns
async def test_beacons_registry_heartbeats_and_commands(isolated: IsolatedDaqd) -> None:
    hb_port = int(re.search(r"heartbeat port (\d+)", isolated.log()).group(1))  # type: ignore[union-attr]
    port = isolated.cmd_port
    probe = await Proc.start(*isolated.in_namespace(sys.executable, PROBE_SCRIPT))
    try:
        await ask(probe, "chirp_open")
        # a REQUEST is answered by an OFFER of that service, from the UDP source address
        me = {"host": "Probe.p1", "group": GROUP}
        await ask(probe, "send", type="REQUEST", service="CONTROL", port=0, **me)
        await ask(probe, "send", type="REQUEST", service="HEARTBEAT", port=0, **me)
        offers = await ask(
            probe, "expect_beacon", sender="Daqd.sat1", type="OFFER",
            services=["CONTROL", "HEARTBEAT"], timeout=20,
        )  # fmt: skip
        assert "timeout" not in offers, offers
        assert offers["got"]["CONTROL"]["port"] == port
        assert offers["got"]["HEARTBEAT"]["port"] == hb_port
        assert offers["got"]["CONTROL"]["address"] == "127.0.0.1"
        services = await ask(probe, "cscp", port=port, command="_get_services")
        mon_port = int(re.search(r"monitoring port (\d+)", isolated.log()).group(1))  # type: ignore[union-attr]
        assert services["payload"] == {
            "CONTROL": port,
            "HEARTBEAT": hb_port,
            "MONITORING": mon_port,
        }

        # the registry: offers of its group are kept (a new port replaces the old), departures
        # remove them; another group, a bad beacon and its own beacons are not in it
        p1 = str(uuid.UUID(bytes=chirp.name_uuid("Probe.p1")))
        await ask(probe, "send_raw", hex=(b"CHIRP\x01\x02" + bytes(34)).hex())  # 41 bytes
        await ask(probe, "send", type="OFFER", service="DATA", port=4343, host="P.x", group="other")
        await ask(probe, "send", type="OFFER", service="DATA", port=4242, **me)
        got = await until(probe, port, "_get_remotes", {p1: {"DATA": "tcp://127.0.0.1:4242"}})
        assert got["payload"] == {p1: {"DATA": "tcp://127.0.0.1:4242"}}
        await ask(probe, "send", type="OFFER", service="DATA", port=4244, **me)
        got = await until(probe, port, "_get_remotes", {p1: {"DATA": "tcp://127.0.0.1:4244"}})
        assert got["payload"] == {p1: {"DATA": "tcp://127.0.0.1:4244"}}
        await ask(probe, "send", type="DEPART", service="DATA", port=4244, **me)
        assert (await until(probe, port, "_get_remotes", {}))["payload"] == {}

        # heartbeats: state, role flags (DYNAMIC = 6), the interval for one subscriber
        await ask(probe, "chp_subscribe", port=hb_port)
        first = await ask(probe, "chp_collect", until_state=0x20, timeout=20)
        assert "timeout" not in first, first
        sender, state, flags, interval, _, _ = first["beats"][-1]
        assert (sender, state, flags & 0x7F, interval) == ("Daqd.sat1", 0x20, 6, 500)
        # a transition driven by daqctl: an extrasystole for launching and for ORBIT
        await probe.say(json.dumps({"op": "chp_collect", "until_state": 0x30, "timeout": 20}))
        assert control(isolated, "CTRL", {"transition": "launch"})["state"] == "ORBIT"
        beats = (await probe.line())["beats"]
        extrasystoles = [(b[1], b[4]) for b in beats if b[2] & 0x80]
        assert [s for s, _ in extrasystoles] == [0x23, 0x30], beats
        assert all(status is not None for _, status in extrasystoles)

        # peers that vanish: a controller gone before its reply, a heartbeat subscriber gone;
        # the satellite keeps answering and beating
        served = isolated.status()["constellation"]["requests"]
        for _ in range(3):
            await ask(probe, "cscp_abandon", port=port, command="get_state")
        await ask(probe, "chp_drop")
        assert (await ask(probe, "cscp", port=port, command="get_name"))["text"] == "Daqd.sat1"
        await wait_for(
            lambda: isolated.status()["constellation"]["requests"] == served + 4,
            20,
            "the three abandoned requests and get_name to be served",
        )
        await ask(probe, "chp_subscribe", port=hb_port)
        again = await ask(probe, "chp_collect", until_state=0x30, timeout=20)
        assert "timeout" not in again, again

        # receivers' commands, case-insensitive, with the spec's argument checks
        paused = await ask(probe, "cscp", port=port, command="ss_pause")
        assert (paused["type"], paused["payload"]) == ("SUCCESS", {"paused": True})
        stats = control(isolated, "CMD ", {"target": "ss", "name": "stats"})
        assert stats["paused"] is True  # daqctl cmd ss stats sees what the controller did
        stats = await ask(probe, "cscp", port=port, command="SS_STATS")
        assert stats["type"] == "SUCCESS" and stats["payload"]["paused"] is True
        wrong = await ask(probe, "cscp", port=port, command="ss_resume", payload=[1, 2])
        assert wrong["type"] == "INCOMPLETE" and wrong["text"].startswith("Wrong argument")
        refused = await ask(probe, "cscp", port=port, command="shutdown")
        assert refused["type"] == "INVALID"  # not in ORBIT

        # interrupt to SAFE, then shutdown: the process ends and DEPARTs its services
        interrupt = await ask(probe, "cscp", port=port, command="_interrupt")
        assert (interrupt["type"], interrupt["payload"]) == ("SUCCESS", "interrupt")
        await ask(probe, "chp_collect", until_state=0xE0, timeout=20)
        assert isolated.status()["state"] == "SAFE"
        bye = await ask(probe, "cscp", port=port, command="shutdown")
        assert (bye["type"], bye["text"]) == ("SUCCESS", "Daqd.sat1 queued for reentry")
        departs = await ask(
            probe, "expect_beacon", sender="Daqd.sat1", type="DEPART",
            services=["CONTROL", "HEARTBEAT"], timeout=30,
        )  # fmt: skip
        assert "timeout" not in departs, departs
        assert departs["got"]["CONTROL"]["port"] == port
        assert await asyncio.to_thread(isolated.proc.wait, 30) == 0
    finally:
        await probe.stop()
    assert "Traceback" not in isolated.log()


@needs_netns
async def test_autonomy_interrupts_when_a_satellite_fails(isolated: IsolatedDaqd) -> None:
    """CHP's rules by the failed satellite's flags: a TRANSIENT one (MARK_DEGRADED) in ERROR
    during a run marks the run DEGRADED with a named reason and does not interrupt; a DYNAMIC one
    (TRIGGER_INTERRUPT too) in ERROR interrupts daqd to SAFE; one that falls silent in a run
    interrupts it and the run ends INTERRUPTED and DEGRADED, the reason listed."""
    probe = await Proc.start(*isolated.in_namespace(sys.executable, PROBE_SCRIPT))

    def remote(name: str) -> Any:
        return isolated.status()["constellation"]["remote_heartbeats"].get(name)

    def state_is(name: str, state: str) -> Any:
        return lambda: (remote(name) or {}).get("state") == state

    try:
        await ask(probe, "chirp_open")
        await ask(probe, "fake", name="Fake.t1", group=GROUP, interval_ms=300, flags=4, state=0x30)
        await ask(probe, "fake", name="Fake.d1", group=GROUP, interval_ms=300, flags=6, state=0x30)
        await wait_for(state_is("Fake.t1", "ORBIT"), 20, "Fake.t1's heartbeats")
        await wait_for(state_is("Fake.d1", "ORBIT"), 20, "Fake.d1's heartbeats")
        assert control(isolated, "CTRL", {"transition": "launch"})["state"] == "ORBIT"
        control(isolated, "CTRL", {"transition": "start", "args": {"run_id": "r1"}})

        await ask(probe, "fake_set", name="Fake.t1", state=0xF0)  # TRANSIENT: the run is marked
        await wait_for(
            lambda: isolated.status()["constellation"]["autonomy_marks"] == 1, 20, "a mark"
        )
        seen = isolated.status()
        assert seen["state"] == "RUN"
        assert seen["constellation"]["autonomy_interrupts"] == 0
        assert seen["constellation"]["status"] == (
            "run r1 marked DEGRADED: constellation.peer_failed:Fake.t1"
        )
        control(isolated, "CTRL", {"transition": "stop"})
        last = isolated.status()["last_run"]
        assert last["condition"] == "DEGRADED", last
        assert last["reasons"] == ["marked constellation.peer_failed:Fake.t1 -> DEGRADED"]
        assert last["accounting"]["marked"] == {"constellation.peer_failed:Fake.t1": 1}

        await ask(probe, "fake_set", name="Fake.d1", state=0xF0)  # DYNAMIC: interrupt
        await wait_for(lambda: isolated.status()["state"] == "SAFE", 20, "daqd in SAFE")
        seen = isolated.status()["constellation"]
        assert seen["autonomy_interrupts"] == 1
        assert seen["autonomy_marks"] == 1  # no run to mark
        assert seen["status"] == "interrupted (Fake.d1 reports ERROR): interrupt done"

        # well again, daqd back to ORBIT and in a run; then Fake.d1 falls silent: DEAD after 3
        # lives, the run marked and interrupted
        await ask(probe, "fake_set", name="Fake.d1", state=0x30)
        await wait_for(state_is("Fake.d1", "ORBIT"), 20, "Fake.d1 well again")
        for step in ("initialize", "launch"):
            control(isolated, "CTRL", {"transition": step})
        control(isolated, "CTRL", {"transition": "start", "args": {"run_id": "r2"}})
        assert isolated.status()["state"] == "RUN"
        await ask(probe, "fake_set", name="Fake.d1", sending=False)
        await wait_for(lambda: isolated.status()["state"] == "SAFE", 30, "daqd in SAFE again")
        seen = isolated.status()
        assert seen["constellation"]["autonomy_interrupts"] == 2
        assert seen["constellation"]["autonomy_marks"] == 2
        assert seen["constellation"]["remote_heartbeats"]["Fake.d1"]["state"] == "DEAD"
        assert "Fake.d1 shows no signs of life" in seen["constellation"]["status"]
        last = seen["last_run"]
        assert last["run_id"] == "r2"
        assert last["condition"] == "INTERRUPTED|DEGRADED", last
        assert "marked constellation.peer_lost:Fake.d1 -> DEGRADED" in last["reasons"]
    finally:
        await probe.stop()


@needs_netns
async def test_fuzzed_requests_and_beacons_leave_it_serving(tmp_path: Path) -> None:
    """Hundreds of random CSCP requests each get a reply of a CSCP type, random datagrams on the
    CHIRP port are counted; the satellite still answers and still offers. Also: with
    wait_for_controller = false daqd stays in ORBIT."""
    config = satellite_config(tmp_path, "sat3", "wait_for_controller = false")
    daqd = IsolatedDaqd(tmp_path, config, "sat3")
    probe = await Proc.start(*daqd.in_namespace(sys.executable, PROBE_SCRIPT))
    try:
        assert daqd.status()["state"] == "ORBIT"
        port = daqd.cmd_port
        fuzz = await ask(probe, "fuzz_cscp", port=port, count=400, seed=7)
        assert fuzz["lost"] == 0
        assert sum(fuzz["kinds"].values()) == 400
        assert set(fuzz["kinds"]) <= {"SUCCESS", "ERROR", "INVALID", "INCOMPLETE", "UNKNOWN"}
        assert fuzz["kinds"]["ERROR"] > 100  # most random frames are not CSCP at all
        await ask(probe, "chirp_open")
        await ask(probe, "fuzz_chirp", count=300, seed=11)
        await wait_for(
            lambda: daqd.status()["constellation"]["errors"].get("chirp_malformed", 0) >= 250,
            20,
            "the malformed beacons to be counted",
        )
        reply = await ask(probe, "cscp", port=port, command="get_state")
        assert reply["type"] == "SUCCESS" and reply["text"] in ("ORBIT", "RUN")
        reply = await ask(probe, "cscp", port=port, command="get_cnstln_version")
        assert (reply["type"], reply["text"]) == ("SUCCESS", "1.0.2")
        hidden = await ask(probe, "cscp", port=port, command="_get_commands")
        assert set(hidden["payload"]) == {
            "_get_commands", "_interrupt", "_failure", "_get_services", "_get_remotes"
        }  # fmt: skip
        assert (await ask(probe, "cscp", port=port, command="_failure"))["type"] == "SUCCESS"
        assert daqd.status()["state"] == "ERROR"
        assert (await ask(probe, "cscp", port=port, command="initialize", payload={}))["type"] == (
            "SUCCESS"
        )
        await wait_for(lambda: daqd.status()["state"] == "INIT", 20, "INIT after ERROR")
        await ask(probe, "send", type="REQUEST", service="CONTROL", port=0, host="P.q", group=GROUP)
        offer = await ask(
            probe,
            "expect_beacon",
            sender="Daqd.sat3",
            type="OFFER",
            services=["CONTROL"],
            timeout=20,
        )
        assert offer["got"]["CONTROL"]["port"] == port
    finally:
        await probe.stop()
        daqd.stop()
    assert "Traceback" not in daqd.log()


@needs_netns
async def test_reconfigure_replaces_the_running_tables_in_orbit(tmp_path: Path) -> None:
    """CSCP reconfigure (ORBIT only): the map's receiver table replaces the running one, the
    untouched publisher keeps running; a bad map is INVALID naming the key and changes nothing;
    outside ORBIT it is refused; daqctl's CTRL 'reconfigure' without a file is refused."""
    config = satellite_config(tmp_path, "sat4", "wait_for_controller = false")
    daqd = IsolatedDaqd(tmp_path, config, "sat4")
    probe = await Proc.start(*daqd.in_namespace(sys.executable, PROBE_SCRIPT))
    port = daqd.cmd_port
    extra = {"type": "udp", "name": "extra", "listen": "127.0.0.1:0", "publish_to": ["disk"]}
    try:
        assert daqd.status()["state"] == "ORBIT"
        bad = {"receiver": {"extra": {**extra, "listen": "nowhere"}}}
        reply = await ask(probe, "cscp", port=port, command="reconfigure", payload=bad)
        assert reply["type"] == "INVALID" and 'key "listen"' in reply["text"], reply
        assert sorted(daqd.status()["receivers"]) == ["ss"]
        new = {"receiver": {"extra": extra}}
        reply = await ask(probe, "cscp", port=port, command="reconfigure", payload=new)
        assert (reply["type"], reply["text"]) == ("SUCCESS", "transitioning"), reply
        await wait_for(
            lambda: (
                sorted(daqd.status()["receivers"]) == ["extra"]
                and daqd.status()["state"] == "ORBIT"
            ),
            20,
            "the new receiver table running, back in ORBIT",
        )
        # the publisher, whose table did not change, kept running untouched
        assert "reconfigured: receiver extra, receiver ss\n" in daqd.log()
        udp = daqd.status()["receivers"]["extra"]
        assert udp["state"] == "running" and udp["addresses"]["listen"].startswith("127.0.0.1:")
        # the same map again: nothing changes, still SUCCESS
        reply = await ask(probe, "cscp", port=port, command="reconfigure", payload=new)
        assert reply["type"] == "SUCCESS"
        await wait_for(lambda: daqd.status()["state"] == "ORBIT", 20, "ORBIT again")
        with pytest.raises(ControlError, match="reconfigure needs a configuration"):
            control(daqd, "CTRL", {"transition": "reconfigure"})
        reply = await ask(probe, "cscp", port=port, command="land")
        await wait_for(lambda: daqd.status()["state"] == "INIT", 20, "INIT")
        reply = await ask(probe, "cscp", port=port, command="reconfigure", payload=new)
        assert reply["type"] == "INVALID" and "reconfigure in state INIT" in reply["text"], reply
        commands = await ask(probe, "cscp", port=port, command="get_commands")
        assert "reconfigure" in commands["payload"]
    finally:
        await probe.stop()
        daqd.stop()
    assert "Traceback" not in daqd.log()


@needs_netns
async def test_conditions_wait_for_other_satellites(isolated: IsolatedDaqd) -> None:
    """_conditions from initialize: launch waits until Fake.a1 is in ORBIT; start, waiting for a
    satellite that never comes, fails after transition_timeout into ERROR; initialize recovers."""
    probe = await Proc.start(*isolated.in_namespace(sys.executable, PROBE_SCRIPT))
    port = isolated.cmd_port

    def seen() -> dict[str, Any]:
        result: dict[str, Any] = isolated.status()["constellation"]
        return result

    try:
        await ask(probe, "chirp_open")
        await ask(probe, "fake", name="Fake.a1", group=GROUP, interval_ms=300, flags=4, state=0x20)
        await wait_for(lambda: "Fake.a1" in seen()["remote_heartbeats"], 20, "Fake.a1 followed")
        conditions = {
            "require_launching_after": ["Fake.a1"],
            "require_starting_after": ["Fake.nobody"],
            # long enough that a loaded machine still sees the launch waiting (and refuses a
            # second launch meanwhile) before the timeout could end the wait
            "transition_timeout": 5,
        }
        bad = await ask(
            probe, "cscp", port=port, command="initialize", payload={"_conditions": {"x": 1}}
        )
        assert bad["type"] == "INCOMPLETE" and "_conditions.x" in bad["text"]
        reply = await ask(
            probe, "cscp", port=port, command="initialize", payload={"_conditions": conditions}
        )
        assert reply["type"] == "SUCCESS"
        await wait_for(lambda: isolated.status()["state"] == "INIT", 20, "INIT")
        assert (await ask(probe, "cscp", port=port, command="launch"))["type"] == "SUCCESS"
        await wait_for(lambda: seen()["status"] == "launch: waiting for Fake.a1", 20, "waiting")
        assert isolated.status()["state"] == "INIT"  # held back while Fake.a1 is in INIT
        busy = await ask(probe, "cscp", port=port, command="launch")
        assert busy["type"] == "INVALID" and "under way" in busy["text"]
        await ask(probe, "fake_set", name="Fake.a1", state=0x30)
        await wait_for(lambda: isolated.status()["state"] == "ORBIT", 20, "ORBIT after Fake.a1")

        reply = await ask(probe, "cscp", port=port, command="start", payload="r9")
        assert reply["type"] == "SUCCESS"
        await wait_for(lambda: isolated.status()["state"] == "ERROR", 20, "ERROR after timeout")
        assert seen()["status"] == "start failed: not in RUN after 5 s: fake.nobody"
        never = {"require_launching_after": ["Fake.never"], "transition_timeout": 600}
        reply = await ask(
            probe, "cscp", port=port, command="initialize", payload={"_conditions": never}
        )
        assert reply["type"] == "SUCCESS"
        await wait_for(lambda: isolated.status()["state"] == "INIT", 20, "INIT from ERROR")
        assert (await ask(probe, "cscp", port=port, command="launch"))["type"] == "SUCCESS"
        await wait_for(lambda: seen()["status"] == "launch: waiting for Fake.never", 20, "waiting")
        # SIGTERM while a transition waits for another satellite: no wait for it
        began = time.monotonic()
        assert isolated.stop() == 0
        assert time.monotonic() - began < 20
    finally:
        await probe.stop()


def cdtp_publisher(name: str) -> str:
    return f"""
[[publisher]]
type = "cdtp"
name = "{name}"
endpoint = "tcp://127.0.0.1:0"
"""


@needs_netns
async def test_data_offers_follow_a_reload(tmp_path: Path) -> None:
    """SIGHUP replacing CDTP publisher pa by pb: DATA of daqd.pa departs, DATA of daqd.pb is
    offered on pb's port, and _get_services says so."""
    config = satellite_config(tmp_path, "sat4")
    daqd = IsolatedDaqd(tmp_path, config + cdtp_publisher("pa"), "sat4")
    probe = await Proc.start(*daqd.in_namespace(sys.executable, PROBE_SCRIPT))
    try:
        await ask(probe, "chirp_open")
        services = await ask(probe, "cscp", port=daqd.cmd_port, command="_get_services")
        pa = services["payload"]["DATA daqd.pa"]
        assert pa == int(daqd.status()["publishers"]["pa"]["addresses"]["endpoint"].split(":")[-1])
        daqd.config_path.write_text(config + cdtp_publisher("pb"))
        daqd.proc.send_signal(signal.SIGHUP)
        gone = await ask(
            probe, "expect_beacon", sender="daqd.pa", type="DEPART", services=["DATA"], timeout=20
        )
        assert gone["got"]["DATA"]["port"] == pa
        came = await ask(
            probe, "expect_beacon", sender="daqd.pb", type="OFFER", services=["DATA"], timeout=20
        )
        pb = int(daqd.status()["publishers"]["pb"]["addresses"]["endpoint"].split(":")[-1])
        assert came["got"]["DATA"]["port"] == pb
        services = await ask(probe, "cscp", port=daqd.cmd_port, command="_get_services")
        assert {k for k in services["payload"] if k.startswith("DATA")} == {"DATA daqd.pb"}
    finally:
        await probe.stop()
        assert daqd.stop() == 0


class Netns:
    """A network namespace held by a sleeping process, with lo up."""

    def __init__(self) -> None:
        self.holder = subprocess.Popen(
            ["unshare", "-n", "sh", "-c", "ip link set lo up && exec sleep 600"]
        )
        wait_until(self._lo_up, 10, "the namespace's lo")

    def _lo_up(self) -> bool:
        # until unshare has made the namespace, /proc/<pid>/ns/net is still the machine's own (and
        # its lo is up): anything run in it then would change the machine's network
        try:
            if os.readlink(f"/proc/{self.holder.pid}/ns/net") == os.readlink("/proc/self/ns/net"):
                return False
        except FileNotFoundError:
            raise AssertionError(f"unshare exited with {self.holder.wait()}") from None
        out = self.run("ip", "-o", "link", "show", "lo", check=False)
        return ",UP" in out.stdout

    def run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["nsenter", f"--net=/proc/{self.holder.pid}/ns/net", *argv],
            capture_output=True,
            text=True,
            check=check,
            timeout=30,
        )

    def wait_carrier(self, dev: str) -> None:
        wait_until(
            lambda: "LOWER_UP" in self.run("ip", "-o", "link", "show", dev).stdout,
            10,
            f"carrier on {dev}",
        )

    def argv(self, *argv: str) -> list[str]:
        return ["nsenter", f"--net=/proc/{self.holder.pid}/ns/net", *argv]

    def close(self) -> None:
        self.holder.kill()
        self.holder.wait()


@pytest.mark.interop
@needs_netns
async def test_real_controller_across_a_veth_link(peer: str, tmp_path: Path) -> None:
    """Two private namespaces joined by a veth pair (made inside them, never in the machine's
    own): daqd announces on its veth by interface name, the real controller in the other
    namespace finds it across the link and drives it through a run."""
    a, b = Netns(), Netns()
    try:
        a.run(
            "ip",
            "link",
            "add",
            "va",
            "type",
            "veth",
            "peer",
            "name",
            "vb",
            "netns",
            str(b.holder.pid),
        )
        a.run("ip", "addr", "add", "10.77.0.1/24", "dev", "va")
        a.run("ip", "link", "set", "va", "up")
        b.run("ip", "addr", "add", "10.77.0.2/24", "dev", "vb")
        b.run("ip", "link", "set", "vb", "up")
        a.wait_carrier("va")  # constellationdaq skips a link without carrier
        b.wait_carrier("vb")
        config = satellite_config(tmp_path, "sat5").replace(
            'interface = ["lo"]', 'interface = ["va"]'
        )
        daqd = IsolatedDaqd(tmp_path, config, "sat5", netns_pid=a.holder.pid)
        try:
            assert "announced on 10.77.0.1, 127.0.0.1" in daqd.log()
            proc = await Proc.start(
                *b.argv(peer, PEER_SCRIPT),
                stdin_json={
                    "group": GROUP,
                    "name": "sat5",
                    "cmd_port": daqd.cmd_port,
                    "run_id": "r_5",
                    "address": "10.77.0.1",
                    "interface": "vb",
                },
            )
            try:
                kinds = [r[0] for r in (await proc.line())["garbage"]]
                assert kinds[-1] == "SUCCESS" and kinds.count("ERROR") == 3
                found = await proc.line()
                assert found["found"]["get_name"][0] == "Daqd.sat5"
                for step, state in (
                    ("initialize", "INIT"),
                    ("launch", "ORBIT"),
                    ("start", "RUN"),
                    ("stop", "ORBIT"),
                    ("land", "INIT"),
                ):
                    line = await proc.line()
                    assert (line["step"], line["state"]) == (step, state)
                    assert daqd.status()["state"] == state
                    await proc.say("go")
                await proc.line()  # the refused bad start
                assert (await proc.line())["done"] is True
            finally:
                await proc.stop()
            assert daqd.status()["last_run"]["run_id"] == "r_5"
        finally:
            assert daqd.stop() == 0
    finally:
        a.close()
        b.close()
