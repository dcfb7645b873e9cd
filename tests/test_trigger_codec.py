"""Property tests of the trigger packet codec (daqd.protocols.trigger): layouts, phases, windows."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daqd.protocols import trigger as tp
from daqd.sim.trigger import FAULTS, TriggerSource

u32 = st.integers(min_value=0, max_value=0xFFFFFFFF)
u64 = st.integers(min_value=0, max_value=(1 << 64) - 1)
phases = st.integers(min_value=0, max_value=7)


@st.composite
def pattern_arrays(draw: st.DrawFn, length: int) -> np.ndarray:
    """(length, 512) bool with a few (sample, SP) bits set."""
    cells = draw(
        st.lists(
            st.tuples(st.integers(0, length - 1), st.integers(0, 511)), min_size=0, max_size=40
        )
    )
    pat = np.zeros((length, 512), dtype=bool)
    for t, sp in cells:
        pat[t, sp] = True
    return pat


def bit(data: bytes, index: int) -> int:
    """Bit `index` of an MSB-first bit array, computed by hand (not numpy)."""
    return data[index // 8] >> (7 - index % 8) & 1


@settings(deadline=None, max_examples=150)
@given(st.data(), u64, phases, u32, u32, u32, st.integers(0, 0xFFFF), st.booleans())
def test_v1_round_trip_and_wire_layout(
    data: st.DataObject, tack: int, phase: int, ro: int, pps: int, clock: int, src: int, busy: bool
) -> None:
    pat = data.draw(pattern_arrays(16))
    packet = tp.encode_v1(
        tack, phase, pat, busy=busy, ro_count=ro, pps_count=pps, clock_count=clock, source=src
    )
    # the layout, read by hand: 3-byte header, <BQB, 1024 B SP-major, 64 B union, <3IH
    assert len(packet) == 1115
    assert packet[:3] == bytes([0xFE, 0xCA, 1 if busy else 0])
    assert struct.unpack_from("<Q", packet, 4)[0] == tack
    assert packet[12] == 1 << (7 - phase)  # bit-reversed one-hot
    assert struct.unpack_from("<3IH", packet, 1115 - 14) == (ro, pps, clock, src)
    for t, sp in zip(*np.nonzero(pat), strict=True):
        assert bit(packet[13 : 13 + 1024], sp * 16 + t) == 1
        assert bit(packet[13 + 1024 : 13 + 1088], sp) == 1
    assert sum(bin(b).count("1") for b in packet[13 : 13 + 1024]) == pat.sum()
    got = tp.decode(packet)
    assert (got.packet_type, got.busy, got.tack, got.phase) == (int(busy), busy, tack, phase)
    assert (got.ro_count, got.pps_count, got.clock_count, got.source) == (ro, pps, clock, src)
    assert got.readout_length == 16 and got.length_field is None
    np.testing.assert_array_equal(got.pattern_array(), pat.astype(np.uint8))
    union = sorted(set(np.nonzero(pat.any(axis=0))[0].tolist()))
    assert got.sps() == union
    assert got.pattern_sps() == sorted(np.nonzero(pat[phase])[0].tolist())
    tags = got.tags()
    assert tags["type"] == ("busy_v1" if busy else "nominal_v1") and tags["tack"] == tack


@settings(deadline=None, max_examples=150)
@given(
    st.data(),
    st.sampled_from([8, 16, 64, 128]),
    st.booleans(),
    u64,
    phases,
    st.integers(0, 255),
    st.integers(0, 255),
    st.integers(0, 0xFFFF),
    u32,
)
def test_v2_v3_round_trip_and_wire_layout(
    data: st.DataObject,
    length: int,
    zs: bool,
    tack: int,
    phase: int,
    mtype: int,
    eflags: int,
    src: int,
    ro: int,
) -> None:
    pat = data.draw(pattern_arrays(length))
    packet = tp.encode_v2(
        tack, phase, pat, zero_suppressed=zs, message_type=mtype, error_flags=eflags,
        source=src, ro_count=ro, pps_count=7, clock_count=9,
    )  # fmt: skip
    union = np.nonzero(pat.any(axis=0))[0].tolist()
    head = struct.unpack_from("<2BHBQB3I", packet, 3)
    assert packet[:3] == bytes([0xFE, 0xCA, 3 if zs else 2])
    assert head == (mtype, eflags, src, length // 8, tack, 1 << (7 - phase), ro, 7, 9)
    body = packet[93:]
    if zs:  # only the union's SPs, ascending, `length` bits each
        assert len(body) == len(union) * length // 8
        for t, sp in zip(*np.nonzero(pat), strict=True):
            assert bit(body, union.index(sp) * length + t) == 1
    else:
        assert len(body) == 512 * length // 8
        for t, sp in zip(*np.nonzero(pat), strict=True):
            assert bit(body, sp * length + t) == 1
    assert sum(bin(b).count("1") for b in body) == pat.sum()
    got = tp.decode(packet)
    assert got.packet_type == (3 if zs else 2) and got.busy == bool(mtype & 1)
    assert (got.tack, got.phase, got.message_type, got.error_flags) == (tack, phase, mtype, eflags)
    assert got.readout_length == length and got.length_field == length // 8
    np.testing.assert_array_equal(got.pattern_array(), pat.astype(np.uint8))
    assert got.sps() == union
    assert got.pattern_sps() == sorted(np.nonzero(pat[phase])[0].tolist())


def test_every_phase_decodes_to_its_own_index() -> None:
    """SSDAQ's int(log2(phase + 1)) gives 1 for phases 0 and 1; each of the 8 is distinct here."""
    pat = np.zeros((16, 512), dtype=bool)
    seen = []
    for phase in range(8):
        packet = tp.encode_v1(1, phase, pat)
        assert packet[12] == 0x80 >> phase
        seen.append(tp.decode(packet).phase)
    assert seen == list(range(8))
    ssdaq = [int(np.log2((1 << i) + 1)) for i in range(8)]
    assert ssdaq[0] == ssdaq[1] == 1  # the bug this fixes
    for byte in (0x00, 0x03, 0x81, 0xFF):
        bad = bytearray(tp.encode_v1(1, 0, pat))
        bad[12] = byte
        with pytest.raises(tp.TriggerError) as exc:
            tp.decode(bytes(bad))
        assert exc.value.reason == "bad_phase"


