"""ICCP frame codec: control messages as ZeroMQ multipart frames with msgpack bodies (sans-IO).

Frame 0 is the message type as `!H`; the frames after it depend on the type (protocols/iccp.md).
`decode` turns frames into a frozen message dataclass or raises ProtocolError; `encode` does the
reverse. Nothing here touches a socket.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack

from daqd.errors import ProtocolError

DEFAULT_MAX_BODY_BYTES = 16 << 20
# A request code is four ASCII letters/digits/space, e.g. b"CMD ".
CODE_LENGTH = 4

Frame = bytes | bytearray | memoryview


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
    """Decode and encode ICCP messages; bodies over `max_body_bytes` are refused unread."""

    def __init__(self, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> None:
        self.max_body_bytes = max_body_bytes

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
        return [head, message.outcome.value.encode("ascii")] + [
            d.encode("utf-8", "replace") for d in message.details
        ]


_default = IccpCodec()


def decode(frames: Sequence[Frame], max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> Message:
    """Decode one multipart message; raises ProtocolError saying what was wrong."""
    if max_body_bytes == DEFAULT_MAX_BODY_BYTES:
        return _default.decode(frames)
    return IccpCodec(max_body_bytes).decode(frames)


def encode(message: Message) -> list[bytes]:
    """Encode one message as a list of frames."""
    return _default.encode(message)
