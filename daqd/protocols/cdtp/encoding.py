"""CDTP2 encoding: messages -> frames, and the plain records' fast paths for transmitters.

`Encoder` packs any message; `plain_records` and the record heads build the usual DATA records
(no tags, one block each) a run at a time, for the cdtp publisher's hot path.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Iterable, Sequence
from typing import Any

import msgpack

from daqd.errors import ProtocolError
from daqd.protocols.cdtp.messages import (
    _PROTOCOL_BYTES,
    _SEQ_CODES,
    _U8,
    _U16,
    _U32,
    BeginOfRun,
    Block,
    Data,
    EndOfRun,
    Message,
    MessageType,
)


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
