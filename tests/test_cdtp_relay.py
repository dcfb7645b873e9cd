"""The cdtp publisher's encoding of tagged records (a relaying daqd's cdtp receiver tags every
record with `seq_tag`): tagged and plain records leave as they came, and a record whose tags
cannot be encoded is refused and counted, in the middle of a batch of good ones.

A Host with one cdtp publisher, fed through its queue; a plain PULL socket on 127.0.0.1 takes the
messages and daqd's codec decodes them.
"""

from __future__ import annotations

import asyncio
from typing import Any

import zmq
import zmq.asyncio

from daqd.config import parse_config
from daqd.host import Host
from daqd.protocols import cdtp
from daqd.record import Record
from daqd.runstate import RunCondition

CONFIG = """
[daemon]
name = "relay-test"
[[publisher]]
type = "cdtp"
name = "tx"
endpoint = "tcp://127.0.0.1:0"
"""


async def test_tagged_records_go_out_as_they_came_and_unencodable_tags_are_refused() -> None:
    host = Host(parse_config(CONFIG, "<test>"))
    await host.start()
    ctx = zmq.asyncio.Context()
    pull = ctx.socket(zmq.PULL)
    messages: list[cdtp.Message] = []
    try:
        pull.connect(host.publishers["tx"].addresses["endpoint"])
        await host.begin_run("tagged")
        # seqs of a run up to past 0xFFFF, where the encoding of the CDTP seq widens
        records: list[Record] = []
        expected: list[tuple[int, dict[str, Any], list[bytes]]] = []
        refused = []
        for k in range(1, 70_001):
            block = k.to_bytes(4, "big") * 8
            tags: dict[Any, Any] = {"cdtp_seq": k} if k % 3 else {}
            if k % 10_007 == 0:
                tags = {1: "not a str key"}  # CDTP tag keys are strings
            elif k % 10_009 == 0:
                tags = {"value": object()}  # not msgpack
            blocks = [block] if k % 5 else [block, b"", block[:3]]
            records.append(Record("up", k, 0, tags, blocks))
            if k % 10_007 == 0 or k % 10_009 == 0:
                refused.append(k)
            else:
                expected.append((k, tags, blocks))
        queue = host.queues["tx"]
        for first in range(0, len(records), 128):
            batch = records[first : first + 128]
            while queue.size - queue.depth < len(batch):
                await asyncio.sleep(0.001)
            queue.put_many(batch)
            while True:  # take what arrived so far, so that the publisher never waits for room
                try:
                    frame = await pull.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                messages.append(cdtp.decode_frame(frame))
        ending = asyncio.ensure_future(host.end_run())
        while not any(isinstance(m, cdtp.EndOfRun) for m in messages):
            frame = await asyncio.wait_for(pull.recv(), 60)
            messages.append(cdtp.decode_frame(frame))
        run = await ending
    finally:
        pull.close(linger=0)
        ctx.term()
        await host.stop()
    assert isinstance(messages[0], cdtp.BeginOfRun)
    data = [r for m in messages if isinstance(m, cdtp.Data) for r in m.records]
    # the CDTP seq counts every record taken, so a refused one leaves a gap where it was
    assert [r.seq for r in data] == [k for k, _, _ in expected]
    assert [(r.tags, [bytes(b) for b in r.blocks]) for r in data] == [
        (tags, blocks) for _, tags, blocks in expected
    ]
    tx = host.publishers["tx"]
    assert tx.counters.drops == {"refused": len(refused)} and len(refused) == 12
    eor = messages[-1]
    assert isinstance(eor, cdtp.EndOfRun)
    assert eor.run_metadata["data_records"] == 70_000
    assert run.accounting["publishers"]["tx"]["delivered"] == len(expected)
    assert run.condition & RunCondition.INCOMPLETE
