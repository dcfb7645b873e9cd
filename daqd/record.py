"""Record: the one thing that flows from receivers to publishers."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack

Block = bytes | bytearray | memoryview

# A packed record is msgpack [source, seq, time_ns, tags, [blocks...]]; blocks are bin.
_packer = msgpack.Packer(use_bin_type=True, autoreset=True)


@dataclass(slots=True)
class Record:
    """Data from one source: a gap-free per-source `seq`, tags, and payload blocks passed by reference."""

    source: str
    seq: int
    time_ns: int
    tags: dict[str, Any] = field(default_factory=dict)
    payload: Sequence[Block] = ()

    @property
    def nbytes(self) -> int:
        p = self.payload
        if len(p) == 1:  # the common case, on the per-record path
            b = p[0]
            return b.nbytes if type(b) is memoryview else len(b)
        return sum(b.nbytes if type(b) is memoryview else len(b) for b in p)

    def header(self) -> dict[str, Any]:
        """Everything but the payload, as a msgpack-able map."""
        return {"source": self.source, "seq": self.seq, "time_ns": self.time_ns, "tags": self.tags}

    def pack(self) -> bytes:
        return _packer.pack([self.source, self.seq, self.time_ns, self.tags, list(self.payload)])

    @classmethod
    def from_packed(cls, obj: Any) -> Record:
        """Build a record from an already unpacked msgpack list, checking its shape."""
        if not (isinstance(obj, (list, tuple)) and len(obj) == 5):
            raise ValueError("a packed record is a 5-element array")
        source, seq, time_ns, tags, blocks = obj
        if not isinstance(source, str) or not isinstance(seq, int) or not isinstance(time_ns, int):
            raise ValueError("record source/seq/time_ns have the wrong types")
        if not isinstance(tags, dict) or not isinstance(blocks, (list, tuple)):
            raise ValueError("record tags must be a map and payload an array")
        if not all(isinstance(b, (bytes, bytearray, memoryview)) for b in blocks):
            raise ValueError("record payload blocks must be bin")
        return cls(source, seq, time_ns, tags, list(blocks))

    @classmethod
    def unpack(cls, data: Block) -> Record:
        return cls.from_packed(msgpack.unpackb(data, raw=False, strict_map_key=False))
