"""Sans-IO codec for CHEC-S backplane trigger packets (SSDAQ's UDP 8307 stream).

Every packet starts with ``<HB``: magic 0xCAFE (bytes ``FE CA``) and a type byte.

- Types 0 (nominal) and 1 (busy), V1, 1115 bytes: ``<BQB`` (a byte the packer sets to 22, TACK,
  phase), 16 samples x 512 SPs of trigger patterns (1024 bytes), the 512-SP union (64 bytes), then
  ``<3IH`` (readout, PPS and clock counters, source).
- Type 2 (V2): ``<2BHBQB3I`` (message type, bit 0 = busy; error flags; source; readout length / 8
  as a u8; TACK; phase; readout, PPS and clock counters), the union (64 bytes), then 512 SPs x L
  samples of patterns.
- Type 3 (V3): as V2, but patterns only for the SPs set in the union, in ascending SP order.

Bit arrays are MSB-first per byte; pattern arrays are SP-major (bit ``sp * L + sample``). The
phase byte is one-hot and bit-reversed: phase i (0-7) is sent as ``1 << (7 - i)``.

The readout length L is taken from the packet's size, not from the u8 field, which holds L / 8
and so cannot describe windows longer than 2040 samples: the field must agree with L modulo 256
(or be 255, saturated); ``window_beyond_field`` says that L / 8 did not fit. A V3 packet with no
SP in its union carries no patterns, so its L can only come from the field.

The union must hold every SP with a pattern bit set; `outside_union()` says when a V1/V2 packet
breaks that (decode() still returns it: it is readable, only self-contradictory).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from daqd.errors import ProtocolError

MAGIC = 0xCAFE
N_SP = 512
UNION_BYTES = N_SP // 8
HEADER = struct.Struct("<HB")
V1_HEAD = struct.Struct("<BQB")
V1_TAIL = struct.Struct("<3IH")
V1_WINDOW = 16  # samples of patterns a V1 packet carries
V1_PATTERN_BYTES = N_SP * V1_WINDOW // 8
V1_BYTES = HEADER.size + V1_HEAD.size + V1_PATTERN_BYTES + UNION_BYTES + V1_TAIL.size
V2_HEAD = struct.Struct("<2BHBQB3I")
V2_FIXED = HEADER.size + V2_HEAD.size + UNION_BYTES  # bytes before the patterns
V1_FILLER = 22  # what SSDAQ's packer writes in V1's first body byte (ignored on reading)
MAX_DATAGRAM_BYTES = 65507

TYPE_NAMES = {0: "nominal_v1", 1: "busy_v1", 2: "v2", 3: "v3"}

assert V1_BYTES == 1115 and V2_HEAD.size == 26


class TriggerError(ProtocolError):
    """A packet that is not a valid trigger packet; `reason` names the counter."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


_ZEROS = memoryview(bytes(MAX_DATAGRAM_BYTES))
_PHASES = {1 << (7 - i): i for i in range(8)}  # phase byte (one-hot, bit-reversed) -> index
V1_PATTERNS_AT = HEADER.size + V1_HEAD.size  # where a V1 packet's patterns start
V1_UNION_AT = V1_PATTERNS_AT + V1_PATTERN_BYTES
V1_TAIL_AT = V1_UNION_AT + UNION_BYTES
V2_UNION_AT = V2_FIXED - UNION_BYTES


