"""ICCP in Saturnin's bytes: daqd's codec against saturnin 0.10.0's own encoder and parser (the
real peer, tests/saturnin_peer.py), the byte examples of protocols/iccp.md, round trips and fuzz."""

from __future__ import annotations

import json
import struct
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daqd.errors import ProtocolError
from daqd.protocols import iccp
from daqd.protocols import protobuf_wire as pw
from daqd.protocols.iccp import (
    AnyValue,
    Error,
    Finished,
    IccpCodec,
    Ok,
    Outcome,
    Ready,
    Request,
    Stop,
)
from tests.peers import peer_python

PEER_SCRIPT = str(Path(__file__).with_name("saturnin_peer.py"))
sat = IccpCodec(encoding="saturnin")
UID = bytes.fromhex("aaaaaaaabbbbccccddddeeeeeeeeeeee")


@pytest.fixture(scope="module")
def peer() -> str:
    return str(peer_python("saturnin"))


def their_frames(peer: str) -> dict[str, list[bytes]]:
    done = subprocess.run(
        [peer, PEER_SCRIPT, "encode"], capture_output=True, text=True, timeout=60, check=True
    )
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    return {d["name"]: [bytes.fromhex(h) for h in d["frames"]] for d in lines}


def their_reading(peer: str, messages: list[list[bytes]]) -> list[dict[str, Any]]:
    stdin = "".join(json.dumps([f.hex() for f in frames]) + "\n" for frames in messages)
    done = subprocess.run(
        [peer, PEER_SCRIPT, "decode"],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return [json.loads(line) for line in done.stdout.splitlines()]


# ----- against the real peer -------------------------------------------------------------------


def test_what_saturnin_sends_decodes(peer: str) -> None:
    f = their_frames(peer)
    ready = sat.decode(f["ready"])
    assert ready == Ready(
        name="toy",
        pid=6875,
        host="vm",
        endpoints={"input": ["inproc://toy-input", "tcp://127.0.0.1:36141"]},
        uid=UID,
        supplement={"n": 3.0},
    )
    # our READY of the same peer is byte for byte saturnin's
    assert sat.encode(ready) == f["ready"]
    # saturnin's controller sends CONF without the code frame (its bug A7.1): read all the same
    request = sat.decode(f["request"])
    assert request == Request(
        "CONF",
        {
            "agent": uuid.UUID(int=5).bytes,
            "logging_id": "toylog",
            "n": -5,
            "x": 1.5,
            "big": 2**64 - 1,
        },
    )
    assert sat.decode(f["request_empty"]) == Request("CONF", {})
    assert sat.decode(f["error"]) == Error("bad thing")
    assert sat.decode(f["finished_ok"]) == Finished(Outcome.OK, ("line one", "line two"))
    # repr(exc) one character per frame (its bug A7.4) is put back together
    assert sat.decode(f["finished_repr"]) == Finished(Outcome.ERROR, ("ValueError('boom')",))
    assert sat.decode(f["stop"]) == Stop()
    assert sat.decode(f["ok"]) == Ok()


def test_what_daqd_sends_saturnin_reads(peer: str) -> None:
    options = {
        "logging_id": "abc",
        "n": -5,
        "flag": True,
        "x": 0.25,
        "agent": uuid.UUID(int=7).bytes,
        "big": 2**63,
    }
    ours = [
        Ready(
            "satc",
            4242,
            "host1",
            "1.2.3",
            {"control": ["ipc:///run/x.ctl"], "live": ["tcp://127.0.0.1:5555"]},
            uid=UID,
        ),
        Request("CONF", options),
        Request("CONF", {}),
        Error("it broke: do this"),
        Finished(Outcome.OK, ("last run 7: GOOD", "12 records received")),
        Finished(Outcome.ERROR, ()),
        Ok({"result": "not carried"}),
        Stop(),
    ]
    read = their_reading(peer, [sat.encode(m) for m in ours])
    assert read[0] == {
        "type": "READY",
        "peer": {
            "uid": UID.hex(),
            "pid": 4242,
            "host": "host1",
            "supplement": {"name": "satc", "version": "1.2.3"},
        },
        "endpoints": {"control": ["ipc:///run/x.ctl"], "live": ["tcp://127.0.0.1:5555"]},
    }
    assert read[1]["type"] == "REQUEST" and read[1]["request"] == "CONFIGURE"
    assert read[1]["config"] == {
        "logging_id": 'as_string: "abc"',
        "n": "as_sint64: -5",
        "flag": "as_bool: true",
        "x": "as_double: 0.25",
        "agent": 'as_bytes: "\\000\\000\\000\\000\\000\\000\\000\\000\\000\\000\\000\\000\\000\\000\\000\\007"',
        "big": "as_uint64: 9223372036854775808",
    }
    assert read[2] == {"type": "REQUEST", "request": "CONFIGURE", "config": {}}
    assert read[3] == {"type": "ERROR", "error": "it broke: do this"}
    assert read[4] == {
        "type": "FINISHED",
        "outcome": "OK",
        "details": ["last run 7: GOOD", "12 records received"],
    }
    assert read[5] == {"type": "FINISHED", "outcome": "ERROR", "details": []}
    assert read[6] == {"type": "OK"}
    assert read[7] == {"type": "STOP"}


def test_what_daqd_refuses_saturnin_refuses_too(peer: str) -> None:
    bad = [
        [b"\x01"],  # 1-byte frame 0
        [b"\x01\x00"],  # little-endian READY is type 256
        [b"\x00\x01", pw.field_bytes(1, b"short"), b""],  # uid not 16 bytes
        [b"\x00\x01", pw.field_bytes(1, UID), pw.encode_struct({"in": ["nowhere"]})],
        [b"\x00\x01", pw.field_bytes(1, UID)],  # no endpoints frame
        [b"\x00\x02", b"STAT", b""],  # not CONF
        [b"\x00\x04", b"\xff\xfe"],  # ERROR text not UTF-8
        [b"\x00\x06", b"ok"],  # outcome is case-sensitive
    ]
    for frames in bad:
        with pytest.raises(ProtocolError):
            sat.decode(frames)
    for frames, reading in zip(bad, their_reading(peer, bad), strict=True):
        assert reading.get("invalid"), (frames, reading)


# ----- the byte examples of protocols/iccp.md ---------------------------------------------------


def test_spec_byte_examples() -> None:
    ready = [
        b"\x00\x01",
        bytes.fromhex("0a10aaaaaaaabbbbccccddddeeeeeeeeeeee10db351a02766d"),
        bytes.fromhex("0a3a0a05")
        + b"input"
        + bytes.fromhex("12 31 32 2f 0a 14 1a 12")
        + b"inproc://toy-input"
        + bytes.fromhex("0a 17 1a 15")
        + b"tcp://127.0.0.1:36141",
    ]
    assert sat.decode(ready) == Ready(
        "",
        6875,
        "vm",
        endpoints={"input": ["inproc://toy-input", "tcp://127.0.0.1:36141"]},
        uid=UID,
    )
    conf = bytes.fromhex("0a130a0a") + b"logging_id" + bytes.fromhex("12051203") + b"abc"
    conf += bytes.fromhex("0a070a01") + b"n" + bytes.fromhex("1202400a")
    assert sat.decode([b"\x00\x02", b"CONF", conf]) == Request(
        "CONF", {"logging_id": "abc", "n": 5}
    )
    assert sat.encode(Request("CONF", {"logging_id": "abc", "n": 5})) == [
        b"\x00\x02",
        b"CONF",
        conf,
    ]
    assert sat.encode(Finished(Outcome.OK)) == [b"\x00\x06", b"OK"]
    assert sat.encode(Stop()) == [b"\x00\x05"]
    assert sat.encode(Ok({"dropped": 1})) == [b"\x00\x03"]


def test_details_go_one_line_per_frame_never_one_character() -> None:
    finished = Finished(Outcome.ERROR, "one text")  # type: ignore[arg-type]
    for codec in (sat, IccpCodec()):
        assert codec.encode(finished) == [b"\x00\x06", b"ERROR", b"one text"]


def test_other_encodings_point_at_each_other() -> None:
    """A READY in the other encoding says which one it is, not just 'bad msgpack'."""
    frames = sat.encode(Ready("x", 1, "h", endpoints={}, uid=UID))
    with pytest.raises(ProtocolError, match="Saturnin"):
        IccpCodec().decode(frames)
    with pytest.raises(ProtocolError):
        sat.decode(IccpCodec().encode(Ready("x", 1)))


def test_encoding_what_saturnin_cannot_carry_is_refused() -> None:
    for message in (
        Ready("x", 1, endpoints={}, uid=b""),  # no uid
        Ready("x", 1, endpoints={"c": ["127.0.0.1:5"]}, uid=UID),  # not proto://
        Request("STAT", {}),  # Saturnin has only CONF
        Request("CONF", {"list": [1, 2]}),  # no list Value
        Request("CONF", {"big": 2**64}),
    ):
        with pytest.raises(ProtocolError):
            sat.encode(message)


def test_body_over_the_limit_is_refused_unread() -> None:
    small = IccpCodec(max_body_bytes=100, encoding="saturnin")
    with pytest.raises(ProtocolError, match="over the limit"):
        small.decode([b"\x00\x02", b"CONF", b"\x0a" * 101])


def test_deep_nesting_is_a_protocol_error() -> None:
    inner = b""
    for _ in range(pw.MAX_DEPTH + 5):
        inner = pw.field_bytes(2, pw.entry("s", inner))
    with pytest.raises(ProtocolError, match="nested"):
        sat.decode([b"\x00\x02", b"CONF", inner])


# ----- round trips and fuzz --------------------------------------------------------------------

text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=30)
option_values = (
    st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | text
    | st.binary(max_size=20)
    | st.builds(AnyValue, text, st.binary(max_size=10))
)
configs = st.recursive(
    st.dictionaries(text, option_values, max_size=4),
    lambda children: st.dictionaries(text, option_values | children, max_size=4),
    max_leaves=10,
)
addresses = st.builds(
    lambda proto, rest: f"{proto}://{rest}",
    st.sampled_from(iccp.SATURNIN_TRANSPORTS),
    st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=20),
)
struct_values = st.recursive(
    st.none() | st.booleans() | st.floats(allow_nan=False) | text,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(text, children, max_size=3),
    max_leaves=8,
)
saturnin_messages = st.one_of(
    st.builds(
        Ready,
        name=text,
        pid=st.integers(0, 2**32 - 1),
        host=text,
        version=text,
        endpoints=st.dictionaries(text, st.lists(addresses, max_size=3), max_size=3),
        uid=st.binary(min_size=16, max_size=16),
        supplement=st.dictionaries(
            text.filter(lambda k: k not in ("name", "version")), struct_values, max_size=3
        ),
    ),
    st.builds(Request, code=st.just("CONF"), args=configs),
    st.just(Ok()),
    st.builds(Error, message=text),
    st.just(Stop()),
    st.builds(
        Finished,
        outcome=st.sampled_from(Outcome),
        details=st.just(()) | st.tuples(text.filter(lambda t: len(t) > 1), text),
    ),
)


