"""Sans-IO protobuf wire codec for the timing board's ``CTA.ACTL.CDTS`` messages (proto2).

Hand-written rather than generated: three small messages, no dependency on the protobuf runtime
or protoc, and every way a message can be malformed becomes a named reason (the receiver counts
it) instead of one DecodeError. The field numbers are those of SSDAQ's ``CDTS.proto``:

- ``TimeStamp``: 1 seconds (uint64), 2 pico_seconds (uint64), 3 index, 4 tai_hi, 5 tai_lo, 6 cyc,
  7 tdc_hi, 8 tdc_lo (uint32).
- ``TriggerMessage``: 1 telescope (uint32), 2 event_counter, 3 pps_counter, 4 clock_counter
  (uint64), 5 time (TimeStamp), 6 type (enum TriggerType, default ReadoutTrigger = 1), 7 status
  (enum WhiteRabbitStatus, default TrackPhase = 5), 8 pattern (fixed64).
- ``TriggerBunch``: 1 telescope (uint32), 2 bunch_counter (uint64), 3 triggers (repeated
  TriggerMessage), 4 arrival_time (TimeStamp).

Decoding follows protobuf's rules: fields in any order, the last of a repeated scalar wins,
unknown fields (varint, fixed32/64, length-delimited) are skipped. Each TriggerMessage keeps the
exact bytes it was sent as (`raw`), which is what SSDAQ re-published.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

from daqd.errors import ProtocolError

VARINT, I64, LEN, I32 = 0, 1, 2, 5
_U32 = (1 << 32) - 1
_U64 = (1 << 64) - 1
_FIXED64 = struct.Struct("<Q")

TRIGGER_TYPES = {
    1: "ReadoutTrigger",
    2: "BusyTrigger",
    3: "SoftTrigger",
    4: "ExternalTrigger",
    5: "FlatfieldTrigger",
    6: "SinglePeTrigger",
    7: "PedestalTrigger",
    8: "MuonTrigger",
}
WR_STATUS = {
    1: "Uninitialized",
    2: "SyncNsec",
    3: "SyncSec",
    4: "SyncPhase",
    5: "TrackPhase",
    6: "WaitOffsetStable",
}
TIMESTAMP_FIELDS = (
    "seconds",
    "pico_seconds",
    "index",
    "tai_hi",
    "tai_lo",
    "cyc",
    "tdc_hi",
    "tdc_lo",
)


class PbError(ProtocolError):
    """A message that does not decode; `reason` names the counter."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(eq=True)
class TimeStamp:
    seconds: int | None = None
    pico_seconds: int | None = None
    index: int | None = None
    tai_hi: int | None = None
    tai_lo: int | None = None
    cyc: int | None = None
    tdc_hi: int | None = None
    tdc_lo: int | None = None

    def as_dict(self) -> dict[str, int]:
        return {k: v for k in TIMESTAMP_FIELDS if (v := getattr(self, k)) is not None}


@dataclass(eq=True)
class TriggerMessage:
    telescope: int | None = None
    event_counter: int | None = None
    pps_counter: int | None = None
    clock_counter: int | None = None
    time: TimeStamp | None = None
    type: int = 1  # proto2 default ReadoutTrigger
    status: int = 5  # proto2 default TrackPhase
    pattern: int | None = None
    raw: bytes = field(default=b"", compare=False)  # the bytes it was decoded from

    def tags(self) -> dict[str, Any]:
        """Decoded fields for a record: absent optional fields are left out."""
        tags: dict[str, Any] = {
            k: v
            for k in ("telescope", "event_counter", "pps_counter", "clock_counter")
            if (v := getattr(self, k)) is not None
        }
        if self.time is not None:
            tags["time"] = self.time.as_dict()
        tags["trigger_type"] = TRIGGER_TYPES.get(self.type, f"unknown({self.type})")
        tags["wr_status"] = WR_STATUS.get(self.status, f"unknown({self.status})")
        if self.pattern is not None:
            tags["pattern"] = self.pattern
        return tags


@dataclass(eq=True)
class TriggerBunch:
    telescope: int | None = None
    bunch_counter: int | None = None
    triggers: list[TriggerMessage] = field(default_factory=list)
    arrival_time: TimeStamp | None = None


# ----- wire level ----------------------------------------------------------------------------
def read_varint(buf: bytes | memoryview, pos: int, end: int) -> tuple[int, int]:
    """(value, next position) of the varint at `pos`; at most 10 bytes, within `end`."""
    value = 0
    shift = 0
    while True:
        if pos >= end:
            raise PbError("truncated", "a varint runs past the end of its message")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            break
        shift += 7
        if shift >= 70:
            raise PbError("bad_varint", "a varint longer than 10 bytes")
    if value > _U64:
        raise PbError("bad_varint", "a varint beyond 64 bits")
    return value, pos


def fields(buf: bytes | memoryview, start: int, end: int) -> list[tuple[int, int, int, int]]:
    """The fields of the message in buf[start:end]: (number, wire type, value, value end).
    For LEN fields value is the payload's start and value end its end; else value end is 0."""
    out = []
    pos = start
    while pos < end:
        key, pos = read_varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if number == 0 or number > 0x1FFFFFFF:
            raise PbError("bad_field", f"field number {number}")
        if wire == VARINT:
            value, pos = read_varint(buf, pos, end)
            out.append((number, wire, value, 0))
        elif wire == I64:
            if pos + 8 > end:
                raise PbError("truncated", f"fixed64 field {number} runs past the end")
            out.append((number, wire, _FIXED64.unpack_from(buf, pos)[0], 0))
            pos += 8
        elif wire == I32:
            if pos + 4 > end:
                raise PbError("truncated", f"fixed32 field {number} runs past the end")
            out.append((number, wire, int.from_bytes(buf[pos : pos + 4], "little"), 0))
            pos += 4
        elif wire == LEN:
            length, pos = read_varint(buf, pos, end)
            if pos + length > end:
                raise PbError("truncated", f"field {number} of {length} bytes runs past the end")
            out.append((number, wire, pos, pos + length))
            pos += length
        else:
            raise PbError(
                "bad_wire_type", f"field {number} has wire type {wire} (groups unsupported)"
            )
    return out


