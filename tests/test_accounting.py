"""The accounting invariant through the real daemon: received = delivered + dropped by reason,
for every publisher and run; the run's condition follows from those counts; shutdown honours
`block` until drain_timeout_s, and a second signal cuts it short, counted."""

from __future__ import annotations

import json
import re
import shutil
import signal
import socket
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zmq

from daqd.config import parse_config
from daqd.host import Host
from daqd.record import Record
from daqd.runfile import read_items

from .conftest import Daemon, wait_until

MakeDaemon = Callable[..., Daemon]

UDP_TO_FILE = """
[daemon]
name = "{name}"
drain_timeout_s = {drain}

[[receiver]]
type = "udp"
name = "raw"
listen = "127.0.0.1:0"
publish_to = {publish_to}

[[publisher]]
type = "file"
name = "disk"
directory = "{directory}"
queue_size = {queue_size}
policy = "{policy}"
live = false
"""

ZMQ_PUBLISHER = """
[[publisher]]
type = "zmq"
name = "live"
endpoint = "tcp://127.0.0.1:0"
policy = "{policy}"
queue_size = {queue_size}
sndhwm = {sndhwm}
"""


def config(
    workdir: Path,
    *,
    name: str = "t",
    drain: float = 30,
    queue_size: int = 10000,
    policy: str = "block",
    publish_to: tuple[str, ...] = ("disk",),
) -> str:
    return UDP_TO_FILE.format(
        name=name,
        drain=drain,
        directory=workdir / "out",
        queue_size=queue_size,
        policy=policy,
        publish_to=json.dumps(list(publish_to)),
    )


def udp_address(d: Daemon) -> tuple[str, int]:
    host, port = d.status()["receivers"]["raw"]["addresses"]["listen"].rsplit(":", 1)
    return host, int(port)


class Blaster(threading.Thread):
    """Sends numbered datagrams as fast as one thread can until stopped."""

    def __init__(self, address: tuple[str, int], size: int = 64) -> None:
        super().__init__(daemon=True)
        self.address = address
        self.size = size
        self.sent = 0
        self.stopped = threading.Event()

    def run(self) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            pad = b"x" * (self.size - 8)
            while not self.stopped.is_set():
                for _ in range(256):
                    try:
                        s.sendto(self.sent.to_bytes(8, "big") + pad, self.address)
                    except OSError:  # ENOBUFS under load: not sent, not counted
                        continue
                    self.sent += 1

    def stop(self) -> None:
        self.stopped.set()
        self.join(30)


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout


def run_file(directory: Path, run_id: str) -> tuple[list[Record], dict[str, Any]]:
    """The records of a run's file and its end marker."""
    [path] = directory.glob(f"run-{run_id}*.daqd")
    records: list[Record] = []
    end: dict[str, Any] = {}
    for item in read_items(path):
        if isinstance(item, Record):
            records.append(item)
        elif "end" in item:
            end = item["end"]
    return records, end


ACCOUNTING = re.compile(r"accounting: (receiver|publisher) (\S+): (.*)$", re.M)


def accounting_lines(log: str) -> dict[str, dict[str, Any]]:
    """The exit accounting lines, parsed: name -> {received|offered|delivered: n, drops: {..}}."""
    out: dict[str, dict[str, Any]] = {}
    for _kind, name, rest in ACCOUNTING.findall(log):
        entry: dict[str, Any] = {"drops": {}}
        for key in ("received", "offered", "delivered"):
            m = re.search(rf"\b{key} (\d+)", rest)
            if m:
                entry[key] = int(m.group(1))
        m = re.search(r"(?:input )?dropped ([^,]*(?:, \d+ \w+)*?)(?:, errors|, \d+ still|$)", rest)
        if m and m.group(1) != "none":
            for part in m.group(1).split(", "):
                n, reason = part.split(" ", 1)
                entry["drops"][reason] = int(n)
        out[name] = entry
    return out


