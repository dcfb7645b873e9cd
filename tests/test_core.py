"""The core in one process: records, routing, queues and policies, supervision, config errors."""

from __future__ import annotations

import asyncio
import logging
import socket
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq
import zmq.asyncio
from hypothesis import given, settings
from hypothesis import strategies as st

from daqd.config import parse_config
from daqd.errors import ConfigError
from daqd.host import Host
from daqd.receiver import ReceiverServer, ReceiverSettings
from daqd.record import Record
from daqd.runfile import verify
from daqd.runstate import RunCondition

from .conftest import wait_for

tags_st = st.dictionaries(
    st.text(max_size=8), st.one_of(st.integers(-(2**63), 2**64 - 1), st.text(), st.booleans())
)


@given(
    source=st.text(min_size=1, max_size=20),
    seq=st.integers(0, 2**63),
    time_ns=st.integers(0, 2**63),
    tags=tags_st,
    blocks=st.lists(st.binary(max_size=300), max_size=5),
)
def test_record_msgpack_round_trip(
    source: str, seq: int, time_ns: int, tags: dict[str, Any], blocks: list[bytes]
) -> None:
    rec = Record(source, seq, time_ns, tags, blocks)
    back = Record.unpack(rec.pack())
    assert back == Record(source, seq, time_ns, tags, blocks)
    assert back.nbytes == sum(map(len, blocks))


def test_hypothesis_runs_without_a_deadline_on_a_slow_machine() -> None:
    """conftest loads one profile for every property test: no per-example deadline (a loaded
    2-core machine may pause an example for seconds), also under a test's own @settings."""
    assert settings().deadline is None
    assert settings(max_examples=5).deadline is None


def test_record_unpack_rejects_wrong_shapes() -> None:
    for bad in ([1, 2, 3], ["s", "x", 1, {}, []], ["s", 1, 1, {}, ["str-not-bin"]]):
        with pytest.raises(ValueError):
            Record.unpack(msgpack.packb(bad, use_bin_type=True))


CONFIG = """
[daemon]
name = "t"
drain_timeout_s = 5

[[receiver]]
type = "udp"
name = "raw"
listen = "127.0.0.1:0"
rcvbuf_bytes = {rcvbuf}
publish_to = ["disk", "live"]

[[publisher]]
type = "file"
name = "disk"
directory = "{directory}"

[[publisher]]
type = "zmq"
name = "live"
endpoint = "tcp://127.0.0.1:0"
policy = "{policy}"
"""


def make_host(tmp_path: Path, rcvbuf: int = 8 << 20, policy: str = "block") -> Host:
    text = CONFIG.format(directory=tmp_path / "data", rcvbuf=rcvbuf, policy=policy)
    return Host(parse_config(text, "test.toml"))


def udp_target(host: Host, name: str = "raw") -> tuple[str, int]:
    h, p = host.receivers[name].addresses["listen"].rsplit(":", 1)
    return h, int(p)


async def test_payload_blocks_pass_through_without_copy(tmp_path: Path) -> None:
    host = make_host(tmp_path)
    await host.start()
    seen: list[Record] = []
    pub = host.publishers["disk"]
    original = pub.send

    async def spy(records: list[Record]) -> None:
        seen.extend(records)
        await original(records)

    pub.send = spy  # type: ignore[method-assign]
    block = memoryview(bytearray(b"x" * 4096))
    rec = host.receivers["raw"]
    record = rec.new_record((block,), {"k": 1})
    await rec.publish(record)
    await wait_for(lambda: seen, what="the record to reach the publisher")
    assert seen[0].payload[0] is block
    await host.stop()


async def test_udp_to_zmq_sub_and_file(tmp_path: Path) -> None:
    host = make_host(tmp_path)
    await host.start()
    ctx = zmq.asyncio.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"raw")
    sub.connect(host.publishers["live"].addresses["endpoint"])
    # a PUB only sends to subscribers it knows: wait until the subscription has arrived
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    target = udp_target(host)
    while not await sub.poll(50):
        tx.sendto(b"probe", target)
    tx.sendto(b"end of probes", target)  # one socket to one socket on loopback keeps order
    while (await sub.recv_multipart())[2] != b"end of probes":
        pass
    run = await host.begin_run("r1")
    sent = [f"datagram {i}".encode() * (1 + i % 7) for i in range(500)]
    for data in sent:
        tx.sendto(data, target)
    got: list[list[bytes]] = []
    while len(got) < len(sent):
        assert await sub.poll(30_000), f"SUB received only {len(got)} of {len(sent)}"
        got.append(await sub.recv_multipart())
    await host.end_run(RunCondition.GOOD)
    assert [m[2] for m in got] == sent
    assert all(m[0] == b"raw" for m in got)
    headers = [msgpack.unpackb(m[1]) for m in got]
    assert [h["seq"] for h in headers] == list(range(headers[0]["seq"], headers[0]["seq"] + 500))
    assert headers[0]["tags"]["peer"].startswith("127.0.0.1:")
    await host.stop()
    tx.close()
    sub.close()
    ctx.term()
    files = list((tmp_path / "data").glob("run-r1*.daqd"))
    assert len(files) == 1
    summary = verify(files[0])
    assert summary.problems == [] and summary.gaps == {}
    assert summary.records == {"raw": 500}
    assert summary.end is not None and summary.end["condition"] == "GOOD"
    assert summary.end["records"] == {"raw": 500} == run.records


