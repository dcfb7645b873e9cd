"""ICCP frame codec: control messages as ZeroMQ multipart frames (sans-IO), in two body encodings.

Frame 0 is the message type as `!H`; the frames after it depend on the type (protocols/iccp.md).
`decode` turns frames into a frozen message dataclass or raises ProtocolError; `encode` does the
reverse. Nothing here touches a socket.

Body encodings, chosen per session (`IccpCodec(encoding=...)`):
- "daqd": msgpack bodies and request codes (daqd's own control plane, daqctl, worker processes);
- "saturnin": Saturnin 0.10.0's bytes (Firebird Butler): READY carries a
  `firebird.butler.PeerIdentification` and a `google.protobuf.Struct` of endpoints, REQUEST is
  CONF with a `firebird.base.ConfigProto` (both the specified [code, config] form and the code-less
  [config] form that saturnin's own encoder sends are accepted), OK has no body, ERROR is text
  only, FINISHED is the same in both. The protobuf is hand-encoded (protocols/protobuf_wire.py).
The messages are the same dataclasses either way; what one encoding cannot carry (a READY's
version in Saturnin's supplement, an OK's result, an ERROR's details) is said per field below.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack

from daqd.errors import ProtocolError
from daqd.protocols import protobuf_wire as pw

DEFAULT_MAX_BODY_BYTES = 16 << 20
# A request code is four ASCII letters/digits/space, e.g. b"CMD ".
CODE_LENGTH = 4

Frame = bytes | bytearray | memoryview

ENCODINGS = ("daqd", "saturnin")
# The ZeroMQ transports a Saturnin controller accepts in an endpoint (it refuses the READY else).
SATURNIN_TRANSPORTS = ("inproc", "ipc", "tcp", "pgm", "epgm", "vmci")
# Saturnin's ICCP has one request, CONF, which its own encoder sends without the code frame.
SATURNIN_CODE = b"CONF"


class MessageType(enum.IntEnum):
    READY = 1
    REQUEST = 2
    OK = 3
    ERROR = 4
    STOP = 5
    FINISHED = 6


class Outcome(enum.Enum):
    OK = "OK"
    ERROR = "ERROR"
    UNKNOWN = "UNKNOWN"


# Request codes daqd serves on its control socket; the server answers others with ERROR.
REQUEST_CODES = ("CONF", "STAT", "CTRL", "CMD ", "TAPS")


@dataclass(frozen=True)
class Ready:
    """A component announces itself: who it is and where its channels are."""

    name: str
    pid: int
    host: str = ""
    version: str = ""
    endpoints: Mapping[str, Sequence[str]] = field(default_factory=dict)
    # Saturnin only: the 16-byte peer UUID (required there), and the supplement's other keys
    # (name and version travel in it too).
    uid: bytes = b""
    supplement: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class AnyValue:
    """A `google.protobuf.Any` in a Saturnin ConfigProto option (as_msg), kept as it came."""

    type_url: str
    value: bytes


@dataclass(frozen=True)
class Request:
    """A controller asks for something: a 4-character code and a map of arguments."""

    code: str
    args: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Ok:
    """The request succeeded; `result` is any msgpack-able value (None: no result frame)."""

    result: Any = None


@dataclass(frozen=True)
class Error:
    """The request (or the component) failed; `message` says what and what to do."""

    message: str
    kind: str | None = None
    details: Any = None


@dataclass(frozen=True)
class Stop:
    """The controller asks the component to end its work, drain, and report FINISHED."""


@dataclass(frozen=True)
class Finished:
    """The component has ended its work."""

    outcome: Outcome
    details: tuple[str, ...] = ()


Message = Ready | Request | Ok | Error | Stop | Finished

_TYPE_OF: dict[type, MessageType] = {
    Ready: MessageType.READY,
    Request: MessageType.REQUEST,
    Ok: MessageType.OK,
    Error: MessageType.ERROR,
    Stop: MessageType.STOP,
    Finished: MessageType.FINISHED,
}


def _pack(value: Any, what: str) -> bytes:
    try:
        return bytes(msgpack.packb(value, use_bin_type=True))
    except (TypeError, ValueError, OverflowError) as exc:
        raise ProtocolError(f"ICCP {what}: cannot be packed with msgpack ({exc})") from exc


def _unpack(frame: Frame, what: str, max_bytes: int) -> Any:
    if len(frame) > max_bytes:
        raise ProtocolError(
            f"ICCP {what}: body of {len(frame)} bytes is over the limit of {max_bytes} bytes"
        )
    try:
        # msgpack bounds every container and string by the buffer length, so a short frame cannot
        # announce a huge allocation; deep nesting raises StackError.
        return msgpack.unpackb(frame, raw=False, use_list=True, strict_map_key=False)
    except Exception as exc:
        reason = f"{type(exc).__name__}: {exc}"
        raise ProtocolError(f"ICCP {what}: not valid msgpack ({reason})") from exc


def _text(frame: Frame, what: str, max_bytes: int) -> str:
    if len(frame) > max_bytes:
        raise ProtocolError(
            f"ICCP {what}: {len(frame)} bytes is over the limit of {max_bytes} bytes"
        )
    try:
        return bytes(frame).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"ICCP {what}: not UTF-8 ({exc})") from exc


class IccpCodec:
    """Decode and encode ICCP messages in one body encoding ("daqd" or "saturnin"); bodies over
    `max_body_bytes` are refused unread."""

    def __init__(
        self, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, encoding: str = "daqd"
    ) -> None:
        if encoding not in ENCODINGS:
            raise ValueError(f"ICCP encoding {encoding!r}: expected one of {', '.join(ENCODINGS)}")
        self.max_body_bytes = max_body_bytes
        self.encoding = encoding
        self.saturnin = encoding == "saturnin"

    def decode(self, frames: Sequence[Frame]) -> Message:
        if not frames:
            raise ProtocolError("ICCP: empty message (no frames)")
        head = frames[0]
        if len(head) != 2:
            raise ProtocolError(f"ICCP frame 0: expected 2 bytes (message type), got {len(head)}")
        (value,) = struct.unpack("!H", head)
        try:
            mtype = MessageType(value)
        except ValueError:
            raise ProtocolError(
                f"ICCP frame 0: unknown message type {value} (known: 1..6)"
            ) from None
        body = frames[1:]
        if self.saturnin:
            return self._saturnin(mtype, body)
        if mtype is MessageType.READY:
            return self._ready(body)
        if mtype is MessageType.REQUEST:
            return self._request(body)
        if mtype is MessageType.OK:
            return Ok(_unpack(body[0], "OK result", self.max_body_bytes) if body else None)
        if mtype is MessageType.ERROR:
            return self._error(body)
        if mtype is MessageType.STOP:
            return Stop()
        return self._finished(body)

    def _ready(self, body: Sequence[Frame]) -> Ready:
        if not body:
            raise ProtocolError("ICCP READY: missing frame 1 (peer map)")
        if len(body) >= 2 and bytes(body[0][:1]) == b"\x0a":
            raise ProtocolError(
                "ICCP READY: frames 1-2 look like Saturnin's protobuf (PeerIdentification, "
                "Struct), not daqd's msgpack map: run this session with the saturnin encoding"
            )
        peer = _unpack(body[0], "READY peer map", self.max_body_bytes)
        if not isinstance(peer, dict):
            raise ProtocolError(f"ICCP READY: frame 1 is a {type(peer).__name__}, expected a map")
        name, pid = peer.get("name"), peer.get("pid")
        if not isinstance(name, str):
            raise ProtocolError("ICCP READY: 'name' missing or not a string")
        if not isinstance(pid, int) or isinstance(pid, bool):
            raise ProtocolError("ICCP READY: 'pid' missing or not an integer")
        host, version = peer.get("host", ""), peer.get("version", "")
        if not isinstance(host, str) or not isinstance(version, str):
            raise ProtocolError("ICCP READY: 'host' and 'version' must be strings")
        endpoints = peer.get("endpoints", {})
        if not isinstance(endpoints, dict) or not all(
            isinstance(k, str) and isinstance(v, list) and all(isinstance(a, str) for a in v)
            for k, v in endpoints.items()
        ):
            raise ProtocolError("ICCP READY: 'endpoints' must map channel names to address lists")
        return Ready(name, pid, host, version, endpoints)

    def _request(self, body: Sequence[Frame]) -> Request:
        if not body:
            raise ProtocolError("ICCP REQUEST: missing frame 1 (4-byte request code)")
        raw = bytes(body[0])
        if len(raw) != CODE_LENGTH:
            raise ProtocolError(f"ICCP REQUEST: code must be 4 bytes, got {len(raw)}")
        if not all(0x20 <= b < 0x7F for b in raw):
            raise ProtocolError(f"ICCP REQUEST: code {raw!r} is not printable ASCII")
        code = raw.decode("ascii")
        if len(body) < 2:
            return Request(code, {})
        args = _unpack(body[1], f"REQUEST {code!r} arguments", self.max_body_bytes)
        if not isinstance(args, dict):
            raise ProtocolError(
                f"ICCP REQUEST {code!r}: arguments are a {type(args).__name__}, expected a map"
            )
        return Request(code, args)

    def _error(self, body: Sequence[Frame]) -> Error:
        if not body:
            raise ProtocolError("ICCP ERROR: missing frame 1 (message text)")
        text = _text(body[0], "ERROR text", self.max_body_bytes)
        if len(body) < 2:
            return Error(text)
        info = _unpack(body[1], "ERROR details", self.max_body_bytes)
        if not isinstance(info, dict):
            raise ProtocolError(f"ICCP ERROR: frame 2 is a {type(info).__name__}, expected a map")
        kind = info.get("type")
        if kind is not None and not isinstance(kind, str):
            raise ProtocolError("ICCP ERROR: 'type' must be a string")
        return Error(text, kind, info.get("details"))

    def _finished(self, body: Sequence[Frame]) -> Finished:
        if not body:
            raise ProtocolError("ICCP FINISHED: missing frame 1 (outcome)")
        raw = bytes(body[0])
        try:
            outcome = Outcome(raw.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            raise ProtocolError(
                f"ICCP FINISHED: outcome {raw[:16]!r} is not OK, ERROR or UNKNOWN"
            ) from None
        details = tuple(
            _text(f, f"FINISHED detail {i}", self.max_body_bytes)
            for i, f in enumerate(body[1:], start=1)
        )
        return Finished(outcome, details)

    def encode(self, message: Message) -> list[bytes]:
        mtype = _TYPE_OF.get(type(message))
        if mtype is None:
            raise ProtocolError(f"ICCP: cannot encode a {type(message).__name__}")
        head = struct.pack("!H", mtype)
        if self.saturnin:
            return [head, *_saturnin_body(message)]
        if isinstance(message, Ready):
            peer = {
                "name": message.name,
                "pid": message.pid,
                "host": message.host,
                "version": message.version,
                "endpoints": {k: list(v) for k, v in message.endpoints.items()},
            }
            return [head, _pack(peer, "READY")]
        if isinstance(message, Request):
            code = message.code.encode("ascii", "replace")
            if len(code) != CODE_LENGTH or not all(0x20 <= b < 0x7F for b in code):
                raise ProtocolError(
                    f"ICCP REQUEST: code {message.code!r} is not 4 ASCII characters"
                )
            return [head, code, _pack(dict(message.args), f"REQUEST {message.code!r}")]
        if isinstance(message, Ok):
            if message.result is None:
                return [head]
            return [head, _pack(message.result, "OK result")]
        if isinstance(message, Error):
            text = message.message.encode("utf-8", "replace")
            if message.kind is None and message.details is None:
                return [head, text]
            info = {"type": message.kind, "details": message.details}
            return [head, text, _pack(info, "ERROR details")]
        if isinstance(message, Stop):
            return [head]
        assert isinstance(message, Finished)
        return [head, *_finished_body(message)]

    # ----- Saturnin's bytes --------------------------------------------------------------------

    def _saturnin(self, mtype: MessageType, body: Sequence[Frame]) -> Message:
        for i, frame in enumerate(body, start=1):
            if len(frame) > self.max_body_bytes:
                raise ProtocolError(
                    f"ICCP {mtype.name}: frame {i} of {len(frame)} bytes is over the limit of "
                    f"{self.max_body_bytes} bytes"
                )
        try:
            if mtype is MessageType.READY:
                return _saturnin_ready(body)
            if mtype is MessageType.REQUEST:
                return _saturnin_request(body)
        except pw.WireError as exc:
            raise ProtocolError(f"ICCP {mtype.name} (Saturnin protobuf): {exc}") from None
        if mtype is MessageType.OK:
            return Ok()  # Saturnin's OK has no body; extra frames are ignored
        if mtype is MessageType.ERROR:
            if not body:
                raise ProtocolError("ICCP ERROR: missing frame 1 (message text)")
            return Error(_text(body[0], "ERROR text", self.max_body_bytes))
        if mtype is MessageType.STOP:
            return Stop()
        if not body:
            raise ProtocolError("ICCP FINISHED: missing frame 1 (outcome)")
        raw = bytes(body[0])
        try:
            outcome = Outcome(raw.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            raise ProtocolError(
                f"ICCP FINISHED: outcome {raw[:16]!r} is not OK, ERROR or UNKNOWN"
            ) from None
        details = [bytes(f).decode("utf-8", "replace") for f in body[1:]]
        if len(details) > 1 and all(len(d) <= 1 for d in details):
            # saturnin 0.10.0 under `python -O` sends repr(exc) one character per frame
            # (its bug A7.4): put the text back together.
            details = ["".join(details)]
        return Finished(outcome, tuple(details))


def _finished_body(message: Finished) -> list[bytes]:
    details = message.details
    if isinstance(details, str):  # one text, never one character per frame
        details = (details,)
    return [message.outcome.value.encode("ascii")] + [
        str(d).encode("utf-8", "replace") for d in details
    ]


def _saturnin_body(message: Message) -> list[bytes]:
    """The frames after frame 0 of `message` in Saturnin's encoding."""
    try:
        if isinstance(message, Ready):
            return _saturnin_ready_body(message)
        if isinstance(message, Request):
            if message.code != SATURNIN_CODE.decode():
                raise ProtocolError(
                    f"ICCP REQUEST {message.code!r}: Saturnin's ICCP has only the CONF request"
                )
            return [SATURNIN_CODE, encode_config(message.args)]
    except pw.WireError as exc:
        raise ProtocolError(f"ICCP {type(message).__name__.upper()}: {exc}") from None
    if isinstance(message, Ok):  # Saturnin's OK carries no result
        return []
    if isinstance(message, Error):  # nor does its ERROR carry more than the text
        return [message.message.encode("utf-8", "replace")]
    if isinstance(message, Stop):
        return []
    assert isinstance(message, Finished)
    return _finished_body(message)