@dataclass(eq=False, slots=True)
class TriggerPacket:
    """One decoded trigger packet. `data` is the packet as received; `union` and `patterns` are
    its bytes at `union_at` and from `patterns_at` (see module doc). decode() finds the union's
    SPs, those that triggered and whether the patterns leave the union in the same pass."""

    packet_type: int  # the type byte: 0-3
    busy: bool
    tack: int
    phase: int  # 0-7
    ro_count: int
    pps_count: int
    clock_count: int
    source: int
    message_type: int  # V2/V3 message type byte; V1: the type byte
    error_flags: int  # V2/V3; 0 for V1
    readout_length: int  # samples per SP in the patterns
    length_field: int | None  # V2/V3: the u8 readout length / 8 as sent; None for V1
    window_beyond_field: bool  # the window is longer than the u8 field can say (> 2040 samples)
    data: bytes
    union_at: int
    patterns_at: int
    patterns_end: int
    union_sps: list[int]  # SPs set in the union, ascending
    trigger_sps: list[int]  # SPs of the union with a pattern bit at sample `phase`, ascending
    mismatch: bool  # V1/V2: a pattern has bits for an SP the union lacks

    @property
    def type_name(self) -> str:
        return TYPE_NAMES[self.packet_type]

    @property
    def union(self) -> bytes:
        """The 64-byte union, MSB-first, bit = SP."""
        return self.data[self.union_at : self.union_at + UNION_BYTES]

    @property
    def patterns(self) -> bytes:
        """The pattern bytes as sent."""
        return self.data[self.patterns_at : self.patterns_end]

    def outside_union(self) -> bool:
        """A V1/V2 pattern has bits set for an SP the union does not hold: the packet
        contradicts itself (V3 carries patterns only for the union's SPs, so never)."""
        return self.mismatch

    def sps(self) -> list[int]:
        """SPs set in the union, ascending."""
        return list(self.union_sps)

    def pattern_sps(self) -> list[int]:
        """SPs of the union whose pattern has the bit set at sample `phase` (what triggered),
        ascending."""
        return list(self.trigger_sps)

    def pattern_array(self) -> np.ndarray:
        """The patterns as (readout_length, 512) uint8 0/1, rows = samples (SSDAQ's layout)."""
        length = self.readout_length
        bits = np.unpackbits(np.frombuffer(self.patterns, dtype=np.uint8))
        out = np.zeros((length, N_SP), dtype=np.uint8)
        if self.packet_type == 3:
            sps = self.union_sps
            if sps:
                out[:, sps] = bits.reshape(len(sps), length).T
        else:
            out[:] = bits.reshape(N_SP, length).T
        return out

    def union_array(self) -> np.ndarray:
        return np.unpackbits(np.frombuffer(self.union, dtype=np.uint8))

    def tags(self) -> dict[str, Any]:
        """What a record says about this trigger (a new dict; its lists are the packet's)."""
        tags = {
            "type": TYPE_NAMES[self.packet_type],
            "busy": self.busy,
            "tack": self.tack,
            "phase": self.phase,
            "ro_count": self.ro_count,
            "pps_count": self.pps_count,
            "clock_count": self.clock_count,
            "source": self.source,
            "readout_length": self.readout_length,
            "sps": self.union_sps,
            "trigger_sps": self.trigger_sps,
        }
        if self.length_field is not None:
            tags["error_flags"] = self.error_flags
            tags["message_type"] = self.message_type
            if self.window_beyond_field:
                tags["window_beyond_field"] = True
        return tags


def decode_phase(byte: int) -> int:
    """The phase index 0-7 of a phase byte (one-hot, bit-reversed)."""
    phase = _PHASES.get(byte)
    if phase is None:
        raise _bad_phase(byte)
    return phase


def _bad_phase(byte: int) -> TriggerError:
    return TriggerError("bad_phase", f"phase byte 0x{byte:02x} is not one-hot")


def encode_phase(phase: int) -> int:
    if not 0 <= phase <= 7:
        raise ValueError(f"phase must be 0-7, not {phase}")
    return 1 << (7 - phase)


