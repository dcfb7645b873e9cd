"""SSDAQ monitoring: the `monitor` receiver takes MonitorData from PUSH senders (in-process Host,
real ZeroMQ), and `[daemon] monitor_push` makes a real `daqd serve` send its receivers' rates as
MonitorData to a PULL socket of the test, which decodes them with Google's protobuf runtime."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import msgpack
import pytest
import zmq
import zmq.asyncio

from daqd.config import parse_config
from daqd.errors import ConfigError
from daqd.host import Host
from daqd.loghandler import DaqdLogHandler
from daqd.monitor import Counters
from daqd.ssdaq_monitor import SNDHWM, MonitorPush

from .conftest import DAQD, Daemon, wait_for, wait_until
from .test_ssdaq_logmon_codec import RefMonitorData

SIM_MONITOR = [DAQD, "sim", "monitor", "--count", "3", "--interval", "0.05", "--quiet"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
async def host(tmp_path: Path) -> AsyncIterator[Host]:
    text = f"""
[[receiver]]
type = "monitor"
name = "mon"
listen = "tcp://127.0.0.1:0"
publish_to = ["out"]
[[publisher]]
name = "out"
type = "file"
directory = "{tmp_path}"
fsync = "never"
"""
    h = Host(parse_config(text, path="<test>"))
    await h.start()
    yield h
    await h.stop()


def _ssdaq_message(name: str, rate: float, sec: int) -> bytes:
    """What SSDAQ's ReceiverMonSender sends, built with Google's runtime."""
    ref = RefMonitorData()
    ref.time.sec, ref.time.nsec = sec, 125
    ref.reciver.name, ref.reciver.pid = name, 4242
    ref.reciver.recv_data, ref.reciver.data_rate = rate > 0, rate
    data: bytes = ref.SerializeToString()
    return data


async def test_monitor_data_from_push_senders_becomes_records(host: Host, tmp_path: Path) -> None:
    rec: Any = host.receivers["mon"]
    await host.begin_run("m1")
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 2000)
    push.connect(rec.addresses["listen"])
    sent = [
        _ssdaq_message("ReadoutAssembler", 159.75, 1_700_000_000),
        _ssdaq_message("TriggerPacketReceiver", 0.0, 1_700_000_001),
    ]
    for m in sent:
        push.send(m)
    push.send(b"\x08\x01")  # time as a varint: not a MonitorData
    push.send_multipart([sent[0], b"more"])
    push.send(sent[0][:-3])  # cut short
    try:
        await wait_for(
            lambda: rec.counters.records == 2 and sum(rec.counters.errors.values()) == 3,
            30.0,
            "2 records and 3 refused messages",
        )
    finally:
        push.close()
        ctx.term()
    await host.end_run()
    with open(tmp_path / "run-m1.daqd", "rb") as f:
        items = list(msgpack.Unpacker(f, raw=False, strict_map_key=False))
    records = [i for i in items[1:-1] if i[0] == "mon"]
    assert [r[4] for r in records] == [[m] for m in sent]  # as sent: SSDAQ's PUB 9005 bytes
    assert records[0][3] == {
        "time": {"sec": 1_700_000_000, "nsec": 125},
        "receiver": "ReadoutAssembler",
        "pid": 4242,
        "recv_data": True,
        "data_rate": 159.75,
    }
    assert records[1][3]["recv_data"] is False and records[1][3]["data_rate"] == 0.0
    assert rec.counters.errors == {"bad_wire_type": 1, "multipart": 1, "truncated": 1}
    assert rec.cmd_stats()["senders"] == {"ReadoutAssembler": 159.75, "TriggerPacketReceiver": 0}
    assert items[-1]["end"]["condition"] == "TAINTED"


def test_a_bad_monitor_push_endpoint_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"monitor_push"):
        parse_config('[daemon]\nmonitor_push = "127.0.0.1:10002"\n', path="x.toml")


def test_daqd_sends_its_receivers_rates_as_monitor_data(daemon: Callable[..., Daemon]) -> None:
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.setsockopt(zmq.LINGER, 0)
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    log_port = free_port()
    d = daemon(
        f"""
