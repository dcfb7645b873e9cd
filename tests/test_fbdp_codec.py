"""FBDP (Firebird Butler Data Pipe): daqd's codec against saturnin 0.10.0's own FBDPMessage (the
real peer, tests/saturnin_peer.py fbdp-encode / fbdp-decode), the consumer session's rules, round
trips and fuzz."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daqd.protocols import fbdp
from daqd.protocols.fbdp import (
    Close,
    Data,
    ErrorCode,
    ErrorDescription,
    FbdpError,
    Flag,
    Noop,
    Open,
    PipeClient,
    PipeSocket,
    Ready,
    decode,
    encode,
)
from tests.peers import peer_python

PEER_SCRIPT = str(Path(__file__).with_name("saturnin_peer.py"))


@pytest.fixture(scope="module")
def peer() -> str:
    return str(peer_python("saturnin"))


def run_peer(peer: str, mode: str, stdin: str = "") -> list[dict[str, Any]]:
    done = subprocess.run(
        [peer, PEER_SCRIPT, mode], input=stdin, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


# ----- against the real peer -------------------------------------------------------------------

THEIRS = {
    "open": Open("words", PipeSocket.OUTPUT, "text/plain", {"charset": "utf-8", "n": 3.0}),
    "ready": Ready(50),
    "ready_zero": Ready(0),
    "noop_ack_req": Noop(Flag.ACK_REQ),
    "data": Data(b"hello", 7),
    "data_ack_req": Data(b"", 65535, Flag.ACK_REQ),
    "data_ack_reply": Data(None, 9, Flag.ACK_REPLY),
    "close_ok": Close(),
    "close_error": Close(
        ErrorCode.INVALID_DATA,
        (ErrorDescription(5, "bad data", {"line": 7.0}), ErrorDescription(0, "second")),
    ),
}


@pytest.mark.interop
def test_what_saturnin_sends_decodes_and_ours_is_byte_identical(peer: str) -> None:
    made = {
        d["name"]: [bytes.fromhex(h) for h in d["frames"]] for d in run_peer(peer, "fbdp-encode")
    }
    assert set(made) == set(THEIRS)
    for name, frames in made.items():
        assert decode(frames) == THEIRS[name], name
        assert encode(THEIRS[name]) == frames, name


@pytest.mark.interop
def test_what_we_send_saturnin_reads(peer: str) -> None:
    client = PipeClient("words", "text/plain;charset=utf-8", batch=20, parameters={"x": "y"})
    ours = [
        client.open(),
        encode(Ready(20)),
        encode(Data(None, 3, Flag.ACK_REPLY)),
        encode(Noop(Flag.ACK_REPLY)),
        client.close(),
        encode(Close(ErrorCode.PROTOCOL_VIOLATION, (ErrorDescription(2, "out of band"),))),
    ]
    stdin = "".join(json.dumps([f.hex() for f in frames]) + "\n" for frames in ours)
    assert run_peer(peer, "fbdp-decode", stdin) == [
        {
            "type": "OPEN",
            "flags": 0,
            "type_data": 0,
            "open": ["words", 2, "text/plain;charset=utf-8", {"x": "y"}],
        },
        {"type": "READY", "flags": 0, "type_data": 20},
        {"type": "DATA", "flags": 2, "type_data": 3, "data": None},
        {"type": "NOOP", "flags": 2, "type_data": 0},
        {"type": "CLOSE", "flags": 0, "type_data": 0, "errors": []},
        {"type": "CLOSE", "flags": 0, "type_data": 2, "errors": [[2, "out of band"]]},
    ]


# ----- what the codec refuses ------------------------------------------------------------------

HEAD = bytes.fromhex("4642445021000007")  # DATA, type_data 7


@pytest.mark.parametrize(
    ("frames", "reason", "words"),
    [
        ([], "bad_frames", "no frames"),
        ([HEAD[:7]], "bad_header", "control frame of 7 bytes, not 8"),
        ([b"FBSP" + HEAD[4:]], "bad_fourcc", "starts b'FBSP'"),
        ([HEAD[:4] + b"\x22" + HEAD[5:]], "bad_version", "protocol revision 2, not 1"),
        ([HEAD[:5] + b"\x04" + HEAD[6:]], "bad_flags", "flags 0x04"),
        ([HEAD[:4] + b"\x31" + HEAD[5:]], "bad_type", "message type 6 is not 1..5"),
        ([HEAD[:4] + b"\x01" + HEAD[5:]], "bad_type", "message type 0"),
        ([HEAD, b"a", b"b"], "bad_frames", "DATA has 2 data frames, at most 1"),
        ([bytes.fromhex("4642445011000032"), b""], "bad_frames", "READY has 1 data frame"),
        ([bytes.fromhex("4642445009000000")], "bad_frames", "OPEN has 0 data frames"),
        ([bytes.fromhex("4642445009000000"), b"\x0a\x05words"], "bad_open", "data_format"),
        ([bytes.fromhex("4642445009000000"), b"\x0a\x09"], "bad_open", "OPEN: "),
        ([bytes.fromhex("4642445029000007")], "bad_close", "unknown error code 7"),
        ([bytes.fromhex("4642445029000003"), b"\x12\x05ab"], "bad_close", "ErrorDescription"),
    ],
)
def test_bad_frames_are_refused_with_a_reason(frames: list[bytes], reason: str, words: str) -> None:
    with pytest.raises(FbdpError) as err:
        decode(frames)
    assert err.value.reason == reason
    assert words in str(err.value)


# ----- the consumer's session ------------------------------------------------------------------


def test_a_pipe_batch_by_batch_to_close() -> None:
    client = PipeClient("words", "text/plain", batch=2)
    assert decode(client.open()) == Open("words", PipeSocket.OUTPUT, "text/plain")
    step = client.receive(Ready(5))  # the server offers 5, we take 2
    assert [decode(r) for r in step.replies] == [Ready(2)]
    assert step.violation is None
    for n in range(2):
        step = client.receive(Data(b"%d" % n))
        assert (step.data, step.replies, step.violation) == (Data(b"%d" % n), [], None)
    step = client.receive(Ready(5))  # the next batch
    assert [decode(r) for r in step.replies] == [Ready(2)]
    step = client.receive(Data(b"x", 4, Flag.ACK_REQ))
    assert [decode(r) for r in step.replies] == [Data(None, 4, Flag.ACK_REPLY)]
    step = client.receive(Noop(Flag.ACK_REQ))
    assert [decode(r) for r in step.replies] == [Noop(Flag.ACK_REPLY)]
    step = client.receive(Close())
    assert step.closed == Close() and client.closed == Close()


def test_the_server_out_of_turn_is_a_violation_and_data_is_still_data() -> None:
    client = PipeClient("p", "text/plain", batch=1)
    client.open()
    step = client.receive(Data(b"early"))
    assert (step.violation, step.data) == ("out_of_band_data", Data(b"early"))
    client.receive(Ready(3))
    step = client.receive(Ready(3))  # a READY while a batch is due
    assert step.violation == "out_of_band_ready"
    assert client.receive(Data(None, 0, Flag.ACK_REPLY)).violation == "unexpected_ack"
    assert client.receive(Open("p", PipeSocket.INPUT, "x")).violation == "open_from_server"
    client.receive(Close(ErrorCode.ERROR))
    step = client.receive(Data(b"late"))
    assert (step.violation, step.data, step.replies) == ("after_close", Data(b"late"), [])


def test_after_our_close_what_was_on_its_way_is_taken_and_not_answered() -> None:
    client = PipeClient("p", "text/plain", batch=1)
    client.open()
    client.receive(Ready(1))
    assert decode(client.close()) == Close()
    step = client.receive(Data(b"a", 0, Flag.ACK_REQ))
    assert (step.data, step.replies, step.violation) == (Data(b"a", 0, Flag.ACK_REQ), [], None)
    step = client.receive(Data(b"b"))  # past the batch, but we closed: in flight, not a fault
    assert (step.data, step.violation) == (Data(b"b"), None)
    assert client.receive(Ready(1)).replies == []


# ----- round trips and fuzz --------------------------------------------------------------------

text = st.text(min_size=1, max_size=20)
flags = st.sampled_from([Flag(0), Flag.ACK_REQ, Flag.ACK_REPLY, Flag.ACK_REQ | Flag.ACK_REPLY])
scalars = st.one_of(st.none(), st.booleans(), st.floats(allow_nan=False), st.text(max_size=8))
structs = st.dictionaries(st.text(max_size=8), scalars, max_size=3)
u16 = st.integers(0, 0xFFFF)
messages = st.one_of(
    st.builds(Open, text, st.sampled_from(list(PipeSocket)), text, structs, flags),
    st.builds(Ready, u16, flags),
    st.builds(Noop, flags),
    st.builds(Data, st.one_of(st.none(), st.binary(max_size=64)), u16, flags),
    st.builds(
        Close,
        st.sampled_from(list(ErrorCode)),
        st.lists(
            st.builds(ErrorDescription, st.integers(0, 2**64 - 1), st.text(max_size=20), structs),
            max_size=3,
        ).map(tuple),
        flags,
    ),
)


@given(messages)
def test_round_trip(message: fbdp.Message) -> None:
    assert decode(encode(message)) == message


@settings(max_examples=400)
@given(st.lists(st.binary(max_size=40), max_size=4))
def test_garbage_is_refused_with_a_reason_never_anything_else(frames: list[bytes]) -> None:
    try:
        decode(frames)
    except FbdpError as exc:
        assert exc.reason in {
            "bad_header",
            "bad_fourcc",
            "bad_version",
            "bad_flags",
            "bad_type",
            "bad_frames",
            "bad_open",
            "bad_close",
        }


@settings(max_examples=300)
@given(messages, st.data())
def test_valid_messages_corrupted_decode_or_are_refused(message: fbdp.Message, data: Any) -> None:
    frames = [bytearray(f) for f in encode(message)]
    i = data.draw(st.integers(0, len(frames) - 1))
    if frames[i]:
        j = data.draw(st.integers(0, len(frames[i]) - 1))
        frames[i][j] ^= data.draw(st.integers(1, 255))
    cut = data.draw(st.booleans())
    if cut:
        frames[i] = frames[i][: data.draw(st.integers(0, len(frames[i])))]
    client = PipeClient("p", "text/plain")
    try:
        got = decode(frames)
    except FbdpError:
        return
    client.receive(got)  # whatever decodes, the session takes without raising
