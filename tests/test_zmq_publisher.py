"""The `zmq` publisher's frames, byte for byte, and its high-water-mark accounting."""

from __future__ import annotations

import os
import shutil
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq
import zmq.asyncio

from daqd.config import parse_config
from daqd.host import Host
from daqd.record import Block, Record

from .conftest import wait_for, wait_until

CONFIG = """
[daemon]
name = "t"
drain_timeout_s = 5

[[receiver]]
type = "udp"
name = "raw"
listen = "127.0.0.1:0"
publish_to = ["live"]

[[publisher]]
type = "zmq"
name = "live"
endpoint = "{endpoint}"
framing = "{framing}"
policy = "{policy}"
sndhwm = {sndhwm}
"""


async def start(
    endpoint: str = "inproc://live",
    framing: str = "record",
    policy: str = "drop",
    sndhwm: int = 10000,
) -> tuple[Host, zmq.asyncio.Socket]:
    """A host whose `zmq` publisher has one SUB subscribed to everything, known to the PUB."""
    text = CONFIG.format(endpoint=endpoint, framing=framing, policy=policy, sndhwm=sndhwm)
    host = Host(parse_config(text, "t.toml"))
    await host.start()
    sub = host.zmq_context.socket(zmq.SUB)
    sub.setsockopt(zmq.RCVHWM, sndhwm)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(host.publishers["live"].addresses["endpoint"])
    rec = host.receivers["raw"]
    while not await sub.poll(20):  # the PUB drops what it sends before the subscription is in
        rec.publish_nowait(rec.new_record((b"probe",)))
    while await sub.poll(100):
        await sub.recv_multipart()
    return host, sub


def expected_frames(r: Record) -> list[bytes]:
    header = {"seq": r.seq, "time_ns": r.time_ns, "tags": r.tags}
    return [r.source.encode(), msgpack.packb(header, use_bin_type=True), *map(bytes, r.payload)]


async def test_record_frames_are_topic_packed_header_and_blocks() -> None:
    host, sub = await start()
    shared = {"peer": "10.0.0.1:5000"}
    big = bytes(range(256)) * 300  # past the zero-copy threshold
    cases: list[tuple[str, int, dict[str, Any], tuple[Block, ...]]] = [
        ("raw", 1, shared, (b"one block",)),
        ("raw", 2, shared, (b"a", bytearray(b"bb"), memoryview(b"ccc"))),
        ("raw", 300, {"peer": "10.0.0.2:6000"}, ()),
        ("other", 70_000, shared, (big,)),
        ("raw", 2**40, {}, (b"",)),
        ("other", 2**63, {"n": -5, "nested": {"x": [1, 2.5, None]}, "b": b"\x00"}, (b"z",)),
    ]
    records = [
        Record(src, seq, t, tags, blocks) for t, (src, seq, tags, blocks) in enumerate(cases)
    ]
    records[1].time_ns = 1_700_000_000_000_000_000
    host.receivers["raw"].publish_many_nowait(records)
    for r in records:
        assert await sub.poll(10_000)
        assert await sub.recv_multipart() == expected_frames(r)
    await host.stop()
    sub.close()


async def test_payload_framing_sends_the_blocks_as_one_frame() -> None:
    host, sub = await start(framing="payload")
    records = [
        Record("raw", 1, 0, {}, (b"single",)),
        Record("raw", 2, 0, {}, (b"jo", bytearray(b"in"), memoryview(b"ed"))),
        Record("raw", 3, 0, {}, (b"x" * 100_000,)),
    ]
    host.receivers["raw"].publish_many_nowait(records)
    for want in (b"single", b"joined", b"x" * 100_000):
        assert await sub.poll(10_000)
        assert await sub.recv_multipart() == [want]
    await host.stop()
    sub.close()