def test_v3_window_longer_than_the_u8_field_is_decoded_from_the_packet_size() -> None:
    pat = np.zeros((4096, 512), dtype=bool)  # 4096 samples: L / 8 = 512 does not fit a u8
    pat[5, [3, 300]] = True
    pat[4000, 77] = True
    packet = tp.encode_v2(11, 5, pat, zero_suppressed=True)
    assert packet[3 + 4] == 512 & 0xFF == 0  # what a u8 says: the field wrapped
    assert len(packet) == 93 + 3 * 4096 // 8
    got = tp.decode(packet)
    assert got.readout_length == 4096 and got.window_beyond_field
    assert got.pattern_sps() == [3, 300] and got.sps() == [3, 77, 300]
    np.testing.assert_array_equal(got.pattern_array(), pat.astype(np.uint8))
    assert got.tags()["window_beyond_field"] is True
    # a field saturated at 255 is accepted too; one that agrees with neither is refused
    saturated = tp.decode(tp.encode_v2(11, 5, pat, zero_suppressed=True, length_field=255))
    assert saturated.readout_length == 4096
    with pytest.raises(tp.TriggerError) as exc:
        tp.decode(tp.encode_v2(11, 5, pat, zero_suppressed=True, length_field=7))
    assert exc.value.reason == "bad_readout_length"
    # a window that fits: the field must match exactly
    short = np.zeros((64, 512), dtype=bool)
    short[0, 1] = True
    with pytest.raises(tp.TriggerError) as exc:
        tp.decode(tp.encode_v2(1, 0, short, length_field=9))
    assert exc.value.reason == "bad_readout_length"
    # V3 with an empty union carries no patterns: its window comes from the field alone
    empty = tp.decode(tp.encode_v2(1, 0, np.zeros((24, 512), dtype=bool), zero_suppressed=True))
    assert empty.readout_length == 24 and empty.sps() == [] and empty.pattern_sps() == []


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "short"),
        (b"\xfe\xca", "short"),
        (b"\xfe\xca\x00" + bytes(100), "short"),
        (b"\xfe\xca\x02" + bytes(80), "short"),
        (b"\xfe\xca\x00" + bytes(1200), "bad_length"),
        (b"\xca\xfe\x00" + bytes(1112), "bad_magic"),
        (b"\xfe\xca\x04" + bytes(1112), "unknown_type"),
        (b"\xfe\xca\xff", "unknown_type"),
    ],
)
def test_bad_packets_are_refused_with_a_reason(data: bytes, reason: str) -> None:
    with pytest.raises(tp.TriggerError) as exc:
        tp.decode(data)
    assert exc.value.reason == reason


