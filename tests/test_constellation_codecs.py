"""CHIRP, CSCP, CHP and CMDP codecs: bytes written from the spec, round trips, and any bytes give a
message or ProtocolError only."""

from __future__ import annotations

import uuid
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daqd.errors import ProtocolError
from daqd.protocols import chirp, chp, cmdp, cscp

TS = msgpack.Timestamp(1_700_000_000, 123_456_789)
# msgpack timestamp 64: fixext 8, type -1, 30-bit ns then 34-bit seconds
TS_BYTES = bytes.fromhex("d7ff") + ((123_456_789 << 34) | 1_700_000_000).to_bytes(8, "big")


# ----- CHIRP ---------------------------------------------------------------------------------
def test_chirp_uuid_is_md5_of_the_lower_cased_name() -> None:
    # the example of the spec
    assert uuid.UUID(bytes=chirp.name_uuid("Sender.s1")) == uuid.UUID(
        "e95e59f9-71e5-52c3-5009-2c319d3f9894"
    )


def test_chirp_offer_bytes_from_the_spec() -> None:
    group, host = chirp.name_uuid("edda"), chirp.name_uuid("Daqd.one")
    wire = b"CHIRP\x01" + b"\x02" + group + host + b"\x01" + b"\x1f\x90"
    beacon = chirp.decode(wire)
    assert beacon == chirp.Beacon(chirp.BeaconType.OFFER, group, host, chirp.Service.CONTROL, 8080)
    assert chirp.encode(beacon) == wire
    assert len(wire) == chirp.BEACON_BYTES == 42


@pytest.mark.parametrize(
    ("wire", "words"),
    [
        (b"CHIRP\x01\x02" + bytes(35), "service 0"),
        (b"CHIRP\x01\x02" + bytes(34), "41 bytes"),
        (b"CHIRP\x02\x02" + bytes(32) + b"\x01\x00\x00", "header"),
        (b"CHIRP\x01\x04" + bytes(32) + b"\x01\x00\x00", "type 4"),
        (b"CHIRP\x01\x02" + bytes(32) + b"\x05\x00\x00", "service 5"),
    ],
)
def test_chirp_refuses_bad_beacons(wire: bytes, words: str) -> None:
    with pytest.raises(ProtocolError, match=words):
        chirp.decode(wire)


uuids = st.binary(min_size=16, max_size=16)
beacons = st.builds(
    chirp.Beacon,
    st.sampled_from(chirp.BeaconType),
    uuids,
    uuids,
    st.sampled_from(chirp.Service),
    st.integers(0, 0xFFFF),
)


@settings(deadline=None)
@given(beacons)
def test_chirp_round_trip(beacon: chirp.Beacon) -> None:
    assert chirp.decode(chirp.encode(beacon)) == beacon


@settings(deadline=None)
@given(
    st.binary(max_size=64) | st.binary(min_size=42, max_size=42).map(lambda b: b"CHIRP\x01" + b[6:])
)
def test_chirp_any_bytes(data: bytes) -> None:
    try:
        assert isinstance(chirp.decode(data), chirp.Beacon)
    except ProtocolError:
        pass


# ----- CSCP ----------------------------------------------------------------------------------
def test_cscp_request_bytes_from_the_spec() -> None:
    # header: "CSCP\x01", "ctrl", timestamp, {}; verb: 0, "GET_STATE"
    frames = [
        b"\xa5CSCP\x01" + b"\xa4ctrl" + TS_BYTES + b"\x80",
        b"\x00" + b"\xa9GET_STATE",
    ]
    msg = cscp.decode(frames)
    assert msg == cscp.Message("ctrl", cscp.Type.REQUEST, "GET_STATE", None, {}, TS)
    assert cscp.encode(msg) == frames


def test_cscp_reply_with_payload_and_tags() -> None:
    msg = cscp.Message(
        "Daqd.one",
        cscp.Type.SUCCESS,
        "ORBIT",
        0x30,
        {"last_changed": TS, "last_changed_iso": "x"},
        TS,
    )
    frames = cscp.encode(msg)
    assert len(frames) == 3 and frames[2] == b"\x30"
    assert frames[1] == b"\x01\xa5ORBIT"
    assert cscp.decode(frames) == msg
    # what constellationdaq's own unpacker reads from it
    unpacker = msgpack.Unpacker(timestamp=0)
    unpacker.feed(frames[0])
    assert list(unpacker) == ["CSCP\x01", "Daqd.one", TS, msg.tags]


