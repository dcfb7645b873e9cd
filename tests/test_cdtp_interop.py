"""Interop with the real Constellation (constellationdaq 1.0.2 from PyPI) in both directions.

The peer runs in its own venv (.venv-peers/constellation, made once by tests/peers.py) as a
subprocess driven by tests/cdtp_peer.py; data goes through real ZeroMQ TCP on 127.0.0.1. Each test
checks that both sides agree on every record (sequence number, tags, block bytes) and on the run
condition.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path
from typing import Any

import msgpack
import pytest
from daqd.receivers.cdtp import CdtpReceiver

from daqd.record import Record
from daqd.runstate import RunCondition
from daqd.sim.cdtp import record_blocks
from tests.conftest import wait_for
from tests.peers import peer_python
from tests.test_cdtp import (
    Proc,
    ended,
    file_toml,
    receiver_toml,
    run_file,
    start_host,
    start_sim,
    tx_toml,
)

pytestmark = pytest.mark.interop

PEER_SCRIPT = str(Path(__file__).with_name("cdtp_peer.py"))


@pytest.fixture(scope="session")
def peer() -> str:
    return str(peer_python("constellation"))


def peer_block(k: int, j: int, size: int) -> bytes:
    """Block j of record k as tests/cdtp_peer.py makes it."""
    head = struct.pack(">QI", k, j)
    if size <= len(head):
        return head[:size]
    return head + bytes([(k + j) % 251]) * (size - len(head))


async def their_transmitter(peer: str, settings: dict[str, Any]) -> tuple[Proc, str]:
    proc = await Proc.start(peer, PEER_SCRIPT, "send", stdin_json={"wait": True, **settings})
    return proc, (await proc.line())["endpoint"]


CASES = {
    "1k": {"count": 300, "sizes": [1024]},
    "64k-multiblock": {"count": 20, "sizes": [65536, 100, 0]},
    "tag-only": {"count": 7, "sizes": []},
    "gap": {"count": 50, "sizes": [512], "skip": [10, 11, 12], "condition_code": 5},
}


@pytest.mark.parametrize("case", list(CASES))
async def test_constellation_transmitter_to_our_receiver(
    peer: str, tmp_path: Path, case: str
) -> None:
    settings: dict[str, Any] = {"name": "PySender.one", **CASES[case]}
    proc, endpoint = await their_transmitter(peer, settings)
    host = await start_host(
        receiver_toml("rx", [endpoint], ["disk"], "eor_timeout_s = 5") + file_toml("disk", tmp_path)
    )
    try:
        rx = host.receivers["rx"]
        assert isinstance(rx, CdtpReceiver)
        await host.begin_run("theirs")
        await proc.say("go")
        theirs = await proc.line()
        assert theirs["failures"] == []
        await wait_for(lambda: ended(rx, "PySender.one"), what="their EOR")
        run = await host.end_run()
        await host.queues["disk"].drained()
    finally:
        await host.stop()
        await proc.stop()
    skip = set(settings.get("skip", []))
    sent = [k for k in range(1, settings["count"] + 1) if k not in skip]
    assert theirs["sent"] == sent and theirs["last_seq"] == settings["count"]
    _, records, _ = run_file(tmp_path, "theirs")
    assert [r.tags["cdtp_seq"] for r in records] == sent
    for k, r in zip(sent, records, strict=True):
        assert r.source == "PySender.one"
        assert r.tags == {"k": k, "name": f"r{k}", "cdtp_seq": k}
        assert [bytes(b) for b in r.payload] == [
            peer_block(k, j, size) for j, size in enumerate(settings["sizes"])
        ]
    sender = rx.senders["PySender.one"]
    assert sender.configuration == {"sizes": settings["sizes"]}
    assert sender.run_metadata["data_records"] == settings["count"]
    assert isinstance(sender.run_metadata["time_start"], msgpack.Timestamp)
    if skip:
        # their TAINTED|INTERRUPTED, plus INCOMPLETE for the gap, as Constellation's receiver does
        assert sender.missed == len(skip)
        assert sender.condition == RunCondition(0x07)
        assert run.condition & RunCondition.INCOMPLETE
    else:
        assert sender.missed == 0 and sender.condition == RunCondition.GOOD
        assert run.condition == RunCondition.GOOD


async def test_constellation_transmitter_that_vanishes_ends_aborted(
    peer: str, tmp_path: Path
) -> None:
    settings = {"name": "PySender.gone", "count": 1000, "sizes": [1024], "vanish_after": 40}
    proc, endpoint = await their_transmitter(peer, settings)
    host = await start_host(receiver_toml("rx", [endpoint], [], "eor_timeout_s = 1"))
    try:
        rx = host.receivers["rx"]
        assert isinstance(rx, CdtpReceiver)
        await proc.say("go")
        assert (await proc.line())["sent"] == list(range(1, 41))
        assert await proc.end() == 0
        await wait_for(lambda: ended(rx, "PySender.gone"), what="the substitute EOR")
    finally:
        await host.stop()
    sender = rx.senders["PySender.gone"]
    assert (sender.records, sender.seq, sender.missed) == (40, 40, 0)
    assert sender.condition == RunCondition.ABORTED


async def their_receiver(peer: str, port: int, sender: str, eor_timeout: int = 5) -> Proc:
    proc = await Proc.start(
        peer,
        PEER_SCRIPT,
        "receive",
        stdin_json={"port": port, "sender": sender, "eor_timeout": eor_timeout},
    )
    assert (await proc.line())["ready"] is True
    return proc


def port_of(endpoint: str) -> int:
    return int(endpoint.rsplit(":", 1)[1])


def crcs(blocks: list[bytes]) -> list[list[int]]:
    return [[len(b), zlib.crc32(b)] for b in blocks]


OUR_CASES = {
    "1k": ["--records", "300", "--size", "1024"],
    "64k-multiblock": ["--records", "20", "--size", "65536", "--blocks", "3"],
    "tag-only": ["--records", "9", "--blocks", "0"],
}


@pytest.mark.parametrize("case", list(OUR_CASES))
async def test_our_transmitter_to_constellation_receiver(peer: str, case: str) -> None:
    args = OUR_CASES[case]
    sim, endpoint = await start_sim("--name", "Sim.src", *args)
    a = await start_host(receiver_toml("rx1", [endpoint], ["tx"]) + tx_toml("tx"), "a")
    proc = await their_receiver(peer, port_of(a.publishers["tx"].addresses["endpoint"]), "daqd.tx")
    try:
        rx1 = a.receivers["rx1"]
        assert isinstance(rx1, CdtpReceiver)
        await a.begin_run("ours")
        await sim.say("go")
        await wait_for(lambda: ended(rx1, "Sim.src"), what="the simulator's EOR")
        run = await a.end_run()
        theirs = await proc.line()
    finally:
        await a.stop()
        await sim.stop()
        await proc.stop()
    count = int(args[1])
    size = int(args[args.index("--size") + 1]) if "--size" in args else 1024
    nblocks = int(args[args.index("--blocks") + 1]) if "--blocks" in args else 1
    assert "error" not in theirs and "timeout" not in theirs
    assert theirs["bor"]["sender"] == "daqd.tx"
    assert theirs["bor"]["config"]["_data"]["payload_threshold"] == 128
    expected = [
        ["daqd.tx", k, {"k": k, "cdtp_seq": k}, crcs(record_blocks(k, size, nblocks))]
        for k in range(1, count + 1)
    ]
    assert theirs["records"] == expected
    meta = theirs["eor"]["metadata"]
    assert meta["condition_code"] == 0 and meta["condition"] == "GOOD"
    assert meta["data_records"] == count and meta["run_id"] == "ours"
    assert run.condition == RunCondition.GOOD
    assert a.publishers["tx"].counters.extra["seq"] == count


async def test_our_transmitter_gap_is_incomplete_on_both_sides(peer: str) -> None:
    a = await start_host(tx_toml("tx", "max_message_bytes = 8192"), "a")
    tx = a.publishers["tx"]
    proc = await their_receiver(peer, port_of(tx.addresses["endpoint"]), "daqd.tx")
    try:
        await a.begin_run("gap")
        queue = a.queues["tx"]
        for k in range(1, 11):
            # record 5 cannot fit in one message: refused, and its sequence number stays used
            size = 10000 if k == 5 else 100
            await queue.put(Record("src", k, 0, {"k": k}, [bytes([k]) * size]))
        await wait_for(lambda: tx.counters.drops.get("refused") == 1, what="the refusal")
        await a.end_run()
        theirs = await proc.line()
    finally:
        await a.stop()
        await proc.stop()
    assert [r[1] for r in theirs["records"]] == [1, 2, 3, 4, 6, 7, 8, 9, 10]
    assert [r[2]["k"] for r in theirs["records"]] == [1, 2, 3, 4, 6, 7, 8, 9, 10]
    meta = theirs["eor"]["metadata"]
    assert meta["data_records"] == 10
    assert meta["condition_code"] == int(RunCondition.INCOMPLETE)
    assert meta["condition"] == "INCOMPLETE"


async def test_our_sender_vanishing_is_aborted_for_constellation(peer: str) -> None:
    sim, endpoint = await start_sim(
        "--name", "Sim.gone", "--records", "1000", "--vanish-after", "30"
    )
    proc = await their_receiver(peer, port_of(endpoint), "Sim.gone", eor_timeout=1)
    try:
        await sim.say("go")
        assert await sim.end() == 0
        await proc.say("stop")
        theirs = await proc.line()
    finally:
        await proc.stop()
    assert [r[1] for r in theirs["records"]] == list(range(1, 31))
    assert theirs["eor"]["metadata"]["condition_code"] == int(RunCondition.ABORTED)
    assert "timeout" in theirs  # Constellation's own words: EOR not received in time


async def test_constellation_receiver_connecting_after_the_start_gets_the_whole_run(
    peer: str,
) -> None:
    """Our BOR waits (in the background) for a receiver: Constellation's, connecting after the
    run started and the records arrived, still gets BOR, every record and a GOOD EOR."""
    sim, endpoint = await start_sim("--name", "Sim.late", "--records", "300", "--size", "1024")
    a = await start_host(receiver_toml("rx1", [endpoint], ["tx"]) + tx_toml("tx"), "a")
    tx = a.publishers["tx"]
    proc: Proc | None = None
    try:
        rx1 = a.receivers["rx1"]
        assert isinstance(rx1, CdtpReceiver)
        await a.begin_run("late")
        await sim.say("go")
        await wait_for(lambda: ended(rx1, "Sim.late"), what="the simulator's EOR")
        assert tx.counters.extra["state"] == "waiting" and tx.counters.records == 0
        proc = await their_receiver(peer, port_of(tx.addresses["endpoint"]), "daqd.tx")
        run = await a.end_run()
        theirs = await proc.line()
    finally:
        await a.stop()
        await sim.stop()
        if proc is not None:
            await proc.stop()
    assert "error" not in theirs and "timeout" not in theirs
    assert [r[1] for r in theirs["records"]] == list(range(1, 301))
    assert theirs["eor"]["metadata"]["condition"] == "GOOD"
    assert run.condition == RunCondition.GOOD
    assert run.accounting["publishers"]["tx"]["delivered"] == 300