def test_a_drop_in_a_run_ends_it_incomplete_with_exact_counts(
    daemon: MakeDaemon, workdir: Path
) -> None:
    """policy = "drop" with a queue of one: a burst overflows it. The host's rule (a publisher
    drop -> INCOMPLETE) flags the run, and the counts add up exactly."""
    d = daemon(config(workdir, queue_size=1, policy="drop"))
    address = udp_address(d)
    ok(d.ctl("start", "drops"))
    sent = [0]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:

        def burst() -> int:
            for i in range(2000):
                s.sendto(b"%08d" % i, address)
            sent[0] += 2000
            disk = d.status()["publishers"]["disk"]
            return int(disk["drops"].get("queue_full", 0))

        wait_until(burst, 60, "queue_full drops from a burst")

    def arrived() -> bool:
        raw = d.status()["receivers"]["raw"]
        return bool(raw["records"] + raw["drops"].get("kernel", 0) == sent[0])

    wait_until(arrived, what="every datagram received or counted by the kernel")
    received = d.status()["receivers"]["raw"]["records"]
    out = ok(d.ctl("stop"))
    assert out.startswith("run drops ended: INCOMPLETE, ")
    assert "dropped" in out and "queue_full" in out and "why: publisher disk:" in out

    status = d.status()
    last = status["last_run"]
    disk = last["accounting"]["publishers"]["disk"]
    raw = last["accounting"]["receivers"]["raw"]
    records, end = run_file(workdir / "out", "drops")
    assert raw["received"] == disk["offered"] == sum(last["records"].values())
    assert disk["delivered"] == len(records)
    assert disk["offered"] == disk["delivered"] + disk["drops"]["queue_full"]
    assert set(disk["drops"]) == {"queue_full"}
    assert end["condition"] == "INCOMPLETE"
    assert end["accounting"]["publishers"]["disk"] == disk

    # the next run, without overflow, is GOOD
    ok(d.ctl("start", "calm"))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(b"one", address)
    wait_until(lambda: d.status()["publishers"]["disk"]["offered"] == received + 1)
    assert ok(d.ctl("stop")).startswith("run calm ended: GOOD, 1 records")


def test_sigterm_at_full_udp_rate_accounts_exactly(daemon: MakeDaemon, workdir: Path) -> None:
    """SIGTERM while UDP arrives as fast as a thread can send it. UDP cannot be slowed down, so
    a file queue that overflows in the run counts queue_full; at exit every record received is
    either in the run file or counted, and the end marker says what the file holds."""
    d = daemon(
        config(workdir, publish_to=("disk", "live"))
        + ZMQ_PUBLISHER.format(policy="drop", queue_size=10000, sndhwm=1000)
    )
    address = udp_address(d)
    ok(d.ctl("start", "load"))
    blaster = Blaster(address)
    blaster.start()
    try:
        wait_until(
            lambda: d.status()["receivers"]["raw"]["records"] > 20_000, 120, "20,000 records"
        )
        assert d.stop(120) == 0
    finally:
        blaster.stop()
    log = d.log()
    lines = accounting_lines(log)
    raw, disk, live = lines["raw"], lines["disk"], lines["live"]
    records, end = run_file(workdir / "out", "load")

    assert disk["offered"] == live["offered"] == raw["received"]
    assert disk["offered"] == len(records) + sum(disk["drops"].values())
    assert set(disk["drops"]) <= {"queue_full"}  # nothing cut at shutdown: block waited
    assert disk["delivered"] == len(records)
    assert live["offered"] == live["delivered"] + sum(live["drops"].values())
    # the file's end marker tells the same story as its content
    acc = end["accounting"]
    assert acc["publishers"]["disk"]["delivered"] == len(records)
    assert acc["publishers"]["disk"]["offered"] == acc["receivers"]["raw"]["received"]
    assert acc["publishers"]["disk"]["drops"] == disk["drops"]
    assert "INTERRUPTED" in end["condition"]
    if disk["drops"]:
        assert "INCOMPLETE" in end["condition"]
    assert "SIGTERM received: stopping" in log


