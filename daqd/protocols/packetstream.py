"""Sans-IO codec for the cs.packetstream wire format: BSUInt integers and request/response packets.

Wire format (see docs/protocols/packetstream.md):

    packet = BSUInt(len(body)) body
    body   = BSUInt(tag) BSUInt(flagword) [BSUInt(channel)] [BSUInt(rq_type + 1)] payload
    flagword = (flags << 2) | (2 if request) | (1 if channel != 0)

A response carries `(user_flags << 1) | ok` as its flags. Wire rq_type 0 is reserved for the two
control packets EOF (tag 0) and ERQ (tag 1).
"""

from __future__ import annotations

from dataclasses import dataclass

from daqd.errors import ProtocolError

__all__ = [
    "DEFAULT_MAX_PACKET_BYTES",
    "EOF",
    "ERQ",
    "MAX_BSUINT_BYTES",
    "EndOfFile",
    "EndOfRequests",
    "Message",
    "PacketDecoder",
    "Request",
    "Response",
    "decode_bsuint",
    "encode",
    "encode_bsuint",
    "encode_header",
    "encode_request_header",
    "encode_response_header",
]

DEFAULT_MAX_PACKET_BYTES = 64 << 20
# 10 bytes carry 70 bits: far more than any tag or length a real peer sends.
MAX_BSUINT_BYTES = 10

_ONE_BYTE = [bytes((i,)) for i in range(128)]


@dataclass(frozen=True, slots=True)
class Request:
    """A request for `rq_type`, answered by the Response with the same (channel, tag)."""

    tag: int
    rq_type: int
    flags: int = 0
    channel: int = 0
    payload: bytes = b""


@dataclass(frozen=True, slots=True)
class Response:
    """The answer to a request: `ok` with user flags and payload, or a failure with a reason."""

    tag: int
    ok: bool
    flags: int = 0
    channel: int = 0
    payload: bytes = b""


@dataclass(frozen=True, slots=True)
class EndOfFile:
    """The sender will send nothing more on this connection."""


@dataclass(frozen=True, slots=True)
class EndOfRequests:
    """The sender will send no more requests (responses may still follow)."""


EOF = EndOfFile()
ERQ = EndOfRequests()

Message = Request | Response | EndOfFile | EndOfRequests

_EOF_BYTES = b"\x03\x00\x02\x00"
_ERQ_BYTES = b"\x03\x01\x02\x00"


def encode_bsuint(value: int) -> bytes:
    """Encode a non-negative int as BSUInt: big-endian base 128, 0x80 on all but the last byte."""
    if value < 0x80:
        if value < 0:
            raise ValueError(f"BSUInt cannot encode a negative number ({value})")
        return _ONE_BYTE[value]
    if value < 0x4000:
        # tags and lengths on a busy connection mostly land here
        return bytes((0x80 | (value >> 7), value & 0x7F))
    if value < 0x200000:
        return bytes((0x80 | (value >> 14), 0x80 | ((value >> 7) & 0x7F), value & 0x7F))
    groups = [value & 0x7F]
    value >>= 7
    while value:
        groups.append((value & 0x7F) | 0x80)
        value >>= 7
    groups.reverse()
    return bytes(groups)


def decode_bsuint(data: bytes | bytearray, pos: int = 0, end: int | None = None) -> tuple[int, int]:
    """Decode one BSUInt from `data[pos:end]`; return (value, position after it).

    Raises ProtocolError if it runs past `end` or is longer than MAX_BSUINT_BYTES.
    """
    if end is None:
        end = len(data)
    try:
        value, after = _read_bsuint(data, pos, end)
    except ProtocolError as exc:
        raise ProtocolError(f"at offset {pos}: {exc}") from None
    if after < 0:
        raise ProtocolError(f"at offset {pos}: BSUInt is truncated")
    return value, after


def _read_bsuint(data: bytes | bytearray, pos: int, end: int) -> tuple[int, int]:
    """Return (value, position after), or (0, -1) when `end` comes before the last byte."""
    value = 0
    limit = min(end, pos + MAX_BSUINT_BYTES)
    p = pos
    while p < limit:
        b = data[p]
        p += 1
        value = (value << 7) | (b & 0x7F)
        if b < 0x80:
            return value, p
    if limit - pos >= MAX_BSUINT_BYTES:
        raise ProtocolError(f"BSUInt longer than {MAX_BSUINT_BYTES} bytes")
    return 0, -1