async def test_high_water_mark_drops_are_counted_and_messages_stay_whole() -> None:
    host, sub = await start(sndhwm=10)
    pub = host.publishers["live"]
    before = pub.counters.records
    records = [Record("raw", i, i, {"i": i}, (b"p%d" % i,)) for i in range(1, 201)]
    host.receivers["raw"].publish_many_nowait(records)  # one batch, faster than the SUB reads
    await wait_for(lambda: pub.counters.records - before + pub.counters.drops.get("hwm", 0) == 200)
    sent = pub.counters.records - before
    assert 0 < sent < 200 and pub.counters.drops["hwm"] == 200 - sent
    got = []
    while await sub.poll(200):
        got.append(await sub.recv_multipart())
    assert len(got) == sent
    for frames in got:  # every message whole: topic, its own header, its own payload
        header = msgpack.unpackb(frames[1])
        assert frames[0] == b"raw" and header["tags"] == {"i": header["seq"]}
        assert frames[2:] == [b"p%d" % header["seq"]]
    seqs = [msgpack.unpackb(f[1])["seq"] for f in got]
    assert seqs == sorted(seqs)
    await host.stop()
    sub.close()


async def test_block_policy_waits_for_room_and_loses_nothing() -> None:
    host, sub = await start(policy="block", sndhwm=10)
    pub = host.publishers["live"]
    records = [Record("raw", i, i, {}, (b"%d" % i,)) for i in range(1, 301)]
    host.receivers["raw"].publish_many_nowait(records)
    got = []
    while len(got) < 300:
        assert await sub.poll(10_000), f"only {len(got)} of 300 arrived"
        got.append((await sub.recv_multipart())[2])
    assert got == [b"%d" % i for i in range(1, 301)]
    assert "hwm" not in pub.counters.drops
    await host.stop()
    sub.close()


def zmq_io_threads() -> dict[int, int]:
    """This process's ZeroMQ I/O threads: thread id -> scheduling policy."""
    threads = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            if Path(f"/proc/self/task/{tid}/comm").read_text().startswith("ZMQbg/IO"):
                threads[int(tid)] = os.sched_getscheduler(int(tid))
        except OSError:  # the thread ended
            continue
    return threads


@pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="Linux scheduling policies")
async def test_tcp_publisher_has_its_own_batch_scheduled_io_thread() -> None:
    before = zmq_io_threads()
    host, sub = await start(endpoint="tcp://127.0.0.1:0")  # start() saw a record arrive
    batch = [t for t, p in zmq_io_threads().items() if t not in before and p == os.SCHED_BATCH]
    assert len(batch) == 1
    await host.stop()
    assert batch[0] not in zmq_io_threads()  # its context has ended
    sub.close()


# Run daqd where the kernel refuses a thread's switch to SCHED_BATCH: a SCHED_IDLE process without
# CAP_SYS_NICE and with RLIMIT_NICE 0 (a systemd SystemCallFilter without @resources, as in our
# unit, refuses the same call). libzmq aborts the process when it cannot set its I/O thread's
# policy, so the publisher must not ask for it there.
REFUSING = [
    "setpriv", "--bounding-set=-sys_nice", "--inh-caps=-sys_nice",
    "prlimit", "--nice=0",
    "chrt", "--idle", "0",
]  # fmt: skip


@pytest.mark.skipif(
    not hasattr(os, "SCHED_BATCH")
    or os.geteuid() != 0
    or not all(shutil.which(tool) for tool in ("setpriv", "prlimit", "chrt")),
    reason="needs Linux, root (to drop CAP_SYS_NICE) and util-linux's setpriv, prlimit, chrt",
)
def test_a_daemon_refused_thread_policies_still_publishes(daemon: Callable[..., Any]) -> None:
    config = """
[daemon]
name = "refused"

[[receiver]]
type = "udp"
name = "u"
listen = "127.0.0.1:0"
publish_to = ["z"]

[[publisher]]
type = "zmq"
name = "z"
endpoint = "tcp://127.0.0.1:0"
"""
    d = daemon(config, name="refused", prefix=REFUSING)  # waits until it answers, or fails
    status = d.status()
    udp_port = int(status["receivers"]["u"]["addresses"]["listen"].rpartition(":")[2])
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(status["publishers"]["z"]["addresses"]["endpoint"])
    out = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        # a PUB sends only to subscribers it knows: send until one datagram comes through
        def arrived() -> bool:
            out.sendto(b"still here", ("127.0.0.1", udp_port))
            return bool(sub.poll(200))

        wait_until(arrived, 30, "a datagram through the daemon's zmq publisher")
        assert sub.recv_multipart()[2] == b"still here"
        assert d.status()["state"] == "ORBIT"
    finally:
        out.close()
        sub.close(linger=0)
        ctx.term()
    assert d.stop() == 0
