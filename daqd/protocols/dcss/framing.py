"""DCS framing: v1 frames (200 bytes, NUL padded), v2 frames (a 26-byte header of two
lengths, text with its NUL, a binary part) and `DcssCodec`, one connection's framing, either
side.
"""

from __future__ import annotations

import re

from daqd.errors import ProtocolError
from daqd.protocols.dcss.base import Message
from daqd.protocols.dcss.parse import Malformed, parse_message
from daqd.protocols.dcss.text import decode_text, next_token

V1_FRAME_BYTES = 200
V1_MAX_TEXT_BYTES = V1_FRAME_BYTES - 1
V2_HEADER_BYTES = 26
DEFAULT_MAX_TEXT_BYTES = 1 << 20
DEFAULT_MAX_BINARY_BYTES = 64 << 20
_V2_HEADER = re.compile(rb"[ \t\n\v\f\r]*([0-9]+)[ \t\n\v\f\r]+([0-9]+)[ \t\n\v\f\r]*")
_NUL_TO_SPACE = bytes.maketrans(b"\0", b" ")


# --------------------------------------------------------------------------- framing


def encode_v1(text: str | bytes) -> bytes:
    """One 200-byte v1 frame: the text (≤ 199 bytes) and NUL padding."""
    data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    if len(data) > V1_MAX_TEXT_BYTES:
        raise ProtocolError(
            f"DCS v1 text is {len(data)} bytes, the 200-byte frame holds at most "
            f"{V1_MAX_TEXT_BYTES}: {data[:40]!r}…"
        )
    if b"\0" in data:
        raise ProtocolError("DCS text must not contain NUL")
    return data + b"\0" * (V1_FRAME_BYTES - len(data))


# Headers of frames without a binary part, by text length (with its NUL), built once each.
_V2_TEXT_HEADERS = [b"%12d %12d " % (n, 0) for n in range(1024)]


def encode_v2(text: str | bytes, binary: bytes = b"") -> bytes:
    """One v2 frame in DCSS's own form: `%12d %12d ` header, text + NUL (counted), binary."""
    # the text with its NUL, encoded in one go (a third faster than adding the NUL after)
    data = (text + "\0").encode() if isinstance(text, str) else bytes(text) + b"\0"
    n = len(data)  # DCSS counts the NUL
    if data.find(0) != n - 1:
        raise ProtocolError("DCS text must not contain NUL")
    if not binary and n < 1024:
        return _V2_TEXT_HEADERS[n] + data
    return b"%12d %12d " % (n, len(binary)) + data + binary


def _fast_v2_lengths(header: bytes | bytearray | memoryview) -> tuple[int, int] | None:
    # DCSS's own "%12d %12d " form, the common case; anything else takes the general path
    parts = bytes(header).split()
    if len(parts) == 2 and parts[0].isdigit() and parts[1].isdigit():
        return int(parts[0]), int(parts[1])
    return None


def parse_v2_header(
    header: bytes | bytearray | memoryview,
    max_text_bytes: int = DEFAULT_MAX_TEXT_BYTES,
    max_binary_bytes: int = DEFAULT_MAX_BINARY_BYTES,
) -> tuple[int, int]:
    """Two decimals from a 26-byte v2 header (any of the known writers' layouts)."""
    lengths = _fast_v2_lengths(header)
    if lengths is None:
        m = _V2_HEADER.fullmatch(bytes(header).translate(_NUL_TO_SPACE))
        if m is None:
            raise ProtocolError(f"DCS v2 header is not two decimal lengths: {bytes(header)!r}")
        lengths = int(m.group(1)), int(m.group(2))
    text_len, bin_len = lengths
    if text_len > max_text_bytes:
        raise ProtocolError(
            f"DCS v2 text length {text_len} exceeds the limit of {max_text_bytes} bytes"
        )
    if bin_len > max_binary_bytes:
        raise ProtocolError(
            f"DCS v2 binary length {bin_len} exceeds the limit of {max_binary_bytes} bytes"
        )
    return text_len, bin_len


_STRIP = b" \t\n\v\f\r"


def _clean_text(data: bytes) -> bytes:
    cut = data.find(b"\0")
    if cut >= 0:
        data = data[:cut]
    return data.rstrip(_STRIP)


