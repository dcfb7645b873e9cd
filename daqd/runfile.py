"""Run files: a msgpack stream of a header, records and an end marker; writer and reader.

Layout: item 1 is a map {"daqd": "runfile", "version": 1, "kind": "run"|"live", ...run metadata};
then records as 5-element arrays [source, seq, time_ns, tags, [blocks]] (see Record.pack); the last
item is a map {"end": <run metadata with condition>}. A file without its end map was not closed
cleanly (crash, power loss): the reader says so and still yields every complete record.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import msgpack

from daqd.record import Record

MAX_ITEM_BYTES = 1 << 30


def create_exclusive(directory: Path, stem: str, suffix: str = ".daqd") -> tuple[Path, BinaryIO]:
    """Open a new file; never truncates: an existing name gets -1, -2, ... instead."""
    directory.mkdir(parents=True, exist_ok=True)
    n = 0
    while True:
        path = directory / (f"{stem}{suffix}" if n == 0 else f"{stem}-{n}{suffix}")
        try:
            return path, open(path, "xb", buffering=1 << 20)
        except FileExistsError:
            n += 1


@dataclass
class FileSummary:
    header: dict[str, Any] | None = None
    end: dict[str, Any] | None = None
    records: dict[str, int] = field(default_factory=dict)
    first_seq: dict[str, int] = field(default_factory=dict)
    gaps: dict[str, list[tuple[int, int]]] = field(default_factory=dict)  # source -> (after, next)
    problems: list[str] = field(default_factory=list)


def read_items(path: str | os.PathLike[str]) -> Iterator[Record | dict[str, Any]]:
    """Yield the header map, each Record, and the end map; raise ValueError on a corrupt item."""
    unpacker = msgpack.Unpacker(
        raw=False, strict_map_key=False, max_buffer_size=MAX_ITEM_BYTES, use_list=True
    )
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            unpacker.feed(chunk)
            for obj in unpacker:
                if isinstance(obj, dict):
                    yield obj
                else:
                    yield Record.from_packed(obj)
        # bytes left in the unpacker after EOF are an item cut short
        if unpacker.tell() != f.tell():
            raise EOFError(
                f"{path}: file ends inside an item at byte {unpacker.tell()} "
                f"(size {f.tell()}): not closed cleanly"
            )


def verify(path: str | os.PathLike[str]) -> FileSummary:
    """Read a whole run file; report per-source counts, seq gaps, and structural problems."""
    s = FileSummary()
    last: dict[str, int] = {}
    try:
        for item in read_items(path):
            if isinstance(item, dict):
                if s.header is None and item.get("daqd") == "runfile":
                    s.header = item
                elif "end" in item:
                    s.end = item["end"]
                else:
                    s.problems.append(f"unexpected map item: {sorted(item)}")
                continue
            src = item.source
            s.records[src] = s.records.get(src, 0) + 1
            prev = last.get(src)
            if prev is None:
                s.first_seq[src] = item.seq
            elif item.seq != prev + 1:
                s.gaps.setdefault(src, []).append((prev, item.seq))
            last[src] = item.seq
    except (ValueError, EOFError, msgpack.UnpackException) as exc:
        s.problems.append(str(exc))
    if s.header is None:
        s.problems.append("no header: not a daqd run file")
    if s.end is None:
        s.problems.append("no end marker: the file was not closed cleanly")
    return s
