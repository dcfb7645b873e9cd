"""CDTP2 codec: the exact bytes Constellation writes, every int and timestamp width, bad input."""

from __future__ import annotations

import datetime as dt
import itertools
import struct

import msgpack
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from daqd.errors import ProtocolError
from daqd.protocols import cdtp
from daqd.protocols.cdtp import decoding

HEADER = bytes.fromhex("a5 43 44 54 50 02")

# The example from the spec: DATA from Sender.s1, seq 1 ({"t": 7}, blocks aabb and cc), seq 2.
SPEC_EXAMPLE = (
    HEADER
    + b"\xa9Sender.s1"
    + bytes.fromhex(
        "00 92 93 01 81 a1 74 07 92 c4 02 aa bb c4 01 cc 93 02 80 91 c4 03 01 01 01".replace(
            " ", ""
        )
    )
)


def constellation_frame(sender: str, kind: int, records: list) -> bytes:
    """A frame built the way constellationdaq builds it: concatenated msgpack objects."""
    packer = msgpack.Packer(datetime=True)
    out = packer.pack("CDTP\x02") + packer.pack(sender) + packer.pack(kind)
    out += packer.pack_array_header(len(records))
    for seq, tags, blocks in records:
        out += packer.pack_array_header(3) + packer.pack(seq) + packer.pack(tags)
        out += packer.pack_array_header(len(blocks))
        for block in blocks:
            out += packer.pack(block)
    return out


def test_spec_example_decodes_and_encodes_to_the_same_bytes() -> None:
    message = cdtp.decode([SPEC_EXAMPLE])
    assert isinstance(message, cdtp.Data)
    assert message.sender == "Sender.s1"
    assert [r.seq for r in message.records] == [1, 2]
    assert message.records[0].tags == {"t": 7}
    assert [bytes(b) for b in message.records[0].blocks] == [b"\xaa\xbb", b"\xcc"]
    assert [bytes(b) for b in message.records[1].blocks] == [b"\x01\x01\x01"]
    assert cdtp.encode(message) == [SPEC_EXAMPLE]


def test_blocks_are_views_of_the_received_frame() -> None:
    frame = bytearray(constellation_frame("A.b", 0, [(1, {}, [b"x" * 1000, b"y" * 70000])]))
    message = cdtp.decode_frame(frame)
    assert isinstance(message, cdtp.Data)
    first, second = message.records[0].blocks
    assert isinstance(first, memoryview) and first.obj is frame
    assert isinstance(second, memoryview) and second.obj is frame
    frame[-1] = ord("z")  # the view sees the frame's own memory
    assert bytes(second[-1:]) == b"z"
    assert message.records[0].nbytes == 71000


def test_64_kib_block_needs_bin32() -> None:
    [frame] = cdtp.encode(cdtp.Data("S.s", [cdtp.DataRecord(1, {}, [bytes(65536)])]))
    assert bytes.fromhex("c6 00 01 00 00".replace(" ", "")) in frame
    assert frame == constellation_frame("S.s", 0, [(1, {}, [bytes(65536)])])


@pytest.mark.parametrize(
    ("encoded", "value"),
    [
        (b"\x05", 5),
        (b"\xcc\xff", 255),
        (b"\xcd\x01\x00", 256),
        (b"\xce\x00\x01\x00\x00", 65536),
        (b"\xcf" + struct.pack(">Q", 7), 7),  # C++ always writes uint64
        (b"\xcf" + struct.pack(">Q", 2**64 - 1), 2**64 - 1),
        (b"\xd0\x05", 5),
        (b"\xd1\x00\x05", 5),
        (b"\xd2\x00\x00\x00\x05", 5),
        (b"\xd3" + struct.pack(">q", 2**40), 2**40),
        (b"\xff", -1),
    ],
)
def test_sequence_numbers_in_every_int_width(encoded: bytes, value: int) -> None:
    frame = HEADER + b"\xa3A.b" + b"\x00\x91\x93" + encoded + b"\x80\x90"
    message = cdtp.decode_frame(frame)
    assert isinstance(message, cdtp.Data)
    assert message.records[0].seq == value
    # message type in a wide encoding too
    frame = (
        HEADER + b"\xa3A.b" + b"\xcf" + struct.pack(">Q", 0) + b"\x91\x93" + encoded + b"\x80\x90"
    )
    assert cdtp.decode_frame(frame) == message


