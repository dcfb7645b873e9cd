"""One log connection's bytes into chec.LogData messages (sans-IO), in either framing:

- **length** (daqd's, for new senders such as `daqd.loghandler.DaqdLogHandler`): each message is
  a 4-byte big-endian length, then that many bytes of a serialized LogData.
- **ssdaq** (SSDAQ's `ChecSocketLogHandler`): serialized LogData written back to back with
  nothing between them. SSDAQ's receiver took each TCP read as one message, which TCP does not
  promise: two records sent close together arrive in one read (and then parse as *one*
  LogData, the second's fields overwriting the first's: a record lost without a trace), a long
  one arrives in pieces. Here a message ends where the next one's first field (systemType, field
  1, which every protobuf serializer writes first) begins, and a piece that is not yet a whole
  message waits for the next read. Bytes that are not protobuf cannot be split: from the first
  bad field to the end of the buffer they are refused, and reading starts afresh with the next
  read.

The framing is told by the connection's first byte: a length below 16 MiB starts with 0x00, and
no protobuf message can (its first key would name field 0). So one port serves both, SSDAQ's
senders unchanged.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from daqd.protocols.protobuf_wire import LEN, VARINT, WireError, read_varint
from daqd.protocols.ssdaq_pb import LogData, PbError, decode_log_data

LENGTH = struct.Struct(">I")
MAX_RECORD_LIMIT = (1 << 24) - 1  # a larger length would not start with 0x00
_FIRST_KEY = 1 << 3 | VARINT  # systemType: where an unframed message begins
_FIXED_SIZES = {1: 8, 5: 4}


@dataclass
class Message:
    """One message cut from the stream: its bytes, and what they decode to (or why not)."""

    raw: bytes
    log: LogData | None = None
    error: PbError | None = None


class LogStream:
    """Feed a connection's reads to `feed()`, then call `close()` at its end; each returns the
    messages completed. After a fatal fault (`broken` is set) the connection must be dropped."""

    def __init__(self, max_record: int = 1 << 20) -> None:
        if not 0 < max_record <= MAX_RECORD_LIMIT:
            raise ValueError(f"max_record must be 1..{MAX_RECORD_LIMIT}")
        self.max_record = max_record
        self.framing: str | None = None  # "length" or "ssdaq", from the first byte
        self.broken = False
        self._buf = bytearray()
        self._scanned = 0  # ssdaq: the buffer is whole fields up to here

    @property
    def pending(self) -> int:
        """Bytes held for a message not yet whole."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[Message]:
        if self.broken or not data:
            return []
        if self.framing is None:
            self.framing = "length" if data[0] == 0 else "ssdaq"
        self._buf += data
        return self._length() if self.framing == "length" else self._unframed()

    def close(self) -> list[Message]:
        """The peer closed: what is left is a message cut short."""
        buf, self._buf = bytes(self._buf), bytearray()
        if not buf or self.broken:
            return []
        if self.framing == "length":
            need = LENGTH.unpack_from(buf)[0] + 4 if len(buf) >= 4 else 4
            why = f"the connection closed after {len(buf)} of {need} bytes of a message"
            return [Message(buf, error=PbError("truncated", why))]
        return [_decode(buf)]

    # ----- length-prefixed --------------------------------------------------------------------
    def _length(self) -> list[Message]:
        out: list[Message] = []
        buf = self._buf
        pos = 0
        while len(buf) - pos >= 4:
            (n,) = LENGTH.unpack_from(buf, pos)
            if n > self.max_record:
                self.broken = True
                why = f"a message of {n} bytes announced, more than max_record_bytes={self.max_record}"
                out.append(Message(bytes(buf[pos : pos + 4]), error=PbError("too_long", why)))
                self._buf = bytearray()
                return out
            if len(buf) - pos - 4 < n:
                break
            out.append(_decode(bytes(buf[pos + 4 : pos + 4 + n])))
            pos += 4 + n
        del buf[:pos]
        return out

    # ----- unframed (SSDAQ) -------------------------------------------------------------------
    def _unframed(self) -> list[Message]:
        out: list[Message] = []
        buf = self._buf
        start = 0  # where the message being walked began
        pos = self._scanned
        end = len(buf)
        while pos < end:
            if buf[pos] == _FIRST_KEY and pos > start:
                out.append(_decode(bytes(buf[start:pos])))
                start = pos
            try:
                pos = _skip_field(buf, pos, end)
            except _Incomplete:
                break
            except WireError as exc:  # not protobuf from here on: it cannot be split further
                if pos > start:  # what came before it may be a whole message
                    before = _decode(bytes(buf[start:pos]))
                    if before.error is None:
                        out.append(before)
                        start = pos
                out.append(Message(bytes(buf[start:]), error=PbError(exc.reason, str(exc))))
                self._buf, self._scanned = bytearray(), 0
                return out
        else:  # whole fields to the end: a whole message unless its required fields are to come
            last = _decode(bytes(buf[start:]))
            if last.error is None or last.error.reason != "missing_field":
                out.append(last)
                start = pos = end
        if end - start > self.max_record:
            why = f"more than max_record_bytes={self.max_record} without a message boundary"
            out.append(Message(bytes(buf[start:]), error=PbError("too_long", why)))
            self._buf, self._scanned = bytearray(), 0
            return out
        del buf[:start]
        self._scanned = pos - start
        return out


class _Incomplete(Exception):
    """The field at the end of the buffer is not all there yet."""


def _skip_field(buf: bytearray, pos: int, end: int) -> int:
    """The position after the field at `pos`; _Incomplete if it runs past `end`."""
    try:
        key, pos = read_varint(buf, pos, end)
        wire = key & 7
        if key >> 3 == 0:
            raise WireError("field number 0", "bad_field")
        if wire == VARINT:
            _, pos = read_varint(buf, pos, end)
        elif wire == LEN:
            size, pos = read_varint(buf, pos, end)
            pos += size
        elif wire in _FIXED_SIZES:
            pos += _FIXED_SIZES[wire]
        else:
            raise WireError(f"wire type {wire} is not supported", "bad_wire_type")
    except WireError as exc:
        if exc.reason == "truncated":
            raise _Incomplete from None
        raise
    if pos > end:
        raise _Incomplete
    return pos


def _decode(raw: bytes) -> Message:
    try:
        return Message(raw, log=decode_log_data(raw))
    except PbError as exc:
        return Message(raw, error=exc)


def frame(message: bytes) -> bytes:
    """One serialized LogData in the length framing."""
    return LENGTH.pack(len(message)) + message