def saturnin_address(address: str) -> bool:
    """Whether a Saturnin controller takes `address` as an endpoint (`proto://...`)."""
    proto, sep, rest = address.partition("://")
    return bool(sep and rest) and proto.lower() in SATURNIN_TRANSPORTS


def _saturnin_ready_body(message: Ready) -> list[bytes]:
    if len(message.uid) != 16:
        raise ProtocolError(f"ICCP READY: Saturnin needs a 16-byte uid, got {len(message.uid)}")
    if not 0 <= message.pid < 1 << 32:
        raise ProtocolError(f"ICCP READY: pid {message.pid} is not a uint32")
    for channel, addresses in message.endpoints.items():
        if isinstance(addresses, str):
            raise ProtocolError(f"ICCP READY: endpoints of {channel!r} must be a list")
        for address in addresses:
            if not saturnin_address(address):
                raise ProtocolError(
                    f"ICCP READY: endpoint {address!r} of {channel!r} is not a ZeroMQ address "
                    f"Saturnin accepts ({', '.join(SATURNIN_TRANSPORTS)}://...)"
                )
    supplement: dict[str, Any] = {}
    if message.name:
        supplement["name"] = message.name
    if message.version:
        supplement["version"] = message.version
    supplement.update(message.supplement)
    peer = pw.field_bytes(1, message.uid)
    if message.pid:
        peer += pw.field_varint(2, message.pid)
    if message.host:
        peer += pw.field_str(3, message.host)
    if supplement:
        any_struct = pw.encode_any(pw.STRUCT_TYPE_URL, pw.encode_struct(supplement))
        peer += pw.field_bytes(4, any_struct)
    endpoints = pw.encode_struct({k: list(v) for k, v in message.endpoints.items()})
    return [peer, endpoints]