@pytest.mark.parametrize(
    "seq",
    [0, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**64 - 1, -1, -32, -33, -(2**63)],
)
def test_sequence_numbers_encode_in_the_smallest_width_like_msgpack(seq: int) -> None:
    message = cdtp.Data("A.b", [cdtp.DataRecord(seq, {}, [b"z"])])
    assert cdtp.encode(message) == [constellation_frame("A.b", 0, [(seq, {}, [b"z"])])]
    assert cdtp.decode(cdtp.encode(message)) == message


@pytest.mark.parametrize(
    ("encoded", "seconds", "nanoseconds"),
    [
        (b"\xd6\xff" + struct.pack(">I", 1_700_000_000), 1_700_000_000, 0),
        (
            b"\xd7\xff" + struct.pack(">Q", (123_456_789 << 34) | 1_700_000_001),
            1_700_000_001,
            123_456_789,
        ),
        (b"\xc7\x0c\xff" + struct.pack(">Iq", 5, -62_000_000_000), -62_000_000_000, 5),
    ],
)
def test_timestamps_in_all_three_widths(encoded: bytes, seconds: int, nanoseconds: int) -> None:
    eor = (
        HEADER + b"\xa3A.b\x02\x92" + b"\x93\x00\x80\x90" + b"\x93\x01\x81\xaatime_start" + encoded
    )
    message = cdtp.decode_frame(eor + b"\x90")
    assert isinstance(message, cdtp.EndOfRun)
    stamp = message.run_metadata["time_start"]
    assert stamp == msgpack.Timestamp(seconds, nanoseconds)
    # and it packs back to a timestamp ext the peer understands
    again = cdtp.decode(cdtp.encode(message))
    assert again == message


def test_bor_and_eor_round_trip_like_constellation() -> None:
    config = {"block_size": 16, "_data": {"bor_timeout": 10, "license": "CC0-1.0"}}
    bor = cdtp.BeginOfRun("Sat.one", {"user": "x"}, config)
    [frame] = cdtp.encode(bor)
    assert frame == constellation_frame("Sat.one", 1, [(0, {"user": "x"}, []), (1, config, [])])
    assert cdtp.decode_frame(frame) == bor
    start = dt.datetime(2026, 1, 2, 3, 4, 5, 678900, tzinfo=dt.UTC)
    eor = cdtp.EndOfRun("Sat.one", {}, {"condition_code": 3, "time_start": start})
    decoded = cdtp.decode(cdtp.encode(eor))
    assert isinstance(decoded, cdtp.EndOfRun)
    assert decoded.run_metadata["time_start"].to_datetime() == start


