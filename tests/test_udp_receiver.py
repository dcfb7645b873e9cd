"""The `udp` receiver hands on a loop turn's datagrams together, without moving run boundaries
or losing what is pending when it stops, and counts what a full queue cannot take."""

from __future__ import annotations

from pathlib import Path

from daqd.config import parse_config
from daqd.host import Host
from daqd.record import Record
from daqd.runfile import verify
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

ADDR = ("192.0.2.7", 4321)


def make_host(tmp_path: Path, queue_size: int = 10000) -> Host:
    text = CONFIG.format(directory=tmp_path / "data", queue_size=queue_size)
    return Host(parse_config(text, "t.toml"))


def spy_batches(host: Host) -> list[list[Record]]:
    """The batches the `spy` publisher is handed, as they come."""
    batches: list[list[Record]] = []
    pub = host.publishers["spy"]
    original = pub.send

    async def spy(records: list[Record]) -> None:
        batches.append(list(records))
        await original(records)

    pub.send = spy  # type: ignore[method-assign]
    return batches


def deliver(host: Host, *payloads: bytes) -> None:
    """Hand datagrams to the receiver as its socket would, within one loop turn."""
    protocol = host.receivers["raw"]._transports[0].get_protocol()
    for data in payloads:
        protocol.datagram_received(data, ADDR)  # type: ignore[attr-defined]


async def test_one_turns_datagrams_are_one_batch_in_order(tmp_path: Path) -> None:
    host = make_host(tmp_path)
    await host.start()
    batches = spy_batches(host)
    deliver(host, *(b"d%d" % i for i in range(40)))
    await wait_for(lambda: sum(map(len, batches)) == 40)
    assert len(batches) == 1
    records = batches[0]
    assert [r.payload for r in records] == [(b"d%d" % i,) for i in range(40)]
    assert [r.seq for r in records] == list(range(1, 41))
    assert all(r.tags == {"peer": "192.0.2.7:4321"} for r in records)
    times = [r.time_ns for r in records]
    assert times == sorted(times)
    await host.stop()


async def test_run_boundaries_fall_where_the_datagrams_arrived(tmp_path: Path) -> None:
    host = make_host(tmp_path)
    await host.start()
    deliver(host, b"before the run")
    run = await host.begin_run("r1")  # no loop turn in between: the datagram is still pending
    deliver(host, *(b"in %d" % i for i in range(10)))
    await host.end_run(RunCondition.GOOD)
    deliver(host, b"after the run")
    await host.stop()
    assert run.records == {"raw": 10}
    summary = verify(next((tmp_path / "data").glob("run-r1*.daqd")))
    assert summary.problems == [] and summary.gaps == {}
    assert summary.records == {"raw": 10}
    assert summary.end is not None and summary.end["records"] == {"raw": 10}


async def test_stopping_hands_on_what_is_pending(tmp_path: Path) -> None:
    host = make_host(tmp_path)
    await host.start()
    batches = spy_batches(host)
    deliver(host, b"a", b"b", b"c")
    await host.stop()
    assert [r.payload[0] for batch in batches for r in batch] == [b"a", b"b", b"c"]
    assert host.publishers["spy"].counters.records == 3


async def test_a_full_queue_takes_what_fits_and_counts_the_rest(tmp_path: Path) -> None:
    host = make_host(tmp_path, queue_size=10)
    await host.start()
    batches = spy_batches(host)
    deliver(host, *(b"%d" % i for i in range(25)))
    await wait_for(lambda: batches)
    spy = host.publishers["spy"]
    assert [r.payload[0] for r in batches[0]] == [b"%d" % i for i in range(10)]
    assert spy.counters.drops == {"queue_full": 15}
    assert host.receivers["raw"].counters.records == 25
    await host.stop()
    assert spy.counters.records == 10
    assert host.publishers["disk"].counters.drops == {}