def _saturnin_ready(body: Sequence[Frame]) -> Ready:
    if len(body) < 2:
        missing = "1 (PeerIdentification)" if not body else "2 (endpoints Struct)"
        raise ProtocolError(f"ICCP READY: missing frame {missing}")
    uid, pid, host = b"", 0, ""
    supplement: dict[str, Any] = {}
    struct_seen = False
    for number, wire_type, value in pw.fields(body[0]):
        if number == 1:
            pw.expect(number, wire_type, pw.LEN, "PeerIdentification.uid")
            uid = value
        elif number == 2:
            pw.expect(number, wire_type, pw.VARINT, "PeerIdentification.pid")
            pid = value & 0xFFFFFFFF
        elif number == 3:
            pw.expect(number, wire_type, pw.LEN, "PeerIdentification.host")
            host = pw.text(value, "PeerIdentification.host")
        elif number == 4:
            pw.expect(number, wire_type, pw.LEN, "PeerIdentification.supplement")
            type_url, packed = pw.decode_any(value)
            if not struct_seen and type_url.endswith("/google.protobuf.Struct"):
                supplement = pw.decode_struct(packed)  # the first Struct, as Saturnin reads it
                struct_seen = True
    if len(uid) != 16:
        raise ProtocolError(f"ICCP READY: PeerIdentification.uid must be 16 bytes, got {len(uid)}")
    endpoints = pw.decode_struct(body[1])
    for channel, addresses in endpoints.items():
        if not isinstance(addresses, list) or not all(isinstance(a, str) for a in addresses):
            raise ProtocolError(f"ICCP READY: endpoints of {channel!r} must be a list of strings")
        for address in addresses:
            if not saturnin_address(address):
                raise ProtocolError(
                    f"ICCP READY: endpoint {address!r} of {channel!r} is not a ZeroMQ address"
                )
    name, version = supplement.pop("name", ""), supplement.pop("version", "")
    return Ready(
        name=name if isinstance(name, str) else str(name),
        pid=pid,
        host=host,
        version=version if isinstance(version, str) else str(version),
        endpoints=endpoints,
        uid=uid,
        supplement=supplement,
    )


