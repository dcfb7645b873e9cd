"""Property tests of the slow-signal codec: datagrams and SSDAQ readout frames."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daqd.errors import ProtocolError
from daqd.protocols import slowsignal as ss

u64 = st.integers(min_value=0, max_value=(1 << 64) - 1)
count = st.integers(min_value=0, max_value=0xFFFF)


@st.composite
def block_lists(draw: st.DrawFn) -> list[tuple[int, int, list[int]]]:
    n = draw(st.integers(min_value=1, max_value=12))
    return [
        (draw(u64), draw(u64), draw(st.lists(count, min_size=64, max_size=64))) for _ in range(n)
    ]


def struct_decode(data: bytes) -> list[tuple[int, int, list[int]]]:
    """An independent decoder: per block `>Q32HQ32H`, counts = raw ^ 0x8000."""
    fmt = struct.Struct(">Q32HQ32H")
    out = []
    for off in range(0, len(data), fmt.size):
        f = fmt.unpack_from(data, off)
        words = list(f[1:33]) + list(f[34:66])
        out.append((f[0], f[33], [w ^ 0x8000 for w in words]))
    return out


@given(block_lists())
def test_datagram_round_trip_and_wire_layout(blocks: list[tuple[int, int, list[int]]]) -> None:
    tack = [b[0] for b in blocks]
    second = [b[1] for b in blocks]
    counts = [b[2] for b in blocks]
    data = ss.encode_datagram(tack, second, counts)
    assert len(data) == 144 * len(blocks)
    assert struct_decode(data) == blocks
    decoded = ss.decode_datagram(data)
    assert len(decoded) == len(blocks)
    assert decoded.tack.tolist() == tack
    assert decoded.second.tolist() == second
    assert decoded.counts.tolist() == counts
    assert decoded.counts.dtype == np.uint16


def test_wire_word_is_twos_complement_and_mv_scale() -> None:
    raw_words = [0x0000, 0x7FFF, 0x8000, 0xFFFF] * 16
    data = struct.pack(">Q32HQ32H", 5, *raw_words[:32], 7, *raw_words[32:])
    blocks = ss.decode_datagram(data)
    # int16 0 is mid-scale 0x8000 counts; int16 -32768 (0x8000) is 0 counts
    assert blocks.counts[0, :4].tolist() == [0x8000, 0xFFFF, 0, 0x7FFF]
    mv = ss.counts_to_mv(blocks.counts)
    assert mv[0, 0] == pytest.approx(0x8000 * 0.0763)
    assert mv[0, 2] == 0.0


@given(st.binary(max_size=2000))
def test_arbitrary_bytes_give_blocks_or_protocol_error(data: bytes) -> None:
    try:
        blocks = ss.decode_datagram(data)
    except ProtocolError:
        assert len(data) == 0 or len(data) % 144 != 0
        return
    assert len(blocks) == len(data) // 144
    assert [b[0] for b in struct_decode(data)] == blocks.tack.tolist()


@pytest.mark.parametrize(
    ("nbytes", "reason"), [(0, "empty"), (143, "bad_size"), (145, "bad_size"), (1439, "bad_size")]
)
def test_bad_sizes_are_named(nbytes: int, reason: str) -> None:
    with pytest.raises(ss.DatagramError) as info:
        ss.decode_datagram(bytes(nbytes))
    assert info.value.reason == reason
    assert isinstance(info.value, ProtocolError)


def test_oversized_datagram_refused_before_decoding() -> None:
    with pytest.raises(ss.DatagramError, match="exceed"):
        ss.check_datagram_size(144 * (ss.MAX_BLOCKS + 1))


def test_encode_refuses_bad_arguments() -> None:
    with pytest.raises(ProtocolError):
        ss.encode_datagram([], [], np.zeros((0, 64)))
    with pytest.raises(ProtocolError):
        ss.encode_datagram([1, 2], [1], np.zeros((2, 64)))
    with pytest.raises(ProtocolError):
        ss.encode_datagram([1], [1], np.full((1, 64), 70000))


mv_values = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False, width=64), st.just(float("nan"))
)


@given(
    u64,
    u64,
    u64,
    u64,
    st.lists(mv_values, min_size=64, max_size=64),
    st.sets(st.integers(0, 31), max_size=32),
)
def test_ssdaq_frame_round_trip(
    readout: int, tack: int, cpu_s: int, cpu_ns: int, row: list[float], missing: set[int]
) -> None:
    mv = np.tile(np.asarray(row), (32, 1)) + np.arange(32)[:, None]
    mv[sorted(missing)] = np.nan
    frame = ss.encode_ssdaq_frame(readout, tack, cpu_s, cpu_ns, mv)
    assert len(frame) == 16416
    assert struct.unpack_from("<4Q", frame) == (readout, tack, cpu_s, cpu_ns)
    back = ss.decode_ssdaq_frame(frame)
    assert (back.readout, back.tack, back.cpu_time_s, back.cpu_time_ns) == (
        readout,
        tack,
        cpu_s,
        cpu_ns,
    )
    np.testing.assert_array_equal(back.mv, mv)
    assert ss.encode_ssdaq_frame(readout, tack, cpu_s, cpu_ns, back.mv) == frame


def _seeded_bytes(size: int) -> st.SearchStrategy[bytes]:
    """Random bytes of a given length drawn from a seed: frame-sized inputs without asking
    Hypothesis for 16 KB of entropy (which trips its data_too_large health check)."""
    return st.integers(0, 2**32 - 1).map(lambda seed: np.random.default_rng(seed).bytes(size))


@settings(max_examples=50)
@given(
    st.one_of(
        st.binary(max_size=2000),
        st.integers(0, 17000).flatmap(_seeded_bytes),
        _seeded_bytes(16416),
    )
)
def test_arbitrary_bytes_give_frame_or_protocol_error(data: bytes) -> None:
    try:
        frame = ss.decode_ssdaq_frame(data)
    except ProtocolError:
        assert len(data) != 16416
        return
    assert frame.mv.shape == (32, 64)


def test_ssdaq_frame_refuses_bad_values() -> None:
    with pytest.raises(ProtocolError):
        ss.encode_ssdaq_frame(-1, 0, 0, 0, np.zeros((32, 64)))
    with pytest.raises(ProtocolError):
        ss.encode_ssdaq_frame(1, 0, 0, 0, np.zeros((31, 64)))
    with pytest.raises(ProtocolError):
        ss.decode_ssdaq_frame(bytes(16416 + 8))
