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
import functools
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import msgpack

from daqd.errors import ProtocolError

Block = bytes | bytearray | memoryview

PROTOCOL = "CDTP\x02"
#: Default bound on one message, both directions. Constellation's Python receiver dies above
#: 100 MiB (msgpack's default buffer size), so we stay well below it.
MAX_MESSAGE_BYTES = 64 << 20
#: The smallest encoding of one record: array(3) header, fixint seq, empty map, empty array.
MIN_RECORD_BYTES = 4

#: Messages with at least this many records try the table-at-once fast path first.
UNIFORM_MIN_RECORDS = 8

_PROTOCOL_BYTES = b"\xa5CDTP\x02"
# bytes after the marker of an unsigned sequence number, and how struct reads them
_SEQ_WIDTHS = {0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8}
_SEQ_CODES = {1: "B", 2: "H", 4: "I", 8: "Q"}
#: A table's sequence numbers are read this many records per struct call (bounds the formats)
_SEQ_CHUNK = 256
_U8 = struct.Struct(">B")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")


class MessageType(enum.IntEnum):
    """The third object of every CDTP2 message."""

    DATA = 0
    BOR = 1
    EOR = 2


class DataRecord(NamedTuple):
    """One record: the transmitter's sequence number (1, 2, ... within a run), tags, blocks."""

    seq: int
    tags: dict[str, Any]
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


def _bin_header(length: int) -> bytes:
    if length < 0x100:
        return b"\xc4" + _U8.pack(length)
    if length < 0x10000:
        return b"\xc5" + _U16.pack(length)
    if length <= 0xFFFFFFFF:
        return b"\xc6" + _U32.pack(length)
    raise ProtocolError(f"CDTP2: a block of {length} bytes cannot be encoded (max 4 GiB - 1)")


# record headers for the first sequence numbers, bin headers for common block sizes
_FIXINT_RECORD = [bytes([0x93, n]) for n in range(0x80)]
_BIN_HEADERS = {n: _bin_header(n) for n in (*range(0x101), 512, 1024, 2048, 4096, 8192, 65536)}


_SEQ8 = struct.Struct(">BBB")
_SEQ16 = struct.Struct(">BBH")
_SEQ32 = struct.Struct(">BBI")
# what follows the sequence number in a record with no tags and one block: empty map, array of
# one, the block's bin header; by block length
_PLAIN_TAILS: dict[int, bytes] = {}


def plain_record_tail(length: int) -> bytes:
    """What follows the sequence number in a record with no tags and one block of `length`
    bytes: the empty map, the array of one, the block's bin header."""
    tail = _PLAIN_TAILS.get(length)
    if tail is None:
        tail = b"\x80\x91" + _bin_header(length)
        if len(_PLAIN_TAILS) < 256:
            _PLAIN_TAILS[length] = tail
    return tail


#: `seq32_record_head(seq)`: a record's array header and its sequence number, for 0xFFFF < seq
#: <= 0xFFFFFFFF (where a run spends nearly all its records); a C-level call, for the hot path
seq32_record_head = functools.partial(_SEQ32.pack, 0x93, 0xCE)


def record_seq_head(seq: int) -> bytes:
    """A record's array header and its sequence number, an int in 0 ... 2**32 - 1."""
    if seq < 0x80:
        return _FIXINT_RECORD[seq]
    if seq <= 0xFF:
        return _SEQ8.pack(0x93, 0xCC, seq)
    if seq <= 0xFFFF:
        return _SEQ16.pack(0x93, 0xCD, seq)
    return _SEQ32.pack(0x93, 0xCE, seq)


def plain_record_head(seq: int, length: int) -> bytes:
    """The encoded head of a record with no tags and one block of `length` bytes: everything
    but the block itself (what `Encoder.record_parts` would give, faster: the transmitter's
    usual case). `seq` must be an int in 0 ... 2**32 - 1."""
    return record_seq_head(seq) + plain_record_tail(length)


