"""Run files: a msgpack stream of a header, records and an end marker; writer helpers and reader.

Layout: item 1 is a map {"daqd": "runfile", "version": 2, "kind": "run"|"live", "part": n,
"receiver_types": {receiver name: its type}, ...run metadata}; then records as 5-element arrays
[source, seq, time_ns, tags, [blocks]] (see Record.pack); the last item is a map {"end": <run
metadata with condition, and "file": what this file holds>}. Version 1 files (no "part", no "file"
in the end marker) are read the same way; files without "receiver_types" too.

A file publisher that cannot write (disk full, I/O error, file removed) cuts its file back to the
last whole record and goes on in a new part, `<name>.p2.daqd`, `.p3`, ...: a part's header names
the part before it, why that one ended, and how many records were dropped in between
("dropped_before"), so a gap between parts is never silent.

A file without its end map was not closed cleanly (crash, power loss, write error): the reader says
so and where it ends, and still yields every whole record.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack

from daqd.record import Record

MAX_ITEM_BYTES = 1 << 30
VERSION = 2
SUFFIX = ".daqd"


def create_exclusive(directory: Path, stem: str, suffix: str = SUFFIX) -> tuple[Path, int]:
    """Create a new file and return its path and a write descriptor; never truncates: an
    existing name gets -1, -2, ... instead. Raises OSError (with the path) if it cannot."""
    directory.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    n = 0
    while True:
        path = directory / (f"{stem}{suffix}" if n == 0 else f"{stem}-{n}{suffix}")
        try:
            return path, os.open(path, flags, 0o644)
        except FileExistsError:
            n += 1


def part_stem(first: Path, part: int) -> str:
    """The name stem of part `part` (2, 3, ...) of the file series that began with `first`."""
    return f"{first.name.removesuffix(SUFFIX)}.p{part}"


class NotARunFile(ValueError):
    """The file does not begin with a daqd run file header."""


class CutFile(EOFError):
    """The file ends inside an item: everything before `offset` was read whole."""

    def __init__(self, message: str, offset: int, size: int) -> None:
        super().__init__(message)
        self.offset = offset
        self.size = size


class RunFileReader:
    """Iterates a run file's items (header map, Records, end map) and remembers where it got:
    `offset` is the end of the last whole item read, `size` the file's size.

    Raises NotARunFile if the first item is not a run file header, CutFile if the file ends inside
    an item, ValueError for an item that is not a record or cannot be decoded.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self.offset = 0
        self.size = 0
        self.items = 0

    def __iter__(self) -> Iterator[Record | dict[str, Any]]:
        path = self.path
        unpacker = msgpack.Unpacker(
            raw=False, strict_map_key=False, max_buffer_size=MAX_ITEM_BYTES, use_list=True
        )
        with open(path, "rb") as f:
            self.size = os.fstat(f.fileno()).st_size
            while chunk := f.read(1 << 20):
                unpacker.feed(chunk)
                while True:
                    try:
                        obj = next(unpacker)
                    except StopIteration:
                        break
                    except (ValueError, TypeError, msgpack.UnpackException) as exc:
                        if not self.items:
                            raise NotARunFile(f"{path}: not a daqd run file ({exc})") from None
                        raise ValueError(
                            f"{path}: undecodable item at byte {self.offset}: {exc}"
                        ) from None
                    if not self.items and not (
                        isinstance(obj, dict) and obj.get("daqd") == "runfile"
                    ):
                        raise NotARunFile(
                            f"{path}: not a daqd run file (it does not begin with a run file header)"
                        )
                    if isinstance(obj, dict):
                        item: Record | dict[str, Any] = obj
                    else:
                        try:
                            item = Record.from_packed(obj)
                        except ValueError as exc:
                            raise ValueError(
                                f"{path}: item at byte {self.offset} is not a record: {exc}"
                            ) from None
                    self.offset = unpacker.tell()
                    self.items += 1
                    yield item
        if not self.items:
            raise NotARunFile(
                f"{path}: not a daqd run file ("
                + ("empty" if not self.size else "no whole item in it")
                + ")"
            )
        if self.offset != self.size:  # bytes left after the last whole item: an item cut short
            raise CutFile(
                f"{path}: cut inside an item at byte {self.offset} (size {self.size})",
                self.offset,
                self.size,
            )


def read_items(path: str | os.PathLike[str]) -> Iterator[Record | dict[str, Any]]:
    """Yield the header map, each Record, and the end map. Raises NotARunFile (a ValueError) if
    the file is not a run file, CutFile (an EOFError) after the last whole item of a cut file."""
    yield from RunFileReader(path)