@given(saturnin_messages)
def test_round_trip(message: iccp.Message) -> None:
    frames = sat.encode(message)
    assert all(isinstance(f, bytes) for f in frames)
    decoded = sat.decode(frames)
    if isinstance(message, Ready):  # numbers in a Struct come back as doubles, as in Saturnin
        assert decoded == Ready(
            message.name,
            message.pid,
            message.host,
            message.version,
            message.endpoints,
            message.uid,
            pw.decode_struct(pw.encode_struct(message.supplement)),
        )
    else:
        assert decoded == message


@settings(max_examples=400)
@given(st.integers(0, 8), st.lists(st.binary(max_size=64), max_size=4))
def test_arbitrary_frames_give_message_or_protocol_error(mtype: int, body: list[bytes]) -> None:
    try:
        message = sat.decode([struct.pack("!H", mtype), *body])
    except ProtocolError as exc:
        assert str(exc).startswith("ICCP")
    else:
        assert isinstance(message, Ready | Request | Ok | Error | Stop | Finished)


@settings(max_examples=300)
@given(saturnin_messages, st.data())
def test_mutated_messages_give_message_or_protocol_error(
    message: iccp.Message, data: st.DataObject
) -> None:
    frames = sat.encode(message)
    i = data.draw(st.integers(0, len(frames) - 1))
    frame = bytearray(frames[i])
    if frame:
        at = data.draw(st.integers(0, len(frame) - 1))
        frame[at] = data.draw(st.integers(0, 255))
        frame = frame[: data.draw(st.integers(0, len(frame)))]
    frames[i] = bytes(frame)
    try:
        sat.decode(frames)
    except ProtocolError:
        pass


