"""Worker processes: the component side driven by a test controller, the parent side in a daemon."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq
import zmq.asyncio
from daqd.publishers.file import FilePublisher

from daqd.config import parse_config
from daqd.errors import ConfigError, ControlError
from daqd.host import Host
from daqd.protocols import iccp
from daqd.record import Record
from daqd.runfile import read_items, verify
from daqd.runstate import RunCondition
from daqd.worker import WorkerReceiver
from tests.conftest import DAQD, Daemon, wait_for, wait_until


@pytest.fixture
def short_dir(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="dqw", dir="/tmp"))
    monkeypatch.setenv("RUNTIME_DIRECTORY", str(path))
    yield path
    shutil.rmtree(path, ignore_errors=True)


class Controller:
    """The parent's side, written out by hand: PAIR for control, PULL for records."""

    def __init__(self, base: Path) -> None:
        self.ctx = zmq.asyncio.Context()
        self.ctl = self.ctx.socket(zmq.PAIR)
        self.ctl.bind(f"ipc://{base}/c.wctl")
        self.data = self.ctx.socket(zmq.PULL)
        self.data.bind(f"ipc://{base}/c.wdata")
        self.data_endpoint = f"ipc://{base}/c.wdata"
        self.proc: asyncio.subprocess.Process | None = None

    async def spawn(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            DAQD, "serve", "--controller", self.ctl.getsockopt_string(zmq.LAST_ENDPOINT)
        )

    async def send(self, message: iccp.Message) -> None:
        await self.ctl.send_multipart(iccp.encode(message))

    async def receive(self) -> iccp.Message:
        return iccp.decode(await asyncio.wait_for(self.ctl.recv_multipart(), 30))

    async def request(self, code: str, args: dict[str, Any]) -> iccp.Message:
        await self.send(iccp.Request(code, args))
        return await self.receive()

    async def record_or_mark(self) -> tuple[Any, list[bytes]]:
        frames = await asyncio.wait_for(self.data.recv_multipart(), 30)
        return msgpack.unpackb(frames[1] if not frames[0] else frames[0]), frames

    def close(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
        self.ctl.close(linger=0)
        self.data.close(linger=0)
        self.ctx.term()


@pytest.fixture
async def controller(short_dir: Path) -> AsyncIterator[Controller]:
    c = Controller(short_dir)
    yield c
    if c.proc is not None and c.proc.returncode is None:
        c.proc.kill()
        await c.proc.wait()
    c.close()


def udp_settings(**extra: Any) -> dict[str, Any]:
    return {"type": "udp", "name": "raw", "listen": "127.0.0.1:0", **extra}


async def test_component_ready_conf_records_run_marks_stop_finished(
    controller: Controller,
) -> None:
    await controller.spawn()
    ready = await controller.receive()
    assert isinstance(ready, iccp.Ready)
    assert controller.proc is not None and ready.pid == controller.proc.pid
    assert ready.version and ready.host == socket.gethostname()

    early = await controller.request("STAT", {})
    assert isinstance(early, iccp.Error) and "not configured yet" in early.message
    bad = await controller.request(
        "CONF", {"receiver": {"type": "nope", "name": "x"}, "data": controller.data_endpoint}
    )
    assert isinstance(bad, iccp.Error) and bad.message == "unknown receiver type 'nope'"
    invalid = await controller.request(
        "CONF", {"receiver": udp_settings(rcvbuf_bytes=-1), "data": controller.data_endpoint}
    )
    assert isinstance(invalid, iccp.Error) and "rcvbuf_bytes" in invalid.message

    ok = await controller.request(
        "CONF",
        {
            "receiver": udp_settings(),
            "daemon": {"name": "p.raw"},
            "data": controller.data_endpoint,
        },
    )
    assert isinstance(ok, iccp.Ok), ok
    host, port = ok.result["addresses"]["listen"].rsplit(":", 1)
    again = await controller.request("CONF", {"receiver": udp_settings(), "data": "x"})
    assert isinstance(again, iccp.Error) and "already configured" in again.message

    status = await controller.request("STAT", {})
    assert isinstance(status, iccp.Ok) and status.result["state"] == "ORBIT"
    await controller.ctl.send_multipart([b"\x00\x02", b"ST"])
    garbage = await controller.receive()
    assert isinstance(garbage, iccp.Error) and "code must be 4 bytes" in garbage.message

    started = await controller.request("CTRL", {"transition": "start", "args": {"run_id": "w1"}})
    assert isinstance(started, iccp.Ok) and started.result == {"state": "RUN"}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for i in range(10):
            s.sendto(b"d%02d" % i, (host, int(port)))
    seen = []
    for _ in range(10):
        header, frames = await controller.record_or_mark()
        source, seq, time_ns, tags = header
        assert source == "raw" and tags["peer"].startswith("127.0.0.1:") and time_ns > 0
        seen.append((seq, frames[1]))
    assert seen == [(i + 1, b"d%02d" % i) for i in range(10)]
    stopped = await controller.request("CTRL", {"transition": "stop"})
    assert isinstance(stopped, iccp.Ok) and stopped.result == {"state": "ORBIT"}
    mark, _ = await controller.record_or_mark()
    assert mark == {"mark": "end", "id": "w1"}

    unknown = await controller.request("CMD ", {"target": "raw", "name": "nope"})
    assert isinstance(unknown, iccp.Error) and "has no command 'nope'" in unknown.message

    await controller.send(iccp.Stop())
    mark, _ = await controller.record_or_mark()
    assert mark == {"mark": "finished"}
    finished = await controller.receive()
    assert finished == iccp.Finished(iccp.Outcome.OK, ("10 records sent",))
    assert await asyncio.wait_for(controller.proc.wait(), 30) == 0


async def test_component_stopped_before_conf_finishes_cleanly(controller: Controller) -> None:
    await controller.spawn()
    assert isinstance(await controller.receive(), iccp.Ready)
    await controller.send(iccp.Stop())
    assert await controller.receive() == iccp.Finished(iccp.Outcome.OK, ("not configured",))
    assert controller.proc is not None
    assert await asyncio.wait_for(controller.proc.wait(), 30) == 0


def host_config(extra: str = "") -> str:
    return (
        '[daemon]\nname = "par"\ndrain_timeout_s = 2\n'
        '[[receiver]]\ntype = "udp"\nname = "raw"\nlisten = "127.0.0.1:0"\nprocess = true\n' + extra
    )


async def test_parent_gives_up_on_a_worker_that_never_says_ready(
    short_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mute = [sys.executable, "-c", "import time; time.sleep(60)"]
    monkeypatch.setattr(WorkerReceiver, "worker_argv", lambda self, controller: mute)
    monkeypatch.setattr(WorkerReceiver, "start_timeout_s", 0.5)
    spawned = record_worker_pids(monkeypatch)
    host = Host(parse_config(host_config(), "<test>"))
    with pytest.raises(ConfigError, match=r"receiver 'raw' cannot start: worker sent no READY"):
        await host.start()
    assert len(spawned) == 1
    with pytest.raises(ProcessLookupError):
        os.kill(spawned[0], 0)  # killed and reaped, not left behind
    assert list(short_dir.glob("*.w*")) == []


async def test_parent_reports_a_worker_whose_receiver_cannot_start(short_dir: Path) -> None:
    taken = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    taken.bind(("127.0.0.1", 0))
    port = taken.getsockname()[1]
    try:
        config = host_config().replace('listen = "127.0.0.1:0"', f'listen = "127.0.0.1:{port}"')
        host = Host(parse_config(config, "<test>"))
        with pytest.raises(ConfigError, match=r"receiver 'raw' cannot start: .*in use"):
            await host.start()
    finally:
        taken.close()


DAEMON_CONFIG = """
[daemon]
name = "t"
drain_timeout_s = 5

[[receiver]]
type = "udp"
name = "raw"
listen = "127.0.0.1:0"
publish_to = ["disk"]
process = true

[[receiver]]
type = "slowsignal"
name = "ss"
listen = "127.0.0.1:0"
process = true

[[publisher]]
type = "file"
name = "disk"
directory = "{data}"
"""


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_daemon_runs_receivers_in_workers(daemon: Callable[..., Daemon], workdir: Path) -> None:
    d = daemon(DAEMON_CONFIG.format(data=workdir / "data"))
    status = d.status()
    raw = status["receivers"]["raw"]
    worker_pid = raw["worker"]["pid"]
    assert d.proc is not None and worker_pid != d.proc.pid and alive(worker_pid)
    assert raw["worker"]["running"] is True
    host, port = raw["addresses"]["listen"].rsplit(":", 1)

    result = d.ctl("cmd", "ss", "pause")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().replace(" ", "").replace("\n", "") == '{"paused":true}'
    result = d.ctl("cmd", "ss", "explode")
    assert result.returncode == 1 and "has no command 'explode'" in result.stderr

    assert d.ctl("start", "wr1").returncode == 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for i in range(300):
            s.sendto(b"w%03d" % i, (host, int(port)))
    wait_until(lambda: d.status()["receivers"]["raw"]["records"] == 300, what="300 records")
    result = d.ctl("stop")
    assert result.stdout.startswith("run wr1 ended: GOOD, 300 records"), result.stderr
    summary = wait_until(
        lambda: (s := verify(workdir / "data" / "run-wr1.daqd")).end is not None and s,
        what="the run file's end marker",
    )
    assert summary.records == {"raw": 300} and not summary.gaps
    assert summary.end is not None and summary.end["records"] == {"raw": 300}

    # A worker that dies is restarted by the receiver's supervisor, on the same settings.
    os.kill(worker_pid, signal.SIGKILL)

    def restarted() -> Any:
        r = d.status()["receivers"]["raw"]
        return r["state"] == "running" and r["worker"]["pid"] != worker_pid and r

    raw = wait_until(restarted, what="a new worker")
    # one crash, the kill; on a loaded machine a restart attempt may itself fail (no READY in
    # time) and be counted too: every crash counted is one logged, and none goes unlogged
    crashes = raw["errors"].get("crash", 0)
    assert crashes >= 1 and d.log().count("raw crashed: ") == crashes, (raw, d.log()[-4000:])
    new_pid = raw["worker"]["pid"]
    ss_pid = d.status()["receivers"]["ss"]["worker"]["pid"]

    assert d.stop() == 0
    assert not alive(new_pid) and not alive(ss_pid)
    assert "worker finished: OK" in d.log()


FAKE_WORKER = """
import os, sys, zmq
from daqd.protocols import iccp
mode = sys.argv[2]
ctl = zmq.Context().socket(zmq.PAIR)
ctl.connect(sys.argv[1])
ready = iccp.Ready("fake", os.getpid())
ctl.send_multipart(iccp.encode(ready))
if mode == "ready-twice":
    ctl.send_multipart(iccp.encode(ready))
while True:
    message = iccp.decode(ctl.recv_multipart())
    if isinstance(message, iccp.Request) and message.code == "CONF":
        ctl.send_multipart(iccp.encode(iccp.Ok({"addresses": {"listen": "fake:1"}})))
    # anything else, STOP included, goes unanswered: a hung worker
"""


def fake_worker(monkeypatch: pytest.MonkeyPatch, mode: str) -> list[int]:
    argv = [sys.executable, "-c", FAKE_WORKER]
    monkeypatch.setattr(
        WorkerReceiver, "worker_argv", lambda self, controller: [*argv, controller, mode]
    )
    return record_worker_pids(monkeypatch)


def record_worker_pids(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The pids of the worker processes receivers spawn from now on (to check they are gone)."""
    spawned: list[int] = []
    real_setup = WorkerReceiver.setup

    async def setup(self: WorkerReceiver) -> None:
        try:
            await real_setup(self)
        finally:
            if self.proc is not None:
                spawned.append(self.proc.pid)

    monkeypatch.setattr(WorkerReceiver, "setup", setup)
    return spawned


async def test_parent_kills_a_worker_that_never_finishes(
    short_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spawned = fake_worker(monkeypatch, "hang")
    monkeypatch.setattr(WorkerReceiver, "stop_timeout_extra_s", 0.3)
    host = Host(parse_config(host_config().replace("drain_timeout_s = 2", "drain_timeout_s = 0.2")))
    await host.start()
    rec = host.receivers["raw"]
    assert isinstance(rec, WorkerReceiver)
    assert rec.addresses["listen"] == "fake:1"
    await host.stop()
    assert rec.outcome == "ERROR"
    assert not alive(spawned[0])
    assert rec.status()["worker"] == {
        "pid": spawned[0],
        "running": False,
        "outcome": "ERROR",
        "state": None,
    }


async def test_ready_after_ready_is_a_protocol_error(
    short_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spawned = fake_worker(monkeypatch, "ready-twice")
    host = Host(parse_config(host_config()))
    with pytest.raises(ConfigError, match="worker sent READY after READY: protocol error"):
        await host.start()
    assert not alive(spawned[0])


# ----- a worker that dies in a run ---------------------------------------------------------------


class Sender(threading.Thread):
    """Numbered datagrams at a steady rate to `target` (the test moves it to a restarted
    worker's port) until stop(); `sent` counts them."""

    def __init__(self, target: tuple[str, int], rate_hz: float = 500.0) -> None:
        super().__init__(daemon=True)
        self.target = target
        self.period_s = 1.0 / rate_hz
        self.sent = 0
        self._halt = threading.Event()

    def run(self) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            due = time.monotonic()
            while not self._halt.is_set():
                with contextlib.suppress(OSError):  # a port nobody holds while a worker restarts
                    s.sendto(b"n%09d" % self.sent, self.target)
                self.sent += 1
                due += self.period_s
                self._halt.wait(max(0.0, due - time.monotonic()))

    def stop(self) -> None:
        self._halt.set()
        self.join(10)


def hostport(address: str) -> tuple[str, int]:
    host, port = address.rsplit(":", 1)
    return host, int(port)


def records_in(path: Path) -> list[Record]:
    return [r for r in read_items(path) if isinstance(r, Record)]


ENDED = re.compile(r"^run (\S+) ended: (\S+), (\d+) records")


WORKER_RUN_CONFIG = """
[daemon]
name = "wk"
drain_timeout_s = 5

[[receiver]]
type = "udp"
name = "raw"
listen = "127.0.0.1:0"
publish_to = ["disk"]
process = true

[[publisher]]
type = "file"
name = "disk"
directory = "{data}"
"""


def test_worker_killed_in_a_run_comes_back_in_it(
    daemon: Callable[..., Daemon], workdir: Path
) -> None:
    data = workdir / "data"
    d = daemon(WORKER_RUN_CONFIG.format(data=data), name="wk")
    raw = d.status()["receivers"]["raw"]
    first_pid = raw["worker"]["pid"]

    def received() -> int:
        return int(d.status()["receivers"]["raw"]["records"])

    assert d.ctl("start", "wk2").returncode == 0
    sender = Sender(hostport(raw["addresses"]["listen"]))
    sender.start()
    try:
        wait_until(lambda: received() >= 300, what="300 records before the kill")
        os.kill(first_pid, signal.SIGKILL)

        def restarted() -> Any:
            r = d.status()["receivers"]["raw"]
            ok = r["state"] == "running" and r["worker"]["running"]
            return ok and r["worker"]["pid"] != first_pid and r["errors"].get("crash") == 1 and r

        raw = wait_until(restarted, what="the worker restarted, crash counted once")
        sender.target = hostport(raw["addresses"]["listen"])  # port 0: a new port
        # the new worker is in the run (its STAT says RUN), and records flow again
        wait_until(
            lambda: d.status()["receivers"]["raw"]["worker"]["state"] == "RUN",
            what="the restarted worker in RUN",
        )
        again = received()
        wait_until(lambda: received() >= again + 300, what="300 records after the restart")
    finally:
        sender.stop()
    result = d.ctl("stop")
    assert result.returncode == 0, result.stderr
    ended = ENDED.match(result.stdout)
    assert ended is not None, result.stdout
    assert ended.group(1) == "wk2"
    assert ended.group(2) != "GOOD" and "DEGRADED" in ended.group(2).split("|"), result.stdout
    assert "crash" in result.stdout, result.stdout  # the reason is shown

    records = records_in(data / "run-wk2.daqd")
    seqs = [r.seq for r in records]
    assert all(b > a for a, b in itertools.pairwise(seqs)), "seq went back"
    assert len(set(seqs)) == len(seqs)
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "seq has gaps"
    assert int(ended.group(3)) == len(records) >= 600
    assert "could not end run" not in d.log()

    # the next run is GOOD, with exact counts, in the same file format
    status = d.status()
    addr = hostport(status["receivers"]["raw"]["addresses"]["listen"])
    before = status["receivers"]["raw"]["records"]
    assert d.ctl("start", "wk3").returncode == 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for i in range(200):
            s.sendto(b"m%03d" % i, addr)
    wait_until(lambda: received() == before + 200, what="200 records in run wk3")
    result = d.ctl("stop")
    assert result.stdout.startswith("run wk3 ended: GOOD, 200 records"), result.stdout
    next_seqs = [r.seq for r in records_in(data / "run-wk3.daqd")]
    assert next_seqs[0] > seqs[-1] and next_seqs == list(range(next_seqs[0], next_seqs[0] + 200))


STALL_CONFIG = """
[daemon]
name = "par"
drain_timeout_s = 5

[[receiver]]
type = "udp"
name = "raw"
listen = "127.0.0.1:0"
publish_to = ["disk"]
process = true

[[publisher]]
type = "file"
name = "disk"
directory = "{data}"
queue_size = 20
"""


def stall_disk(monkeypatch: pytest.MonkeyPatch) -> asyncio.Event:
    """The file publisher writes nothing until the returned event is set; the worker's data
    link is short and its STAT frequent, so records back up into the worker's own queue."""
    gate = asyncio.Event()
    real_send = FilePublisher.send

    async def stalled_send(self: FilePublisher, records: list[Record]) -> None:
        await gate.wait()
        await real_send(self, records)

    monkeypatch.setattr(FilePublisher, "send", stalled_send)
    monkeypatch.setattr(WorkerReceiver, "data_hwm", 20)
    monkeypatch.setattr(WorkerReceiver, "stat_interval_s", 0.02)
    return gate


async def fill_worker(rec: WorkerReceiver, n: int) -> None:
    """Send n datagrams of 8 kB, 20 at a time (the socket loses none), until the worker's STAT
    says its link took all of them."""

    def link_offered(n: int) -> bool:
        link = rec.worker_status.get("link") or {}
        return int(link.get("offered", 0)) == n

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for sent in range(1, n + 1):
            s.sendto(b"%08d" % sent + bytes(8000), hostport(rec.addresses["listen"]))
            if sent % 20 == 0 or sent == n:
                await wait_for(functools.partial(link_offered, sent), what=f"{sent} in worker")
    assert not any(rec.worker_status["receiver"]["drops"].values())


async def test_records_a_dead_worker_held_are_counted_as_worker_lost(
    short_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The disk is stalled, so the records back up into the worker's own queue; the worker is
    killed: what its last STAT said it had taken in and never reached the parent is counted."""
    gate = stall_disk(monkeypatch)
    host = Host(parse_config(STALL_CONFIG.format(data=short_dir / "data"), "<test>"))
    await host.start()
    try:
        rec = host.receivers["raw"]
        assert isinstance(rec, WorkerReceiver) and rec.proc is not None
        first_pid = rec.proc.pid
        await host.begin_run("lost1")
        sent = 400
        await fill_worker(rec, sent)
        assert rec.counters.records < sent  # most are held in the worker, behind the stall
        os.kill(first_pid, signal.SIGKILL)
        gate.set()

        def restarted() -> bool:
            return rec.state == "running" and rec.proc is not None and rec.proc.pid != first_pid

        await wait_for(restarted, what="the restarted worker")
        arrived = rec.counters.records
        lost = sent - arrived
        assert lost > 0
        assert rec.counters.drops == {"worker_lost": lost}
        assert rec.counters.errors == {"crash": 1}

        # the new worker is in the run and numbers on from the last seq that arrived
        await wait_for(lambda: rec.worker_status.get("state") == "RUN", what="worker in RUN")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for i in range(10):
                s.sendto(b"after%d" % i, hostport(rec.addresses["listen"]))
        await wait_for(lambda: rec.counters.records == arrived + 10, what="10 more records")
        run = await host.end_run()
    finally:
        gate.set()
        await host.stop()

    assert run.condition & RunCondition.INCOMPLETE and run.condition & RunCondition.DEGRADED
    accounting = run.accounting["receivers"]["raw"]
    assert accounting["received"] == arrived + 10
    assert accounting["drops"] == {"worker_lost": lost}
    assert accounting["errors"] == {"crash": 1}
    assert any("worker_lost" in reason for reason in run.reasons)
    records = records_in(short_dir / "data" / "run-lost1.daqd")
    seqs = [r.seq for r in records]
    assert all(b > a for a, b in itertools.pairwise(seqs))
    assert seqs[-10:] == list(range(arrived + 1, arrived + 11))  # on from what arrived
    assert [bytes(r.payload[0]) for r in records[-10:]] == [b"after%d" % i for i in range(10)]
    # every record that reached the parent is in the file or counted by the publisher
    disk = run.accounting["publishers"]["disk"]
    assert run.records == {"raw": arrived + 10}
    assert len(records) + sum(disk["drops"].values()) == arrived + 10


SLOW_CONFIG = """
[daemon]
name = "par"
drain_timeout_s = 5

[[receiver]]
type = "slowsignal"
name = "ss"
listen = "127.0.0.1:0"
process = true
"""


async def test_worker_counts_reach_the_run_at_its_end_and_survive_restarts(
    short_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No periodic STAT here: the worker's drop must reach the run through end_run's own STAT.
    Then a restarted worker counts from 0, and the parent's worker.<reason> goes on from 1."""
    monkeypatch.setattr(WorkerReceiver, "stat_interval_s", 3600.0)
    host = Host(parse_config(SLOW_CONFIG, "<test>"))
    await host.start()
    try:
        rec = host.receivers["ss"]
        assert isinstance(rec, WorkerReceiver) and rec.proc is not None
        first_pid = rec.proc.pid

        async def worker_counts() -> dict[str, dict[str, int]]:
            status = await rec._request("STAT", {})  # looked at, not absorbed
            return {kind: dict(status["receiver"][kind]) for kind in ("drops", "errors")}

        def bad_size(counts: dict[str, dict[str, int]]) -> tuple[str, int] | None:
            """Where the receiver counts a datagram that is not whole blocks, and how many."""
            for kind, by_reason in counts.items():
                if by_reason.get("bad_size"):
                    return kind, by_reason["bad_size"]
            return None

        async def send_bad_and_wait(total: int) -> str:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.sendto(b"12345", hostport(rec.addresses["listen"]))  # not whole blocks
            deadline = time.monotonic() + 30
            while (found := bad_size(await worker_counts())) is None or found[1] != total:
                assert time.monotonic() < deadline, "the worker did not count the datagram"
                await asyncio.sleep(0.01)
            return found[0]

        def here() -> dict[str, dict[str, int]]:
            return {"drops": rec.counters.drops, "errors": rec.counters.errors}

        await host.begin_run("c1")
        kind = await send_bad_and_wait(1)
        assert "worker.bad_size" not in here()[kind]  # not fetched yet
        run = await host.end_run()
        assert run.accounting["receivers"]["ss"][kind] == {"worker.bad_size": 1}
        assert run.condition != RunCondition.GOOD
        assert any("worker.bad_size" in reason for reason in run.reasons)
        assert here()[kind] == {"worker.bad_size": 1}

        os.kill(first_pid, signal.SIGKILL)
        await wait_for(
            lambda: rec.state == "running" and rec.proc is not None and rec.proc.pid != first_pid,
            what="the restarted worker",
        )
        await send_bad_and_wait(1)  # the new worker's own count starts again at 1
        assert await rec.refresh_worker_status()
        assert rec.counters.errors.get("crash") == 1
        assert here()[kind].get("worker.bad_size") == 2
        assert rec.worker_status["state"] == "ORBIT"  # no run was going on when it restarted
    finally:
        await host.stop()
    assert here()[kind].get("worker.bad_size") == 2


async def test_a_worker_killed_as_its_run_ends_is_counted_in_that_run(
    short_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The run is stopped right as its worker dies, holding records behind a stalled disk: the
    crash, the records it had sent and those it lost all belong to that run, and the restarted
    worker is not in a run."""
    gate = stall_disk(monkeypatch)
    host = Host(parse_config(STALL_CONFIG.format(data=short_dir / "data"), "<test>"))
    await host.start()
    try:
        rec = host.receivers["raw"]
        assert isinstance(rec, WorkerReceiver) and rec.proc is not None
        first_pid = rec.proc.pid
        await host.begin_run("e1")
        await fill_worker(rec, 200)
        os.kill(first_pid, signal.SIGKILL)
        gate.set()
        run = await host.end_run()
        arrived = rec.counters.records
        assert 0 < arrived < 200
        receiver = run.accounting["receivers"]["raw"]
        assert receiver["errors"] == {"crash": 1}
        assert receiver["drops"] == {"worker_lost": 200 - arrived}
        assert receiver["received"] == arrived and run.records == {"raw": arrived}
        assert run.condition & RunCondition.DEGRADED and run.condition & RunCondition.INCOMPLETE
        disk = run.accounting["publishers"]["disk"]
        assert disk["offered"] == arrived
        assert disk["delivered"] + sum(disk["drops"].values()) == arrived
        await wait_for(
            lambda: rec.state == "running" and rec.proc is not None and rec.proc.pid != first_pid,
            what="the restarted worker",
        )
        assert await rec.refresh_worker_status()
        assert rec.worker_status["state"] == "ORBIT"
    finally:
        gate.set()
        await host.stop()
    records = records_in(short_dir / "data" / "run-e1.daqd")
    assert len(records) == disk["delivered"]
    assert all(b > a for a, b in itertools.pairwise([r.seq for r in records]))


async def test_a_request_to_a_worker_that_dies_fails_as_an_error_not_a_cancellation(
    short_dir: Path,
) -> None:
    """The worker is killed with requests going to it: each one ends with a ControlError (the
    run's end catches those), never with the CancelledError of a send its dead peer held while
    the supervisor closed the socket (which escaped the run's end, found by CI)."""
    host = Host(parse_config(STALL_CONFIG.format(data=short_dir / "data"), "<test>"))
    await host.start()
    try:
        rec = host.receivers["raw"]
        assert isinstance(rec, WorkerReceiver) and rec.proc is not None
        os.kill(rec.proc.pid, signal.SIGKILL)
        with pytest.raises(ControlError):
            while True:  # until the death is seen: a dead worker cannot answer for long
                await rec._request("STAT", {}, 10.0)
    finally:
        await host.stop()


async def test_a_worker_that_never_finishes_is_killed_and_what_it_held_counted(
    short_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A frozen worker (SIGSTOP) holding records does not answer STOP: it is killed when its
    time is up, what it had sent is still written, and what it held is counted as lost."""
    gate = stall_disk(monkeypatch)
    monkeypatch.setattr(WorkerReceiver, "stop_timeout_extra_s", 0.5)
    config = STALL_CONFIG.replace("drain_timeout_s = 5", "drain_timeout_s = 1")
    host = Host(parse_config(config.format(data=short_dir / "data"), "<test>"))
    await host.start()
    rec = host.receivers["raw"]
    assert isinstance(rec, WorkerReceiver) and rec.proc is not None
    pid = rec.proc.pid
    try:
        await host.begin_run("h1")
        await fill_worker(rec, 200)
        os.kill(pid, signal.SIGSTOP)
        gate.set()
    finally:
        await host.stop()
    assert rec.outcome == "ERROR" and not alive(pid)
    arrived = rec.counters.records
    assert 0 < arrived < 200
    assert rec.counters.drops == {"worker_lost": 200 - arrived}
    assert host.last_run is not None and host.last_run.run_id == "h1"
    assert host.last_run.accounting["receivers"]["raw"]["drops"] == {"worker_lost": 200 - arrived}


def test_runs_started_and_stopped_under_steady_input_hold_what_stop_reports(
    daemon: Callable[..., Daemon], workdir: Path
) -> None:
    """Records keep arriving from the worker while runs start and stop: each run file holds
    exactly the records `daqctl stop` reports, numbered on without gaps."""
    data = workdir / "data"
    d = daemon(WORKER_RUN_CONFIG.format(data=data), name="wk")

    def received() -> int:
        return int(d.status()["receivers"]["raw"]["records"])

    def more_than(n: int) -> bool:
        return received() >= n

    sender = Sender(hostport(d.status()["receivers"]["raw"]["addresses"]["listen"]), 1000.0)
    sender.start()
    try:
        wait_until(lambda: received() >= 100, what="records flowing")
        for run_id in ("s1", "s2"):
            assert d.ctl("start", run_id).returncode == 0
            wait_until(functools.partial(more_than, received() + 200), what=f"run {run_id}")
            result = d.ctl("stop")
            ended = ENDED.match(result.stdout)
            assert ended is not None and ended.group(2) == "GOOD", result.stdout
            seqs = [r.seq for r in records_in(data / f"run-{run_id}.daqd")]
            assert int(ended.group(3)) == len(seqs) >= 200, (run_id, result.stdout)
            assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    finally:
        sender.stop()
