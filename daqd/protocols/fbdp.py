"""FBDP (Firebird Butler Data Pipe Protocol, RFC 9) frame codec and the consumer side of a pipe,
sans-IO: ZeroMQ multipart frames in, messages and replies out; nothing here touches a socket.

Every message starts with an 8-byte control frame: b"FBDP", a control byte (message type << 3 |
protocol revision 1), a flags byte (ACK_REQ 1, ACK_REPLY 2) and `type_data`, a big-endian uint16
whose meaning depends on the type. The frames after it:
- OPEN (1): one `firebird.butler.FBDPOpenDataframe` (data_pipe = 1 string, pipe_socket = 2
  uint32: INPUT 1 / OUTPUT 2, data_format = 3 string, parameters = 4 google.protobuf.Struct);
  the client opens the pipe socket it attaches to.
- READY (2): none; type_data is the batch size (how many DATA the sender takes or gives now;
  0: not yet).
- NOOP (3): none.
- DATA (4): at most one frame, the user data; type_data is free for the application.
- CLOSE (5): zero or more `firebird.butler.ErrorDescription`s (code = 1 uint64, description = 2
  string, context = 3 and annotation = 4 Struct); type_data is the error code (0 = OK).
A message with ACK_REQ asks for the same header back with ACK_REPLY instead.

`decode` raises `FbdpError` (a ProtocolError) whose `reason` is one word for a receiver's
counters: bad_header, bad_fourcc, bad_version, bad_flags, bad_type, bad_frames, bad_open,
bad_close. `PipeClient` keeps the consumer's session (the client attached to a server's OUTPUT):
OPEN, READY in answer to each READY, the DATA of each batch, ACK-REPLYs, CLOSE; what the server
does out of turn is a `violation` (out_of_band_data, out_of_band_ready, open_from_server,
unexpected_ack, after_close), said and survived: data that came is still data.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from daqd.errors import ProtocolError
from daqd.protocols import protobuf_wire as pw

FOURCC = b"FBDP"
REVISION = 1
HEADER = struct.Struct("!4sBBH")
DEFAULT_BATCH = 50  # Saturnin's default batch size
Frame = bytes | bytearray | memoryview


class MessageType(enum.IntEnum):
    OPEN = 1
    READY = 2
    NOOP = 3
    DATA = 4
    CLOSE = 5


class Flag(enum.IntFlag):
    ACK_REQ = 1
    ACK_REPLY = 2


NO_FLAGS = Flag(0)


class PipeSocket(enum.IntEnum):
    INPUT = 1
    OUTPUT = 2


class ErrorCode(enum.IntEnum):
    OK = 0
    INVALID_MESSAGE = 1
    PROTOCOL_VIOLATION = 2
    ERROR = 3
    INTERNAL_ERROR = 4
    INVALID_DATA = 5
    TIMEOUT = 6
    PIPE_ENDPOINT_UNAVAILABLE = 100
    FBDP_VERSION_NOT_SUPPORTED = 101
    NOT_IMPLEMENTED = 102
    DATA_FORMAT_NOT_SUPPORTED = 103


class FbdpError(ProtocolError):
    """Frames that are not an FBDP message; `reason` names the fault in one word."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(f"FBDP: {message}")
        self.reason = reason


@dataclass(frozen=True)
class Open:
    data_pipe: str
    pipe_socket: PipeSocket
    data_format: str
    parameters: Mapping[str, Any] = field(default_factory=dict)
    flags: Flag = NO_FLAGS


@dataclass(frozen=True)
class Ready:
    batch: int
    flags: Flag = NO_FLAGS


@dataclass(frozen=True)
class Noop:
    flags: Flag = NO_FLAGS


@dataclass(frozen=True)
class Data:
    payload: bytes | None = None  # None: the DATA had no data frame (an ACK-REPLY has none)
    type_data: int = 0
    flags: Flag = NO_FLAGS


@dataclass(frozen=True)
class ErrorDescription:
    code: int = 0
    description: str = ""
    context: Mapping[str, Any] = field(default_factory=dict)
    annotation: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Close:
    code: ErrorCode = ErrorCode.OK
    errors: tuple[ErrorDescription, ...] = ()
    flags: Flag = NO_FLAGS


Message = Open | Ready | Noop | Data | Close


# ----- encoding ---------------------------------------------------------------------------------