@pytest.mark.parametrize(
    ("frame", "what"),
    [
        (b"", "malformed|ends inside"),
        (HEADER, "ends inside"),
        (b"\xc4\x05CDTP\x02\xa3A.b\x00\x91\x93\x01\x80\x90", "does not start"),  # bin, not str
        (b"\xa5CDTP\x01\xa3A.b\x00\x91\x93\x01\x80\x90", "does not start"),
        (HEADER + b"\xc4\x03A.b\x00\x91\x93\x01\x80\x90", "sender must be a str"),
        (HEADER + b"\xa3A.b\x03\x91\x93\x01\x80\x90", "unknown message type"),
        (HEADER + b"\xa3A.b\xc3\x91\x93\x01\x80\x90", "message type at byte 10 is not an int"),
        (HEADER + b"\xa3A.b\x00\x90", "no records"),
        (HEADER + b"\xa3A.b\x01\x91\x93\x00\x80\x90", "exactly 2"),
        (HEADER + b"\xa3A.b\x02\x93" + b"\x93\x00\x80\x90" * 3, "exactly 2"),
        (HEADER + b"\xa3A.b\x00\x91\x92\x01\x80\x90", "array of 3"),
        (HEADER + b"\xa3A.b\x00\x91\x93\xc3\x80\x90", "not an int"),
        (HEADER + b"\xa3A.b\x00\x91\x93\x01\x90\x90", "not a map"),
        (HEADER + b"\xa3A.b\x00\x91\x93\x01\x81\x01\x02\x90", "malformed"),  # int key
        (HEADER + b"\xa3A.b\x00\x91\x93\x01\x81\xc4\x01k\x02\x90", "is not a str"),  # bin key
        (HEADER + b"\xa3A.b\x00\x91\x93\x01\x80\x91\xa2ab", "not msgpack bin"),
        (HEADER + b"\xa3A.b\x00\x91\x93\x01\x80\x80", "not an array"),
        (HEADER + b"\xa3A.b\x00\x91\x93\x01\x80\x91\xc6\xff\xff\xff\xff", "overruns"),
        (HEADER + b"\xa3A.b\x00\x91\x93\x01\x80\x91\xc5\x00", "ends inside"),
        (HEADER + b"\xa3A.b\x00\xdd\xff\xff\xff\xff\x93\x01\x80\x90", "cannot fit"),
        (HEADER + b"\xa3A.b\x00\x91\x93\x01\x80\xdd\xff\xff\xff\xff", "cannot fit"),
        (HEADER + b"\xa3A.b\x00\x91\x93\x01\x80\x90\x00", "trailing"),
        (
            HEADER + b"\xa3A.b\x02\x92\x93\x00\x80\x90\x93\x01\x81\xa1t\xd5\xff\x00\x00\x90",
            "malformed",
        ),
    ],
)
def test_bad_frames_raise_protocol_error_saying_what(frame: bytes, what: str) -> None:
    with pytest.raises(ProtocolError, match=what):
        cdtp.decode_frame(frame)


def test_frame_count_and_size_limit() -> None:
    with pytest.raises(ProtocolError, match="expected 1 frame, got 2"):
        cdtp.decode([SPEC_EXAMPLE, b""])
    with pytest.raises(ProtocolError, match="exceeds the limit of 40"):
        cdtp.decode([SPEC_EXAMPLE], max_message_bytes=40)


def test_any_str_encoding_of_the_protocol_and_array_widths() -> None:
    frame = (
        b"\xd9\x05CDTP\x02"
        + b"\xd9\x03A.b\x00"
        + b"\xdc\x00\x01"
        + b"\xdc\x00\x03\x01\x80\xdc\x00\x00"
    )
    message = cdtp.decode_frame(frame)
    assert message == cdtp.Data("A.b", [cdtp.DataRecord(1, {}, [])])


def test_encoder_refuses_what_the_wire_cannot_carry() -> None:
    encoder = cdtp.Encoder("A.b")
    with pytest.raises(ProtocolError, match="at least one record"):
        encoder.data_message(0, [])
    with pytest.raises(ProtocolError, match="str keys"):
        encoder.record_parts(1, {1: 2}, (), [])  # type: ignore[dict-item]
    with pytest.raises(ProtocolError, match="cannot encode"):
        encoder.record_parts(1, {"naive": dt.datetime(2026, 1, 1)}, (), [])
    with pytest.raises(ProtocolError, match="cannot encode"):
        encoder.record_parts(1, {"x": object()}, (), [])
    # the encoder still works after a failed pack
    parts: list = []
    size, payload = encoder.record_parts(1, {"ok": 1}, [b"ab", b"cde"], parts)
    assert size == sum(len(p) for p in parts)
    assert payload == 5
    assert cdtp.decode_frame(encoder.data_message(1, parts)) == cdtp.Data(
        "A.b", [cdtp.DataRecord(1, {"ok": 1}, [b"ab", b"cde"])]
    )


