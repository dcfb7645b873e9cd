"""DCS v1/v2 framing, tokenising, Tcl lists and typed messages: examples and property tests."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daqd.errors import ProtocolError
from daqd.protocols import dcss
from daqd.protocols.dcss import (
    WHITESPACE,
    DcssCodec,
    HtosConfigurePseudoMotor,
    HtosConfigureRealMotor,
    HtosReportIonChambers,
    Malformed,
    Message,
    StohConfigureRealMotor,
    StohStartOperation,
    Unknown,
    encode_v1,
    encode_v2,
    parse_message,
    tcl_join,
    tcl_split,
)

# ------------------------------------------------------------------ strategies

tokens = st.text(
    alphabet=st.characters(blacklist_characters=WHITESPACE + "\0", blacklist_categories=("Cs",)),
    min_size=1,
    max_size=12,
)
rest_text = st.text(
    alphabet=st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)), max_size=60
).map(lambda s: s.strip(WHITESPACE))
numbers = st.floats(allow_nan=False, width=64)


def _strategy_for(cls: type[Message], f: dataclasses.Field[Any]) -> st.SearchStrategy[Any]:
    if f.name == cls.rest_field:
        return rest_text
    kind = dcss.base._FIELD_KINDS[cls][f.name]
    if kind is tuple:
        return st.lists(tokens, max_size=4).map(tuple)
    if kind is float:
        return numbers
    if kind is int:
        return st.integers(-(2**40), 2**40)
    if kind is bool:
        return st.booleans()
    if f.default == "":
        return st.one_of(st.just(""), tokens)
    return tokens


def _message_strategy(cls: type[Message]) -> st.SearchStrategy[Message]:
    if cls is HtosReportIonChambers:
        return st.builds(
            HtosReportIonChambers,
            time_s=numbers,
            readings=st.lists(st.tuples(tokens, numbers), max_size=4).map(tuple),
        )
    kwargs = {f.name: _strategy_for(cls, f) for f in dcss.base._wire_fields(cls)}
    return st.builds(cls, **kwargs)


ALL_CLASSES = [*dcss.MESSAGES.values(), HtosConfigureRealMotor, HtosConfigurePseudoMotor]
any_message = st.one_of(
    *[_message_strategy(c) for c in ALL_CLASSES],
    st.builds(
        Unknown,
        tokens.filter(lambda t: t not in dcss.MESSAGES and t != "htos_configure_device"),
        rest_text,
    ),
)


def _chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    out, last = [], 0
    for p in points:
        out.append(data[last:p])
        last = p
    out.append(data[last:])
    return out


# ------------------------------------------------------------------ properties


@given(any_message)
@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
def test_every_message_round_trips_through_its_text(msg: Message) -> None:
    text = msg.to_text()
    assert parse_message(text) == msg
    # A tab after the command word skips the fast path (command found by str.find): same result.
    assert parse_message(text.replace(" ", "\t", 1)) == msg


@given(st.lists(any_message, min_size=1, max_size=6), st.lists(st.integers(0, 10_000)))
@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
def test_v2_stream_round_trip_in_any_chunking(msgs: list[Message], cuts: list[int]) -> None:
    tx = DcssCodec(2)
    handshake = dcss.HtosClientIsHardware("dhs")
    wire = tx.encode(handshake) + b"".join(tx.encode(m) for m in msgs)
    rx = DcssCodec(2)
    got: list[Message] = []
    for chunk in _chunks(wire, cuts):
        got.extend(rx.feed(chunk))
    assert got == [handshake, *msgs]
    assert rx.buffered == 0 and rx.bad_bytes == 0


@given(st.lists(any_message, min_size=1, max_size=6), st.lists(st.integers(0, 2000)))
@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
def test_v1_stream_round_trip_or_clear_refusal(msgs: list[Message], cuts: list[int]) -> None:
    tx = DcssCodec(1)
    frames = []
    expected = []
    for m in msgs:
        if len(m.to_text().encode()) > 199:
            with pytest.raises(ProtocolError, match="at most 199"):
                tx.encode(m)
        else:
            frames.append(tx.encode(m))
            expected.append(m)
    assert all(len(f) == 200 for f in frames)
    rx = DcssCodec(1)
    got: list[Message] = []
    for chunk in _chunks(b"".join(frames), cuts):
        got.extend(rx.feed(chunk))
    assert got == expected


@given(
    st.binary(max_size=600),
    st.sampled_from([1, 2]),
    st.booleans(),
    st.lists(st.integers(0, 600)),
)
@settings(max_examples=500)
def test_arbitrary_bytes_give_messages_or_protocol_error(
    data: bytes, level: int, handshake: bool, cuts: list[int]
) -> None:
    rx = DcssCodec(level, handshake=handshake, max_text_bytes=4096, max_binary_bytes=4096)
    try:
        for chunk in _chunks(data, cuts):
            for m in rx.feed(chunk):
                assert isinstance(m, Message)
                m.to_text()
    except ProtocolError:
        pass


@given(st.binary(max_size=300))
def test_arbitrary_v2_body_never_raises_beyond_protocol_error(body: bytes) -> None:
    rx = DcssCodec(2, handshake=False)
    frame = b"%12d %12d " % (len(body), 0) + body
    (m,) = rx.feed(frame)
    assert isinstance(m, Message)


@given(st.lists(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12)))
@settings(max_examples=400)
def test_tcl_join_then_split_gives_the_words_back(words: list[str]) -> None:
    joined = tcl_join(words)
    assert "\0" not in joined
    assert tcl_split(joined) == words
    # what survives a DCS frame (trailing whitespace is stripped on read) still splits the same
    assert tcl_split(joined.rstrip(WHITESPACE)) == words


@given(st.text(max_size=80))
def test_tcl_split_of_any_text_gives_words_or_protocol_error(text: str) -> None:
    try:
        assert all(isinstance(w, str) for w in tcl_split(text))
    except ProtocolError:
        pass


# ------------------------------------------------------------------ examples


def test_v1_frame_is_200_bytes_and_refuses_200_byte_text() -> None:
    assert encode_v1("x" * 199) == b"x" * 199 + b"\0"
    with pytest.raises(ProtocolError, match="200 bytes"):
        encode_v1("x" * 200)
    codec = DcssCodec(1)
    with pytest.raises(ProtocolError, match="at most 199"):
        codec.encode_text("stoh_x " + "y" * 300)


def test_v1_text_without_nul_and_registration_newline() -> None:
    rx = DcssCodec(1)
    frame = b"stoh_register_shutter shutter closed hw_shutter\n".ljust(200, b"\0")
    m, full = rx.feed(frame + b"a" * 200)
    assert m == dcss.StohRegisterShutter("shutter", "closed", "hw_shutter")
    assert m.device == "shutter"
    assert full == Unknown("a" * 200)  # a 200-byte text arrives without NUL


def test_handshake_is_v1_then_the_configured_level() -> None:
    tx = DcssCodec(2)
    hello = tx.encode_text("stoc_send_client_type")
    assert hello == b"stoc_send_client_type" + b"\0" * 179
    nxt = tx.encode_text("stoh_register_real_motor m m")
    assert nxt[:26] == b"%12d %12d " % (len("stoh_register_real_motor m m") + 1, 0)
    rx = DcssCodec(2)
    assert [type(m) for m in rx.feed(hello + nxt)] == [
        dcss.StocSendClientType,
        dcss.StohRegisterRealMotor,
    ]


_OP = b"stoh_start_operation op 1.2 x"
_N = len(_OP)


@pytest.mark.parametrize(
    "frame",
    [
        b"%12d %12d " % (_N + 1, 0) + _OP + b"\0",  # DCSS
        b"%12lu %12lu" % (_N + 1, 0) + b"\0" + _OP + b"\0",  # SSRL C++ DHS library
        b"%12d%13d " % (_N + 2, 0) + _OP + b" \0",  # pydhsfw
        b"%12d %12d " % (_N, 0) + _OP,  # ALS pyDHS
        b"%d 0" % _N + b"\0" * (26 - len(b"%d 0" % _N)) + _OP,  # java_dcss_sim
    ],
)
def test_every_known_v2_header_form_reads(frame: bytes) -> None:
    rx = DcssCodec(2, handshake=False)
    assert rx.feed(frame) == [StohStartOperation("op", "1.2", "x")]


def test_v2_binary_part_is_kept() -> None:
    rx = DcssCodec(2, handshake=False)
    (m,) = rx.feed(encode_v2("htos_operation_completed op 1.1 normal", b"\x00\x01bin"))
    assert m.binary == b"\x00\x01bin"
    assert isinstance(m, dcss.HtosOperationCompleted) and m.status == "normal"


@pytest.mark.parametrize(
    "header, match",
    [
        (b"%12d %12d " % (10**9, 0), "text length 1000000000 exceeds"),
        (b"%12d %12d " % (10, 10**10), "binary length 10000000000 exceeds"),
        (b"%12d %12d " % (-5, 0), "not two decimal"),
        (b"stoh_start_operation op 1.2", "not two decimal"),
        ((b"%12d %12d " % (10, 0))[:-3] + b"x0 ", "not two decimal"),
    ],
)
def test_bad_v2_headers_raise_protocol_error_before_allocating(header: bytes, match: str) -> None:
    rx = DcssCodec(2, handshake=False)
    with pytest.raises(ProtocolError, match=match):
        rx.feed(header)


def test_non_ascii_bytes_are_replaced_and_counted() -> None:
    rx = DcssCodec(2, handshake=False)
    (m,) = rx.feed(encode_v2(b"stoh_start_operation op 1.1 caf\xc3\xa9 \xff\xfeend"))
    assert isinstance(m, StohStartOperation)
    assert m.args == "café \ufffd\ufffdend"
    assert rx.bad_bytes == 2


def test_configure_real_motor_has_sixteen_fields_host_first() -> None:
    text = (
        "stoh_configure_real_motor sample_x localhost sample_x 12.500000 50.000000 -50.000000 "
        "1000.000000 2000.000000 0.100000 0.000000 1 1 0 0 0 normal"
    )
    m = parse_message(text)
    assert m == StohConfigureRealMotor(
        "sample_x", "localhost", "sample_x", 12.5, 50.0, -50.0, 1000.0, 2000.0, 0.1, 0.0,
        True, True, False, False, False, "normal",
    )  # fmt: skip


def test_configure_device_is_real_or_pseudo_by_field_count() -> None:
    real = parse_message("htos_configure_device m 1 10 -10 1000 500 0.1 0 1 1 0 0 0")
    assert isinstance(real, HtosConfigureRealMotor) and real.scale_factor == 1000
    pseudo = parse_message("htos_configure_device e 1 10 -10 1 1 0")
    assert isinstance(pseudo, HtosConfigurePseudoMotor) and pseudo.locked is False
    with pytest.raises(ProtocolError, match="expected 13"):
        parse_message("htos_configure_device e 1 2")


def test_bad_arguments_give_malformed_with_the_field_named() -> None:
    rx = DcssCodec(2, handshake=False)
    (m,) = rx.feed(encode_v2("stoh_start_motor_move sample_x far_away"))
    assert isinstance(m, Malformed)
    assert m.verb == "stoh_start_motor_move"
    assert "destination" in m.reason and "far_away" in m.reason
    (m,) = rx.feed(encode_v2("stoh_start_operation"))
    assert isinstance(m, Malformed) and "name" in m.reason
    (m,) = rx.feed(encode_v2(""))
    assert isinstance(m, Malformed) and m.reason == "empty message"
    assert rx.malformed == 3


def test_unknown_commands_are_kept_whole() -> None:
    m = parse_message("stoh_future_thing  a   b ")
    assert isinstance(m, Unknown) and m.verb == "stoh_future_thing" and m.args == "a   b"


def test_operation_tail_is_raw_and_tcl_split() -> None:
    m = parse_message("stoh_start_operation collect 1.2 0 {two words} /data/x PRIVATE0a1b")
    assert isinstance(m, StohStartOperation)
    assert m.args == "0 {two words} /data/x PRIVATE0a1b"
    assert tcl_split(m.args) == ["0", "two words", "/data/x", "PRIVATE0a1b"]
    assert dcss.mask_private(m.to_text()).endswith("/data/x PRIVATE*****")


def test_numbers_are_formatted_by_the_codec() -> None:
    m = dcss.HtosMotorMoveCompleted("m", 12.5, "normal")
    assert m.to_text() == "htos_motor_move_completed m 12.5 normal"
    assert tcl_join([1, 2.25, True, "a b", "", np.float64(0.5)]) == "1 2.25 1 {a b} {} 0.5"
    report = HtosReportIonChambers(1.0, (("i0", 1000.0), ("i1", 5.0)))
    assert report.to_text() == "htos_report_ion_chambers 1.0 i0 1000.0 i1 5.0"


def test_tokens_with_whitespace_are_refused_on_encode() -> None:
    with pytest.raises(ProtocolError, match="whitespace-free"):
        dcss.HtosMotorMoveStarted("two words", 1.0).to_text()


def test_unbalanced_tcl_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError, match="unmatched open brace"):
        tcl_split("a {b c")
    with pytest.raises(ProtocolError, match="instead of space"):
        tcl_split("{a}b")