def _header(kind: MessageType, flags: Flag, type_data: int) -> bytes:
    if not 0 <= type_data <= 0xFFFF:
        raise FbdpError(f"type_data {type_data} does not fit in 16 bits", "bad_header")
    return HEADER.pack(FOURCC, (kind << 3) | REVISION, int(flags), type_data)


def _error_description(err: ErrorDescription) -> bytes:
    out = bytearray()
    if err.code:
        out += pw.field_varint(1, err.code)
    if err.description:
        out += pw.field_str(2, err.description)
    if err.context:
        out += pw.field_bytes(3, pw.encode_struct(err.context))
    if err.annotation:
        out += pw.field_bytes(4, pw.encode_struct(err.annotation))
    return bytes(out)


def encode(message: Message) -> list[bytes]:
    """The frames of `message`."""
    if isinstance(message, Open):
        body = pw.field_str(1, message.data_pipe) + pw.field_varint(2, int(message.pipe_socket))
        body += pw.field_str(3, message.data_format)
        if message.parameters:
            body += pw.field_bytes(4, pw.encode_struct(message.parameters))
        return [_header(MessageType.OPEN, message.flags, 0), body]
    if isinstance(message, Ready):
        return [_header(MessageType.READY, message.flags, message.batch)]
    if isinstance(message, Noop):
        return [_header(MessageType.NOOP, message.flags, 0)]
    if isinstance(message, Data):
        frames = [_header(MessageType.DATA, message.flags, message.type_data)]
        return frames if message.payload is None else [*frames, message.payload]
    header = _header(MessageType.CLOSE, message.flags, int(message.code))
    return [header, *(_error_description(e) for e in message.errors)]


# ----- decoding ---------------------------------------------------------------------------------


def _decode_open(raw: bytes) -> tuple[str, int, str, dict[str, Any]]:
    pipe, socket, fmt, params = "", 0, "", {}
    for number, wire_type, value in pw.fields(raw):
        if number == 1:
            pw.expect(number, wire_type, pw.LEN, "data_pipe")
            pipe = pw.text(value, "data_pipe")
        elif number == 2:
            pw.expect(number, wire_type, pw.VARINT, "pipe_socket")
            socket = value
        elif number == 3:
            pw.expect(number, wire_type, pw.LEN, "data_format")
            fmt = pw.text(value, "data_format")
        elif number == 4:
            pw.expect(number, wire_type, pw.LEN, "parameters")
            params = pw.decode_struct(value)
    return pipe, socket, fmt, params


def _decode_error(raw: bytes) -> ErrorDescription:
    code, description = 0, ""
    context: dict[str, Any] = {}
    annotation: dict[str, Any] = {}
    for number, wire_type, value in pw.fields(raw):
        if number == 1:
            pw.expect(number, wire_type, pw.VARINT, "ErrorDescription.code")
            code = value
        elif number == 2:
            pw.expect(number, wire_type, pw.LEN, "ErrorDescription.description")
            description = pw.text(value, "ErrorDescription.description")
        elif number == 3:
            pw.expect(number, wire_type, pw.LEN, "ErrorDescription.context")
            context = pw.decode_struct(value)
        elif number == 4:
            pw.expect(number, wire_type, pw.LEN, "ErrorDescription.annotation")
            annotation = pw.decode_struct(value)
    return ErrorDescription(code, description, context, annotation)