async def test_udp_kernel_drops_are_counted(tmp_path: Path) -> None:
    """Every datagram sent is either received or in the kernel drop counter."""
    host = make_host(tmp_path, rcvbuf=4096)
    await host.start()
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    target = udp_target(host)
    n = 2000
    for _ in range(n):  # the loop is not running while we send: the tiny buffer overflows
        tx.sendto(b"z" * 1000, target)
    rec = host.receivers["raw"]

    def accounted() -> bool:
        rec.sample()
        return rec.counters.records + rec.counters.drops.get("kernel", 0) == n

    await wait_for(accounted, what="received + kernel drops == sent")
    assert rec.counters.drops["kernel"] > 0
    await host.stop()
    tx.close()


async def test_drop_policy_counts_what_a_full_queue_refuses(tmp_path: Path) -> None:
    host = make_host(tmp_path, policy="drop")
    await host.start()
    rec = host.receivers["raw"]
    live = host.queues["live"]
    live.size = 10
    # publish faster than the queue drains: without yielding to the loop, 100 records in a row
    for _ in range(100):
        rec.publish_nowait(rec.new_record((b"x",)))
    assert host.publishers["live"].counters.drops["queue_full"] == 90
    await host.stop()
    assert host.publishers["live"].counters.records == 10


async def test_block_policy_waits_for_room_and_loses_nothing(tmp_path: Path) -> None:
    """A `block` queue of 10 behind a stalled send(): the producer is held once the queue is
    full (it has published exactly what the send holds plus 10), nothing is dropped, and when
    the send goes on, the producer resumes and every record is delivered in order."""
    host = make_host(tmp_path, policy="block")
    await host.start()
    rec = host.receivers["raw"]
    live = host.queues["live"]
    live.size = 10
    pub = host.publishers["live"]
    original = pub.send
    gate = asyncio.Event()
    sent: list[bytes] = []
    held: list[int] = []

    async def stalled(records: list[Record]) -> None:
        held.append(len(records))
        await gate.wait()
        sent.extend(bytes(r.payload[0]) for r in records)
        await original(records)

    pub.send = stalled  # type: ignore[method-assign]
    produced = 0

    async def produce() -> None:
        nonlocal produced
        for i in range(30):
            await rec.publish(rec.new_record((b"%d" % i,)))
            produced += 1

    task = asyncio.create_task(produce())
    await wait_for(lambda: held and live.depth == 10, what="the queue full behind a stalled send")
    # a drop policy would have run through all 30 without waiting
    assert produced == held[0] + 10
    assert pub.counters.drops == {}
    gate.set()
    await asyncio.wait_for(task, 30)
    await wait_for(lambda: pub.counters.records == 30, what="all 30 delivered")
    assert sent == [b"%d" % i for i in range(30)]
    assert pub.counters.drops == {} and host.queues["live"].offered == 30
    await host.stop()


class Crashing(ReceiverServer):
    restart_first_s = 0.01
    crashes = 0

    async def ct_work(self) -> None:
        type(self).crashes += 1
        raise RuntimeError("instrument went away")


