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


@dataclass(eq=False, slots=True)
class TriggerPacket:
    """One decoded trigger packet. `patterns` are the pattern bytes as sent (see module doc)."""

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
    union: bytes  # 64 bytes, MSB-first, bit = SP
    patterns: bytes

    @property
    def type_name(self) -> str:
        return TYPE_NAMES[self.packet_type]

    @property
    def window_beyond_field(self) -> bool:
        """The readout window is longer than the u8 length field can say (> 2040 samples)."""
        return self.length_field is not None and self.readout_length // 8 > 0xFF

    def outside_union(self) -> bool:
        """A V1/V2 pattern has bits set for an SP the union does not hold: the packet
        contradicts itself (V3 carries patterns only for the union's SPs, so never)."""
        if self.packet_type == 3:
            return False
        pat = int.from_bytes(self.patterns, "big")
        if not pat:
            return False
        union = int.from_bytes(self.union, "big")
        length = self.readout_length
        segment = (1 << length) - 1
        mask = 0
        while union:  # union bit b is SP 511 - b, whose pattern is int bits [b * L, (b + 1) * L)
            low = union & -union
            mask |= segment << ((low.bit_length() - 1) * length)
            union ^= low
        return bool(pat & ~mask)

    def sps(self) -> list[int]:
        """SPs set in the union, ascending."""
        return set_bits(self.union, N_SP)

    def pattern_sps(self, sps: list[int] | None = None) -> list[int]:
        """SPs of the union whose pattern has the bit set at sample `phase` (what triggered),
        ascending. `sps`: self.sps() if the caller has it already."""
        length = self.readout_length
        phase = self.phase
        if sps is None:
            sps = self.sps()
        if phase >= length:
            return []
        data = self.patterns
        out = []
        zero_suppressed = self.packet_type == 3
        for k, sp in enumerate(sps):
            bit = (k if zero_suppressed else sp) * length + phase
            if data[bit >> 3] >> (7 - (bit & 7)) & 1:
                out.append(sp)
        return out

    def pattern_array(self) -> np.ndarray:
        """The patterns as (readout_length, 512) uint8 0/1, rows = samples (SSDAQ's layout)."""
        length = self.readout_length
        bits = np.unpackbits(np.frombuffer(self.patterns, dtype=np.uint8))
        out = np.zeros((length, N_SP), dtype=np.uint8)
        if self.packet_type == 3:
            sps = self.sps()
            if sps:
                out[:, sps] = bits.reshape(len(sps), length).T
        else:
            out[:] = bits.reshape(N_SP, length).T
        return out

    def union_array(self) -> np.ndarray:
        return np.unpackbits(np.frombuffer(self.union, dtype=np.uint8))

    def tags(self) -> dict[str, Any]:
        """What a record says about this trigger."""
        sps = self.sps()
        tags: dict[str, Any] = {
            "type": TYPE_NAMES[self.packet_type],
            "busy": self.busy,
            "tack": self.tack,
            "phase": self.phase,
            "ro_count": self.ro_count,
            "pps_count": self.pps_count,
            "clock_count": self.clock_count,
            "source": self.source,
            "readout_length": self.readout_length,
            "sps": sps,
            "trigger_sps": self.pattern_sps(sps),
        }
        if self.length_field is not None:
            tags["error_flags"] = self.error_flags
            tags["message_type"] = self.message_type
            if self.window_beyond_field:
                tags["window_beyond_field"] = True
        return tags


def set_bits(data: bytes, nbits: int) -> list[int]:
    """Indices of the set bits of an MSB-first bit array of `nbits` bits, ascending."""
    value = int.from_bytes(data, "big")
    top = nbits - 1
    out = []
    while value:
        low = value & -value
        out.append(top - (low.bit_length() - 1))
        value ^= low
    out.reverse()
    return out


def decode_phase(byte: int) -> int:
    """The phase index 0-7 of a phase byte (one-hot, bit-reversed)."""
    if byte == 0 or byte & (byte - 1):
        raise TriggerError("bad_phase", f"phase byte 0x{byte:02x} is not one-hot")
    return 7 - (byte.bit_length() - 1)


def encode_phase(phase: int) -> int:
    if not 0 <= phase <= 7:
        raise ValueError(f"phase must be 0-7, not {phase}")
    return 1 << (7 - phase)


def decode(data: bytes | bytearray | memoryview) -> TriggerPacket:
    """Decode one packet; raises TriggerError (reason: short, bad_magic, unknown_type,
    bad_length, bad_phase, bad_readout_length) for anything else."""
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
        at = HEADER.size + V1_HEAD.size
        patterns = bytes(data[at : at + V1_PATTERN_BYTES])
        at += V1_PATTERN_BYTES
        union = bytes(data[at : at + UNION_BYTES])
        ro, pps, clock, source = V1_TAIL.unpack_from(data, at + UNION_BYTES)
        return TriggerPacket(
            ptype, ptype == 1, tack, decode_phase(phase_byte), ro, pps, clock, source,
            ptype, 0, V1_WINDOW, None, union, patterns,
        )  # fmt: skip
    if ptype > 3:
        raise TriggerError("unknown_type", f"unknown packet type {ptype}")
    if n < V2_FIXED:
        raise TriggerError("short", f"V{ptype} packet of {n} bytes, shorter than {V2_FIXED}")
    mtype, eflags, source, field, tack, phase_byte, ro, pps, clock = V2_HEAD.unpack_from(
        data, HEADER.size
    )
    phase = decode_phase(phase_byte)
    union = bytes(data[V2_FIXED - UNION_BYTES : V2_FIXED])
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
        n_sp = int.from_bytes(union, "big").bit_count()
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
    if field_disagrees(length, field):
        raise TriggerError(
            "bad_readout_length",
            f"readout length field {field} (x 8) disagrees with the {length}-sample patterns",
        )
    return TriggerPacket(
        ptype, bool(mtype & 1), tack, phase, ro, pps, clock, source, mtype, eflags, length,
        field, union, bytes(data[V2_FIXED:]),
    )  # fmt: skip


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