def encode_request_header(tag: int, rq_type: int, flags: int, channel: int, size: int) -> bytes:
    """The bytes before the payload of a request carrying `size` payload bytes."""
    if rq_type < 0 or flags < 0 or tag < 0 or channel < 0:
        raise ValueError(
            f"request fields must be >= 0 (tag {tag}, rq_type {rq_type}, flags {flags}, "
            f"channel {channel})"
        )
    if rq_type < 0x7F and flags < 0x20 and not channel:
        # the common case: flags and rq_type fit one byte each
        tail = bytes(((flags << 2) | 2, rq_type + 1))
        if tag < 0x80:
            return encode_bsuint(3 + size) + bytes((tag,)) + tail
        head = encode_bsuint(tag)
        return encode_bsuint(len(head) + 2 + size) + head + tail
    fields = (
        encode_bsuint(tag)
        + encode_bsuint((flags << 2) | (3 if channel else 2))
        + (encode_bsuint(channel) if channel else b"")
        + encode_bsuint(rq_type + 1)
    )
    return encode_bsuint(len(fields) + size) + fields


def encode_response_header(tag: int, ok: bool, flags: int, channel: int, size: int) -> bytes:
    """The bytes before the payload of a response carrying `size` payload bytes."""
    if flags < 0 or tag < 0 or channel < 0:
        raise ValueError(
            f"response fields must be >= 0 (tag {tag}, flags {flags}, channel {channel})"
        )
    flagword = ((flags << 1) | (1 if ok else 0)) << 2
    if flagword < 0x80 and not channel:
        head = encode_bsuint(tag)
        return encode_bsuint(len(head) + 1 + size) + head + _ONE_BYTE[flagword]
    fields = (
        encode_bsuint(tag)
        + encode_bsuint(flagword | (1 if channel else 0))
        + (encode_bsuint(channel) if channel else b"")
    )
    return encode_bsuint(len(fields) + size) + fields


def encode_header(message: Message) -> bytes:
    """Everything of the packet before the payload; send it followed by `message.payload`."""
    if type(message) is Request:
        return encode_request_header(
            message.tag, message.rq_type, message.flags, message.channel, len(message.payload)
        )
    if type(message) is Response:
        return encode_response_header(
            message.tag, message.ok, message.flags, message.channel, len(message.payload)
        )
    if type(message) is EndOfFile:
        return _EOF_BYTES
    if type(message) is EndOfRequests:
        return _ERQ_BYTES
    raise TypeError(f"not a packet stream message: {message!r}")


def encode(message: Message) -> bytes:
    """The whole packet for `message` as one bytes object."""
    header = encode_header(message)
    if type(message) is Request or type(message) is Response:
        return header + message.payload
    return header


# A packet this large that arrives in pieces keeps its payload as a list of chunks, joined once
# when complete, instead of being re-buffered and re-copied with every chunk.
_BIG_PACKET_BYTES = 32 << 10
# tag, flags, channel and rq_type: the most the fields before a payload can take
_MAX_FIELDS_BYTES = 4 * MAX_BSUINT_BYTES


