"""Sans-IO protobuf wire codec for the timing board's ``CTA.ACTL.CDTS`` messages and SSDAQ's
``chec.LogData`` and ``chec.MonitorData`` (proto2).

Hand-written rather than generated: a few small messages, no dependency on the protobuf runtime
or protoc, and every way a message can be malformed becomes a named reason (the receiver counts
it) instead of one DecodeError. The field numbers are those of SSDAQ's ``CDTS.proto``:

- ``TimeStamp``: 1 seconds (uint64), 2 pico_seconds (uint64), 3 index, 4 tai_hi, 5 tai_lo, 6 cyc,
  7 tdc_hi, 8 tdc_lo (uint32).
- ``TriggerMessage``: 1 telescope (uint32), 2 event_counter, 3 pps_counter, 4 clock_counter
  (uint64), 5 time (TimeStamp), 6 type (enum TriggerType, default ReadoutTrigger = 1), 7 status
  (enum WhiteRabbitStatus, default TrackPhase = 5), 8 pattern (fixed64).
- ``TriggerBunch``: 1 telescope (uint32), 2 bunch_counter (uint64), 3 triggers (repeated
  TriggerMessage), 4 arrival_time (TimeStamp).

SSDAQ's ``log.proto`` and ``monitor.proto`` (package ``chec``):

- ``LogData``: 1 systemType (int32), 2 severity (enum: NOTSET 0, DEBUG 10, INFO 20, WARNING 30,
  ERROR 40, FATAL 50), 3 sender (string), 4 message (string), 5 time (int64, ns), 6 pid (int32),
  7 sourceFile (string), 8 line (int32): all required; optional 9 position, 10 geoid (string),
  11 seqid (int32), 12 cameraPcTime (int64).
- ``TimeUTC``: 1 sec, 2 nsec (int32, required).
- ``MonitorData``: 1 time (TimeUTC, required), 16 reciver (``Reciever``: 1 name (string,
  required), 2 pid (int32), 3 recv_data (bool), 4 data_rate (float), 5 from_tm (repeated uint32,
  packed)).

A message without one of its required fields is refused (`missing_field`), as protobuf's own
parser does; an int32 outside its range is `out_of_range`. Text that is not UTF-8 is kept, with
U+FFFD for the bad bytes (a log line is not thrown away for one byte).

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
from daqd.protocols.protobuf_wire import (
    LEN,
    VARINT,
    WireError,
    read_varint,
    scan,
    signed64,
    varint,
)
from daqd.protocols.protobuf_wire import expect as _expect
from daqd.protocols.protobuf_wire import field_bytes as _len_field
from daqd.protocols.protobuf_wire import key as _key

P = ParamSpec("P")
T = TypeVar("T")
_U32 = (1 << 32) - 1
_FIXED64 = struct.Struct("<Q")
_FLOAT = struct.Struct("<f")

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


# ----- SSDAQ's chec.LogData and chec.MonitorData -------------------------------------------------
SEVERITIES = {0: "NOTSET", 10: "DEBUG", 20: "INFO", 30: "WARNING", 40: "ERROR", 50: "FATAL"}


def severity_name(level: int) -> str:
    """LogData.Severity's name; a level the enum lacks (Python allows any) as "Level N"."""
    return SEVERITIES.get(level, f"Level {level}")


@dataclass(eq=True)
class LogData:
    system_type: int = 0
    severity: int = 0
    sender: str = ""
    message: str = ""
    time: int = 0  # ns since the Unix epoch
    pid: int = 0
    source_file: str = ""
    line: int = 0
    position: str | None = None
    geoid: str | None = None
    seqid: int | None = None
    camera_pc_time: int | None = None

    def tags(self) -> dict[str, Any]:
        """The fields for a record (optional ones only when present), and severity's name."""
        tags: dict[str, Any] = {
            "severity": severity_name(self.severity),
            "level": self.severity,
            "sender": self.sender,
            "time": self.time,
            "message": self.message,
            "pid": self.pid,
            "system_type": self.system_type,
            "source_file": self.source_file,
            "line": self.line,
        }
        for name in ("position", "geoid", "seqid", "camera_pc_time"):
            if (value := getattr(self, name)) is not None:
                tags[name] = value
        return tags


_STR, _INT32, _INT64 = 0, 32, 64
# number -> (attribute, kind); 1-8 are required
_LOG_FIELDS = {
    1: ("system_type", _INT32),
    2: ("severity", _INT32),
    3: ("sender", _STR),
    4: ("message", _STR),
    5: ("time", _INT64),
    6: ("pid", _INT32),
    7: ("source_file", _STR),
    8: ("line", _INT32),
    9: ("position", _STR),
    10: ("geoid", _STR),
    11: ("seqid", _INT32),
    12: ("camera_pc_time", _INT64),
}
_LOG_REQUIRED = sum(1 << n for n in range(1, 9))


def _int32(number: int, value: int, what: str) -> int:
    """An int32 field: protobuf writes a negative one sign-extended to 64 bits."""
    value = signed64(value)
    if not -(1 << 31) <= value < 1 << 31:
        raise PbError("out_of_range", f"{what} field {number} = {value} exceeds int32")
    return value


def _text(buf: bytes | memoryview, start: int, end: int) -> str:
    return bytes(buf[start:end]).decode("utf-8", "replace")


def _missing(what: str, names: list[str]) -> PbError:
    return PbError("missing_field", f"{what} lacks required field(s) {', '.join(names)}")