# --- property tests ----------------------------------------------------------------------------

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.binary(max_size=20)
    | st.builds(
        msgpack.Timestamp,
        st.integers(min_value=-(2**63), max_value=2**63 - 1),
        st.integers(min_value=0, max_value=999_999_999),
    )
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
tag_maps = st.dictionaries(st.text(max_size=12), values, max_size=5)
blocks = st.lists(
    st.binary(max_size=300) | st.sampled_from([bytes(70000), bytes(256), bytes(65535)]), max_size=3
)
records = st.builds(
    cdtp.DataRecord, st.integers(min_value=-(2**63), max_value=2**64 - 1), tag_maps, blocks
)
messages = (
    st.builds(cdtp.Data, st.text(max_size=30), st.lists(records, min_size=1, max_size=5))
    | st.builds(cdtp.BeginOfRun, st.text(max_size=30), tag_maps, tag_maps)
    | st.builds(cdtp.EndOfRun, st.text(max_size=30), tag_maps, tag_maps)
)


@given(messages)
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_round_trip(message: cdtp.Message) -> None:
    frames = cdtp.encode(message)
    assert len(frames) == 1
    assert cdtp.decode(frames) == message


@given(messages)
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_our_frames_equal_constellations(message: cdtp.Message) -> None:
    if isinstance(message, cdtp.Data):
        recs = [(r.seq, r.tags, list(r.blocks)) for r in message.records]
        expected = constellation_frame(message.sender, 0, recs)
    else:
        second = (
            message.configuration if isinstance(message, cdtp.BeginOfRun) else message.run_metadata
        )
        kind = 1 if isinstance(message, cdtp.BeginOfRun) else 2
        expected = constellation_frame(
            message.sender, kind, [(0, message.user_tags, []), (1, second, [])]
        )
    assert cdtp.encode(message) == [expected]


@given(st.binary(max_size=400))
@example(HEADER + b"\xa3A.b\x00\xdd\x7f\xff\xff\xff")
@example(HEADER + b"\xa3A.b\x00\x91\x93\x01\xdf\x7f\xff\xff\xff")
@settings(max_examples=300, deadline=None)
def test_arbitrary_bytes_give_a_message_or_protocol_error(data: bytes) -> None:
    try:
        message = cdtp.decode_frame(data)
    except ProtocolError:
        return
    assert isinstance(message, cdtp.Data | cdtp.BeginOfRun | cdtp.EndOfRun)


@given(messages, st.data())
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_corrupted_frames_give_a_message_or_protocol_error(
    message: cdtp.Message, data: st.DataObject
) -> None:
    [frame] = cdtp.encode(message)
    buf = bytearray(frame)
    for _ in range(data.draw(st.integers(min_value=1, max_value=4))):
        at = data.draw(st.integers(min_value=0, max_value=len(buf) - 1))
        buf[at] = data.draw(st.integers(min_value=0, max_value=255))
    cut = data.draw(st.integers(min_value=0, max_value=len(buf)))
    try:
        decoded = cdtp.decode_frame(bytes(buf[:cut]))
    except ProtocolError:
        return
    assert isinstance(decoded, cdtp.Data | cdtp.BeginOfRun | cdtp.EndOfRun)


# --- the table-at-once fast path for uniform DATA messages --------------------------------------


def decode_slowly(frame: bytes) -> cdtp.Message:
    """The record-by-record parser alone, without the uniform fast path."""
    saved = cdtp.UNIFORM_MIN_RECORDS
    cdtp.UNIFORM_MIN_RECORDS = 1 << 62
    try:
        return cdtp.decode_frame(frame)
    finally:
        cdtp.UNIFORM_MIN_RECORDS = saved


