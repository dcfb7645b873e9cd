"""The `udp` receiver, fed real datagrams over 127.0.0.1: one record per datagram in order with its
sender, run boundaries where the datagrams arrived, nothing lost of what the kernel holds when it
stops, and what a full queue cannot take counted exactly."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest

from daqd.config import parse_config
from daqd.host import Host
from daqd.record import Record
from daqd.runfile import read_items, verify
from daqd.runstate import RunCondition

from .conftest import wait_for

CONFIG = """
[daemon]
name = "t"
drain_timeout_s = 5

[[receiver]]
type = "udp"
name = "raw"
listen = "127.0.0.1:0"
publish_to = ["disk", "spy"]
coalesce_ms = {coalesce_ms}

[[publisher]]
type = "file"
name = "disk"
directory = "{directory}"

[[publisher]]
type = "zmq"
name = "spy"
endpoint = "inproc://spy"
queue_size = {queue_size}
"""


def make_host(tmp_path: Path, queue_size: int = 10000, coalesce_ms: float = 1.0) -> Host:
    text = CONFIG.format(
        directory=tmp_path / "data", queue_size=queue_size, coalesce_ms=coalesce_ms
    )
    return Host(parse_config(text, "t.toml"))


def spy_batches(host: Host, gate: asyncio.Event | None = None) -> list[list[Record]]:
    """The batches the `spy` publisher is handed, as they come (each send() waits for `gate`,
    if given: a stalled publisher)."""
    batches: list[list[Record]] = []
    pub = host.publishers["spy"]
    original = pub.send

    async def spy(records: list[Record]) -> None:
        batches.append(list(records))
        if gate is not None:
            await gate.wait()
        await original(records)

    pub.send = spy  # type: ignore[method-assign]
    return batches


class Sender:
    """A real UDP socket towards the receiver. sendto() does not yield to the event loop: what
    is sent in one go sits in the kernel until the loop reads it."""

    def __init__(self, host: Host) -> None:
        h, p = host.receivers["raw"].addresses["listen"].rsplit(":", 1)
        self.target = (h, int(p))
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.peer = f"127.0.0.1:{self.sock.getsockname()[1]}"

    def send(self, *payloads: bytes) -> None:
        for data in payloads:
            self.sock.sendto(data, self.target)

    def close(self) -> None:
        self.sock.close()


async def test_datagrams_become_records_in_order_with_their_sender(tmp_path: Path) -> None:
    host = make_host(tmp_path)
    await host.start()
    batches = spy_batches(host)
    tx = Sender(host)
    tx.send(*(b"d%d" % i for i in range(40)))
    await wait_for(lambda: sum(map(len, batches)) == 40, what="40 records")
    records = [r for batch in batches for r in batch]
    assert [r.payload for r in records] == [(b"d%d" % i,) for i in range(40)]
    assert [r.seq for r in records] == list(range(1, 41))
    assert all(r.tags == {"peer": tx.peer} for r in records)
    times = [r.time_ns for r in records]
    assert times == sorted(times)
    rec = host.receivers["raw"]
    assert (rec.counters.records, rec.counters.bytes) == (
        40,
        sum(len(b"d%d" % i) for i in range(40)),
    )
    tx.close()
    await host.stop()


async def test_run_boundaries_fall_where_the_datagrams_arrived(tmp_path: Path) -> None:
    host = make_host(tmp_path)
    await host.start()
    rec = host.receivers["raw"]
    tx = Sender(host)
    tx.send(b"before the run")
    await wait_for(lambda: rec.counters.records == 1, what="the datagram before the run")
    run = await host.begin_run("r1")
    tx.send(*(b"in %d" % i for i in range(10)))
    await wait_for(lambda: rec.counters.records == 11, what="10 datagrams in the run")
    await host.end_run(RunCondition.GOOD)
    tx.send(b"after the run")
    await wait_for(lambda: rec.counters.records == 12, what="the datagram after the run")
    await host.stop()
    tx.close()
    assert run.records == {"raw": 10}
    [path] = (tmp_path / "data").glob("run-r1*.daqd")
    summary = verify(path)
    assert summary.problems == [] and summary.gaps == {}
    assert summary.records == {"raw": 10}
    assert summary.end is not None and summary.end["records"] == {"raw": 10}
    payloads = [bytes(r.payload[0]) for r in read_items(path) if isinstance(r, Record)]
    assert payloads == [b"in %d" % i for i in range(10)]


@pytest.mark.parametrize("coalesce_ms", [100, 0])
async def test_datagrams_coming_while_reading_pauses_are_read_as_one_batch(
    tmp_path: Path, coalesce_ms: float
) -> None:
    """After a read, the receiver waits coalesce_ms before reading again: three datagrams sent
    loop turns apart in that time reach the publisher as one batch. The first datagram after a
    quiet spell is read at once. With 0, each is read as it comes, in a batch of its own."""
    host = make_host(tmp_path, coalesce_ms=coalesce_ms)
    await host.start()
    batches = spy_batches(host)
    tx = Sender(host)
    tx.send(b"a")
    await wait_for(lambda: batches, what="the first datagram")
    for payload in (b"b", b"c", b"d"):
        tx.send(payload)
        for _ in range(5):  # loop turns: time for the reader to read it, unless it pauses
            await asyncio.sleep(0)
    await wait_for(lambda: sum(map(len, batches)) == 4, what="4 records")
    got = [[r.payload[0] for r in batch] for batch in batches]
    if coalesce_ms:
        assert got == [[b"a"], [b"b", b"c", b"d"]]
    else:
        assert got == [[b"a"], [b"b"], [b"c"], [b"d"]]
    tx.close()
    await host.stop()


async def test_stopping_hands_on_what_the_kernel_still_holds(tmp_path: Path) -> None:
    """Datagrams sent right before stop() (the loop has not read them yet): stopping reads them
    from the socket and hands them on; none is lost."""
    host = make_host(tmp_path)
    await host.start()
    batches = spy_batches(host)
    tx = Sender(host)
    tx.send(b"a", b"b", b"c")  # no await until stop(): the kernel holds all three
    await host.stop()
    tx.close()
    assert [r.payload[0] for batch in batches for r in batch] == [b"a", b"b", b"c"]
    assert host.publishers["spy"].counters.records == 3
    assert host.receivers["raw"].counters.records == 3


async def test_a_full_queue_takes_what_fits_and_counts_the_rest(tmp_path: Path) -> None:
    """A stalled publisher with a queue of 10: after the record it holds, 10 records fit, every
    later one is dropped `queue_full`, exactly; the other publisher gets all of them."""
    host = make_host(tmp_path, queue_size=10)
    await host.start()
    gate = asyncio.Event()
    batches = spy_batches(host, gate)
    tx = Sender(host)
    tx.send(b"0")
    await wait_for(lambda: batches, what="the publisher stalled on the first record")
    tx.send(*(b"%d" % i for i in range(1, 25)))
    rec = host.receivers["raw"]
    await wait_for(lambda: rec.counters.records == 25, what="25 datagrams read")
    spy = host.publishers["spy"]
    assert spy.counters.drops == {"queue_full": 25 - 1 - 10}
    gate.set()
    await wait_for(lambda: spy.counters.records == 1 + 10, what="the queue drained")
    got = [r.payload[0] for batch in batches for r in batch]
    assert got == [b"%d" % i for i in range(1 + 10)]
    tx.close()
    await host.stop()
    assert spy.counters.records == 1 + 10
    assert host.publishers["disk"].counters.drops == {}
    assert host.publishers["disk"].counters.records == 25