def _log_data(buf: bytes | memoryview, start: int = 0, end: int | None = None) -> LogData:
    log = LogData()
    seen = 0
    for number, wire, value, vend in scan(buf, start, len(buf) if end is None else end):
        spec = _LOG_FIELDS.get(number)
        if spec is None:
            continue
        name, kind = spec
        if kind == _STR:
            _expect(number, wire, LEN, "LogData")
            setattr(log, name, _text(buf, value, vend))
        else:
            _expect(number, wire, VARINT, "LogData")
            setattr(
                log,
                name,
                _int32(number, value, "LogData") if kind == _INT32 else signed64(value),
            )
        seen |= 1 << number
    if seen & _LOG_REQUIRED != _LOG_REQUIRED:
        names = [_LOG_FIELDS[n][0] for n in range(1, 9) if not seen & 1 << n]
        raise _missing("LogData", names)
    return log


@dataclass(eq=True)
class ReceiverRate:
    """chec.MonitorData.Reciever (sic): one receiver's rate over the last interval."""

    name: str = ""
    pid: int | None = None
    recv_data: bool | None = None
    data_rate: float | None = None  # per second; a float32 on the wire
    from_tm: list[int] = field(default_factory=list)


@dataclass(eq=True)
class MonitorData:
    sec: int = 0  # TimeUTC, int32 each
    nsec: int = 0
    receiver: ReceiverRate | None = None

    def tags(self) -> dict[str, Any]:
        tags: dict[str, Any] = {"time": {"sec": self.sec, "nsec": self.nsec}}
        r = self.receiver
        if r is not None:
            tags["receiver"] = r.name
            for name in ("pid", "recv_data", "data_rate"):
                if (value := getattr(r, name)) is not None:
                    tags[name] = value
            if r.from_tm:
                tags["from_tm"] = list(r.from_tm)
        return tags


def _receiver_rate(buf: bytes | memoryview, start: int, end: int) -> ReceiverRate:
    rate = ReceiverRate()
    named = False
    for number, wire, value, vend in scan(buf, start, end):
        if number == 1:
            _expect(number, wire, LEN, "MonitorData.Reciever")
            rate.name = _text(buf, value, vend)
            named = True
        elif number == 2:
            _expect(number, wire, VARINT, "MonitorData.Reciever")
            rate.pid = _int32(number, value, "MonitorData.Reciever")
        elif number == 3:
            _expect(number, wire, VARINT, "MonitorData.Reciever")
            rate.recv_data = bool(value)
        elif number == 4:
            _expect(number, wire, I32, "MonitorData.Reciever")
            rate.data_rate = _FLOAT.unpack(value.to_bytes(4, "little"))[0]
        elif number == 5:  # packed, as the .proto asks; a parser takes unpacked ones too
            if wire == LEN:
                pos = value
                while pos < vend:
                    item, pos = read_varint(buf, pos, vend)
                    rate.from_tm.append(_u32(number, item, "MonitorData.Reciever"))
            else:
                _expect(number, wire, VARINT, "MonitorData.Reciever")
                rate.from_tm.append(_u32(number, value, "MonitorData.Reciever"))
    if not named:
        raise _missing("MonitorData.Reciever", ["name"])
    return rate


def _monitor_data(buf: bytes | memoryview, start: int = 0, end: int | None = None) -> MonitorData:
    mon = MonitorData()
    timed = False
    for number, wire, value, vend in scan(buf, start, len(buf) if end is None else end):
        if number == 1:
            _expect(number, wire, LEN, "MonitorData")
            seen = 0
            for n, w, v, _ in scan(buf, value, vend):
                if n in (1, 2):
                    _expect(n, w, VARINT, "TimeUTC")
                    setattr(mon, "sec" if n == 1 else "nsec", _int32(n, v, "TimeUTC"))
                    seen |= n
            if seen != 3:
                raise _missing("TimeUTC", [k for b, k in ((1, "sec"), (2, "nsec")) if not seen & b])
            timed = True
        elif number == 16:
            _expect(number, wire, LEN, "MonitorData")
            mon.receiver = _receiver_rate(buf, value, vend)
    if not timed:
        raise _missing("MonitorData", ["time"])
    return mon


decode_log_data = _decoder(_log_data)
decode_monitor_data = _decoder(_monitor_data)


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


def _str_field(number: int, value: str) -> bytes:
    return _len_field(number, value.encode("utf-8"))


def encode_log_data(log: LogData) -> bytes:
    """Serialize in field order (the required fields always, the optional ones when set), as
    protobuf's own serializer does."""
    out = bytearray()
    for number, (name, kind) in _LOG_FIELDS.items():
        value = getattr(log, name)
        if value is None:
            continue
        if kind == _STR:
            out += _str_field(number, value)
        else:
            out += _key(number, VARINT) + varint(value)
    return bytes(out)


def encode_monitor_data(mon: MonitorData) -> bytes:
    out = bytearray()
    out += _len_field(1, _key(1, VARINT) + varint(mon.sec) + _key(2, VARINT) + varint(mon.nsec))
    r = mon.receiver
    if r is not None:
        body = bytearray(_str_field(1, r.name))
        if r.pid is not None:
            body += _key(2, VARINT) + varint(r.pid)
        if r.recv_data is not None:
            body += _key(3, VARINT) + varint(int(r.recv_data))
        if r.data_rate is not None:
            body += _key(4, I32) + _FLOAT.pack(r.data_rate)
        if r.from_tm:
            body += _len_field(5, b"".join(varint(v) for v in r.from_tm))
        out += _len_field(16, bytes(body))
    return bytes(out)
