"""ICCP codec: every message round-trips, and any frames give a message or ProtocolError."""

from __future__ import annotations

import struct

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daqd.errors import ProtocolError
from daqd.protocols import iccp
from daqd.protocols.iccp import Error, Finished, IccpCodec, Ok, Outcome, Ready, Request, Stop

text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)
integers = st.integers(-(2**63), 2**64 - 1)
scalars = st.none() | st.booleans() | integers | text | st.binary(max_size=40)
values = st.recursive(
    scalars | st.floats(allow_nan=False),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(text, children, max_size=4),
    max_leaves=12,
)
codes = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=4, max_size=4)

messages = st.one_of(
    st.builds(
        Ready,
        name=text,
        pid=st.integers(0, 2**31),
        host=text,
        version=text,
        endpoints=st.dictionaries(text, st.lists(text, max_size=3), max_size=3),
    ),
    st.builds(Request, code=codes, args=st.dictionaries(text, values, max_size=5)),
    st.builds(Ok, result=values),
    st.builds(Error, message=text, kind=st.none() | text, details=values),
    st.just(Stop()),
    st.builds(
        Finished, outcome=st.sampled_from(Outcome), details=st.tuples(text, text) | st.just(())
    ),
)


@given(messages)
def test_round_trip(message: iccp.Message) -> None:
    frames = iccp.encode(message)
    assert all(isinstance(f, bytes) for f in frames)
    assert iccp.decode(frames) == message


@settings(max_examples=300)
@given(st.lists(st.binary(max_size=64), max_size=5))
def test_arbitrary_frames_give_message_or_protocol_error(frames: list[bytes]) -> None:
    try:
        message = iccp.decode(frames)
    except ProtocolError as exc:
        assert str(exc).startswith("ICCP")
    else:
        assert isinstance(message, Ready | Request | Ok | Error | Stop | Finished)


@settings(max_examples=300)
@given(
    st.sampled_from(range(0, 8)),
    st.lists(st.binary(max_size=64) | st.builds(lambda v: msgpack.packb(v), values), max_size=4),
)
def test_typed_head_with_arbitrary_bodies(mtype: int, body: list[bytes]) -> None:
    try:
        iccp.decode([struct.pack("!H", mtype), *body])
    except ProtocolError:
        pass


def test_wire_layout_matches_the_spec() -> None:
    frames = iccp.encode(Request("STAT", {}))
    assert frames == [b"\x00\x02", b"STAT", b"\x80"]
    assert iccp.encode(Stop()) == [b"\x00\x05"]
    assert iccp.encode(Finished(Outcome.ERROR, ("drain timed out",))) == [
        b"\x00\x06",
        b"ERROR",
        b"drain timed out",
    ]
    assert iccp.encode(Error("no such receiver")) == [b"\x00\x04", b"no such receiver"]
    ok = iccp.encode(Ok({"state": "ORBIT"}))
    assert ok[0] == b"\x00\x03" and msgpack.unpackb(ok[1]) == {"state": "ORBIT"}
    ready = iccp.encode(Ready("w1", 42, "box", "0.1", {"data": ["tcp://127.0.0.1:5"]}))
    assert msgpack.unpackb(ready[1])["endpoints"] == {"data": ["tcp://127.0.0.1:5"]}


def test_extra_trailing_frames_are_ignored() -> None:
    assert iccp.decode([b"\x00\x05", b"junk", b"more"]) == Stop()
    assert iccp.decode([b"\x00\x02", b"TAPS", b"\x80", b"extra"]) == Request("TAPS", {})


def test_request_without_arguments_frame_means_empty_map() -> None:
    assert iccp.decode([b"\x00\x02", b"STAT"]) == Request("STAT", {})


@pytest.mark.parametrize(
    ("frames", "words"),
    [
        ([], "no frames"),
        ([b"\x02"], "expected 2 bytes"),
        ([b"\x00\x09"], "unknown message type 9"),
        ([b"\x00\x02"], "missing frame 1"),
        ([b"\x00\x02", b"STA"], "4 bytes"),
        ([b"\x00\x02", b"ST\x00T"], "printable ASCII"),
        ([b"\x00\x02", b"STAT", msgpack.packb([1, 2])], "expected a map"),
        ([b"\x00\x02", b"STAT", b"\xc1"], "not valid msgpack"),
        ([b"\x00\x02", b"STAT", b"\x80\x80"], "not valid msgpack"),
        ([b"\x00\x04", b"\xff\xfe"], "not UTF-8"),
        ([b"\x00\x06", b"MAYBE"], "not OK, ERROR or UNKNOWN"),
        ([b"\x00\x01", msgpack.packb({"name": "w"})], "'pid'"),
        ([b"\x00\x01", msgpack.packb({"name": "w", "pid": 1, "endpoints": {"a": 1}})], "endpoints"),
    ],
)
def test_bad_frames_say_what_is_wrong(frames: list[bytes], words: str) -> None:
    with pytest.raises(ProtocolError, match=words):
        iccp.decode(frames)


def test_body_over_the_limit_is_refused_before_unpacking() -> None:
    codec = IccpCodec(max_body_bytes=100)
    body = msgpack.packb({"config": "x" * 200})
    with pytest.raises(ProtocolError, match="over the limit of 100 bytes"):
        codec.decode([b"\x00\x02", b"CONF", body])
    assert codec.decode([b"\x00\x02", b"CONF", msgpack.packb({"config": "x"})]).args == {
        "config": "x"
    }


def test_deeply_nested_body_is_a_protocol_error() -> None:
    body = b"\x91" * 100_000 + b"\xc0"
    with pytest.raises(ProtocolError):
        iccp.decode([b"\x00\x03", body])


def test_encoding_bad_messages_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError, match="4 ASCII"):
        iccp.encode(Request("STATUS", {}))
    with pytest.raises(ProtocolError, match="msgpack"):
        iccp.encode(Ok(object()))