def test_v2_and_v3_sizes_must_fit_the_union_and_window() -> None:
    pat = np.zeros((16, 512), dtype=bool)
    pat[3, [1, 2, 3]] = True
    v2 = tp.encode_v2(1, 3, pat)
    v3 = tp.encode_v2(1, 3, pat, zero_suppressed=True)
    for packet in (v2 + b"\x00", v2[:-1], v2[:93], v3 + b"\x00", v3[:-1], v3[:93]):
        with pytest.raises(tp.TriggerError) as exc:
            tp.decode(packet)
        assert exc.value.reason in ("bad_length", "bad_readout_length")


@settings(deadline=None, max_examples=400)
@given(st.binary(max_size=1300))
def test_arbitrary_bytes_decode_or_raise_trigger_error(data: bytes) -> None:
    try:
        got = tp.decode(data)
    except tp.TriggerError as exc:
        assert exc.reason in (
            "short", "bad_magic", "unknown_type", "bad_length", "bad_phase", "bad_readout_length",
        )  # fmt: skip
        return
    got.tags()
    got.pattern_array()


@settings(deadline=None, max_examples=400)
@given(
    st.integers(0, 4 * 256 - 1),
    st.lists(st.tuples(st.integers(0, 5000), st.integers(0, 255)), max_size=6),
    st.integers(0, 40),
    st.integers(0, 40),
)
def test_mutated_packets_decode_consistently_or_raise(
    k: int, flips: list[tuple[int, int]], cut: int, extra: int
) -> None:
    """Every packet type, with bytes overwritten, cut or appended: a TriggerError or a packet
    whose fields agree with its size."""
    sim = TriggerSource(("127.0.0.1", 9), readout_length=32)
    try:
        buf = bytearray(sim.packet(k))
    finally:
        sim.close()
    for at, value in flips:
        if at < len(buf):
            buf[at] = value
    data = bytes(buf[: len(buf) - cut]) + bytes(extra)
    try:
        got = tp.decode(data)
    except tp.TriggerError:
        return
    if got.packet_type <= 1:
        assert len(data) == 1115 and got.readout_length == 16
    elif got.packet_type == 2:
        assert len(data) == 93 + 64 * got.readout_length
    else:
        assert len(data) == 93 + len(got.sps()) * got.readout_length // 8
    assert got.pattern_array().shape == (got.readout_length, 512)
    assert set(got.pattern_sps()) <= set(got.sps())


def test_simulator_faults_are_refused_under_their_own_names() -> None:
    with TriggerSource(("127.0.0.1", 9)) as sim:
        for k in range(8):
            for fault in FAULTS:
                with pytest.raises(tp.TriggerError) as exc:
                    tp.decode(sim.faulty(fault, k))
                assert exc.value.reason == fault
            got = tp.decode(sim.packet(k))
            assert got.packet_type == sim.packet_type(k) and got.tack == sim.tack(k)
            assert got.pattern_sps() == sim.trigger_sps(k)


@settings(deadline=None, max_examples=150)
@given(st.data(), st.sampled_from([1, 2]), st.sampled_from([8, 16, 64]))
def test_patterns_outside_the_union_are_found(
    data: st.DataObject, version: int, length: int
) -> None:
    """outside_union() is true exactly when some SP with a pattern bit is missing from the union
    (checked against numpy on the decoded arrays)."""
    if version == 1:
        length = 16
    pat = data.draw(pattern_arrays(length))
    union: np.ndarray = np.asarray(pat.any(axis=0))
    drop = data.draw(st.lists(st.integers(0, 511), max_size=3))
    add = data.draw(st.lists(st.integers(0, 511), max_size=3))
    union[drop] = False
    union[add] = True
    if version == 1:
        packet = tp.encode_v1(1, 0, pat, union=union)
    else:  # encode_v2 writes the true union: overwrite it with ours
        buf = bytearray(tp.encode_v2(1, 0, pat))
        buf[29:93] = np.packbits(union.astype(np.uint8)).tobytes()
        packet = bytes(buf)
    got = tp.decode(packet)
    np.testing.assert_array_equal(got.union_array(), union.astype(np.uint8))
    expected = bool((pat.any(axis=0) & ~union).any())
    assert got.outside_union() is expected
    assert ("union_mismatch" in got.tags()) is False  # a receiver's tag, not the codec's
    v3 = tp.decode(
        tp.encode_v2(1, 0, np.zeros((8, 512), dtype=bool) | pat[:8], zero_suppressed=True)
    )
    assert v3.outside_union() is False