@pytest.mark.parametrize(
    ("frames", "words"),
    [
        ([b"\xa5CSCP\x01"], "1 frames"),
        ([b"", b"", b"", b""], "4 frames"),
        ([b"\xa5CSCP\x02\xa1x" + TS_BYTES + b"\x80", b"\x00\xa1x"], "protocol"),
        ([b"\xa5CSCP\x01\xa1x" + TS_BYTES + b"\x80", b"\x07\xa1x"], "type 7"),
        ([b"\xa5CSCP\x01\xa1x" + TS_BYTES + b"\x80", b"\x00\x01"], "text: expected str"),
        ([b"\xa5CSCP\x01\xa1x\x00\x80", b"\x00\xa1x"], "time: expected Timestamp"),
        ([b"\xa5CSCP\x01\xa1x" + TS_BYTES, b"\x00\xa1x"], "holds 3"),
        ([b"\xa5CSCP\x01\xa1x" + TS_BYTES + b"\x80", b"\x00\xa1x", b"\x01\x02"], "holds 2"),
        (
            [b"\xa5CSCP\x01\xa1x" + TS_BYTES + b"\x80", b"\x00\xa1x", b"\xdb\xff\xff\xff\xff"],
            "cut off",
        ),
        ([b"\xa5CSCP\x01\xa1x" + TS_BYTES + b"\x80", b"\x00\xa1x", b"\xc1"], "not msgpack"),
        ([b"\xa5CSCP\x01\xa1x" + TS_BYTES + b"\x80", b"\x00\xa1x", b"\xd4\x05\x00"], "ext type 5"),
        ([b"\xa5CSCP\x01\xa1x" + TS_BYTES + b"\x81\x01\x02", b"\x00\xa1x"], "tag name"),
    ],
)
def test_cscp_refuses_bad_messages(frames: list[bytes], words: str) -> None:
    with pytest.raises(ProtocolError, match=words):
        cscp.decode(frames)


def test_cscp_a_huge_length_prefix_is_refused_before_allocating() -> None:
    # an array claiming 2**32-1 entries in a 5-byte payload frame
    frames = [b"\xa5CSCP\x01\xa1x" + TS_BYTES + b"\x80", b"\x00\xa1x", b"\xdd\xff\xff\xff\xff"]
    with pytest.raises(ProtocolError):
        cscp.decode(frames)


timestamps = st.builds(msgpack.Timestamp, st.integers(0, 2**34 - 1), st.integers(0, 999_999_999))
keys = st.text(max_size=8)
values: st.SearchStrategy[Any] = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.binary(max_size=20)
    | timestamps,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=4),
    max_leaves=12,
)
tags = st.dictionaries(keys, values, max_size=4)


@settings(deadline=None)
@given(
    st.text(max_size=30),
    st.sampled_from(cscp.Type),
    st.text(max_size=30),
    values.filter(lambda v: v is not None) | st.none(),
    tags,
    timestamps,
)
def test_cscp_round_trip(
    sender: str, kind: cscp.Type, text: str, payload: Any, tag_map: dict[str, Any], ts: Any
) -> None:
    msg = cscp.Message(sender, kind, text, payload, tag_map, ts)
    assert cscp.decode(cscp.encode(msg)) == msg


frame_lists = st.lists(st.binary(max_size=40), max_size=4)


def _mutated(frames: list[bytes], at: int, byte: int) -> list[bytes]:
    out = [bytearray(f) for f in frames]
    flat = [(i, j) for i, f in enumerate(out) for j in range(len(f))]
    if flat:
        i, j = flat[at % len(flat)]
        out[i][j] = byte
    return [bytes(f) for f in out]


valid_cscp = st.builds(
    lambda t, p, at, byte: _mutated(
        cscp.encode(cscp.Message("ctrl", cscp.Type.REQUEST, t, p, {}, TS)), at, byte
    ),
    st.text(max_size=10),
    values,
    st.integers(0, 200),
    st.integers(0, 255),
)


@settings(deadline=None)
@given(frame_lists | valid_cscp)
def test_cscp_any_frames(frames: list[bytes]) -> None:
    try:
        assert isinstance(cscp.decode(frames), cscp.Message)
    except ProtocolError:
        pass


# ----- CHP -----------------------------------------------------------------------------------
def test_chp_heartbeat_bytes_from_the_spec() -> None:
    frame = b"\xa4CHP\x01" + b"\xa8Daqd.one" + TS_BYTES + b"\x30" + b"\xcc\x86" + b"\xcd\x05\xdc"
    hb = chp.decode([frame, b"ready"])
    assert hb == chp.Heartbeat("Daqd.one", TS, 0x30, 0x86, 1500, "ready")
    assert hb.flags & chp.Flags.IS_EXTRASYSTOLE
    assert chp.encode(hb) == [frame, b"ready"]
    assert chp.decode([frame]).status is None


def test_chp_interval_rule() -> None:
    assert chp.interval_ms(0, 30000) == 500
    assert chp.interval_ms(1, 30000) == 500
    assert chp.interval_ms(2, 30000) == 1500  # what the spec saw with 2 subscribers
    assert chp.interval_ms(5, 30000) == 3000
    assert chp.interval_ms(10_000, 30000) == 30000
    assert chp.interval_ms(10_000, 2000) == 2000
    assert chp.ROLE_FLAGS["DYNAMIC"] == 6 and chp.ROLE_FLAGS["ESSENTIAL"] == 7