def decode(frames: Sequence[Frame]) -> Message:
    """The message in `frames`, or FbdpError saying what is wrong."""
    if not frames:
        raise FbdpError("no frames", "bad_frames")
    head = bytes(frames[0])
    if len(head) != HEADER.size:
        raise FbdpError(f"control frame of {len(head)} bytes, not {HEADER.size}", "bad_header")
    fourcc, control, flag_bits, type_data = HEADER.unpack(head)
    if fourcc != FOURCC:
        raise FbdpError(f"control frame starts {fourcc!r}, not b'FBDP'", "bad_fourcc")
    if control & 7 != REVISION:
        raise FbdpError(f"protocol revision {control & 7}, not {REVISION}", "bad_version")
    if flag_bits > 3:
        raise FbdpError(f"flags 0x{flag_bits:02x}: only ACK_REQ 1 and ACK_REPLY 2", "bad_flags")
    try:
        kind = MessageType(control >> 3)
    except ValueError:
        raise FbdpError(f"message type {control >> 3} is not 1..5", "bad_type") from None
    flags, body = Flag(flag_bits), [bytes(f) for f in frames[1:]]
    if kind in (MessageType.READY, MessageType.NOOP) and body:
        raise FbdpError(f"{kind.name} has {len(body)} data frame(s), none allowed", "bad_frames")
    if kind is MessageType.READY:
        return Ready(type_data, flags)
    if kind is MessageType.NOOP:
        return Noop(flags)
    if kind is MessageType.DATA:
        if len(body) > 1:
            raise FbdpError(f"DATA has {len(body)} data frames, at most 1", "bad_frames")
        return Data(body[0] if body else None, type_data, flags)
    if kind is MessageType.OPEN:
        if len(body) != 1:
            raise FbdpError(f"OPEN has {len(body)} data frames, not 1", "bad_frames")
        try:
            pipe, socket, fmt, params = _decode_open(body[0])
        except pw.WireError as exc:
            raise FbdpError(f"OPEN: {exc}", "bad_open") from None
        if not pipe or not fmt or socket not in (1, 2):
            what = "data_pipe" if not pipe else "data_format" if not fmt else "pipe_socket"
            raise FbdpError(f"OPEN: {what} missing or invalid", "bad_open")
        return Open(pipe, PipeSocket(socket), fmt, params, flags)
    try:
        code = ErrorCode(type_data)
    except ValueError:
        raise FbdpError(f"CLOSE with unknown error code {type_data}", "bad_close") from None
    try:
        errors = tuple(_decode_error(f) for f in body)
    except pw.WireError as exc:
        raise FbdpError(f"CLOSE: ErrorDescription: {exc}", "bad_close") from None
    return Close(code, errors, flags)


# ----- the consumer's session -------------------------------------------------------------------


@dataclass
class Step:
    """What one message from the server means to the client."""

    replies: list[list[bytes]] = field(default_factory=list)  # frames to send back, in order
    data: Data | None = None  # user data that came (an ACK-REPLY is not)
    closed: Close | None = None  # the server closed the pipe
    violation: str | None = None  # what the server did out of turn, in one word


class PipeClient:
    """The client attached to a data pipe's OUTPUT socket: it opens the pipe, accepts each batch
    the server offers (up to `batch` DATA at a time), takes the DATA, acknowledges what asks
    for it, and ends at the server's CLOSE or its own (after which what was already on its way
    is still taken, and nothing is answered)."""

    def __init__(
        self,
        pipe: str,
        data_format: str,
        batch: int = DEFAULT_BATCH,
        parameters: Mapping[str, Any] | None = None,
    ) -> None:
        if not 1 <= batch <= 0xFFFF:
            raise ValueError(f"batch {batch} must be 1..65535")
        self.open_message = Open(pipe, PipeSocket.OUTPUT, data_format, dict(parameters or {}))
        self.batch = batch
        self.transmit: int | None = None  # DATA still due in this batch; None: none agreed
        self.closed: Close | None = None  # the server's CLOSE
        self.closing = False  # this side sent CLOSE

    def open(self) -> list[bytes]:
        """The OPEN to send first."""
        return encode(self.open_message)

    def close(self) -> list[bytes]:
        """The CLOSE(OK) that ends the pipe from this side."""
        self.closing = True
        return encode(Close())

    def receive(self, message: Message) -> Step:
        step = Step()
        if self.closed is not None:
            step.violation = "after_close"
        elif isinstance(message, Ready):
            if self.transmit is not None:
                step.violation = "out_of_band_ready"
            granted = min(message.batch, self.batch)
            step.replies.append(encode(Ready(granted)))
            self.transmit = granted if granted > 0 else None
        elif isinstance(message, Data):
            if Flag.ACK_REPLY in message.flags:
                step.violation = "unexpected_ack"  # a consumer sends no DATA to acknowledge
                return step
            if self.transmit is None:
                step.violation = None if self.closing else "out_of_band_data"
            else:
                self.transmit -= 1
                if self.transmit == 0:
                    self.transmit = None  # the server offers the next batch with READY
            if Flag.ACK_REQ in message.flags:
                step.replies.append(encode(Data(None, message.type_data, Flag.ACK_REPLY)))
        elif isinstance(message, Noop):
            if Flag.ACK_REQ in message.flags:
                step.replies.append(encode(Noop(Flag.ACK_REPLY)))
        elif isinstance(message, Close):
            self.closed = step.closed = message
            self.transmit = None
        else:
            step.violation = "open_from_server"
        if isinstance(message, Data) and Flag.ACK_REPLY not in message.flags:
            step.data = message  # data that came is data, whatever else was wrong
        if self.closing:
            step.replies = []  # a pipe this side closed is answered no more
        return step