class DcssCodec:
    """A DCS connection's framing, either side. The first frame each way is the v1 handshake;
    every later frame uses `level` (1 or 2).

    `feed(data)` returns the messages completed by `data`; `encode(message)` returns the bytes of
    one frame. `bad_bytes` counts undecodable text bytes, `malformed` the unparsable messages.
    """

    def __init__(
        self,
        level: int = 2,
        *,
        handshake: bool = True,
        max_text_bytes: int = DEFAULT_MAX_TEXT_BYTES,
        max_binary_bytes: int = DEFAULT_MAX_BINARY_BYTES,
    ) -> None:
        if level not in (1, 2):
            raise ValueError(f"DCS protocol level must be 1 or 2, not {level!r}")
        self.level = level
        self.max_text_bytes = max_text_bytes
        self.max_binary_bytes = max_binary_bytes
        self._in_v1_next = handshake or level == 1
        self._out_v1_next = handshake or level == 1
        self._buf = bytearray()
        self._pending: tuple[int, int] | None = None  # v2 lengths whose body has not arrived
        self.bad_bytes = 0
        self.malformed = 0
        self.frames_in = 0
        self.frames_out = 0

    def feed(self, data: bytes | bytearray | memoryview) -> list[Message]:
        if self._buf:
            self._buf += data
            buf = bytes(self._buf)
            self._buf.clear()
        else:
            buf = data if isinstance(data, bytes) else bytes(data)
        out: list[Message] = []
        pending = self._pending
        pos = 0
        end = len(buf)
        try:
            while True:
                if self._in_v1_next:
                    if end - pos < V1_FRAME_BYTES:
                        break
                    text = _clean_text(buf[pos : pos + V1_FRAME_BYTES])
                    binary = b""
                    pos += V1_FRAME_BYTES
                    self._in_v1_next = self.level == 1
                else:
                    if pending is None:
                        if end - pos < V2_HEADER_BYTES:
                            break
                        header = buf[pos : pos + V2_HEADER_BYTES]
                        parts = header.split()  # DCSS's own "%12d %12d " form, checked below
                        if len(parts) == 2 and parts[0].isdigit() and parts[1].isdigit():
                            pending = int(parts[0]), int(parts[1])
                        if (
                            pending is None
                            or pending[0] > self.max_text_bytes
                            or pending[1] > self.max_binary_bytes
                        ):  # any other layout, and every error message
                            pending = parse_v2_header(
                                header, self.max_text_bytes, self.max_binary_bytes
                            )
                    text_len, bin_len = pending
                    start = pos + V2_HEADER_BYTES
                    stop = start + text_len
                    if end - stop < bin_len:
                        break
                    cut = buf.find(0, start, stop)  # the counted NUL, or one before it
                    text = buf[start : stop if cut < 0 else cut].rstrip(_STRIP)
                    if bin_len:
                        binary = buf[stop : stop + bin_len]
                        pos = stop + bin_len
                    else:
                        binary = b""
                        pos = stop
                    pending = None
                try:  # the usual case, without a call more: UTF-8 text that parses
                    out.append(parse_message(text.decode(), binary, text))
                except (UnicodeDecodeError, ProtocolError):
                    out.append(self._message(text, binary))  # bad bytes replaced, or Malformed
        finally:
            self._pending = pending
            self.frames_in += len(out)
            if pos < end:
                self._buf += buf[pos:]
        return out

    def _message(self, raw: bytes, binary: bytes) -> Message:
        try:
            text = raw.decode()
        except UnicodeDecodeError:
            text, bad = decode_text(raw)
            self.bad_bytes += bad
        try:
            return parse_message(text, binary, raw)
        except ProtocolError as exc:
            self.malformed += 1
            command = next_token(text)[0] or ""
            return Malformed(command, text, str(exc), binary=binary, raw=raw)

    def encode_text(self, text: str | bytes, binary: bytes = b"") -> bytes:
        """Frame an already formatted text (the next frame's version: v1 handshake or level)."""
        if self._out_v1_next:
            if binary:
                raise ProtocolError("DCS v1 frames cannot carry a binary part")
            frame = encode_v1(text)
            self._out_v1_next = self.level == 1
        else:
            frame = encode_v2(text, binary)
        self.frames_out += 1
        return frame

    def encode(self, message: Message) -> bytes:
        return self.encode_text(message.to_text(), message.binary)

    @property
    def buffered(self) -> int:
        """Bytes received but not yet part of a whole frame."""
        return len(self._buf)