def _saturnin_request(body: Sequence[Frame]) -> Request:
    """[b"CONF", ConfigProto] as specified, or [ConfigProto] (or nothing) as saturnin 0.10.0's
    encoder sends it (its bug A7.1). A ConfigProto never starts with a printable byte (its first
    field key is 0x0a or 0x12), so a 4-byte printable first frame is a code."""
    if not body:
        return Request("CONF", {})
    first = bytes(body[0])
    if len(first) == CODE_LENGTH and all(0x20 <= b < 0x7F for b in first):
        if first != SATURNIN_CODE:
            raise ProtocolError(
                f"ICCP REQUEST: code {first!r} is not CONF, Saturnin's only request"
            )
        return Request("CONF", decode_config(body[1]) if len(body) > 1 else {})
    return Request("CONF", decode_config(first))


# ----- firebird.base.ConfigProto ---------------------------------------------------------------
# ConfigProto: map<string, Value> options = 1; map<string, ConfigProto> configs = 2.
# Value (oneof kind): as_string 2, as_bytes 3, as_bool 4, as_double 5, as_float 6, as_sint32 7,
# as_sint64 8, as_uint32 9, as_uint64 10, as_msg 11 (google.protobuf.Any).
# As a dict: options map to their values, sections (configs) to nested dicts.