async def test_shutdown_drain_waits_for_a_block_queue_instead_of_dropping(
    tmp_path: Path,
) -> None:
    """The kernel holds ten times more datagrams than the file queue when the host stops
    (they were sent while the loop could not read them): the drain waits for queue room
    (policy block) and nothing is dropped; datagrams sent = received + the kernel's drops."""
    host = Host(parse_config(config(tmp_path, queue_size=100), "t.toml"))
    await host.start()
    try:
        await host.begin_run("burst")
        host_, port = host.receivers["raw"].addresses["listen"].rsplit(":", 1)
        sent = 0
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for _ in range(1000):  # no await: the loop cannot read any of them yet
                s.sendto(sent.to_bytes(8, "big"), (host_, int(port)))
                sent += 1
    finally:
        await host.stop()
    raw = host.receivers["raw"].counters
    disk = host.queues["disk"].accounting()
    records, end = run_file(tmp_path / "out", "burst")
    assert raw.records + raw.drops.get("kernel", 0) == sent
    assert raw.records >= 10 * 100, "the kernel buffer held too little for this test"
    assert disk["drops"] == {} and disk["queued"] == 0
    assert disk["offered"] == disk["delivered"] == len(records) == raw.records
    assert [r.seq for r in records] == list(range(1, len(records) + 1))
    assert end["accounting"]["publishers"]["disk"]["delivered"] == len(records)
    assert end["condition"] == "INTERRUPTED"


def test_a_publisher_that_cannot_begin_refuses_the_start(daemon: MakeDaemon, workdir: Path) -> None:
    d = daemon(config(workdir))
    out = workdir / "out"
    shutil.rmtree(out)
    out.write_text("not a directory")  # the file publisher cannot create its run file
    result = d.ctl("start", "nope")
    assert result.returncode != 0
    assert "run nope not started: publisher disk:" in result.stderr
    assert d.status()["state"] == "ORBIT"
    out.unlink()
    out.mkdir()
    assert ok(d.ctl("start", "yes")).startswith("run yes started")


def test_a_second_sigterm_exits_at_once_and_counts_what_it_cut(
    daemon: MakeDaemon, workdir: Path
) -> None:
    """A subscriber that never reads holds a `block` zmq publisher; the drain could last
    drain_timeout_s (10 minutes here). A second SIGTERM ends it now: exit code 1, the log says
    why, every record still undelivered is counted as 'forced_exit', and no socket file is
    left behind."""
    d = daemon(
        config(workdir, drain=600, publish_to=("live",))
        + ZMQ_PUBLISHER.format(policy="block", queue_size=100, sndhwm=10)
    )
    endpoint = d.status()["publishers"]["live"]["addresses"]["endpoint"]
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.RCVHWM, 1)
    sub.setsockopt(zmq.RCVBUF, 4096)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(endpoint)
    address = udp_address(d)
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            delivered = [-1]

            def stuck() -> bool:
                for _ in range(50):
                    s.sendto(b"z" * 60000, address)
                live = d.status()["publishers"]["live"]
                before, delivered[0] = delivered[0], live["records"]
                return bool(live["queue"] >= 100 and live["records"] == before)

            wait_until(
                stuck, 120, "the live queue to stay full behind a subscriber that never reads"
            )
        d.signal(signal.SIGTERM)
        wait_until(lambda: "stopping: no more input" in d.log(), 60, "the drain to begin")
        d.signal(signal.SIGTERM)
        assert d.proc is not None
        assert d.proc.wait(60) == 1
    finally:
        sub.close(linger=0)
        ctx.term()
    log = d.log()
    assert "second signal (SIGTERM): exiting at once" in log
    lines = accounting_lines(log)
    live, raw = lines["live"], lines["raw"]
    assert live["drops"].get("forced_exit", 0) > 0
    assert live["offered"] == live["delivered"] + sum(live["drops"].values())
    assert live["offered"] == raw["received"]
    assert not list(d.runtime.glob("t.*")), "socket files left behind"
