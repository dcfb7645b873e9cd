"""CDTP2 decoding: one received frame -> a message (or, for the usual DATA message, a table).

Decoded blocks are memoryviews of the received frame, so a DATA message is never copied block by
block. Timestamps in tags (msgpack ext -1, in any of its three widths) decode as
`msgpack.Timestamp`, which keeps every value exactly and packs again as is.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgpack

from daqd.errors import ProtocolError
from daqd.protocols.cdtp.messages import (
    _PROTOCOL_BYTES,
    _SEQ_CODES,
    _U16,
    _U32,
    MAX_MESSAGE_BYTES,
    PROTOCOL,
    BeginOfRun,
    Block,
    Data,
    DataRecord,
    EndOfRun,
    Message,
    MessageType,
)

#: The smallest encoding of one record: array(3) header, fixint seq, empty map, empty array.
MIN_RECORD_BYTES = 4

#: Messages with at least this many records try the table-at-once fast path first.
UNIFORM_MIN_RECORDS = 8

# bytes after the marker of an unsigned sequence number, and how struct reads them
_SEQ_WIDTHS = {0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8}
#: A table's sequence numbers are read this many records per struct call (bounds the formats)
_SEQ_CHUNK = 256


@dataclass(frozen=True, slots=True)
class PlainData:
    """A DATA message whose records are all plain: no tags, one block each, all blocks of one
    length, laid out at a fixed stride (what transmitters usually send). `decode_frame_plain`
    gives this table instead of one DataRecord per record, for receivers that build their own
    records; `data()` is the same message as `decode_frame` gives it.
    """

    sender: str
    seqs: list[int]
    consecutive: bool  # every seq is one more than the one before
    starts: range  # offset of each record's block in `frame`
    length: int  # of every block
    frame: memoryview

    def data(self) -> Data:
        view, length, new = self.frame, self.length, tuple.__new__
        return Data(
            self.sender,
            [
                new(DataRecord, (seq, {}, [view[at : at + length]]))
                for seq, at in zip(self.seqs, self.starts, strict=True)
            ],
        )


_UNPACK_ERRORS = (msgpack.UnpackException, ValueError, TypeError, OverflowError, RecursionError)


def _where(offset: int) -> str:
    return f"at byte {offset}"


@functools.lru_cache(maxsize=64)
def _seq_reader(count: int, stride: int, offset: int, code: str) -> struct.Struct:
    """Reads the sequence numbers (struct `code`, `offset` bytes into each record) of `count`
    records laid out `stride` bytes apart, in one call."""
    rest = stride - offset - struct.calcsize(">" + code)
    return struct.Struct(">" + f"{offset}x{code}{rest}x" * count)


class WrongProtocol(ProtocolError):
    """The message starts with another identifier than "CDTP\\x02": another protocol, or
    another version of CDTP (also raised for the right one encoded as bin)."""


def decode(frames: Sequence[Block], *, max_message_bytes: int = MAX_MESSAGE_BYTES) -> Message:
    """Decode one received ZeroMQ message (a list of frames); CDTP2 allows exactly one frame."""
    if len(frames) != 1:
        raise ProtocolError(f"CDTP2: expected 1 frame, got {len(frames)}")
    return decode_frame(frames[0], max_message_bytes=max_message_bytes)


def decode_frame(frame: Block, *, max_message_bytes: int = MAX_MESSAGE_BYTES) -> Message:
    """Decode one CDTP2 frame. Blocks of DATA records are memoryviews into `frame`."""
    message = _decode(frame, max_message_bytes, False)
    assert not isinstance(message, PlainData)
    return message


def decode_frame_plain(
    frame: Block, *, max_message_bytes: int = MAX_MESSAGE_BYTES
) -> Message | PlainData:
    """As `decode_frame`, but a DATA message of UNIFORM_MIN_RECORDS or more plain records comes
    back as a PlainData table (checked as strictly: anything else decodes as usual)."""
    return _decode(frame, max_message_bytes, True)


def _decode(frame: Block, max_message_bytes: int, plain: bool) -> Message | PlainData:
    view = memoryview(frame)
    if view.ndim != 1 or view.format != "B":
        view = view.cast("B")
    size = len(view)
    if size > max_message_bytes:
        raise ProtocolError(
            f"CDTP2: message of {size} bytes exceeds the limit of {max_message_bytes}"
        )
    reader = _Reader(view, size)
    try:
        return reader.message(plain)
    except ProtocolError:
        raise
    except (IndexError, struct.error):
        raise ProtocolError(f"CDTP2: message of {size} bytes ends inside an object") from None
    except _UNPACK_ERRORS as exc:
        raise ProtocolError(
            f"CDTP2: malformed msgpack near byte {reader.upos}: {type(exc).__name__}: {exc}"
        ) from None


class _Reader:
    """Walks one frame. The record structure is parsed by hand, which is several times faster
    than a msgpack call per item; anything else (tags, odd encodings) goes to one msgpack
    Unpacker, made on first need and only ever moved forward, so the frame is copied into it at
    most once.
    """

    __slots__ = ("size", "unpacker", "upos", "view")

    def __init__(self, view: memoryview, size: int) -> None:
        self.view = view
        self.size = size
        self.unpacker: msgpack.Unpacker | None = None
        self.upos = 0

    def obj(self, pos: int) -> tuple[Any, int]:
        """The msgpack object at `pos` (which never goes backwards) and the offset after it."""
        unpacker = self.unpacker
        if unpacker is None:
            size = self.size
            # every length inside is bounded by the frame, so msgpack allocates at most a small
            # multiple of the frame size
            unpacker = self.unpacker = msgpack.Unpacker(
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
            unpacker.feed(self.view)
        if pos > self.upos:
            unpacker.read_bytes(pos - self.upos)
        obj = unpacker.unpack()
        self.upos = unpacker.tell()
        return obj, self.upos

    def int_at(self, pos: int, what: str) -> tuple[int, int]:
        view = self.view
        b = view[pos]
        if b < 0x80:
            return b, pos + 1
        if b >= 0xE0:
            return b - 0x100, pos + 1
        if 0xCC <= b <= 0xD3:
            value, end = self.obj(pos)
            return value, end
        raise ProtocolError(f"CDTP2: {what} {_where(pos)} is not an int (0x{b:02x})")

    def array_at(self, pos: int, what: str) -> tuple[int, int]:
        b = self.view[pos]
        if 0x90 <= b <= 0x9F:
            return b - 0x90, pos + 1
        if b == 0xDC:
            return _U16.unpack_from(self.view, pos + 1)[0], pos + 3
        if b == 0xDD:
            return _U32.unpack_from(self.view, pos + 1)[0], pos + 5
        raise ProtocolError(f"CDTP2: {what} {_where(pos)} is not an array (0x{b:02x})")

    def message(self, plain: bool = False) -> Message | PlainData:
        view, size = self.view, self.size
        if view[:6] == _PROTOCOL_BYTES:
            pos = 6
        else:
            protocol, pos = self.obj(0)
            if type(protocol) in (str, bytes) and protocol != PROTOCOL:
                raise WrongProtocol(
                    f"CDTP2: message does not start with the str 'CDTP\\x02' (got {protocol!r:.40})"
                )
            if type(protocol) is not str:
                raise ProtocolError(
                    f"CDTP2: message does not start with the str 'CDTP\\x02' (got {protocol!r:.40})"
                )
        b = view[pos]
        if 0xA0 <= b <= 0xBF:
            end = pos + 1 + b - 0xA0
            if end > size:
                raise ProtocolError(f"CDTP2: sender name {_where(pos)} overruns the message")
            try:
                sender = str(view[pos + 1 : end], "utf-8")
            except UnicodeDecodeError as exc:
                raise ProtocolError(
                    f"CDTP2: sender name {_where(pos)} is not UTF-8: {exc}"
                ) from None
            pos = end
        else:
            sender, pos = self.obj(pos)
            if type(sender) is not str:
                raise ProtocolError(f"CDTP2: sender must be a str, got {type(sender).__name__}")
        kind, after = self.int_at(pos, "message type")
        if kind not in (0, 1, 2):
            raise ProtocolError(f"CDTP2: unknown message type {kind!r} {_where(pos)}")
        count, pos = self.array_at(after, "the array of records")
        if count * MIN_RECORD_BYTES > size - pos:
            raise ProtocolError(
                f"CDTP2: {count} records announced {_where(after)} cannot fit in {size} bytes"
            )
        if kind == MessageType.DATA:
            if count == 0:
                raise ProtocolError("CDTP2: DATA message with no records")
            if plain and count >= UNIFORM_MIN_RECORDS:
                table = self.uniform_table(pos, count)
                if table is not None:
                    seqs, steady, starts, length = table
                    return PlainData(sender, seqs, steady, starts, length, view)
            records, pos = self.records(pos, count)
            self.check_end(pos)
            return Data(sender, records)
        if count != 2:
            raise ProtocolError(
                f"CDTP2: {MessageType(kind).name} must hold exactly 2 records, got {count}"
            )
        (first, second), pos = self.records(pos, 2)
        self.check_end(pos)
        if kind == MessageType.BOR:
            return BeginOfRun(sender, first.tags, second.tags)
        return EndOfRun(sender, first.tags, second.tags)

    def uniform_records(self, pos: int, count: int) -> list[DataRecord] | None:
        """The fast path for the usual DATA message: `count` records laid out alike (no tags,
        one block of one length, one width of sequence number) filling the rest of the frame.
        None if anything differs, and the record-by-record parser decides (and explains).
        """
        table = self.uniform_table(pos, count)
        if table is None:
            return None
        seqs, _, starts, length = table
        view, new = self.view, tuple.__new__
        return [
            new(DataRecord, (seq, {}, [view[at : at + length]]))
            for seq, at in zip(seqs, starts, strict=True)
        ]

    def uniform_table(self, pos: int, count: int) -> tuple[list[int], bool, range, int] | None:
        """uniform_records as a table: (seqs, consecutive, block offsets, block length), checked a
        column of the table at a time (a strided view of the frame) and with the sequence numbers
        read by one struct call per _SEQ_CHUNK records."""
        view = self.view
        left = self.size - pos
        if left % count:
            return None
        stride = left // count
        b = view[pos + 1]
        seq_bytes = 0 if b < 0x80 else _SEQ_WIDTHS.get(b)
        if view[pos] != 0x93 or seq_bytes is None:
            return None
        at = pos + 2 + seq_bytes  # the empty tags map
        marker = view[at + 2]
        if view[at] != 0x80 or view[at + 1] != 0x91 or marker not in (0xC4, 0xC5, 0xC6):
            return None
        if marker == 0xC4:
            length, head = view[at + 3], at + 4
        elif marker == 0xC5:
            length, head = _U16.unpack_from(view, at + 3)[0], at + 5
        else:
            length, head = _U32.unpack_from(view, at + 3)[0], at + 7
        head -= pos
        if head + length != stride:
            return None
        # every byte of a record's head but its sequence number is the first record's
        for column in (0, 1, *range(2 + seq_bytes, head)) if seq_bytes else (0, *range(2, head)):
            if view[pos + column :: stride] != bytes((view[pos + column],)) * count:
                return None
        offset, code = (2, _SEQ_CODES[seq_bytes]) if seq_bytes else (1, "B")
        seqs: list[int] = []
        end = pos + left
        for start in range(pos, end, _SEQ_CHUNK * stride):
            n = min(_SEQ_CHUNK, (end - start) // stride)
            seqs += _seq_reader(n, stride, offset, code).unpack_from(view, start)
        if not seq_bytes and max(seqs) >= 0x80:
            return None  # not positive fixints: left to the record parser
        steady = seqs == list(range(seqs[0], seqs[0] + count))
        first = pos + head
        return seqs, steady, range(first, first + left, stride), length

    def check_end(self, pos: int) -> None:
        if pos != self.size:
            raise ProtocolError(
                f"CDTP2: {self.size - pos} trailing bytes after the records {_where(pos)}"
            )

    def records(self, pos: int, count: int, uniform: bool = True) -> tuple[list[DataRecord], int]:
        if uniform and count >= UNIFORM_MIN_RECORDS:
            records = self.uniform_records(pos, count)
            if records is not None:
                return records, self.size
        view, size = self.view, self.size
        u16, u32 = _U16.unpack_from, _U32.unpack_from
        out: list[DataRecord] = []
        append = out.append
        new = tuple.__new__  # skips NamedTuple's Python-level __new__
        for _ in range(count):
            start = pos
            b = view[pos]
            if b == 0x93:
                pos += 1
            elif self.array_at(pos, "a record") != (3, pos + 1 + (2 if b == 0xDC else 4)):
                raise ProtocolError(f"CDTP2: a record must be an array of 3 {_where(pos)}")
            else:
                pos += 3 if b == 0xDC else 5
            b = view[pos]
            if b < 0x80:
                seq = b
                pos += 1
            elif b == 0xCD:
                seq = u16(view, pos + 1)[0]
                pos += 3
            elif b == 0xCC:
                seq = view[pos + 1]
                pos += 2
            elif b == 0xCE:
                seq = u32(view, pos + 1)[0]
                pos += 5
            else:
                seq, pos = self.int_at(pos, "sequence number")
            b = view[pos]
            if b == 0x80:
                tags: dict[str, Any] = {}
                pos += 1
            elif 0x81 <= b <= 0x8F or b == 0xDE or b == 0xDF:
                tags, pos = self.obj(pos)
                for key in tags:
                    if type(key) is not str:
                        raise ProtocolError(
                            f"CDTP2: record tag key {key!r:.40} {_where(start)} is not a str"
                        )
            else:
                raise ProtocolError(f"CDTP2: record tags {_where(pos)} are not a map")
            b = view[pos]
            if b == 0x91:
                nblocks = 1
                pos += 1
            else:
                nblocks, pos = self.array_at(pos, "record blocks")
                if nblocks * 2 > size - pos:
                    raise ProtocolError(
                        f"CDTP2: {nblocks} blocks announced {_where(pos)} cannot fit"
                    )
            blocks: list[memoryview] = []
            for _ in range(nblocks):
                b = view[pos]
                if b == 0xC4:
                    first = pos + 2
                    end = first + view[pos + 1]
                elif b == 0xC5:
                    first = pos + 3
                    end = first + u16(view, pos + 1)[0]
                elif b == 0xC6:
                    first = pos + 5
                    end = first + u32(view, pos + 1)[0]
                else:
                    raise ProtocolError(f"CDTP2: data block {_where(pos)} is not msgpack bin")
                if end > size:
                    raise ProtocolError(
                        f"CDTP2: block of {end - first} bytes {_where(pos)} overruns the message"
                    )
                blocks.append(view[first:end])
                pos = end
            append(new(DataRecord, (seq, tags, blocks)))
        return out, pos