_INT64 = range(-(1 << 63), 1 << 63)
_UINT64 = range(0, 1 << 64)


def encode_config_value(value: Any) -> bytes:
    if isinstance(value, bool):
        return pw.field_varint(4, int(value))
    if isinstance(value, int):
        if value in _INT64:
            return pw.field_varint(8, pw.zigzag(value))
        if value in _UINT64:
            return pw.field_varint(10, value)
        raise pw.WireError(f"integer {value} fits neither sint64 nor uint64")
    if isinstance(value, float):
        return pw.field_double(5, value)
    if isinstance(value, str):
        return pw.field_str(2, value)
    if isinstance(value, bytes | bytearray):
        return pw.field_bytes(3, bytes(value))
    if isinstance(value, AnyValue):
        return pw.field_bytes(11, pw.encode_any(value.type_url, value.value))
    raise pw.WireError(
        f"a {type(value).__name__} has no ConfigProto Value (string, bytes, bool, number, Any); "
        "write a list as text, as Saturnin does"
    )


def encode_config(config: Mapping[str, Any], depth: int = 0) -> bytes:
    if depth > pw.MAX_DEPTH:
        raise pw.WireError(f"ConfigProto nested deeper than {pw.MAX_DEPTH}")
    out = bytearray()
    for name, value in config.items():
        if not isinstance(name, str):
            raise pw.WireError(f"ConfigProto keys are strings, not {type(name).__name__}")
        if value is None:  # as Saturnin does: an option without a value is left out
            continue
        if isinstance(value, Mapping):
            out += pw.field_bytes(2, pw.entry(name, encode_config(value, depth + 1)))
        else:
            out += pw.field_bytes(1, pw.entry(name, encode_config_value(value)))
    return bytes(out)