@given(
    first=st.sampled_from([0, 1, 100, 120, 200, 250, 300, 65530, 70000, 2**32 - 3, 2**40]),
    count=st.integers(min_value=8, max_value=40),
    length=st.sampled_from([0, 1, 7, 255, 256, 1024, 65535, 65536]),
    odd=st.sampled_from([None, "tags", "length", "blocks", "backwards", "trailing"]),
    where=st.integers(min_value=0, max_value=39),
)
@settings(max_examples=150, deadline=None)
def test_uniform_fast_path_agrees_with_the_record_parser(
    first: int, count: int, length: int, odd: str | None, where: int
) -> None:
    records = [cdtp.DataRecord(first + i, {}, [bytes([i % 256]) * length]) for i in range(count)]
    i = where % count
    if odd == "tags":
        records[i] = cdtp.DataRecord(records[i].seq, {"t": 1}, records[i].blocks)
    elif odd == "length":
        records[i] = cdtp.DataRecord(records[i].seq, {}, [bytes(length + 1)])
    elif odd == "blocks":
        records[i] = cdtp.DataRecord(records[i].seq, {}, [b"", bytes(length)])
    elif odd == "backwards":
        records[i] = cdtp.DataRecord(0, {}, records[i].blocks)
    [frame] = cdtp.encode(cdtp.Data("S.u", records))
    if odd == "trailing":
        frame += b"\xc0"
        with pytest.raises(ProtocolError, match="trailing"):
            cdtp.decode_frame(frame)
        return
    fast = cdtp.decode_frame(frame)
    assert fast == decode_slowly(frame) == cdtp.Data("S.u", records)
    assert isinstance(fast, cdtp.Data)
    assert all(isinstance(b, memoryview) and b.obj is frame for r in fast.records for b in r.blocks)


def test_uniform_fast_path_is_taken_for_plain_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    results: list[object] = []
    original = decoding._Reader.uniform_records

    def spy(self: decoding._Reader, pos: int, count: int) -> object:
        result = original(self, pos, count)
        results.append(result)
        return result

    monkeypatch.setattr(decoding._Reader, "uniform_records", spy)
    for first, size in ((1, 1024), (1000, 1024), (70000, 65536), (2**33, 10)):
        records = [cdtp.DataRecord(first + i, {}, [bytes([i]) * size]) for i in range(100)]
        [frame] = cdtp.encode(cdtp.Data("S.u", records))
        assert cdtp.decode_frame(frame) == cdtp.Data("S.u", records)
    assert all(r is not None for r in results) and len(results) == 4


@given(
    st.one_of(
        st.integers(0, 300), st.integers(0xFF00, 0x10100), st.integers(0xFFFFFF00, 0xFFFFFFFF)
    ),
    st.one_of(st.integers(0, 300), st.integers(0xFF00, 0x10100), st.sampled_from([1024, 65536])),
)
@settings(max_examples=200, deadline=None)
def test_plain_record_head_is_what_record_parts_gives(seq: int, length: int) -> None:
    parts: list[cdtp.Block] = []
    block = bytes(length)
    size, payload = cdtp.Encoder("S.s").record_parts(seq, {}, [block], parts)
    head = cdtp.plain_record_head(seq, length)
    assert parts == [head, block]
    assert (size, payload) == (len(head) + length, length)
    # and it is what msgpack itself writes
    assert head + block == msgpack.packb([seq, {}, [block]], use_bin_type=True)