class PacketDecoder:
    """Stream decoder: feed bytes as they arrive, get the complete messages back.

    Every length is checked against `max_packet_bytes` before bytes are kept for it. After a
    ProtocolError the stream position is lost, so the decoder refuses further input.
    """

    def __init__(
        self,
        max_packet_bytes: int = DEFAULT_MAX_PACKET_BYTES,
        *,
        big_packet_bytes: int = _BIG_PACKET_BYTES,
    ) -> None:
        if max_packet_bytes < 1:
            raise ValueError("max_packet_bytes must be >= 1")
        self.max_packet_bytes = max_packet_bytes
        self.big_packet_bytes = max(big_packet_bytes, _MAX_FIELDS_BYTES)
        self._buf = bytearray()
        # bytes the incomplete packet at the front of _buf needs before parsing is worth trying
        self._need = 0
        self._offset = 0  # stream offset of _buf[0] (or of the big packet), for error messages
        self._error: ProtocolError | None = None
        # a big packet in progress: its fields, payload chunks so far, and bytes still missing
        self._big_head: tuple[int, int, int, int] = (0, 0, 0, 0)
        self._big_parts: list[bytes] | None = None
        self._big_have = 0
        self._big_missing = 0
        self._big_size = 0

    @property
    def buffered(self) -> int:
        """Bytes held for an incomplete packet."""
        return len(self._buf) + self._big_have

    def feed(self, data: bytes | bytearray | memoryview) -> list[Message]:
        """Add received bytes; return every message they complete, in order."""
        if self._error is not None:
            raise ProtocolError(f"decoder stopped after an earlier error: {self._error}")
        try:
            if self._big_parts is not None:
                return self._feed_big(data if type(data) is bytes else bytes(data))
            buf = self._buf
            if buf:
                buf += data
                if len(buf) < self._need:
                    return []
                src = bytes(buf)
                buf.clear()
            else:
                src = data if type(data) is bytes else bytes(data)
            return self._parse(src, [])
        except ProtocolError as exc:
            self._error = exc
            raise

    def feed_eof(self) -> None:
        """The stream ended: raise ProtocolError if a packet was cut off."""
        if self._error is not None:
            raise ProtocolError(f"decoder stopped after an earlier error: {self._error}")
        if self._buf or self._big_parts is not None:
            self._error = ProtocolError(
                f"stream ended inside a packet at offset {self._offset} "
                f"({self.buffered} bytes of it received)"
            )
            raise self._error

    def _feed_big(self, data: bytes) -> list[Message]:
        parts = self._big_parts
        assert parts is not None
        missing = self._big_missing
        if len(data) < missing:
            parts.append(data)
            self._big_have += len(data)
            self._big_missing = missing - len(data)
            return []
        parts.append(data[:missing])
        payload = b"".join(parts)
        self._big_parts = None
        self._big_have = 0
        self._big_missing = 0
        tag, flagword, channel, wire_rq_type = self._big_head
        where = self._offset
        self._offset = where + self._big_size
        out = [_message(tag, flagword, channel, wire_rq_type, payload, where)]
        if len(data) > missing:
            return self._parse(data[missing:], out)
        return out

    def _parse(self, src: bytes, out: list[Message]) -> list[Message]:
        n = len(src)
        pos = 0
        max_len = self.max_packet_bytes
        big = self.big_packet_bytes
        base = self._offset
        while pos < n:
            b = src[pos]
            if b < 0x80:
                length = b
                body = pos + 1
            else:
                try:
                    length, body = _read_bsuint(src, pos, n)
                except ProtocolError as exc:
                    raise ProtocolError(f"packet length at offset {base + pos}: {exc}") from None
                if body < 0:
                    self._need = n - pos + 1
                    break
            if length > max_len:
                raise ProtocolError(
                    f"packet at offset {base + pos} declares {length} bytes, "
                    f"more than max_packet_bytes={max_len}"
                )
            end = body + length
            if end > n:
                if length >= big and n - body >= _MAX_FIELDS_BYTES:
                    self._start_big(src, pos, body, end, base + pos)
                    self._offset = base + pos
                    return out
                self._need = end - pos
                break
            out.append(_parse_body(src, body, end, base + pos))
            pos = end
        else:
            self._need = 0
        if pos < n:
            self._buf += memoryview(src)[pos:]
        self._offset = base + pos
        return out

    def _start_big(self, src: bytes, start: int, body: int, end: int, where: int) -> None:
        tag, p = _field(src, body, end, "tag", where)
        flagword, p = _field(src, p, end, "flags", where)
        channel = 0
        wire_rq_type = 0
        if flagword & 1:
            channel, p = _field(src, p, end, "channel", where)
        if flagword & 2:
            wire_rq_type, p = _field(src, p, end, "rq_type", where)
            if not wire_rq_type:
                # a control packet never carries a payload, let alone a big one
                _message(tag, flagword, channel, 0, b"x", where)
        self._big_head = (tag, flagword, channel, wire_rq_type)
        first = src[p:]
        self._big_parts = [first]
        self._big_have = len(first)
        self._big_missing = end - len(src)
        self._big_size = end - start


def _message(
    tag: int, flagword: int, channel: int, wire_rq_type: int, payload: bytes, where: int
) -> Message:
    """The message for fields already read; raises for malformed control packets."""
    if flagword & 2:
        if wire_rq_type:
            return Request(tag, wire_rq_type - 1, flagword >> 2, channel, payload)
        if channel == 0 and flagword >> 2 == 0 and not payload:
            if tag == 0:
                return EOF
            if tag == 1:
                return ERQ
        raise ProtocolError(
            f"packet at offset {where}: malformed control packet (rq_type 0 with tag {tag}, "
            f"channel {channel}, flags {flagword >> 2}, {len(payload)} payload bytes)"
        )
    wire_flags = flagword >> 2
    return Response(tag, bool(wire_flags & 1), wire_flags >> 1, channel, payload)


def _field(src: bytes, pos: int, end: int, what: str, where: int) -> tuple[int, int]:
    b = src[pos] if pos < end else 0x80
    if b < 0x80:
        return b, pos + 1
    if pos + 1 < end:
        b2 = src[pos + 1]
        if b2 < 0x80:
            return ((b & 0x7F) << 7) | b2, pos + 2
    try:
        value, after = _read_bsuint(src, pos, end)
    except ProtocolError as exc:
        raise ProtocolError(f"packet at offset {where}: {what}: {exc}") from None
    if after < 0:
        raise ProtocolError(f"packet at offset {where}: {what} runs past the end of the packet")
    return value, after


def _parse_body(src: bytes, pos: int, end: int, where: int) -> Message:
    tag, pos = _field(src, pos, end, "tag", where)
    flagword, pos = _field(src, pos, end, "flags", where)
    channel = 0
    if flagword & 1:
        channel, pos = _field(src, pos, end, "channel", where)
    if flagword & 2:
        wire_rq_type, pos = _field(src, pos, end, "rq_type", where)
        if wire_rq_type:
            return Request(tag, wire_rq_type - 1, flagword >> 2, channel, src[pos:end])
        return _message(tag, flagword, channel, 0, src[pos:end], where)
    wire_flags = flagword >> 2
    return Response(tag, bool(wire_flags & 1), wire_flags >> 1, channel, src[pos:end])