def decode(data: bytes | bytearray | memoryview) -> TriggerPacket:
    """Decode one packet; raises TriggerError (reason: short, bad_magic, unknown_type,
    bad_length, bad_phase, bad_readout_length) for anything else. (It runs once per packet at
    the receiver's full rate: the phase and length checks are written out here, not called.)"""
    if type(data) is not bytes:
        data = bytes(data)
    n = len(data)
    if n < HEADER.size:
        raise TriggerError("short", f"{n} bytes: shorter than the 3-byte header")
    magic, ptype = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise TriggerError("bad_magic", f"magic 0x{magic:04x}, expected 0x{MAGIC:04x}")
    if ptype <= 1:
        if n != V1_BYTES:
            reason = "short" if n < V1_BYTES else "bad_length"
            raise TriggerError(reason, f"V1 packet of {n} bytes, expected {V1_BYTES}")
        _, tack, phase_byte = V1_HEAD.unpack_from(data, HEADER.size)
        phase = _PHASES.get(phase_byte)
        if phase is None:
            raise _bad_phase(phase_byte)
        ro, pps, clock, source = V1_TAIL.unpack_from(data, V1_TAIL_AT)
        union = int.from_bytes(data[V1_UNION_AT:V1_TAIL_AT], "big")
        sps, trig, mismatch = _scan(data, union, V1_PATTERNS_AT, V1_WINDOW, phase, False)
        return TriggerPacket(
            ptype, ptype == 1, tack, phase, ro, pps, clock, source, ptype, 0, V1_WINDOW, None,
            False, data, V1_UNION_AT, V1_PATTERNS_AT, V1_UNION_AT, sps, trig, mismatch,
        )  # fmt: skip
    if ptype > 3:
        raise TriggerError("unknown_type", f"unknown packet type {ptype}")
    if n < V2_FIXED:
        raise TriggerError("short", f"V{ptype} packet of {n} bytes, shorter than {V2_FIXED}")
    mtype, eflags, source, field, tack, phase_byte, ro, pps, clock = V2_HEAD.unpack_from(
        data, HEADER.size
    )
    phase = _PHASES.get(phase_byte)
    if phase is None:
        raise _bad_phase(phase_byte)
    union = int.from_bytes(data[V2_UNION_AT:V2_FIXED], "big")
    rest = n - V2_FIXED
    if ptype == 2:
        per_sample = N_SP // 8  # bytes of patterns per sample of the window
        if rest == 0 or rest % per_sample or (rest // per_sample) % 8:
            raise TriggerError(
                "bad_length",
                f"V2 patterns of {rest} bytes are not 512 SPs x a window of a multiple of 8",
            )
        length = rest // per_sample
    else:
        n_sp = union.bit_count()
        if n_sp == 0:
            if rest:
                raise TriggerError("bad_length", f"V3 with an empty union carries {rest} bytes")
            length = field * 8
        else:
            if rest == 0 or rest % n_sp:
                raise TriggerError(
                    "bad_length",
                    f"V3 patterns of {rest} bytes do not split into {n_sp} SPs of whole bytes",
                )
            length = rest // n_sp * 8
    if (length >> 3) & 0xFF != field and field_disagrees(length, field):
        raise TriggerError(
            "bad_readout_length",
            f"readout length field {field} (x 8) disagrees with the {length}-sample patterns",
        )
    sps, trig, mismatch = _scan(data, union, V2_FIXED, length, phase, ptype == 3)
    return TriggerPacket(
        ptype, bool(mtype & 1), tack, phase, ro, pps, clock, source, mtype, eflags, length,
        field, length // 8 > 0xFF, data, V2_UNION_AT, V2_FIXED, n, sps, trig, mismatch,
    )  # fmt: skip


def _scan(
    data: bytes, union: int, at: int, length: int, phase: int, zero_suppressed: bool
) -> tuple[list[int], list[int], bool]:
    """The union's SPs (`union`: its 64 bytes as a big-endian int), those whose pattern bit at
    `phase` is set, and whether a V1/V2 pattern has bits for an SP outside the union. Each SP's
    pattern is `length` / 8 whole bytes (row k for the k-th union SP in V3, row SP in V1/V2)
    whose first byte holds sample `phase` (< 8): the bit is a byte read, and "outside the union"
    means a nonzero byte between the union's rows, each gap compared with zeros by
    bytes.startswith (a memcmp; a memoryview comparison goes byte by byte in Python objects,
    50x slower)."""
    sps: list[int] = []
    while union:  # highest int bit first: SP 511 - bit, ascending
        b = union.bit_length() - 1
        sps.append(511 - b)
        union ^= 1 << b
    trig: list[int] = []
    if phase >= length:  # only a V3 with an empty union has a window this short
        return sps, trig, False
    row = length >> 3
    mask = 0x80 >> phase
    if zero_suppressed:
        start = at
        for sp in sps:
            if data[start] & mask:
                trig.append(sp)
            start += row
        return sps, trig, False
    zeros = _ZEROS
    clean = at  # start of the next gap of SPs outside the union
    mismatch = False
    for sp in sps:
        start = at + sp * row
        if data[start] & mask:
            trig.append(sp)
        if start > clean and not data.startswith(zeros[: start - clean], clean):
            mismatch = True
        clean = start + row
    end = at + N_SP * row
    if end > clean and not data.startswith(zeros[: end - clean], clean):
        mismatch = True
    return sps, trig, mismatch


def field_disagrees(length: int, field: int) -> bool:
    """The u8 length field (L / 8) disagrees with L: equal modulo 256, or 255 when saturated."""
    eighths = length // 8
    if eighths & 0xFF == field:
        return False
    return not (eighths > 0xFF and field == 0xFF)


def _pack_bits(bits: Any) -> bytes:
    return np.packbits(np.asarray(bits, dtype=bool).astype(np.uint8)).tobytes()


def _check_patterns(patterns: np.ndarray) -> np.ndarray:
    patterns = np.asarray(patterns)
    if patterns.ndim != 2 or patterns.shape[1] != N_SP:
        raise ValueError(f"patterns must be (samples, 512), not {patterns.shape}")
    return patterns.astype(bool)


def encode_v1(
    tack: int,
    phase: int,
    patterns: np.ndarray,
    *,
    busy: bool = False,
    union: np.ndarray | None = None,
    ro_count: int = 0,
    pps_count: int = 0,
    clock_count: int = 0,
    source: int = 0,
) -> bytes:
    """A V1 packet; `patterns` (16, 512), `union` (512,) defaults to any SP in the patterns."""
    pat = _check_patterns(patterns)
    if pat.shape[0] != V1_WINDOW:
        raise ValueError(f"V1 patterns are 16 samples, not {pat.shape[0]}")
    uni = pat.any(axis=0) if union is None else np.asarray(union, dtype=bool)
    return b"".join(
        (
            HEADER.pack(MAGIC, 1 if busy else 0),
            V1_HEAD.pack(V1_FILLER, tack, encode_phase(phase)),
            _pack_bits(pat.T),
            _pack_bits(uni),
            V1_TAIL.pack(ro_count, pps_count, clock_count, source),
        )
    )


def encode_v2(
    tack: int,
    phase: int,
    patterns: np.ndarray,
    *,
    zero_suppressed: bool = False,
    busy: bool = False,
    message_type: int | None = None,
    error_flags: int = 0,
    source: int = 0,
    ro_count: int = 0,
    pps_count: int = 0,
    clock_count: int = 0,
    length_field: int | None = None,
) -> bytes:
    """A V2 packet, or V3 with `zero_suppressed`; `patterns` (L, 512), L a multiple of 8. The
    union is the SPs with any bit set; the length field defaults to (L / 8) mod 256."""
    pat = _check_patterns(patterns)
    length = pat.shape[0]
    if length % 8 or length == 0:
        raise ValueError(f"the readout length must be a positive multiple of 8, not {length}")
    uni = pat.any(axis=0)
    body = _pack_bits(pat[:, uni].T) if zero_suppressed else _pack_bits(pat.T)
    mtype = (1 if busy else 0) if message_type is None else message_type
    field = (length // 8) & 0xFF if length_field is None else length_field
    return b"".join(
        (
            HEADER.pack(MAGIC, 3 if zero_suppressed else 2),
            V2_HEAD.pack(
                mtype,
                error_flags,
                source,
                field,
                tack,
                encode_phase(phase),
                ro_count,
                pps_count,
                clock_count,
            ),
            _pack_bits(uni),
            body,
        )
    )
