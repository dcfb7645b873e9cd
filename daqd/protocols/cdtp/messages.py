"""CDTP2's messages and the wire constants its decoding and encoding share.

A CDTP2 message is one ZeroMQ frame holding four concatenated msgpack objects: the protocol string
"CDTP\\x02", the sender's canonical name, the message type (DATA, BOR, EOR) and an array of records
`[seq, tags, blocks]`. BOR and EOR carry exactly two records whose tags are (user tags,
configuration) and (user tags, run metadata).
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

Block = bytes | bytearray | memoryview

PROTOCOL = "CDTP\x02"
#: Default bound on one message, both directions. Constellation's Python receiver dies above
#: 100 MiB (msgpack's default buffer size), so we stay well below it.
MAX_MESSAGE_BYTES = 64 << 20

# shared by decoding and encoding: the protocol string as msgpack, struct codes of the widths of
# an unsigned sequence number, and the big-endian unsigned ints of msgpack's headers
_PROTOCOL_BYTES = b"\xa5CDTP\x02"
_SEQ_CODES = {1: "B", 2: "H", 4: "I", 8: "Q"}
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
