"""The `file` publisher: one run file per run, a live file outside runs, fsync by policy.

Delivered means written: each batch is packed and handed to the kernel with os.pwrite on the
file's descriptor, in one piece (up to 4 MiB; larger batches in pieces of that size), looping on
short writes: no user-space buffer that could hide an error. A write that fails (disk full, I/O
error, read-only) is cut back to the last whole record; what did not make it is counted as dropped
"write_error", and the next batch goes to a new part of the file (`run-ID.p2.daqd`, ...), whose
header names the part before, why it ended, and how many records were dropped in between. Room for
the end marker is reserved when the run is flushed, before its condition is decided. See
daqd.runfile for the layout.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import msgpack
from pydantic import Field

from daqd.errors import DaqdError
from daqd.logs import LimitedLogger
from daqd.publisher import Publisher, PublisherSettings
from daqd.record import Record
from daqd.runfile import VERSION, create_exclusive, part_stem
from daqd.runstate import RunCondition, RunInfo

CHUNK_BYTES = 4 << 20  # a batch is written in pieces of about this size


class FileSettings(PublisherSettings):
    directory: str
    fsync: Literal["never", "per_run", "interval"] = "per_run"
    fsync_interval_s: float = Field(1.0, gt=0)
    live: bool = True  # also write records that arrive outside runs, to live-<time>.daqd


def _why(exc: OSError) -> str:
    name = errno.errorcode.get(exc.errno or 0, "")
    return f"{name}: {exc.strerror}" if name and exc.strerror else str(exc)


def _write_all(fd: int, buf: bytes, offset: int) -> tuple[int, OSError | None]:
    """Write all of `buf` at `offset`, looping on short writes; returns the bytes written and
    the error that stopped it (None if all were written)."""
    view = memoryview(buf)
    done = 0
    while done < len(buf):
        try:
            n = os.pwrite(fd, view[done:], offset + done)
        except OSError as exc:
            return done, exc
        if n <= 0:
            return done, OSError(errno.EIO, "write wrote nothing")
        done += n
    return done, None


def _load_fallocate() -> Any:
    """libc's fallocate (Linux), to reserve room without changing a file's size; or None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fallocate = getattr(libc, "fallocate64", None) or libc.fallocate
    except (OSError, AttributeError):
        return None
    fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fallocate.restype = ctypes.c_int
    return fallocate


_fallocate = _load_fallocate()
FALLOC_FL_KEEP_SIZE = 0x01
END_MARKER_ROOM = 4096  # reserved for the end marker beyond its estimated size


def _reserve(fd: int, offset: int, length: int) -> OSError | None:
    """Allocate `length` bytes at `offset` without changing the file's size. Returns the error
    if there is no room; None if reserved, or if this file system cannot reserve (then the
    write will tell)."""
    if _fallocate is None or _fallocate(fd, FALLOC_FL_KEEP_SIZE, offset, length) == 0:
        return None
    code = ctypes.get_errno()
    if code in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
        return None
    return OSError(code, os.strerror(code))


def _summary(part: _Part) -> dict[str, dict[str, int]]:
    return {
        src: {"count": c[0], "first_seq": c[1], "last_seq": c[2]} for src, c in part.content.items()
    }


@dataclass
class _Part:
    """One file of a series: `pos` bytes of whole items are in it (0: not even its header)."""

    path: Path
    fd: int
    number: int
    pos: int = 0
    records: int = 0
    content: dict[str, list[int]] = field(default_factory=dict)  # source -> [count, first, last]
    reserved: bool = False  # room for the end marker allocated beyond pos