@given(
    first=st.sampled_from([0, 1, 100, 250, 65530, 70000, 2**32 - 3, 2**40, 2**64 - 20]),
    count=st.integers(min_value=1, max_value=40),
    length=st.sampled_from([0, 1, 255, 256, 1024, 65536]),
    odd=st.sampled_from([None, "tags", "gap", "repeat", "backwards"]),
    where=st.integers(min_value=0, max_value=39),
)
@settings(max_examples=150, deadline=None)
def test_plain_table_is_the_same_message(
    first: int, count: int, length: int, odd: str | None, where: int
) -> None:
    seqs = [first + i for i in range(count)]
    i = where % count
    if odd == "gap":
        seqs[i:] = [s + 2 for s in seqs[i:]]
    elif odd == "repeat" and i:
        seqs[i] = seqs[i - 1]
    elif odd == "backwards":
        seqs[i] = 0
    seqs = [min(s, 2**64 - 1) for s in seqs]
    tags = [{"t": 1} if odd == "tags" and k == i else {} for k in range(count)]
    records = [
        cdtp.DataRecord(s, t, [bytes([k % 256]) * length])
        for k, (s, t) in enumerate(zip(seqs, tags, strict=True))
    ]
    [frame] = cdtp.encode(cdtp.Data("S.p", records))
    plain = cdtp.decode_frame_plain(frame)
    assert cdtp.decode_frame(frame) == cdtp.Data("S.p", records)
    widths = {(s > 0x7F) + (s > 0xFF) + (s > 0xFFFF) + (s > 0xFFFFFFFF) for s in seqs}
    if count < cdtp.UNIFORM_MIN_RECORDS or odd == "tags" or len(widths) > 1:
        assert plain == cdtp.Data("S.p", records)  # not a table: decoded as usual
        return
    assert isinstance(plain, cdtp.PlainData)
    assert plain.data() == cdtp.Data("S.p", records)
    assert plain.seqs == seqs and plain.length == length
    assert plain.consecutive == all(b == a + 1 for a, b in itertools.pairwise(seqs))
    assert [bytes(plain.frame[at : at + length]) for at in plain.starts] == [
        bytes(r.blocks[0]) for r in records
    ]


@pytest.mark.parametrize("gap_at", [None, 5, 300, 599])
def test_plain_table_of_many_records(gap_at: int | None) -> None:
    """Sequence numbers are read a chunk of records at a time: a long message, in one piece."""
    seqs = [70000 + i + (gap_at is not None and i >= gap_at) for i in range(600)]
    records = [cdtp.DataRecord(s, {}, [bytes([s % 256]) * 3]) for s in seqs]
    [frame] = cdtp.encode(cdtp.Data("S.m", records))
    plain = cdtp.decode_frame_plain(frame)
    assert isinstance(plain, cdtp.PlainData)
    assert plain.seqs == seqs and plain.consecutive == (gap_at is None)
    assert plain.data() == cdtp.decode_frame(frame) == cdtp.Data("S.m", records)


@given(
    first=st.sampled_from(
        [0, 1, 100, 127, 128, 200, 255, 256, 1000, 65535, 65536, 0x1FFF0, 0xFFFFF0, 2**32 - 9]
    ),
    count=st.integers(min_value=1, max_value=40),
    length=st.sampled_from([1, 7, 255, 256, 1024, 65535, 65536]),
    spare=st.sampled_from([0, 1, 20]),
)
@settings(max_examples=150, deadline=None)
def test_plain_records_are_what_record_parts_gives(
    first: int, count: int, length: int, spare: int
) -> None:
    count = min(count, cdtp.seq_width_end(first) - first + 1)
    blocks: list[cdtp.Block] = [bytes([k % 256]) * length for k in range(count)]
    blocks[::2] = [memoryview(b) for b in blocks[::2]]
    parts: list[cdtp.Block] = []
    enc = cdtp.Encoder("S.r")
    for k, block in enumerate(blocks):
        enc.record_parts(first + k, {}, [block], parts)
    run = cdtp.plain_records(first, blocks, length, spare)
    assert run[:spare] == bytes(spare)
    assert bytes(run[spare:]) == b"".join(parts)


def test_plain_records_refuses_mixed_widths_and_lengths() -> None:
    with pytest.raises(ProtocolError, match="width"):
        cdtp.plain_records(0x7F, [b"a", b"b"], 1)
    with pytest.raises(ProtocolError, match="other than"):
        cdtp.plain_records(1, [b"a", b"bb"], 1)
    assert [cdtp.seq_width_end(s) for s in (0, 0x7F, 0x80, 0xFF, 0x100, 0x10000)] == [
        0x7F,
        0x7F,
        0xFF,
        0xFF,
        0xFFFF,
        0xFFFFFFFF,
    ]
