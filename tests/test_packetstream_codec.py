"""Packet stream codec: the spec's bytes, limits, and property tests over arbitrary input."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daqd.errors import ProtocolError
from daqd.protocols.packetstream import (
    EOF,
    ERQ,
    MAX_BSUINT_BYTES,
    EndOfFile,
    EndOfRequests,
    Message,
    PacketDecoder,
    Request,
    Response,
    decode_bsuint,
    encode,
    encode_bsuint,
    encode_header,
)


@pytest.mark.parametrize(
    ("value", "wire"),
    [
        (0, "00"),
        (127, "7f"),
        (128, "81 00"),
        (300, "82 2c"),
        (16383, "ff 7f"),
        (16384, "81 80 00"),
    ],
)
def test_bsuint_spec_examples(value: int, wire: str) -> None:
    assert encode_bsuint(value) == bytes.fromhex(wire)
    assert decode_bsuint(bytes.fromhex(wire)) == (value, len(bytes.fromhex(wire)))


def test_bsuint_is_not_leb128() -> None:
    # LEB128 would put the low group first: 300 = ac 02
    assert encode_bsuint(300) != bytes.fromhex("ac 02")


def test_bsuint_limits() -> None:
    with pytest.raises(ProtocolError, match="longer than 10 bytes"):
        decode_bsuint(b"\x81" * 11)
    with pytest.raises(ProtocolError, match="truncated"):
        decode_bsuint(b"\x81\x80")
    assert decode_bsuint(b"\x81" * 9 + b"\x00")[1] == MAX_BSUINT_BYTES
    with pytest.raises(ValueError):
        encode_bsuint(-1)


SPEC_PACKETS: list[tuple[Message, str]] = [
    (Request(tag=2, rq_type=0, payload=b"hi"), "05 02 02 01 68 69"),
    (Response(tag=2, ok=True, payload=b"hi"), "04 02 04 68 69"),
    (Request(tag=3, rq_type=1, flags=3, payload=b"yo"), "05 03 0e 02 79 6f"),
    (Response(tag=3, ok=True, flags=3, payload=b"yo"), "04 03 1c 79 6f"),
    (
        Response(tag=4, ok=False, payload=b"exception during handler"),
        "1a 04 00" + b"exception during handler".hex(),
    ),
    (Request(tag=300, rq_type=199, flags=5, channel=3, payload=b"x"), "07 82 2c 17 03 81 48 78"),
    (EOF, "03 00 02 00"),
    (ERQ, "03 01 02 00"),
]


@pytest.mark.parametrize(("message", "wire"), SPEC_PACKETS)
def test_spec_packets_byte_for_byte(message: Message, wire: str) -> None:
    data = bytes.fromhex(wire)
    assert encode(message) == data
    assert PacketDecoder().feed(data) == [message]


def test_header_plus_payload_is_the_packet() -> None:
    rq = Request(tag=9, rq_type=4, flags=1, channel=2, payload=b"abc" * 100)
    assert encode_header(rq) + rq.payload == encode(rq)
    assert encode_header(EOF) == encode(EOF)


def test_spec_stream_decoded_one_byte_at_a_time() -> None:
    stream = b"".join(bytes.fromhex(w) for _, w in SPEC_PACKETS)
    decoder = PacketDecoder()
    got: list[Message] = []
    for i in range(len(stream)):
        got += decoder.feed(stream[i : i + 1])
    assert got == [m for m, _ in SPEC_PACKETS]
    assert decoder.buffered == 0
    decoder.feed_eof()


@pytest.mark.parametrize(
    ("wire", "what"),
    [
        ("03 02 02 00", "malformed control packet"),  # rq_type 0 with tag 2
        ("03 00 06 00", "malformed control packet"),  # EOF with flags 1
        ("04 00 02 00 41", "malformed control packet"),  # EOF with a payload
        ("04 00 03 05 00", "malformed control packet"),  # EOF on channel 5
        ("02 05 02", "rq_type runs past"),  # request without its rq_type
        ("01 85", "tag runs past"),
        ("02 05 03", "channel runs past"),
        ("00", "tag runs past"),
        ("0c 05 02" + "81" * 10, "rq_type: BSUInt longer than 10 bytes"),
        ("81" * 11, "packet length at offset 0: BSUInt longer"),
    ],
)
def test_malformed_packets_raise_protocol_error(wire: str, what: str) -> None:
    with pytest.raises(ProtocolError, match=what):
        PacketDecoder().feed(bytes.fromhex(wire))


def test_error_names_stream_offset() -> None:
    decoder = PacketDecoder()
    assert decoder.feed(encode(Request(2, 0))) == [Request(2, 0)]
    with pytest.raises(ProtocolError, match="offset 4"):
        decoder.feed(bytes.fromhex("03 07 02 00"))


def test_length_over_limit_rejected_before_the_body_arrives() -> None:
    decoder = PacketDecoder(max_packet_bytes=1000)
    header = encode_bsuint(1001)
    with pytest.raises(ProtocolError, match="more than max_packet_bytes=1000"):
        decoder.feed(header)
    # the default limit: a 2**60 length is refused from its header alone
    with pytest.raises(ProtocolError, match="max_packet_bytes"):
        PacketDecoder().feed(encode_bsuint(1 << 60))


def test_packet_at_the_limit_is_accepted() -> None:
    rq = Request(tag=2, rq_type=0, payload=b"z" * 997)
    data = encode(rq)
    assert len(data) - 2 == 1000  # two bytes of length header
    assert PacketDecoder(max_packet_bytes=1000).feed(data) == [rq]
    with pytest.raises(ProtocolError, match="declares 1000 bytes"):
        PacketDecoder(max_packet_bytes=999).feed(data)


def test_decoder_refuses_input_after_an_error() -> None:
    decoder = PacketDecoder()
    with pytest.raises(ProtocolError):
        decoder.feed(bytes.fromhex("03 05 02 00"))
    with pytest.raises(ProtocolError, match="earlier error"):
        decoder.feed(encode(EOF))


def test_truncated_packet_at_eof() -> None:
    decoder = PacketDecoder()
    assert decoder.feed(bytes.fromhex("05 02 02 01 68")) == []
    assert decoder.buffered == 5
    with pytest.raises(ProtocolError, match="stream ended inside a packet at offset 0"):
        decoder.feed_eof()


def test_channel_bit_with_channel_zero_is_channel_zero() -> None:
    # never produced by our encoder, but well-defined: the channel field says 0
    assert PacketDecoder().feed(bytes.fromhex("05 02 03 00 01 41")) == [
        Request(tag=2, rq_type=0, channel=0, payload=b"A")
    ]


def test_big_packets_in_pieces() -> None:
    decoder = PacketDecoder(big_packet_bytes=1000)
    rq = Request(tag=300, rq_type=5, flags=2, channel=7, payload=bytes(range(256)) * 20)
    rsp = Response(tag=301, ok=False, flags=1, payload=b"r" * 3000)
    data = encode(rq) + encode(Request(2, 0, payload=b"small")) + encode(rsp)
    got: list[Message] = []
    for i in range(0, len(data), 700):
        got += decoder.feed(data[i : i + 700])
        assert decoder.buffered <= len(encode(rq))
    assert got == [rq, Request(2, 0, payload=b"small"), rsp]
    decoder.feed_eof()
    # cut inside a big packet: truncated at the end of the stream
    decoder = PacketDecoder(big_packet_bytes=1000)
    assert decoder.feed(encode(rsp)[:2000]) == []
    assert decoder.buffered > 1900
    with pytest.raises(ProtocolError, match="stream ended inside a packet at offset 0"):
        decoder.feed_eof()
    # a big control packet is refused as soon as its fields are seen
    decoder = PacketDecoder(big_packet_bytes=1000)
    bad = encode_bsuint(5000) + bytes.fromhex("00 02 00") + b"z" * 100
    with pytest.raises(ProtocolError, match="malformed control packet"):
        decoder.feed(bad)


def test_large_payload_in_small_chunks() -> None:
    rq = Request(tag=5, rq_type=1, payload=bytes(range(256)) * 256)
    data = encode(rq) * 3
    decoder = PacketDecoder()
    got: list[Message] = []
    for i in range(0, len(data), 1000):
        got += decoder.feed(memoryview(data)[i : i + 1000])
    assert got == [rq] * 3


# ---- property tests ----

naturals = st.one_of(st.integers(0, 300), st.integers(0, (1 << 63) - 1))
payloads = st.binary(max_size=300)

requests = st.builds(
    Request, tag=naturals, rq_type=naturals, flags=naturals, channel=naturals, payload=payloads
)
responses = st.builds(
    Response, tag=naturals, ok=st.booleans(), flags=naturals, channel=naturals, payload=payloads
)
messages = st.one_of(requests, responses, st.just(EOF), st.just(ERQ))


@given(st.integers(0, (1 << 70) - 1))
def test_bsuint_round_trip(value: int) -> None:
    data = encode_bsuint(value)
    assert len(data) <= MAX_BSUINT_BYTES
    assert decode_bsuint(data + b"junk") == (value, len(data))


@given(
    st.lists(messages, max_size=20),
    st.lists(st.integers(1, 50), max_size=20),
    st.sampled_from([40, 100, 32 << 10]),
)
def test_message_stream_round_trip_with_any_chunking(
    msgs: list[Message], cuts: list[int], big: int
) -> None:
    # `big`: packets at least this long that arrive in pieces take the chunk-list path
    stream = b"".join(encode(m) for m in msgs)
    decoder = PacketDecoder(big_packet_bytes=big)
    got: list[Message] = []
    pos = 0
    for cut in cuts:
        got += decoder.feed(stream[pos : pos + cut])
        pos += cut
    got += decoder.feed(stream[pos:])
    decoder.feed_eof()
    assert got == msgs


@settings(max_examples=500)
@given(st.binary(max_size=200), st.integers(1, 64), st.sampled_from([40, 64, 32 << 10]))
def test_arbitrary_bytes_give_messages_or_protocol_error(data: bytes, chunk: int, big: int) -> None:
    decoder = PacketDecoder(max_packet_bytes=100, big_packet_bytes=big)
    try:
        for i in range(0, len(data), chunk):
            for m in decoder.feed(data[i : i + chunk]):
                assert isinstance(m, Request | Response | EndOfFile | EndOfRequests)
        decoder.feed_eof()
    except ProtocolError as exc:
        assert str(exc)
    assert decoder.buffered <= 100 + MAX_BSUINT_BYTES


@given(st.lists(messages, min_size=1, max_size=5), st.data())
def test_any_cut_short_stream_is_an_error_at_eof(msgs: list[Message], data: st.DataObject) -> None:
    stream = b"".join(encode(m) for m in msgs)
    cut = data.draw(st.integers(1, len(stream) - 1)) if len(stream) > 1 else 0
    if not cut:
        return
    decoder = PacketDecoder()
    decoder.feed(stream[:cut])
    boundaries = set()
    pos = 0
    for m in msgs:
        pos += len(encode(m))
        boundaries.add(pos)
    if cut in boundaries:
        decoder.feed_eof()
    else:
        with pytest.raises(ProtocolError):
            decoder.feed_eof()
