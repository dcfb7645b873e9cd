"""CDTP2, Constellation's data transmission protocol: sans-IO encode and decode of its messages.

A CDTP2 message is one ZeroMQ frame holding four concatenated msgpack objects: the protocol string
"CDTP\\x02", the sender's canonical name, the message type (DATA, BOR, EOR) and an array of records
`[seq, tags, blocks]`. BOR and EOR carry exactly two records whose tags are (user tags,
configuration) and (user tags, run metadata). Decoded blocks are memoryviews of the received frame,
so a DATA message is never copied block by block. Timestamps in tags (msgpack ext -1, in any of its
three widths) decode as `msgpack.Timestamp`, which keeps every value exactly and packs again as is.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack

from daqd.errors import ProtocolError

Block = bytes | bytearray | memoryview

PROTOCOL = "CDTP\x02"
#: Default bound on one message, both directions. Constellation's Python receiver dies above
#: 100 MiB (msgpack's default buffer size), so we stay well below it.
MAX_MESSAGE_BYTES = 64 << 20
#: The smallest encoding of one record: array(3) header, fixint seq, empty map, empty array.
MIN_RECORD_BYTES = 4

_PROTOCOL_BYTES = b"\xa5CDTP\x02"
_U8 = struct.Struct(">B")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")


class MessageType(enum.IntEnum):
    """The third object of every CDTP2 message."""

    DATA = 0
    BOR = 1
    EOR = 2


@dataclass(frozen=True, slots=True)
class DataRecord:
    """One record: the transmitter's sequence number (1, 2, ... within a run), tags, blocks."""

    seq: int
    tags: dict[str, Any] = field(default_factory=dict)
    blocks: Sequence[Block] = ()

    @property
    def nbytes(self) -> int:
        """Payload bytes: the block lengths only, as Constellation counts them."""
        return sum(len(b) for b in self.blocks)


@dataclass(frozen=True, slots=True)
class Data:
    """A DATA message: one or more records from `sender`."""

    sender: str
    records: Sequence[DataRecord]


@dataclass(frozen=True, slots=True)
class BeginOfRun:
    """A BOR message: the sender's user tags and its configuration."""

    sender: str
    user_tags: dict[str, Any] = field(default_factory=dict)
    configuration: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class EndOfRun:
    """An EOR message: the sender's user tags and the run metadata (condition_code, ...)."""

    sender: str
    user_tags: dict[str, Any] = field(default_factory=dict)
    run_metadata: dict[str, Any] = field(default_factory=dict)


Message = Data | BeginOfRun | EndOfRun

_UNPACK_ERRORS = (msgpack.UnpackException, ValueError, TypeError, OverflowError, RecursionError)


def _where(offset: int) -> str:
    return f"at byte {offset}"


def decode(frames: Sequence[Block], *, max_message_bytes: int = MAX_MESSAGE_BYTES) -> Message:
    """Decode one received ZeroMQ message (a list of frames); CDTP2 allows exactly one frame."""
    if len(frames) != 1:
        raise ProtocolError(f"CDTP2: expected 1 frame, got {len(frames)}")
    return decode_frame(frames[0], max_message_bytes=max_message_bytes)


def decode_frame(frame: Block, *, max_message_bytes: int = MAX_MESSAGE_BYTES) -> Message:
    """Decode one CDTP2 frame. Blocks of DATA records are memoryviews into `frame`."""
    view = memoryview(frame)
    if view.ndim != 1 or view.format != "B":
        view = view.cast("B")
    size = len(view)
    if size > max_message_bytes:
        raise ProtocolError(
            f"CDTP2: message of {size} bytes exceeds the limit of {max_message_bytes}"
        )
    # Every length inside is bounded by the frame itself, so msgpack never allocates more than a
    # small multiple of the frame size.
    unpacker = msgpack.Unpacker(
        raw=False,
        strict_map_key=True,
        timestamp=0,
        max_buffer_size=max(size, 1024),
        max_str_len=size,
        max_bin_len=size,
        max_array_len=size // 2 + 1,
        max_map_len=size // 2 + 1,
        max_ext_len=size,
    )
    unpacker.feed(view)
    try:
        return _decode_body(unpacker, view, size)
    except ProtocolError:
        raise
    except _UNPACK_ERRORS as exc:
        raise ProtocolError(
            f"CDTP2: malformed msgpack {_where(unpacker.tell())}: {type(exc).__name__}: {exc}"
        ) from None