async def test_crashing_receiver_is_restarted_then_marked_failed(tmp_path: Path) -> None:
    host = make_host(tmp_path)
    await host.start()
    rec = Crashing(ReceiverSettings(type="crash", name="bad"), host)
    await rec.start()
    host.receivers["bad"] = rec
    await wait_for(lambda: rec.state == "failed", what="the receiver to be marked failed")
    assert Crashing.crashes == 5
    status = host.status()["receivers"]["bad"]
    assert status["state"] == "failed"
    assert status["errors"]["crash"] == 5
    assert "instrument went away" in status["last_error"]
    await host.begin_run("r2")
    run = await host.end_run()
    assert run.condition & RunCondition.DEGRADED
    await host.stop()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[daemon]\nnmae = 'x'\n", '[daemon]: key "nmae": unknown key'),
        (
            "[[receiver]]\ntype='udp'\nname='a'\nlisten='127.0.0.1:1'\nrcvbuf_bytes='big'\n",
            '[[receiver]] #1 (name "a"): key "rcvbuf_bytes"',
        ),
        ("[[receiver]]\ntype='nope'\nname='a'\n", "key \"type\": unknown receiver type 'nope'"),
        ("[[receiver]]\ntype='udp'\nname='a'\n", 'key "listen": required key is missing'),
        (
            "[[receiver]]\ntype='udp'\nname='a'\nlisten='1.2.3.4:1'\npublish_to=['x']\n",
            "key \"publish_to\": no publisher named 'x'",
        ),
        (
            "[[publisher]]\ntype='zmq'\nname='p'\nendpoint='tcp://10.1.2.3:9004'\n",
            "mode 'local' binds a loopback address",
        ),
        ("[[receiver]]\ntype='udp'\nname='a'\nlisten='nohost'\n", "expected 'host:port'"),
        ("[daemon\n", "not valid TOML"),
        ("[extra]\n", "unknown table 'extra'"),
    ],
)
def test_config_errors_name_file_table_and_key(text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse_config(text, "site.toml")
    assert str(exc.value).startswith("site.toml: ")
    assert expected in str(exc.value)


TCP_CONFIG = """
[[receiver]]
type = "tcp"
name = "in"
listen = "127.0.0.1:0"
framing = "{framing}"
max_message_bytes = 100
publish_to = ["disk"]

[[publisher]]
type = "file"
name = "disk"
directory = "{directory}"
"""


async def tcp_host(tmp_path: Path, framing: str) -> tuple[Host, str, int]:
    host = Host(parse_config(TCP_CONFIG.format(framing=framing, directory=tmp_path), "t.toml"))
    await host.start()
    h, p = host.receivers["in"].addresses["listen"].rsplit(":", 1)
    return host, h, int(p)


async def sent_records(host: Host) -> list[Record]:
    got: list[Record] = []
    pub = host.publishers["disk"]
    original = pub.send

    async def spy(records: list[Record]) -> None:
        got.extend(records)
        await original(records)

    pub.send = spy  # type: ignore[method-assign]
    return got


async def test_tcp_length32_many_clients_and_a_bad_one(tmp_path: Path) -> None:
    host, h, p = await tcp_host(tmp_path, "length32")
    got = await sent_records(host)
    writers = []
    for c in range(3):
        _, w = await asyncio.open_connection(h, p)
        for i in range(50):
            body = f"c{c}m{i}".encode()
            w.write(len(body).to_bytes(4, "big") + body)
        writers.append(w)
    _, bad = await asyncio.open_connection(h, p)
    bad.write((101).to_bytes(4, "big") + b"x" * 101)  # over max_message_bytes
    for w in writers:
        await w.drain()
    await wait_for(lambda: len(got) == 150, what="150 records")
    rec = host.receivers["in"]
    await wait_for(lambda: rec.counters.errors.get("too_long") == 1, what="the bad client counted")
    for c in range(3):
        mine = [
            bytes(r.payload[0]) for r in got if bytes(r.payload[0]).startswith(f"c{c}".encode())
        ]
        assert mine == [f"c{c}m{i}".encode() for i in range(50)]
    assert rec.state == "running"
    for w in [*writers, bad]:
        w.close()
    await host.stop()


async def test_tcp_line_and_raw_framing(tmp_path: Path) -> None:
    host, h, p = await tcp_host(tmp_path / "l", "line")
    got = await sent_records(host)
    _, w = await asyncio.open_connection(h, p)
    w.write(b"first\nsecond\r\nthird-without-newline")
    await w.drain()
    w.close()
    await wait_for(lambda: len(got) == 3, what="3 lines")
    assert [bytes(r.payload[0]) for r in got] == [b"first", b"second", b"third-without-newline"]
    await host.stop()

    host, h, p = await tcp_host(tmp_path / "r", "raw")
    got = await sent_records(host)
    _, w = await asyncio.open_connection(h, p)
    data = bytes(range(256)) * 1000
    w.write(data)
    await w.drain()
    w.close()
    await wait_for(lambda: sum(r.nbytes for r in got) == len(data), what="all raw bytes")
    assert b"".join(bytes(r.payload[0]) for r in got) == data
    await host.stop()


async def test_stopping_with_clients_connected_logs_no_asyncio_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A client still connected when the receiver stops is ended quietly: no 'Exception in
    callback' traceback from asyncio (Python 3.11 logs one for a cancelled start_server task)."""
    host, h, p = await tcp_host(tmp_path, "length32")
    got = await sent_records(host)
    _, w = await asyncio.open_connection(h, p)
    w.write((5).to_bytes(4, "big") + b"hello" + (9).to_bytes(4, "big") + b"cut")  # one half-sent
    await w.drain()
    await wait_for(lambda: len(got) == 1, what="the whole message")
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        await host.stop()
        await asyncio.sleep(0)  # the done callbacks of the cancelled client tasks run
    assert not [r for r in caplog.records if r.name == "asyncio"], caplog.text
    w.close()


def test_config_errors_never_echo_secrets() -> None:
    text = "[[receiver]]\ntype='udp'\nname='cam'\nlisten='http://u:hunter2@cam:80'\n"
    with pytest.raises(ConfigError) as exc:
        parse_config(text, "s.toml")
    assert 'key "listen"' in str(exc.value) and "hunter2" not in str(exc.value)
    text = "[[receiver]]\ntype='http_poll'\nname='cam'\nurl='http://cam/x'\npassword=['hunter3']\n"
    with pytest.raises(ConfigError) as exc:
        parse_config(text, "s.toml")
    assert 'key "password"' in str(exc.value) and "hunter3" not in str(exc.value)