def seq_width_end(seq: int) -> int:
    """The last sequence number encoded as wide as `seq` (an int in 0 ... 2**32 - 1): where a run
    of `plain_records` must end."""
    if seq <= 0x7F:
        return 0x7F
    if seq <= 0xFF:
        return 0xFF
    if seq <= 0xFFFF:
        return 0xFFFF
    return 0xFFFFFFFF


def plain_records(first: int, blocks: Sequence[Block], length: int, spare: int = 0) -> bytearray:
    """Records `first`, `first + 1`, ... with no tags and one block of `length` bytes each (one
    per block), encoded after `spare` bytes left free for a message header: what
    `plain_record_head` and the block give for each record, made in one join of the blocks with
    the first record's head, whose sequence number is then rewritten in the others a byte column
    at a time (only the low bytes that change). All the sequence numbers must be as wide as
    `first` (up to `seq_width_end(first)`)."""
    count = len(blocks)
    last = first + count - 1
    if last > seq_width_end(first):
        raise ProtocolError(f"CDTP2: seqs {first} ... {last} differ in width")
    head = plain_record_head(first, length)
    stride = len(head) + length
    out = bytearray(head).join([bytes(spare), *blocks])
    if len(out) != spare + count * stride:
        raise ProtocolError(f"CDTP2: blocks of other than {length} bytes in a run of records")
    # where the number's last byte is in a record: after the array header, the int's marker
    # (none for a fixint) and the number
    at = spare + len(head) - len(plain_record_tail(length)) - 1
    changing = ((first ^ last).bit_length() + 7) // 8  # low bytes that are not all first's
    view = memoryview(out)
    if changing == 1:
        view[at::stride] = bytes(range(first & 0xFF, (last & 0xFF) + 1))
    elif changing:
        width = len(head) - len(plain_record_tail(length)) - (1 if first <= 0x7F else 2)
        seqs = struct.pack(f">{count}{_SEQ_CODES[width]}", *range(first, last + 1))
        for byte in range(changing):
            view[at - byte :: stride] = seqs[width - 1 - byte :: width]
    return out


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

    def tags_bytes(self, tags: dict[str, Any] | None) -> bytes:
        """A record's tags encoded: a map with str keys (None or empty: the empty map)."""
        if tags:
            if type(tags) is not dict or not all(type(k) is str for k in tags):
                raise ProtocolError(f"CDTP2: record tags must be a map with str keys: {tags!r:.80}")
            return self._pack(tags)
        if tags is None or type(tags) is dict:
            return b"\x80"
        raise ProtocolError(f"CDTP2: record tags must be a map, got {tags!r:.80}")

    def record_parts(
        self, seq: int, tags: dict[str, Any] | None, blocks: Sequence[Block], parts: list[Block]
    ) -> tuple[int, int]:
        """Append the pieces of one encoded record to `parts`.

        Returns (encoded size, payload size): the bytes added to the message, and the block bytes
        alone (what Constellation's payload threshold counts).
        """
        head = self.tags_bytes(tags)
        if type(seq) is not int:
            raise ProtocolError(f"CDTP2: sequence number must be an int, got {seq!r:.40}")
        if 0 <= seq < 0x80:
            head = _FIXINT_RECORD[seq] + head
        elif 0 <= seq <= 0xFF:
            head = b"\x93\xcc" + _U8.pack(seq) + head
        elif 0 <= seq <= 0xFFFF:
            head = b"\x93\xcd" + _U16.pack(seq) + head
        elif 0 <= seq <= 0xFFFFFFFF:
            head = b"\x93\xce" + _U32.pack(seq) + head
        else:
            head = b"\x93" + self._pack(seq) + head
        if len(blocks) == 1:
            block = blocks[0]
            length = block.nbytes if type(block) is memoryview else len(block)
            head += b"\x91" + (_BIN_HEADERS.get(length) or _bin_header(length))
            parts.append(head)
            parts.append(block)
            return len(head) + length, length
        head += _array_header(len(blocks))
        if not blocks:
            parts.append(head)
            return len(head), 0
        payload = 0
        size = 0
        for i, block in enumerate(blocks):
            length = block.nbytes if type(block) is memoryview else len(block)
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