class FilePublisher(Publisher):
    """Writes msgpack record streams (see daqd.runfile); `daqd dump FILE` reads them back."""

    Settings = FileSettings
    settings: FileSettings

    async def start(self) -> None:
        self.directory = Path(self.settings.directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.addresses["directory"] = str(self.directory.resolve())
        self._packer = msgpack.Packer(use_bin_type=True)
        self._limited = LimitedLogger(self.log)
        self._kind = ""  # the series being written: "run", "live", or "" (none)
        self._stem = ""
        self._meta: dict[str, Any] = {}  # header metadata of the series
        self._part: _Part | None = None  # the part being written (None: the next write opens one)
        self._first: Path | None = None  # part 1 of the series (later parts are named after it)
        self._parts = 0  # parts created in this series
        self._previous = ""  # name of the part before the next one, and why it ended
        self._previous_ended = ""
        self._ended: list[dict[str, Any]] = []  # the parts of the series that ended on an error
        self._gap: dict[str, int] = {}  # dropped since the last record written, by reason
        self._drops0: dict[str, int] = {}  # counters.drops when the series began
        self._last_sync = time.monotonic()
        self.counters.extra["files"] = []

    # ----- parts --------------------------------------------------------------------------------
    def _begin_series(self, kind: str, stem: str, meta: dict[str, Any]) -> None:
        self._kind, self._stem, self._meta = kind, stem, meta
        self._part = self._first = None
        self._parts = 0
        self._drops0 = dict(self.counters.drops)
        self._previous = self._previous_ended = ""
        self._ended = []
        self._gap = {}

    def _open_part(self) -> _Part:
        """Create the next part of the series (OSError if it cannot be created)."""
        number = self._parts + 1
        first = self._first if number > 1 else None
        stem = part_stem(first, number) if first is not None else self._stem
        path, fd = create_exclusive(self.directory, stem)
        self._parts = number
        if number == 1:
            self._first = path
        part = self._part = _Part(path, fd, number)
        files: list[str] = self.counters.extra["files"]
        files.append(str(path))
        del files[:-8]  # status shows the newest few
        if number == 1:
            self.log.info("writing %s", path)
        else:
            self.log.warning(
                "writing %s (part %d, after %s ended: %s; %d records dropped before it)",
                path,
                number,
                self._previous,
                self._previous_ended,
                sum(self._gap.values()),
            )
        return part

    def _header(self, part: _Part) -> bytes:
        host = self.host  # None where a test drives send() alone
        receivers = host.receivers.items() if host is not None else ()
        receiver_types = {n: r.settings.type for n, r in receivers}
        header: dict[str, Any] = {
            "daqd": "runfile",
            "version": VERSION,
            "kind": self._kind,
            "publisher": self.name,
            "part": part.number,
            # which type of receiver made each source's records (daqd export --to sof reads it)
            "receiver_types": receiver_types,
            **self._meta,
        }
        if part.number > 1:
            header["previous_part"] = self._previous
            header["previous_ended"] = self._previous_ended
        if part.number > 1 or self._gap:
            header["dropped_before"] = dict(self._gap)
        return self._packer.pack(header)

    async def _sync(self, part: _Part, what: str) -> bool:
        try:
            await asyncio.to_thread(os.fsync, part.fd)
        except OSError as exc:
            self.counters.error("fsync")
            self._limited.warning(
                "fsync", "%s: fsync of %s failed (%s) at %s", self.name, part.path, _why(exc), what
            )
            return False
        return True

    async def _retire(self, part: _Part, why: str) -> None:
        """The part ended on an error: close it; the next write opens the next part."""
        self._part = None
        if part.pos:
            self._previous, self._previous_ended = part.path.name, why
            self._ended.append({"file": part.path.name, "content": _summary(part), "ended": why})
        else:  # a part with nothing in it is removed: its number is free again
            self._parts -= 1
        if self.settings.fsync != "never" and part.pos:
            await self._sync(part, "the end of a part")
        self._close_fd(part)

    def _close_fd(self, part: _Part) -> None:
        if part.reserved:  # give back the room reserved for the end marker beyond its end
            try:
                os.ftruncate(part.fd, part.pos)
            except OSError as exc:
                self.log.warning("%s: trimming %s failed: %s", self.name, part.path, _why(exc))
        try:
            os.close(part.fd)
        except OSError as exc:
            self.counters.error("close")
            self.log.error("%s: closing %s failed: %s", self.name, part.path, _why(exc))
        if not part.pos:  # nothing of it got written: do not leave an empty file behind
            try:
                part.path.unlink()
            except OSError:
                pass
            files: list[str] = self.counters.extra["files"]
            if str(part.path) in files:
                files.remove(str(part.path))

    def _unusable(self, part: _Part) -> str:
        """Why the part cannot be written any more ("" if it can)."""
        try:
            if os.fstat(part.fd).st_nlink == 0:
                return "the file was removed while being written"
        except OSError as exc:
            return f"the file became unusable ({_why(exc)})"
        return ""

    async def _check_part(self, what: str) -> _Part | None:
        """The current part if it can still be written; else it ends (counted) and None."""
        part = self._part
        if part is not None and (broken := self._unusable(part)):
            self.counters.error("file_removed" if "removed" in broken else what)
            self.log.error("%s: %s: %s; going on in a new part", self.name, part.path, broken)
            await self._retire(part, broken)
            part = None
        return part

    # ----- writing ------------------------------------------------------------------------------
    async def _write(self, packs: list[bytes], records: list[Record] | None) -> int:
        """Write whole items to the current part (opening one, with its header, if needed).
        Returns how many of `packs` are now in the file; the caller counts the rest. `records`
        are the Records of `packs`, or None for an end marker. A failed write leaves the part
        ending at its last whole item; a part holding anything then ends, and the next write
        goes to a new part. Failures are counted as errors "write" ("end_marker")."""
        what = "write" if records is not None else "end_marker"
        part = await self._check_part(what)
        if part is None:
            try:
                part = self._open_part()
            except OSError as exc:
                where = exc.filename or self.directory
                self._failed(what, f"creating a file in {where}", exc, len(packs))
                return 0
        head = self._header(part) if part.pos == 0 else b""
        kept, err, cut = self._write_chunks(part, head, packs, records is not None)
        if err is not None:
            self._failed(what, f"writing {part.path}", err, len(packs) - kept, cut)
        if kept and records is not None:
            if head and self._gap:
                self.log.warning(
                    "%s: writing again: %s holds the records after %d dropped (%s)",
                    self.name,
                    part.path,
                    sum(self._gap.values()),
                    ", ".join(f"{n} {reason}" for reason, n in self._gap.items()),
                )
                self._gap = {}  # the header just written names them
            self._track(part, records if kept == len(records) else records[:kept])
        if err is not None and (part.pos or cut):
            await self._retire(part, f"write failed: {_why(err)}{cut}")
        return kept

    def _write_chunks(
        self, part: _Part, head: bytes, packs: list[bytes], records: bool
    ) -> tuple[int, OSError | None, str]:
        """Write `head` and `packs` at the part's end, in chunks of about CHUNK_BYTES (a batch
        of large records is not copied into one buffer). On an error, cut the file back to the
        last whole record (a new header stays only together with a record; an end marker is
        whole or not at all). Returns how many packs are in the file, the error, and what went
        wrong cutting back ("" if nothing)."""
        fd, start, n = part.fd, part.pos, len(packs)
        i = 0
        while i < n:
            j, size = i + 1, len(head) + len(packs[i])
            while j < n and size + len(packs[j]) <= CHUNK_BYTES:
                size += len(packs[j])
                j += 1
            buf = packs[i] if j == i + 1 and not head else b"".join([head, *packs[i:j]])
            written, err = _write_all(fd, buf, part.pos)
            if err is None:
                part.pos += len(buf)
                head = b""
                i = j
                continue
            at = part.pos + len(head)
            if records and written >= len(head):
                while i < j and at + len(packs[i]) <= part.pos + written:
                    at += len(packs[i])
                    i += 1
            end = at if records and i > 0 else start
            cut = ""
            try:
                os.ftruncate(fd, end)
            except OSError as texc:
                cut = f"; cutting it back to byte {end} failed ({_why(texc)})"
            part.pos = end
            return i, err, cut
        return n, None, ""

    def _track(self, part: _Part, records: list[Record]) -> None:
        content = part.content
        for r in records:
            c = content.get(r.source)
            if c is None:
                content[r.source] = [1, r.seq, r.seq]
            else:
                c[0] += 1
                c[2] = r.seq
        part.records += len(records)

    def _failed(self, what: str, doing: str, exc: OSError, lost: int, more: str = "") -> None:
        self.counters.error(what)
        self._limited.warning(
            f"{what}:{exc.errno}",
            "%s: %s failed (%s)%s; %d %s not written",
            self.name,
            doing,
            _why(exc),
            more,
            lost,
            "records" if what == "write" else "end marker",
        )

    def _lost(self, n: int) -> None:
        if n:
            self.counters.drop("write_error", n)
            self._gap["write_error"] = self._gap.get("write_error", 0) + n

    async def send(self, records: list[Record]) -> None:
        part = self._part
        packs = [r.pack() for r in records]
        if part is not None and part.pos:
            # the usual case in one go: the file is still there, one write, no header
            buf = b"".join(packs) if len(packs) > 1 else packs[0]
            if len(buf) <= CHUNK_BYTES:
                try:
                    n = os.pwrite(part.fd, buf, part.pos) if os.fstat(part.fd).st_nlink else -1
                except OSError:
                    n = -1  # the general path below tries again, and counts
                if n == len(buf):
                    part.pos += n
                    self._track(part, records)
                    if self.settings.fsync == "interval":
                        await self._sync_interval(part, time.monotonic())
                    return
        elif not self._kind:
            if not self.settings.live:
                self.counters.drop("outside_run", len(records))
                return
            self._begin_series(
                "live", f"live-{time.strftime('%Y%m%dT%H%M%S')}", {"time_start": time.time_ns()}
            )
        kept = await self._write(packs, records)
        self._lost(len(records) - kept)
        part = self._part
        if part is not None and kept and self.settings.fsync == "interval":
            await self._sync_interval(part, time.monotonic())

    async def _sync_interval(self, part: _Part, now: float) -> None:
        if now - self._last_sync >= self.settings.fsync_interval_s:
            self._last_sync = now
            await self._sync(part, "an interval")

    # ----- runs ---------------------------------------------------------------------------------
    async def _end_series(self, end: dict[str, Any], drops: dict[str, int]) -> None:
        """Write the end marker (when there is room), fsync by policy, close."""
        if not self._kind:
            return
        part = await self._check_part("end_marker")  # the marker describes the part it goes in
        mark = {
            **end,
            "file": {
                "part": part.number if part is not None else self._parts + 1,
                "content": _summary(part) if part is not None else {},
                "drops": drops,
                "previous_parts": self._ended,
            },
        }
        if not await self._write([self._packer.pack({"end": mark})], None):
            self.log.error(
                "%s: no end marker written for %s: its file ends at its last whole record",
                self.name,
                self._stem,
            )
        part = self._part
        self._kind = ""
        self._part = None
        if part is None:
            return
        if self.settings.fsync != "never" and part.pos:
            await self._sync(part, "the end of the file")
        self._close_fd(part)
        if part.pos:
            self.log.info("closed %s (%s)", part.path, end.get("condition", "live"))

    def _run_drops(self, run: RunInfo | None) -> dict[str, int]:
        """This publisher's drops in the run (or live series): the run's ledger where the host
        gave one, else what was counted since the series began."""
        accounting = getattr(run, "accounting", None) or {}
        ledger = accounting.get("publishers", {}).get(self.name)
        if isinstance(ledger, dict) and isinstance(ledger.get("drops"), dict):
            return dict(ledger["drops"])
        return {
            k: n - self._drops0.get(k, 0)
            for k, n in self.counters.drops.items()
            if n - self._drops0.get(k, 0)
        }

    async def begin_run(self, run: RunInfo) -> None:
        if self._kind:  # the live file ends where the run begins
            await self._end_series({"time_end": time.time_ns()}, self._run_drops(None))
        self._begin_series("run", f"run-{run.run_id}", run.metadata())
        try:
            part = self._open_part()
        except OSError as exc:
            self._kind = ""
            raise DaqdError(f"cannot create a run file in {self.directory}: {_why(exc)}") from None
        head = self._header(part)
        written, err = _write_all(part.fd, head, 0)
        if err is not None:
            self._kind = ""
            self._part = None
            self._close_fd(part)  # removes it: nothing of it was kept
            raise DaqdError(f"cannot write the run file {part.path}: {_why(err)}")
        part.pos = written

    async def flush_run(self, run: RunInfo) -> None:
        """fsync the run's records and reserve room for its end marker, before the run's
        accounting is taken: a failure of either is then in the run's condition."""
        part = self._part
        if self._kind != "run" or part is None or not part.pos:
            return  # no part being written: the write errors that ended it are counted
        if self.settings.fsync != "never":
            await self._sync(part, "the end of the run")
        # the end marker is the run's metadata, this file's summary, and the run's accounting
        # and reasons (not known yet: a few hundred bytes per receiver and publisher)
        known = len(self._packer.pack({**run.metadata(), "previous_parts": self._ended}))
        parts = len(getattr(self.host, "receivers", ())) + len(getattr(self.host, "queues", ()))
        size = known + 96 * len(part.content) + 512 * parts + END_MARKER_ROOM
        err = _reserve(part.fd, part.pos, size)
        if err is not None:
            self.counters.error("end_marker_room")
            self.log.error(
                "%s: no room for the end marker of %s (%s); the run is marked DEGRADED, and "
                "the end marker will be tried once more",
                self.name,
                part.path,
                _why(err),
            )
        else:
            part.reserved = True

    async def end_run(self, run: RunInfo) -> None:
        if self._kind != "run" or self._meta.get("run_id") != run.run_id:
            return  # this run's file was never begun (begin_run refused it)
        await self._end_series(run.metadata(), self._run_drops(run))

    async def close(self) -> None:
        if self._kind == "run":
            # a run still open here was not ended by the host: say so in the file
            meta = {**self._meta, "time_end": time.time_ns()}
            cond = RunCondition.ABORTED | RunCondition.INCOMPLETE
            meta.update(condition_code=int(cond), condition=cond.describe())
            await self._end_series(meta, self._run_drops(None))
        elif self._kind:
            await self._end_series({"time_end": time.time_ns()}, self._run_drops(None))