@dataclass
class FileSummary:
    """What `verify` found. `problems` name each one: "no header", "cut tail", "no end marker",
    "gap in seq", "count mismatch", "seq range mismatch", "unexpected item"."""

    header: dict[str, Any] | None = None
    end: dict[str, Any] | None = None
    records: dict[str, int] = field(default_factory=dict)
    first_seq: dict[str, int] = field(default_factory=dict)
    last_seq: dict[str, int] = field(default_factory=dict)
    gaps: dict[str, list[tuple[int, int]]] = field(default_factory=dict)  # source -> (after, next)
    problems: list[str] = field(default_factory=list)
    size: int = 0
    whole_bytes: int = 0  # where the last whole item ends
    ending: str = ""  # "end marker", or why the file ends where it does
    notes: list[str] = field(default_factory=list)  # facts that explain problems; not problems

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(path: str | os.PathLike[str]) -> FileSummary:
    """Read a whole run file; compare what it holds with what its end marker says it holds.

    Checks: a header first, every record whole, seq gap-free per source, an end marker last, and
    (version 2) the end marker's per-source count and seq range equal to the content (version 1:
    its "records" counts).
    """
    s = FileSummary()
    reader = RunFileReader(path)
    last: dict[str, int] = {}
    try:
        for item in reader:
            if isinstance(item, dict):
                if s.header is None:
                    s.header = item
                elif "end" in item and s.end is None:
                    s.end = item["end"] if isinstance(item["end"], dict) else {}
                else:
                    s.problems.append(
                        f"unexpected item: a map at byte {reader.offset} "
                        f"with keys {sorted(map(str, item))}"
                    )
                continue
            if s.end is not None:
                s.problems.append(f"unexpected item: a record after the end marker ({item.source})")
            src = item.source
            prev = last.get(src)
            if prev is None:
                s.first_seq[src] = item.seq
                s.records[src] = 1
            else:
                s.records[src] += 1
                if item.seq != prev + 1:
                    s.gaps.setdefault(src, []).append((prev, item.seq))
            last[src] = item.seq
    except NotARunFile as exc:
        s.problems.append(f"no header: {exc}")
        s.ending = "not a run file"
    except CutFile:
        s.problems.append(
            f"cut tail: the file ends inside an item at byte {reader.offset} "
            f"(size {reader.size}; {reader.size - reader.offset} bytes after the last whole item)"
        )
        s.ending = f"cut inside an item at byte {reader.offset}"
    except (ValueError, EOFError) as exc:
        s.problems.append(str(exc))
        s.ending = f"undecodable at byte {reader.offset}"
    s.size, s.whole_bytes = reader.size, reader.offset
    s.last_seq = last
    for src, gaps in sorted(s.gaps.items()):
        missing = sum(b - a - 1 for a, b in gaps if b > a)
        a, b = gaps[0]
        s.problems.append(
            f"gap in seq: {src}: {len(gaps)} gaps, {missing} records missing "
            f"(first: after {a} comes {b})"
        )
    if s.header is None:
        return s
    if s.end is None:
        if not s.ending:
            s.ending = f"no end marker after byte {reader.offset}"
        s.problems.append(
            f"no end marker: the file was not closed cleanly; its last whole item ends at byte "
            f"{reader.offset}"
        )
        s.notes.extend(_next_part_note(Path(path)))
    else:
        s.ending = "end marker"
        s.problems.extend(_compare_with_end(s))
    return s


def _compare_with_end(s: FileSummary) -> list[str]:
    """What the end marker claims this file holds, against what it holds."""
    assert s.end is not None
    problems: list[str] = []
    own = s.end.get("file")
    if isinstance(own, dict) and isinstance(own.get("content"), dict):
        claimed: dict[str, Any] = own["content"]
        for src in sorted(set(claimed) | set(s.records), key=str):
            c = claimed.get(src)
            n = s.records.get(src, 0)
            if not isinstance(c, dict):
                problems.append(f"count mismatch: {src}: the end marker says 0 records, found {n}")
                continue
            if c.get("count") != n:
                problems.append(
                    f"count mismatch: {src}: the end marker says {c.get('count')} records, "
                    f"found {n}"
                )
            if n and (c.get("first_seq"), c.get("last_seq")) != (s.first_seq[src], s.last_seq[src]):
                problems.append(
                    f"seq range mismatch: {src}: the end marker says seq "
                    f"{c.get('first_seq')}..{c.get('last_seq')}, found "
                    f"{s.first_seq[src]}..{s.last_seq[src]}"
                )
    elif s.header is not None and s.header.get("kind") == "run":
        # version 1: the end marker's "records" are the run's counts, which this file held whole
        claimed_counts = s.end.get("records")
        if isinstance(claimed_counts, dict) and claimed_counts != s.records:
            problems.append(
                f"count mismatch: the end marker says {claimed_counts} records, found {s.records}"
            )
    return problems


_PART = re.compile(r"\.p(\d+)(?:-\d+)?$")


def _next_part_note(path: Path) -> list[str]:
    """If a later part of the same series names this file as its predecessor, say so."""
    stem = path.name.removesuffix(SUFFIX)
    m = _PART.search(stem)
    base = stem[: m.start()] if m else stem
    try:
        candidates = sorted(path.parent.glob(f"{glob_escape(base)}.p*{SUFFIX}"))
    except OSError:
        return []
    for cand in candidates:
        try:
            first = next(iter(RunFileReader(cand)))
        except (ValueError, EOFError, OSError, StopIteration):
            continue
        if isinstance(first, dict) and first.get("previous_part") == path.name:
            dropped = first.get("dropped_before") or {}
            return [
                f"this part ended on an error ({first.get('previous_ended', 'unknown')}); "
                f"{cand.name} goes on after {sum(dropped.values())} records dropped "
                f"{dict(dropped)}"
            ]
    return []


def glob_escape(text: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", text)