[daemon]
name = "monpush"
monitor_push = "tcp://127.0.0.1:{port}"
[[receiver]]
type = "log"
name = "camera-logs"
listen = "127.0.0.1:{log_port}"
[[receiver]]
type = "monitor"
name = "mon"
listen = "tcp://127.0.0.1:0"
""",
        name="monpush",
    )
    handler = DaqdLogHandler("127.0.0.1", log_port)
    logger = logging.getLogger("monpush.test")
    logger.propagate = False
    logger.handlers = [handler]
    got: list[Any] = []
    try:
        deadline = time.monotonic() + 30

        def busy_seen() -> bool:
            """Send a log record now and then until daqd reports camera-logs receiving."""
            while time.monotonic() < deadline:
                logger.warning("tick")
                if pull.poll(200):
                    got.append(RefMonitorData.FromString(pull.recv()))
                    if any(m.reciver.name == "camera-logs" and m.reciver.recv_data for m in got):
                        return True
            return False

        assert busy_seen(), f"no MonitorData saying camera-logs received: {got}"
    finally:
        handler.close()
    pid = d.status()["pid"]
    assert pid != os.getpid()
    busy = [m for m in got if m.reciver.name == "camera-logs" and m.reciver.recv_data]
    assert busy[0].reciver.pid == pid and busy[0].reciver.data_rate > 0
    assert {m.reciver.name for m in got} <= {"camera-logs", "mon"}
    assert abs(busy[0].time.sec - time.time()) < 60
    status = wait_until(lambda: d.status().get("monitor_push"), 10, "monitor_push in status")
    assert status["endpoint"] == f"tcp://127.0.0.1:{port}" and status["sent"] >= len(got)
    assert status["dropped"] == 0
    pull.close()
    ctx.term()


def test_daqd_serve_takes_daqd_sim_monitor(daemon: Callable[..., Daemon]) -> None:
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    d = daemon(
        f'[daemon]\nname = "simmon"\n[[receiver]]\ntype = "monitor"\nname = "mon"\n'
        f'listen = "{endpoint}"\n',
        name="simmon",
    )
    subprocess.run(
        [*SIM_MONITOR, "--connect", endpoint, "--name", "ReadoutAssembler", "--rate-hz", "12.5"],
        check=True,
        timeout=60,
    )

    def mon() -> dict[str, Any]:
        status: dict[str, Any] = d.status()["receivers"]["mon"]
        return status

    wait_until(lambda: mon()["records"] == 3, 30, "3 MonitorData")
    assert mon()["extra"]["senders"] == {"ReadoutAssembler": 12.5} and mon()["errors"] == {}


async def test_monitor_push_cannot_change_on_reconfigure(tmp_path: Path) -> None:
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.setsockopt(zmq.LINGER, 0)
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    text = f'[daemon]\nmonitor_push = "tcp://127.0.0.1:{port}"\n'
    h = Host(parse_config(text, path="a.toml"))
    await h.start()
    try:
        with pytest.raises(ConfigError, match=r'key "monitor_push": cannot change'):
            await h.reconfigure("", "b.toml")
        assert h.status()["monitor_push"]["endpoint"] == f"tcp://127.0.0.1:{port}"
        assert await h.reconfigure(text, "a.toml") == []  # the same value: nothing changes
    finally:
        await h.stop()
        pull.close()
        ctx.term()


async def test_what_zeromq_holds_when_the_receiver_stops_is_published(host: Host) -> None:
    rec: Any = host.receivers["mon"]
    for task in rec._tasks:  # nothing reads any more: what comes stays in ZeroMQ's queue
        task.cancel()
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 2000)
    push.connect(rec.addresses["listen"])
    push.send(_ssdaq_message("held", 1.0, 1_700_000_000))
    held: zmq.Socket[bytes] = zmq.Socket.shadow(rec._sock.underlying)
    await wait_for(lambda: held.poll(0), 30.0, "the message waiting in ZeroMQ")
    push.close()
    ctx.term()
    await host.stop()
    assert rec.counters.records == 1 and set(rec.senders) == {"held"}


async def test_monitor_push_never_waits_and_counts_what_nobody_takes() -> None:
    """Nobody listens at the endpoint: ZeroMQ holds SNDHWM messages, the rest are counted."""

    ctx = zmq.asyncio.Context()
    push = MonitorPush(ctx, f"tcp://127.0.0.1:{free_port()}")
    receivers: list[Any] = [
        SimpleNamespace(name=f"r{i}", counters=Counters()) for i in range(SNDHWM + 20)
    ]
    try:
        push.tick(receivers)  # the first tick starts the clock
        assert (push.sent, push.dropped) == (0, 0)
        await asyncio.sleep(0.01)
        push.tick(receivers)  # returns: a send that finds no room is counted, never waited for
        assert push.sent + push.dropped == SNDHWM + 20
        assert 0 < push.sent <= SNDHWM and push.dropped >= 20
        assert push.status()["dropped"] == push.dropped
    finally:
        push.close()
        ctx.term()