# ----- the wire helper -------------------------------------------------------------------------


def test_varints() -> None:
    assert pw.varint(0) == b"\x00" and pw.varint(300) == b"\xac\x02"
    assert pw.varint(-1) == b"\xff" * 9 + b"\x01"  # int64 -1: ten bytes, as protobuf does
    assert pw.read_varint(pw.varint(2**64 - 1), 0) == (2**64 - 1, 10)
    assert (
        pw.zigzag(-5) == 9 and pw.unzigzag(9) == -5 and pw.unzigzag(pw.zigzag(-(2**63))) == -(2**63)
    )
    with pytest.raises(pw.WireError, match="longer than 10"):
        pw.read_varint(b"\x80" * 11 + b"\x01", 0)
    with pytest.raises(pw.WireError, match="truncated"):
        pw.read_varint(b"\x80", 0)
    with pytest.raises(pw.WireError):
        pw.varint(2**64)


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        (b"\x09\x00\x00", "truncated fixed64"),
        (b"\x0d\x00", "truncated fixed32"),
        (b"\x0a\x05ab", "past the end"),
        (b"\x0b", "wire type 3"),  # groups are not proto3
        (b"\x00\x00", "field number 0"),
    ],
)
def test_bad_fields_say_what_is_wrong(raw: bytes, words: str) -> None:
    with pytest.raises(pw.WireError, match=words):
        list(pw.fields(raw))


def test_unknown_fields_are_skipped() -> None:
    """Fields a newer peer adds (any wire type) do not stop the known ones from being read."""
    extra = pw.field_varint(9, 7) + pw.key(10, pw.FIXED32) + b"\x00" * 4 + pw.field_str(11, "x")
    peer = extra + pw.field_bytes(1, UID) + pw.field_varint(2, 42) + extra
    ready = sat.decode([b"\x00\x01", peer, extra])
    assert (ready.uid, ready.pid, ready.endpoints) == (UID, 42, {})  # type: ignore[union-attr]


def test_struct_round_trip_and_any() -> None:
    value = {"a": [1.0, "x", None, True, {"b": []}], "c": {}}
    assert pw.decode_struct(pw.encode_struct(value)) == value
    assert pw.decode_any(pw.encode_any(pw.STRUCT_TYPE_URL, b"\x01")) == (
        pw.STRUCT_TYPE_URL,
        b"\x01",
    )
