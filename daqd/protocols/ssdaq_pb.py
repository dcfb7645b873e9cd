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

import functools
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ParamSpec, TypeVar

from daqd.errors import ProtocolError
from daqd.protocols.protobuf_wire import FIXED32 as I32
from daqd.protocols.protobuf_wire import FIXED64 as I64
from daqd.protocols.protobuf_wire import LEN, VARINT, WireError, scan, varint
from daqd.protocols.protobuf_wire import expect as _expect
from daqd.protocols.protobuf_wire import field_bytes as _len_field
from daqd.protocols.protobuf_wire import key as _key

__all__ = ["I32", "I64", "LEN", "VARINT", "varint"]  # re-exported: the tests build wire bytes

P = ParamSpec("P")
T = TypeVar("T")
_U32 = (1 << 32) - 1
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


# ----- wire level (protobuf_wire's primitives; their faults become PbError by reason) ---------
def _decoder(fn: Callable[P, T]) -> Callable[P, T]:
    """A public decoder: protobuf_wire's WireError leaves it as a PbError with the same reason."""

    @functools.wraps(fn)
    def decode(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return fn(*args, **kwargs)
        except WireError as exc:
            raise PbError(exc.reason, str(exc)) from None

    return decode


def _u32(number: int, value: int, what: str) -> int:
    if value > _U32:
        raise PbError("out_of_range", f"{what} field {number} = {value} exceeds uint32")
    return value


def _timestamp(buf: bytes | memoryview, start: int = 0, end: int | None = None) -> TimeStamp:
    ts = TimeStamp()
    for number, wire, value, _ in scan(buf, start, len(buf) if end is None else end):
        if 1 <= number <= 8:
            _expect(number, wire, VARINT, "TimeStamp")
            setattr(
                ts,
                TIMESTAMP_FIELDS[number - 1],
                value if number <= 2 else _u32(number, value, "TimeStamp"),
            )
    return ts


def _trigger_message(
    buf: bytes | memoryview, start: int = 0, end: int | None = None
) -> TriggerMessage:
    stop = len(buf) if end is None else end
    msg = TriggerMessage(raw=bytes(buf[start:stop]))
    for number, wire, value, vend in scan(buf, start, stop):
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
            msg.time = _timestamp(buf, value, vend)
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


def _trigger_bunch(buf: bytes | memoryview) -> TriggerBunch:
    """Decode one TriggerBunch; raises PbError (truncated, bad_varint, bad_field, bad_wire_type,
    out_of_range) for anything that is not one."""
    bunch = TriggerBunch()
    for number, wire, value, vend in scan(buf):
        if number == 1:
            _expect(number, wire, VARINT, "TriggerBunch")
            bunch.telescope = _u32(number, value, "TriggerBunch")
        elif number == 2:
            _expect(number, wire, VARINT, "TriggerBunch")
            bunch.bunch_counter = value
        elif number == 3:
            _expect(number, wire, LEN, "TriggerBunch")
            bunch.triggers.append(_trigger_message(buf, value, vend))
        elif number == 4:
            _expect(number, wire, LEN, "TriggerBunch")
            bunch.arrival_time = _timestamp(buf, value, vend)
    return bunch


decode_timestamp = _decoder(_timestamp)
decode_trigger_message = _decoder(_trigger_message)
decode_trigger_bunch = _decoder(_trigger_bunch)


# ----- encoding (simulators and tests) ---------------------------------------------------------
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