@pytest.mark.parametrize(
    ("frames", "words"),
    [
        ([], "0 frames"),
        ([b"\xa4CHP\x02\xa1x" + TS_BYTES + b"\x30\x06\x01"], "protocol"),
        ([b"\xa4CHP\x01\xa1x" + TS_BYTES + b"\xcd\x01\x00\x06\x01"], "state 256"),
        ([b"\xa4CHP\x01\xa1x" + TS_BYTES + b"\x30\x06"], "holds 5"),
        ([b"\xa4CHP\x01\xa1x" + TS_BYTES + b"\x30\x06\x01", b"\xff"], "UTF-8"),
    ],
)
def test_chp_refuses_bad_messages(frames: list[bytes], words: str) -> None:
    with pytest.raises(ProtocolError, match=words):
        chp.decode(frames)


@settings(deadline=None)
@given(
    st.text(max_size=30),
    timestamps,
    st.integers(0, 255),
    st.integers(0, 255),
    st.integers(0, 2**32 - 1),
    st.none() | st.text(max_size=30),
)
def test_chp_round_trip(
    sender: str, ts: Any, state: int, flags: int, interval: int, status: str | None
) -> None:
    hb = chp.Heartbeat(sender, ts, state, flags, interval, status)
    assert chp.decode(chp.encode(hb)) == hb


@settings(deadline=None)
@given(frame_lists)
def test_chp_any_frames(frames: list[bytes]) -> None:
    try:
        assert isinstance(chp.decode(frames), chp.Heartbeat)
    except ProtocolError:
        pass


# ----- CMDP ----------------------------------------------------------------------------------
def test_cmdp_log_and_stat_bytes_from_the_spec() -> None:
    header = b"\xa5CMDP\x01" + b"\xa8Daqd.one" + TS_BYTES + b"\x81\xa6lineno\x07"
    log = cmdp.decode([b"LOG/WARNING/RX", header, b"disk full"])
    assert log == cmdp.Log("Daqd.one", "WARNING", "RX", "disk full", {"lineno": 7}, TS)
    assert cmdp.encode(log) == [b"LOG/WARNING/RX", header, b"disk full"]
    stat = cmdp.decode([b"STAT/RX_BYTES", header, b"\xcd\x04\x00" + b"\x00" + b"\xa1B"])
    assert stat == cmdp.Stat("Daqd.one", "RX_BYTES", 1024, "B", {"lineno": 7}, TS)
    note = cmdp.decode([b"STAT?", header, b"\x81\xa8STAT/RUN\xa3now"])
    assert note == cmdp.Notification("Daqd.one", "STAT?", {"STAT/RUN": "now"}, {"lineno": 7}, TS)


@pytest.mark.parametrize(
    ("topic", "payload", "words"),
    [
        (b"LOG/LOUD", b"x", "level 'LOUD'"),
        (b"LOG/INFO/", b"x", "LOG/<LEVEL>"),
        (b"STAT/X", b"\x01\x00", "holds 2"),
        (b"NEWS", b"x", "neither"),
        (b"LOG/INFO", b"\xff", "UTF-8"),
        (b"\xff", b"x", "topic is not UTF-8"),
    ],
)
def test_cmdp_refuses_bad_messages(topic: bytes, payload: bytes, words: str) -> None:
    header = b"\xa5CMDP\x01\xa1x" + TS_BYTES + b"\x80"
    with pytest.raises(ProtocolError, match=words):
        cmdp.decode([topic, header, payload])


level = st.sampled_from(cmdp.LEVELS)
component = st.text(max_size=10).filter(lambda c: not c.startswith("/"))
cmdp_messages = (
    st.builds(
        cmdp.Log, st.text(max_size=10), level, component, st.text(max_size=40), tags, timestamps
    )
    | st.builds(
        cmdp.Stat,
        st.text(max_size=10),
        st.text(min_size=1, max_size=10),
        values,
        st.text(max_size=5),
        tags,
        timestamps,
    )
    | st.builds(
        cmdp.Notification,
        st.text(max_size=10),
        st.sampled_from(["LOG?", "STAT?"]),
        st.dictionaries(st.text(max_size=10), st.text(max_size=10), max_size=4),
        tags,
        timestamps,
    )
)


@settings(deadline=None)
@given(cmdp_messages)
def test_cmdp_round_trip(msg: cmdp.Message) -> None:
    assert cmdp.decode(cmdp.encode(msg)) == msg


@settings(deadline=None)
@given(
    frame_lists
    | st.builds(
        lambda t, p: [t, b"\xa5CMDP\x01\xa1x" + TS_BYTES + b"\x80", p],
        st.sampled_from([b"LOG/INFO", b"STAT/A", b"LOG?", b"STAT?"]),
        st.binary(max_size=30),
    )
)
def test_cmdp_any_frames(frames: list[bytes]) -> None:
    try:
        assert isinstance(cmdp.decode(frames), cmdp.Log | cmdp.Stat | cmdp.Notification)
    except ProtocolError:
        pass
