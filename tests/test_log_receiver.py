"""The `log` receiver through real TCP, in an in-process Host: SSDAQ's unframed LogData senders
(a SocketHandler writing Google-serialized LogData, as SSDAQ's ChecSocketLogHandler does), daqd's
length-framed DaqdLogHandler end to end, the level filter, and refused input by reason."""

from __future__ import annotations

import asyncio
import logging
import logging.handlers
import random
import socket
import struct
import subprocess
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from daqd.config import parse_config
from daqd.host import Host
from daqd.loghandler import DaqdLogHandler
from daqd.protocols import ssdaq_pb as pb
from daqd.protocols.logstream import LogStream, frame
from daqd.sim.log import log_record

from .conftest import DAQD, Daemon, HostRig, wait_until
from .test_ssdaq_logmon_codec import RefLogData

SIM_LOG = [DAQD, "sim", "log", "--rate", "2000", "--quiet"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def config_text(tmp_path: Path, listen: str, level: str) -> str:
    return f"""
[daemon]
name = "logtest"
[[receiver]]
type = "log"
name = "logs"
listen = "{listen}"
level = "{level}"
max_record_bytes = 4096
publish_to = ["out"]
[[publisher]]
name = "out"
type = "file"
directory = "{tmp_path}"
fsync = "never"
"""


class Rig(HostRig):
    def __init__(self, host: Host, tmp_path: Path) -> None:
        super().__init__(host, "logs", tmp_path)
        self.port = int(self.rec.addresses["listen"].rpartition(":")[2])


@pytest.fixture
async def rig_factory(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    hosts: list[Host] = []

    async def make(level: str = "info", port: int = 0) -> Rig:
        text = config_text(tmp_path, f"127.0.0.1:{port}", level)
        host = Host(parse_config(text, path="<test>"))
        await host.start()
        hosts.append(host)
        return Rig(host, tmp_path)

    yield make
    for host in hosts:
        await host.stop()


class SsdaqStyleHandler(logging.handlers.SocketHandler):
    """What SSDAQ's ChecSocketLogHandler does: a SocketHandler whose 'pickle' is the bare
    serialized LogData (Google's runtime), no length prefix."""

    def makePickle(self, record: logging.LogRecord) -> bytes:
        data: bytes = RefLogData(
            systemType=0, severity=record.levelno, sender=record.name, message=record.msg,
            time=int(record.created * 1e9), pid=record.process or 0,
            sourceFile=record.pathname, line=record.lineno,
        ).SerializeToString()  # fmt: skip
        return data


def _logger(name: str, handler: logging.Handler) -> logging.Logger:
    logger = logging.getLogger(name)
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    logger.handlers = [handler]
    return logger


async def test_ssdaq_and_daqd_senders_on_one_port_with_a_level_filter(
    rig_factory: Callable[..., Any],
) -> None:
    rig = await rig_factory(level="info")
    await rig.host.begin_run("r1")
    # SSDAQ's sender: 30 records written as fast as logging goes, so TCP puts several in a read
    old = SsdaqStyleHandler("127.0.0.1", rig.port)
    old_log = _logger("ssdaq.camera", old)
    for i in range(30):
        old_log.log(logging.DEBUG if i % 10 == 0 else logging.WARNING, "old %d", i)
    # daqd's handler
    new = DaqdLogHandler("127.0.0.1", rig.port)
    new_log = _logger("chec.server", new)
    new_log.info("started %s", "ok")
    new_log.debug("not wanted")  # below the receiver's level
    new_log.critical("fan %d stopped", 3)
    try:
        await rig.wait(
            "29 records and 4 filtered",
            lambda: rig.rec.counters.records == 29 and rig.rec.below_level == 4,
        )
    finally:
        old.close()
        new.close()
    await rig.host.end_run()
    assert new.sent == 3 and new.dropped == {}
    records, end = rig.records("r1")
    olds = [r for r in records if r[3]["sender"] == "ssdaq.camera"]
    news = [r for r in records if r[3]["sender"] == "chec.server"]
    # SSDAQ's logger sends record.msg unformatted, as its handler did
    assert [r[3]["message"] for r in olds] == ["old %d"] * 27
    assert {r[3]["severity"] for r in olds} == {"WARNING"}
    assert {r[3]["framing"] for r in olds} == {"ssdaq"}
    for _src, _seq, _t, tags, payload in olds:  # the payload is the LogData as sent
        ref = RefLogData.FromString(payload[0])
        assert (ref.severity, ref.sender, ref.time) == (30, "ssdaq.camera", tags["time"])
    assert [(r[3]["severity"], r[3]["level"], r[3]["message"]) for r in news] == [
        ("INFO", 20, "started ok"),
        ("FATAL", 50, "fan 3 stopped"),
    ]
    tags = news[0][3]
    assert tags["framing"] == "length" and tags["source_file"] == __file__
    assert tags["peer"].startswith("127.0.0.1:") and tags["line"] > 0
    assert abs(tags["time"] - news[0][2]) < 60 * 10**9  # the record's own time, in ns
    assert pb.decode_log_data(news[1][4][0]).message == "fan 3 stopped"
    stats = rig.rec.cmd_stats()
    assert stats["filtered"] == {"below_level": 4}
    assert stats["messages"] == {"ssdaq": 30, "length": 3}
    assert stats["connections"] == {"ssdaq": 1, "length": 1}
    assert stats["errors"] == {} and end["condition"] == "GOOD"  # a filter is not a loss


async def test_bad_input_is_counted_by_reason_and_a_bad_length_closes_its_connection(
    rig_factory: Callable[..., Any],
) -> None:
    rig = await rig_factory(level="debug")
    await rig.host.begin_run("r2")
    good = pb.encode_log_data(pb.LogData(severity=20, sender="raw", message="ok", time=5))

    async def send(data: bytes) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", rig.port)
        writer.write(data)
        await writer.drain()
        writer.write_eof()
        answer = await reader.read()  # b"" when the receiver closes the connection
        writer.close()
        return answer

    # framed, then a length over max_record_bytes: the receiver closes the connection
    assert await send(frame(good) + frame(b"\x08\x01") + (1 << 20).to_bytes(4, "big")) == b""
    await send(frame(good) + frame(good)[:9])  # the connection ends inside a message
    await send(good + b"\x0f\xff")  # unframed, then not protobuf
    await rig.wait(
        "3 records and 4 refused",
        lambda: rig.rec.counters.records == 3 and sum(rig.rec.counters.errors.values()) == 4,
    )
    await rig.host.end_run()
    assert rig.rec.counters.errors == {
        "missing_field": 1,
        "too_long": 1,
        "truncated": 1,
        "bad_wire_type": 1,
    }
    records, end = rig.records("r2")
    assert [r[4] for r in records] == [[good]] * 3
    assert end["condition"] == "TAINTED"


async def test_the_handler_waits_for_a_receiver_that_is_not_there_yet_and_counts_overflow(
    rig_factory: Callable[..., Any],
) -> None:
    port = free_port()
    handler = DaqdLogHandler("127.0.0.1", port, queue_size=5)
    log = _logger("early", handler)
    for i in range(8):  # nobody listens: 5 wait in the queue (one may be in the thread's hand)
        log.error("early %d", i)
    assert 2 <= handler.dropped["queue_full"] <= 3
    rig = await rig_factory(port=port)
    try:
        await rig.wait("the queued records", lambda: handler.sent >= 5)
        await rig.wait("them published", lambda: rig.rec.counters.records == handler.sent)
        assert handler.sent + handler.dropped["queue_full"] == 8
        # the receiver goes away and comes back on the same port: the handler connects again
        await rig.host.stop()
        log.error("while away")
        rig = await rig_factory(port=port)
        log.error("after")
        await rig.wait("both", lambda: rig.rec.counters.records == 2)
        assert handler.connects == 2
    finally:
        handler.close()
    lonely = DaqdLogHandler("127.0.0.1", free_port(), close_timeout_s=0.2)
    _logger("lonely", lonely).error("nobody hears this")
    lonely.close()
    assert lonely.dropped == {"closed": 1} and lonely.sent == 0


def test_daqd_serve_takes_both_framings_from_daqd_sim_log(daemon: Callable[..., Daemon]) -> None:
    port = free_port()
    d = daemon(
        f"""
[daemon]
name = "simlog"
[[receiver]]
type = "log"
name = "logs"
listen = "127.0.0.1:{port}"
level = "warning"
""",
        name="simlog",
    )
    for framing in ("ssdaq", "length"):
        subprocess.run(
            [*SIM_LOG, "--connect", f"127.0.0.1:{port}", "--framing", framing, "--count", "25"],
            check=True,
            timeout=60,
        )

    def logs() -> dict[str, Any]:
        status: dict[str, Any] = d.status()["receivers"]["logs"]
        return status

    wait_until(lambda: logs()["extra"]["messages"] == {"ssdaq": 25, "length": 25}, 30, "50 logs")
    status = logs()
    # severities cycle DEBUG..FATAL: WARNING, ERROR and FATAL pass, 3 in 5
    assert status["records"] == 30 and status["extra"]["filtered"] == {"below_level": 20}
    assert status["errors"] == {} and status["extra"]["connections"] == {"ssdaq": 1, "length": 1}


async def test_a_reset_connection_and_a_stop_mid_message_are_counted(
    rig_factory: Callable[..., Any],
) -> None:
    rig = await rig_factory(level="debug")
    good = frame(pb.encode_log_data(pb.LogData(severity=40, sender="r", message="x", time=9)))
    _, writer = await asyncio.open_connection("127.0.0.1", rig.port)
    writer.write(good + good[:9])
    await rig.wait("the bytes read", lambda: rig.rec.bytes_in == len(good) + 9)
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()  # an RST, not a FIN
    await rig.wait("the cut message counted", lambda: "truncated" in rig.rec.counters.errors)
    assert rig.rec.counters.records == 1 and rig.rec.counters.errors == {"truncated": 1}
    # a message half-read when the receiver stops: lost there, and counted as such
    _, writer = await asyncio.open_connection("127.0.0.1", rig.port)
    writer.write(good[:9])
    await rig.wait("the bytes read", lambda: rig.rec.bytes_in == len(good) + 18)
    rec = rig.rec
    await rig.host.stop()
    writer.close()
    assert rec.counters.drops == {"stopped_mid_message": 1}


async def test_fuzzed_connections_are_counted_exactly_and_never_stop_the_receiver(
    rig_factory: Callable[..., Any],
) -> None:
    """300 seeded connections of garbage, cut, oversized and corrupted input. Length-framed ones
    are counted by reason exactly as the sans-IO codec counts them (its result does not depend on
    how TCP cuts the bytes); unframed ones may be cut differently by TCP, so of them each must come
    out as records or errors. After all of it a valid record still gets in."""
    rig = await rig_factory(level="notset")
    rec = rig.rec
    rng = random.Random(15)
    good = [pb.encode_log_data(log_record(i)) for i in range(20)]

    def outcomes() -> int:
        return int(rec.counters.records) + sum(rec.counters.errors.values())

    async def send(data: bytes) -> None:
        before = outcomes()
        _, writer = await asyncio.open_connection("127.0.0.1", rig.port)
        writer.write(data)
        writer.close()
        await rig.wait("the input counted", lambda: outcomes() > before and rec.clients == 0)

    def corrupt(body: bytes) -> bytes:
        out = bytearray(body)
        out[rng.randrange(len(out))] = rng.randrange(256)
        return bytes(out)

    model_records = 0
    model_errors: Counter[str] = Counter()
    for n in range(150):  # length-framed
        body = rng.choice(good)
        data = [
            b"\x00" + bytes(rng.randrange(256) for _ in range(rng.randrange(0, 60))),
            frame(corrupt(body)) + frame(rng.choice(good)),
            frame(body)[: rng.randrange(1, len(body) + 4)],
            (5000).to_bytes(4, "big") + body,  # over max_record_bytes (4096)
            frame(body) + frame(corrupt(body))[: rng.randrange(1, len(body) + 4)],
        ][n % 5]
        model = LogStream(4096)
        for m in model.feed(data) + model.close():
            if m.error is None:
                model_records += 1
            else:
                model_errors[m.error.reason] += 1
        await send(data)
    assert rec.connections == {"length": 150, "ssdaq": 0}
    assert rec.counters.records == model_records and rec.counters.errors == model_errors
    records, errors = rec.counters.records, sum(rec.counters.errors.values())
    for n in range(150):  # unframed (SSDAQ's)
        body = rng.choice(good)
        data = [
            bytes(rng.randrange(1, 256) for _ in range(rng.randrange(1, 60))),
            corrupt(body) + rng.choice(good),
            body[: rng.randrange(1, len(body))],
        ][n % 3]
        await send(b"\x08" + data[1:] if data[0] == 0 else data)
    assert rec.connections == {"length": 150, "ssdaq": 150}
    assert outcomes() - records - errors >= 150
    await send(frame(good[0]))
    # every LogData read was published, but for a corruption that made its severity negative
    assert rec.counters.records == records + rec.messages["ssdaq"] - rec.below_level + 1