def _decode_body(unpacker: msgpack.Unpacker, view: memoryview, size: int) -> Message:
    if view[: len(_PROTOCOL_BYTES)] == _PROTOCOL_BYTES:
        unpacker.skip()
    else:
        # Any str encoding is legal msgpack; peers write a fixstr, checked above cheaply.
        protocol = unpacker.unpack()
        if protocol != PROTOCOL or type(protocol) is not str:
            raise ProtocolError(
                f"CDTP2: message does not start with the str 'CDTP\\x02' (got {protocol!r:.40})"
            )
    sender = unpacker.unpack()
    if type(sender) is not str:
        raise ProtocolError(f"CDTP2: sender must be a str, got {type(sender).__name__}")
    offset = unpacker.tell()
    kind = unpacker.unpack()
    if type(kind) is not int or kind not in (0, 1, 2):
        raise ProtocolError(f"CDTP2: unknown message type {kind!r} {_where(offset)}")
    offset = unpacker.tell()
    if offset >= size or not (0x90 <= view[offset] <= 0x9F or view[offset] in (0xDC, 0xDD)):
        raise ProtocolError(f"CDTP2: expected the array of records {_where(offset)}")
    count = unpacker.read_array_header()
    if count * MIN_RECORD_BYTES > size - unpacker.tell():
        raise ProtocolError(
            f"CDTP2: {count} records announced {_where(offset)} cannot fit in {size} bytes"
        )
    if kind == MessageType.DATA:
        if count == 0:
            raise ProtocolError("CDTP2: DATA message with no records")
        records = [_decode_record(unpacker, view, size) for _ in range(count)]
        _check_end(unpacker, size)
        return Data(sender, records)
    if count != 2:
        raise ProtocolError(
            f"CDTP2: {MessageType(kind).name} must hold exactly 2 records, got {count}"
        )
    first = _decode_record(unpacker, view, size)
    second = _decode_record(unpacker, view, size)
    _check_end(unpacker, size)
    if kind == MessageType.BOR:
        return BeginOfRun(sender, first.tags, second.tags)
    return EndOfRun(sender, first.tags, second.tags)


def _check_end(unpacker: msgpack.Unpacker, size: int) -> None:
    end = unpacker.tell()
    if end != size:
        raise ProtocolError(f"CDTP2: {size - end} trailing bytes after the records {_where(end)}")


def _decode_record(unpacker: msgpack.Unpacker, view: memoryview, size: int) -> DataRecord:
    offset = unpacker.tell()
    if offset >= size or view[offset] != 0x93:
        # Any array(3) encoding is legal msgpack; fixarray is what every peer writes.
        if offset < size and view[offset] in (0xDC, 0xDD):
            if unpacker.read_array_header() != 3:
                raise ProtocolError(f"CDTP2: a record must be an array of 3 {_where(offset)}")
        else:
            raise ProtocolError(f"CDTP2: a record must be an array of 3 {_where(offset)}")
    else:
        unpacker.read_array_header()
    seq = unpacker.unpack()
    if type(seq) is not int:
        raise ProtocolError(f"CDTP2: sequence number {_where(offset)} is not an int")
    tags_at = unpacker.tell()
    if tags_at < size and view[tags_at] == 0x80:
        unpacker.skip()
        tags: dict[str, Any] = {}
    else:
        tags = unpacker.unpack()
        if type(tags) is not dict:
            raise ProtocolError(f"CDTP2: record tags {_where(tags_at)} are not a map")
        for key in tags:
            if type(key) is not str:
                raise ProtocolError(
                    f"CDTP2: record tag key {key!r:.40} {_where(tags_at)} is not a str"
                )
    at = unpacker.tell()
    if at >= size or not (0x90 <= view[at] <= 0x9F or view[at] in (0xDC, 0xDD)):
        raise ProtocolError(f"CDTP2: record blocks {_where(at)} are not an array")
    nblocks = unpacker.read_array_header()
    at = unpacker.tell()
    if nblocks * 2 > size - at:
        raise ProtocolError(f"CDTP2: {nblocks} blocks announced {_where(at)} cannot fit")
    blocks: list[memoryview] = []
    for _ in range(nblocks):
        if at >= size:
            raise ProtocolError(f"CDTP2: message ends inside a record {_where(at)}")
        marker = view[at]
        if marker == 0xC4 and at + 2 <= size:
            start = at + 2
            length = view[at + 1]
        elif marker == 0xC5 and at + 3 <= size:
            start = at + 3
            length = _U16.unpack_from(view, at + 1)[0]
        elif marker == 0xC6 and at + 5 <= size:
            start = at + 5
            length = _U32.unpack_from(view, at + 1)[0]
        elif marker in (0xC4, 0xC5, 0xC6):
            raise ProtocolError(f"CDTP2: truncated block header {_where(at)}")
        else:
            raise ProtocolError(f"CDTP2: data block {_where(at)} is not msgpack bin")
        end = start + length
        if end > size:
            raise ProtocolError(f"CDTP2: block of {length} bytes {_where(at)} overruns the message")
        blocks.append(view[start:end])
        unpacker.skip()
        at = end
    return DataRecord(seq, tags, blocks)


def _bin_header(length: int) -> bytes:
    if length < 0x100:
        return b"\xc4" + _U8.pack(length)
    if length < 0x10000:
        return b"\xc5" + _U16.pack(length)
    if length <= 0xFFFFFFFF:
        return b"\xc6" + _U32.pack(length)
    raise ProtocolError(f"CDTP2: a block of {length} bytes cannot be encoded (max 4 GiB - 1)")


