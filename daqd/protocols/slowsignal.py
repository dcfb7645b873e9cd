"""Sans-IO codec for CHEC-S TARGET-module slow-signal datagrams and SSDAQ readout frames.

A datagram is P >= 1 blocks of 144 bytes, big-endian ``>Q32HQ32H``: TACK (ns, the match key), ADC
words of pixels 0-31, a second timestamp (ns, kept as a tag), ADC words of pixels 32-63. A wire
word is a two's-complement int16; counts are offset binary (``raw ^ 0x8000``), mV = counts * 0.0763.

An SSDAQ readout frame is ``<4Q`` (readout number, TACK, cpu seconds, cpu nanoseconds) followed by
32 x 64 little-endian float64 mV, module-major, NaN where a module is missing: 16,416 bytes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from daqd.errors import ProtocolError

N_MODULES = 32
N_PIXELS = 64
BLOCK_BYTES = 144
# The largest UDP payload over IPv4: no legal datagram holds more blocks than this.
MAX_DATAGRAM_BYTES = 65507
MAX_BLOCKS = MAX_DATAGRAM_BYTES // BLOCK_BYTES
MV_PER_COUNT = 0.03815 * 2.0
SSDAQ_HEADER = struct.Struct("<4Q")
SSDAQ_FRAME_BYTES = SSDAQ_HEADER.size + N_MODULES * N_PIXELS * 8

BLOCK_DTYPE = np.dtype(
    [("tack", ">u8"), ("lo", ">u2", (32,)), ("second", ">u8"), ("hi", ">u2", (32,))]
)
assert BLOCK_DTYPE.itemsize == BLOCK_BYTES

_U64_MAX = (1 << 64) - 1


class DatagramError(ProtocolError):
    """A datagram that is not P x 144-byte blocks; `reason` is the counter name."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, eq=False)
class Blocks:
    """The blocks of one datagram, as arrays: P TACKs, P second timestamps, P x 64 counts."""

    tack: np.ndarray  # (P,) uint64
    second: np.ndarray  # (P,) uint64
    counts: np.ndarray  # (P, 64) uint16, offset binary

    def __len__(self) -> int:
        return int(self.tack.shape[0])


@dataclass(frozen=True, eq=False)
class SsdaqFrame:
    """One camera readout as SSDAQ publishes it."""

    readout: int
    tack: int
    cpu_time_s: int
    cpu_time_ns: int
    mv: np.ndarray  # (32, 64) float64, NaN for a missing module


def check_datagram_size(nbytes: int, max_blocks: int = MAX_BLOCKS) -> None:
    """Raise DatagramError unless `nbytes` is a whole, non-zero number of at most max_blocks."""
    if nbytes == 0:
        raise DatagramError("empty", "empty datagram (0 bytes)")
    if nbytes % BLOCK_BYTES:
        raise DatagramError(
            "bad_size",
            f"datagram of {nbytes} bytes is not a multiple of the {BLOCK_BYTES}-byte block",
        )
    if nbytes > max_blocks * BLOCK_BYTES:
        raise DatagramError("bad_size", f"{nbytes} bytes exceed {max_blocks} blocks")


def decode_datagram(data: bytes | bytearray | memoryview, max_blocks: int = MAX_BLOCKS) -> Blocks:
    """Decode a whole datagram at once into TACKs, second timestamps and counts.

    Datagrams received together may be decoded as one: pass their concatenation and a
    `max_blocks` that allows for all of them.
    """
    check_datagram_size(len(data), max_blocks)
    wire = np.frombuffer(data, dtype=BLOCK_DTYPE)
    counts = np.empty((wire.shape[0], N_PIXELS), dtype=np.uint16)
    counts[:, :32] = wire["lo"]
    counts[:, 32:] = wire["hi"]
    counts ^= 0x8000
    return Blocks(
        tack=wire["tack"].astype(np.uint64),
        second=wire["second"].astype(np.uint64),
        counts=counts,
    )


def encode_datagram(tack: Any, second: Any, counts: Any) -> bytes:
    """Encode P blocks: `tack` and `second` are P integers, `counts` is P x 64 counts (0-65535)."""
    tack_a = np.asarray(tack, dtype=np.uint64).reshape(-1)
    second_a = np.asarray(second, dtype=np.uint64).reshape(-1)
    counts_a = np.asarray(counts)
    n = tack_a.shape[0]
    if not 1 <= n <= MAX_BLOCKS:
        raise ProtocolError(f"a datagram holds 1 to {MAX_BLOCKS} blocks, not {n}")
    if second_a.shape != (n,) or counts_a.shape != (n, N_PIXELS):
        raise ProtocolError(
            f"{n} blocks need {n} second timestamps and {n} x {N_PIXELS} counts, got "
            f"{second_a.shape[0]} and {counts_a.shape}"
        )
    if counts_a.size and (counts_a.min() < 0 or counts_a.max() > 0xFFFF):
        raise ProtocolError("counts must be 0 to 65535")
    wire = np.empty(n, dtype=BLOCK_DTYPE)
    raw = counts_a.astype(np.uint16) ^ 0x8000
    wire["tack"] = tack_a
    wire["second"] = second_a
    wire["lo"] = raw[:, :32]
    wire["hi"] = raw[:, 32:]
    return wire.tobytes()


def counts_to_mv(counts: np.ndarray) -> np.ndarray:
    """Counts (offset binary) to millivolts, float64."""
    return counts * MV_PER_COUNT


def encode_ssdaq_frame(
    readout: int, tack: int, cpu_time_s: int, cpu_time_ns: int, mv: np.ndarray
) -> bytes:
    """The exact 16,416-byte frame SSDAQ's `SSReadout.pack` produces."""
    for name, value in (
        ("readout", readout),
        ("tack", tack),
        ("cpu_time_s", cpu_time_s),
        ("cpu_time_ns", cpu_time_ns),
    ):
        if not 0 <= value <= _U64_MAX:
            raise ProtocolError(f"{name} {value} does not fit an unsigned 64-bit field")
    if mv.shape != (N_MODULES, N_PIXELS):
        raise ProtocolError(f"mV array must be {N_MODULES} x {N_PIXELS}, not {mv.shape}")
    header = SSDAQ_HEADER.pack(readout, tack, cpu_time_s, cpu_time_ns)
    return header + np.ascontiguousarray(mv, dtype="<f8").tobytes()


def decode_ssdaq_frame(data: bytes | bytearray | memoryview) -> SsdaqFrame:
    """Decode one SSDAQ readout frame; its length must be exactly 16,416 bytes."""
    if len(data) != SSDAQ_FRAME_BYTES:
        raise ProtocolError(
            f"SSDAQ readout frame must be {SSDAQ_FRAME_BYTES} bytes, got {len(data)}"
        )
    readout, tack, cpu_s, cpu_ns = SSDAQ_HEADER.unpack_from(data, 0)
    mv = np.frombuffer(data, dtype="<f8", offset=SSDAQ_HEADER.size).reshape(N_MODULES, N_PIXELS)
    return SsdaqFrame(readout, tack, cpu_s, cpu_ns, mv)
