"""daqd.protocols.logstream: a log connection's bytes, in either framing and cut anywhere by TCP,
back into the LogData messages that were sent; and what cannot be, refused with a reason."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from daqd.protocols import ssdaq_pb as pb
from daqd.protocols.logstream import LogStream, Message, frame

i32 = st.integers(-(1 << 31), (1 << 31) - 1)
# what SSDAQ's ChecSocketLogHandler fills: the required fields only
required_only = st.builds(
    pb.LogData,
    system_type=i32, severity=st.sampled_from([10, 20, 30, 40, 50]), sender=st.text(max_size=20),
    message=st.text(max_size=200), time=st.integers(0, 1 << 62), pid=i32,
    source_file=st.text(max_size=30), line=i32,
)  # fmt: skip
with_optional = st.builds(
    pb.LogData,
    system_type=i32, severity=st.integers(0, 60), sender=st.text(max_size=20),
    message=st.text(max_size=200), time=st.integers(0, 1 << 62), pid=i32,
    source_file=st.text(max_size=30), line=i32, position=st.none() | st.text(max_size=10),
    geoid=st.none() | st.text(max_size=10), seqid=st.none() | i32,
    camera_pc_time=st.none() | st.integers(0, 1 << 62),
)  # fmt: skip


def _cut(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


def _run(stream: LogStream, reads: list[bytes]) -> list[Message]:
    out: list[Message] = []
    for r in reads:
        out += stream.feed(r)
    return out + stream.close()


@settings(max_examples=300)
@given(st.lists(with_optional, max_size=8), st.lists(st.integers(0, 10_000), max_size=12))
def test_length_framing_gives_back_every_message_however_tcp_cuts_it(
    logs: list[pb.LogData], cuts: list[int]
) -> None:
    wires = [pb.encode_log_data(log) for log in logs]
    data = b"".join(frame(w) for w in wires)
    stream = LogStream()
    got = _run(stream, _cut(data, cuts))
    assert [m.log for m in got] == logs and [m.raw for m in got] == wires
    assert stream.framing in (None, "length") and not stream.broken


@settings(max_examples=300)
@given(st.lists(required_only, max_size=8), st.lists(st.integers(0, 10_000), max_size=12))
def test_ssdaqs_unframed_stream_is_split_at_each_message_however_tcp_cuts_it(
    logs: list[pb.LogData], cuts: list[int]
) -> None:
    """Back-to-back messages coalesced into one read, or one split over several: each comes out
    whole, as sent (SSDAQ's receiver took one read as one message, and merged or broke them)."""
    wires = [pb.encode_log_data(log) for log in logs]
    stream = LogStream()
    got = _run(stream, _cut(b"".join(wires), cuts))
    assert [m.error for m in got] == [None] * len(logs)
    assert [m.log for m in got] == logs and [m.raw for m in got] == wires
    assert stream.framing in (None, "ssdaq")


def test_a_message_with_optional_fields_split_before_them_is_counted_not_merged() -> None:
    """Unframed, a read that ends after the required fields looks like a whole message; its
    optional fields arriving in the next read are refused (missing_field), never lost unseen."""
    log = pb.LogData(severity=20, sender="s", message="m", time=1, seqid=7)
    wire = pb.encode_log_data(log)
    cut = wire.index(b"\x58")  # seqid's key, field 11
    stream = LogStream()
    first = stream.feed(wire[:cut])
    assert first[0].log is not None and first[0].log.seqid is None
    rest = _run(stream, [wire[cut:], wire])
    assert [m.error.reason if m.error else "ok" for m in rest] == ["missing_field", "ok"]


@settings(max_examples=500)
@given(st.lists(st.binary(max_size=80), max_size=6))
def test_any_bytes_come_out_as_messages_or_reasons_and_every_byte_is_in_one(
    reads: list[bytes],
) -> None:
    stream = LogStream(max_record=200)
    got = _run(stream, reads)
    for m in got:
        assert (m.log is None) != (m.error is None)
        if m.log is not None:
            m.log.tags()
    if not stream.broken:
        assert sum(len(m.raw) for m in got) == sum(len(r) for r in reads)


def test_faults_are_named() -> None:
    good = pb.encode_log_data(pb.LogData(sender="a"))
    stream = LogStream(max_record=100)
    got = _run(stream, [frame(good) + frame(b"\x08\x01") + frame(good)[:7]])
    assert [m.error.reason if m.error else "ok" for m in got] == [
        "ok",
        "missing_field",
        "truncated",
    ]
    stream = LogStream(max_record=100)
    got = stream.feed(frame(good) + (101).to_bytes(4, "big") + bytes(101))
    assert [m.error.reason if m.error else "ok" for m in got] == ["ok", "too_long"]
    assert stream.broken and stream.feed(frame(good)) == []
    stream = LogStream(max_record=100)  # unframed: garbage, then a message in a later read
    got = _run(stream, [good + b"\x0f\x01\x02", good])
    assert [m.error.reason if m.error else "ok" for m in got] == ["ok", "bad_wire_type", "ok"]
    stream = LogStream(max_record=100)  # unframed: one field longer than max_record
    got = _run(stream, [b"\x08\x01\x22\x80\x02" + bytes(120)])
    assert [m.error.reason if m.error else "ok" for m in got] == ["too_long"]


def test_the_example_in_docs_protocols() -> None:
    """docs/protocols/ssdaq-streams.md shows these bytes for the length framing."""
    wire = frame(pb.encode_log_data(pb.LogData(severity=20, sender="a", time=1)))
    assert wire.hex(" ") == "00 00 00 11 08 00 10 14 1a 01 61 22 00 28 01 30 00 3a 00 40 00"