def _array_header(length: int) -> bytes:
    if length < 16:
        return _U8.pack(0x90 | length)
    if length < 0x10000:
        return b"\xdc" + _U16.pack(length)
    return b"\xdd" + _U32.pack(length)


class Encoder:
    """Packs CDTP2 messages; keeps one msgpack packer, so use one per task or thread.

    DATA messages are built in two steps so that a transmitter can batch without copying twice:
    `record_parts` returns the encoded pieces of one record (headers as bytes, blocks as given) and
    their size; `data_message` joins a header and the collected pieces into one frame.
    """

    def __init__(self, sender: str) -> None:
        self.sender = sender
        self._packer = msgpack.Packer(use_bin_type=True, datetime=True, autoreset=True)
        self._head = self._sender_head(sender)

    def _pack(self, value: Any) -> bytes:
        try:
            return self._packer.pack(value)
        except (TypeError, ValueError, OverflowError) as exc:
            # A failed pack can leave the packer's buffer dirty; start from a clean one.
            self._packer = msgpack.Packer(use_bin_type=True, datetime=True, autoreset=True)
            raise ProtocolError(f"CDTP2: cannot encode {value!r:.80}: {exc}") from None

    def header_bytes(self, kind: MessageType, count: int, sender: str | None = None) -> bytes:
        """The message header and the records' array header."""
        head = self._head if sender is None or sender == self.sender else self._sender_head(sender)
        return head + _U8.pack(kind) + _array_header(count)

    def _sender_head(self, sender: str) -> bytes:
        if type(sender) is not str:
            raise ProtocolError(f"CDTP2: sender must be a str, got {type(sender).__name__}")
        return _PROTOCOL_BYTES + self._pack(sender)

    def record_parts(
        self, seq: int, tags: dict[str, Any] | None, blocks: Sequence[Block], parts: list[Block]
    ) -> tuple[int, int]:
        """Append the pieces of one encoded record to `parts`.

        Returns (encoded size, payload size): the bytes added to the message, and the block bytes
        alone (what Constellation's payload threshold counts).
        """
        if tags is None or (type(tags) is dict and not tags):
            packed_tags = b"\x80"
        elif isinstance(tags, dict) and all(type(k) is str for k in tags):
            packed_tags = self._pack(tags)
        else:
            raise ProtocolError(f"CDTP2: record tags must be a map with str keys: {tags!r:.80}")
        if type(seq) is not int:
            raise ProtocolError(f"CDTP2: sequence number must be an int, got {seq!r:.40}")
        head = b"\x93" + (_U8.pack(seq) if 0 <= seq < 0x80 else self._pack(seq)) + packed_tags
        if not blocks:
            head += b"\x90"
            parts.append(head)
            return len(head), 0
        head += _array_header(len(blocks))
        payload = 0
        for i, block in enumerate(blocks):
            length = block.nbytes if isinstance(block, memoryview) else len(block)
            if i == 0:
                head += _bin_header(length)
                parts.append(head)
                size = len(head)
            else:
                bin_head = _bin_header(length)
                parts.append(bin_head)
                size += len(bin_head)
            parts.append(block)
            payload += length
        return size + payload, payload

    def data_message(self, count: int, parts: Iterable[Block], sender: str | None = None) -> bytes:
        """One DATA frame from `count` records' pieces (as collected by `record_parts`)."""
        if count < 1:
            raise ProtocolError("CDTP2: a DATA message needs at least one record")
        return b"".join((self.header_bytes(MessageType.DATA, count, sender), *parts))

    def encode(self, message: Message) -> list[bytes]:
        """Encode any message into its single frame (DATA records with their blocks)."""
        parts: list[Block] = []
        if isinstance(message, Data):
            for record in message.records:
                self.record_parts(record.seq, record.tags, record.blocks, parts)
            frame = self.data_message(len(message.records), parts, message.sender)
        elif isinstance(message, BeginOfRun | EndOfRun):
            second = (
                message.configuration if isinstance(message, BeginOfRun) else message.run_metadata
            )
            kind = MessageType.BOR if isinstance(message, BeginOfRun) else MessageType.EOR
            self.record_parts(0, _check_tags(message.user_tags), (), parts)
            self.record_parts(1, _check_tags(second), (), parts)
            frame = b"".join((self.header_bytes(kind, 2, message.sender), *parts))
        else:
            raise ProtocolError(f"CDTP2: cannot encode {type(message).__name__}")
        return [frame]


def _check_tags(tags: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(tags, dict):
        raise ProtocolError(f"CDTP2: tags must be a map, got {type(tags).__name__}")
    return tags


def encode(message: Message) -> list[bytes]:
    """Encode one message into its frame list (always one frame)."""
    return Encoder(message.sender).encode(message)