def decode_config_value(raw: bytes) -> Any:
    value: Any = None
    for number, wire_type, v in pw.fields(raw):
        if number == 2:
            pw.expect(number, wire_type, pw.LEN, "Value.as_string")
            value = pw.text(v, "Value.as_string")
        elif number == 3:
            pw.expect(number, wire_type, pw.LEN, "Value.as_bytes")
            value = v
        elif number == 4:
            pw.expect(number, wire_type, pw.VARINT, "Value.as_bool")
            value = bool(v)
        elif number == 5:
            pw.expect(number, wire_type, pw.FIXED64, "Value.as_double")
            value = pw.as_double(v)
        elif number == 6:
            pw.expect(number, wire_type, pw.FIXED32, "Value.as_float")
            value = pw.as_float(v)
        elif number == 7:
            pw.expect(number, wire_type, pw.VARINT, "Value.as_sint32")
            value = pw.unzigzag(v & 0xFFFFFFFF)
        elif number == 8:
            pw.expect(number, wire_type, pw.VARINT, "Value.as_sint64")
            value = pw.unzigzag(v)
        elif number == 9:
            pw.expect(number, wire_type, pw.VARINT, "Value.as_uint32")
            value = v & 0xFFFFFFFF
        elif number == 10:
            pw.expect(number, wire_type, pw.VARINT, "Value.as_uint64")
            value = v
        elif number == 11:
            pw.expect(number, wire_type, pw.LEN, "Value.as_msg")
            value = AnyValue(*pw.decode_any(v))
    return value


def decode_config(raw: Frame, depth: int = 0) -> dict[str, Any]:
    if depth > pw.MAX_DEPTH:
        raise pw.WireError(f"ConfigProto nested deeper than {pw.MAX_DEPTH}")
    out: dict[str, Any] = {}
    sections: set[str] = set()
    for number, wire_type, v in pw.fields(raw):
        if number not in (1, 2):
            continue
        what = "ConfigProto.options" if number == 1 else "ConfigProto.configs"
        pw.expect(number, wire_type, pw.LEN, what)
        name, value = pw.map_entry(v, what)
        if number == 1:
            if name in sections:
                raise pw.WireError(f"{name!r} is both an option and a section")
            out[name] = None if value is None else decode_config_value(value)
        else:
            if name in out and name not in sections:
                raise pw.WireError(f"{name!r} is both an option and a section")
            sections.add(name)
            out[name] = {} if value is None else decode_config(value, depth + 1)
    return out


_default = IccpCodec()


def decode(frames: Sequence[Frame], max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> Message:
    """Decode one multipart message; raises ProtocolError saying what was wrong."""
    if max_body_bytes == DEFAULT_MAX_BODY_BYTES:
        return _default.decode(frames)
    return IccpCodec(max_body_bytes).decode(frames)


def encode(message: Message) -> list[bytes]:
    """Encode one message as a list of frames."""
    return _default.encode(message)