def _expect(number: int, wire: int, want: int, what: str) -> None:
    if wire != want:
        raise PbError("bad_wire_type", f"{what} field {number} has wire type {wire}, not {want}")


def _u32(number: int, value: int, what: str) -> int:
    if value > _U32:
        raise PbError("out_of_range", f"{what} field {number} = {value} exceeds uint32")
    return value


def decode_timestamp(buf: bytes | memoryview, start: int = 0, end: int | None = None) -> TimeStamp:
    ts = TimeStamp()
    for number, wire, value, _ in fields(buf, start, len(buf) if end is None else end):
        if 1 <= number <= 8:
            _expect(number, wire, VARINT, "TimeStamp")
            setattr(
                ts,
                TIMESTAMP_FIELDS[number - 1],
                value if number <= 2 else _u32(number, value, "TimeStamp"),
            )
    return ts


def decode_trigger_message(
    buf: bytes | memoryview, start: int = 0, end: int | None = None
) -> TriggerMessage:
    stop = len(buf) if end is None else end
    msg = TriggerMessage(raw=bytes(buf[start:stop]))
    for number, wire, value, vend in fields(buf, start, stop):
        if number == 1:
            _expect(number, wire, VARINT, "TriggerMessage")
            msg.telescope = _u32(number, value, "TriggerMessage")
        elif number == 2:
            _expect(number, wire, VARINT, "TriggerMessage")
            msg.event_counter = value
        elif number == 3:
            _expect(number, wire, VARINT, "TriggerMessage")
            msg.pps_counter = value
        elif number == 4:
            _expect(number, wire, VARINT, "TriggerMessage")
            msg.clock_counter = value
        elif number == 5:
            _expect(number, wire, LEN, "TriggerMessage")
            msg.time = decode_timestamp(buf, value, vend)
        elif number == 6:
            _expect(number, wire, VARINT, "TriggerMessage")
            msg.type = value
        elif number == 7:
            _expect(number, wire, VARINT, "TriggerMessage")
            msg.status = value
        elif number == 8:
            _expect(number, wire, I64, "TriggerMessage")
            msg.pattern = value
    return msg


def decode_trigger_bunch(buf: bytes | memoryview) -> TriggerBunch:
    """Decode one TriggerBunch; raises PbError (truncated, bad_varint, bad_field, bad_wire_type,
    out_of_range) for anything that is not one."""
    bunch = TriggerBunch()
    for number, wire, value, vend in fields(buf, 0, len(buf)):
        if number == 1:
            _expect(number, wire, VARINT, "TriggerBunch")
            bunch.telescope = _u32(number, value, "TriggerBunch")
        elif number == 2:
            _expect(number, wire, VARINT, "TriggerBunch")
            bunch.bunch_counter = value
        elif number == 3:
            _expect(number, wire, LEN, "TriggerBunch")
            bunch.triggers.append(decode_trigger_message(buf, value, vend))
        elif number == 4:
            _expect(number, wire, LEN, "TriggerBunch")
            bunch.arrival_time = decode_timestamp(buf, value, vend)
    return bunch


# ----- encoding (simulators and tests) ---------------------------------------------------------
def varint(value: int) -> bytes:
    if not 0 <= value <= _U64:
        raise ValueError(f"varint out of range: {value}")
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _key(number: int, wire: int) -> bytes:
    return varint(number << 3 | wire)


def _len_field(number: int, payload: bytes) -> bytes:
    return _key(number, LEN) + varint(len(payload)) + payload


def encode_timestamp(ts: TimeStamp) -> bytes:
    out = bytearray()
    for number, name in enumerate(TIMESTAMP_FIELDS, 1):
        value = getattr(ts, name)
        if value is not None:
            out += _key(number, VARINT) + varint(value)
    return bytes(out)


def encode_trigger_message(msg: TriggerMessage, *, defaults: bool = True) -> bytes:
    """Serialize in field order; `defaults`: also write type and status when they hold their
    default values (a sender that sets them explicitly does)."""
    out = bytearray()
    for number, value in enumerate(
        (msg.telescope, msg.event_counter, msg.pps_counter, msg.clock_counter), 1
    ):
        if value is not None:
            out += _key(number, VARINT) + varint(value)
    if msg.time is not None:
        out += _len_field(5, encode_timestamp(msg.time))
    if defaults or msg.type != 1:
        out += _key(6, VARINT) + varint(msg.type)
    if defaults or msg.status != 5:
        out += _key(7, VARINT) + varint(msg.status)
    if msg.pattern is not None:
        out += _key(8, I64) + _FIXED64.pack(msg.pattern)
    return bytes(out)


def encode_trigger_bunch(bunch: TriggerBunch) -> bytes:
    out = bytearray()
    if bunch.telescope is not None:
        out += _key(1, VARINT) + varint(bunch.telescope)
    if bunch.bunch_counter is not None:
        out += _key(2, VARINT) + varint(bunch.bunch_counter)
    for msg in bunch.triggers:
        out += _len_field(3, encode_trigger_message(msg))
    if bunch.arrival_time is not None:
        out += _len_field(4, encode_timestamp(bunch.arrival_time))
    return bytes(out)
