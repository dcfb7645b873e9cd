"""The `hdf5` publisher: one HDF5 file per run (parts by size), SSDAQ's slow-signal table, SWMR.

Layout in daqd.hdf5. Records are converted to rows as they come and written, in one go per table,
every `flush_interval_s` (or sooner when `flush_records` are waiting); each write ends with an HDF5
flush, and only then are its records counted as delivered (`confirms_delivery`). Writes run in one
worker thread (h5py lets go of the GIL while HDF5 compresses and writes), so the event loop keeps
receiving meanwhile. The file is in SWMR mode while being written: `h5py.File(path, "r",
swmr=True)` follows a run live. A write that fails (disk full, I/O error) counts its records as
dropped "write_error" and an error "write"; the part ends holding what was flushed before, and the
next records go to a new part (`run-ID.p2.h5`, ...), whose attributes name the part before, why it
ended and what was dropped in between. A part that reaches `max_file_mib` ends the same way, as
SSDAQ's `filesize_lim`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import os
import time
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from daqd.errors import DaqdError
from daqd.hdf5 import (
    ROOM_RESERVE,
    SUFFIX,
    Batch,
    Compression,
    Layout,
    Options,
    RunFileWriter,
    TagsFormat,
)
from daqd.logs import LimitedLogger
from daqd.publisher import Publisher, PublisherSettings
from daqd.record import Record
from daqd.runfile import create_exclusive
from daqd.runstate import RunCondition, RunInfo


class Hdf5Settings(PublisherSettings):
    directory: str
    compression: Compression = "gzip"
    complevel: int = Field(1, ge=0, le=22)
    shuffle: bool = True
    fletcher32: bool = True
    chunk_kib: int = Field(128, ge=1, le=65536)
    tags_format: TagsFormat = "json"
    flush_interval_s: float = Field(1.0, gt=0)
    flush_records: int = Field(4096, ge=1)  # write at once when this many records wait
    max_file_mib: float | None = Field(None, gt=0)  # a new part beyond this size
    swmr: bool = True

    @model_validator(mode="after")
    def _level(self) -> Hdf5Settings:
        lo, hi = {"none": (0, 22), "zstd": (1, 22), "bzip2": (1, 9)}.get(self.compression, (0, 9))
        if not lo <= self.complevel <= hi:
            raise ValueError(f"complevel of {self.compression} must be {lo} to {hi}")
        return self


def _why(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno:
        name = errno.errorcode.get(exc.errno, "")
        return f"{name}: {exc.strerror}" if name and exc.strerror else str(exc)
    return f"{type(exc).__name__}: {exc}"


class Hdf5Publisher(Publisher):
    """Writes runs as HDF5 files that SSDAQ's reader, PyTables and h5py open."""

    Settings = Hdf5Settings
    settings: Hdf5Settings
    confirms_delivery = True

    async def start(self) -> None:
        s = self.settings
        self.directory = Path(s.directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.addresses["directory"] = str(self.directory.resolve())
        self.options = Options(
            compression=s.compression,
            complevel=s.complevel,
            shuffle=s.shuffle,
            fletcher32=s.fletcher32,
            chunk_kib=s.chunk_kib,
            tags_format=s.tags_format,
        )
        self.options.filters()  # a compression that cannot be used fails here, at start
        self.layout = Layout(s.tags_format)
        self._limited = LimitedLogger(self.log)
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"hdf5-{s.name}")
        self._lock = asyncio.Lock()
        self._run: RunInfo | None = None
        self._meta: dict[str, Any] = {}
        self._writer: RunFileWriter | None = None
        self._last: RunFileWriter | None = None  # the part closed last
        self._first: Path | None = None
        self._parts = 0
        self._previous: dict[str, Any] = {}  # the part before the next one, and why it ended
        self._gap: dict[str, int] = {}  # dropped since the last part ended, by reason
        self._batch = Batch()
        self._writing: tuple[asyncio.Future[None], Batch] | None = None
        self._known: dict[str, str] = {}  # table path -> source, over the parts of a run
        self._last_flush = time.monotonic()
        self.counters.extra["files"] = []
        self._timer = asyncio.create_task(self._flush_forever(), name=f"hdf5-flush-{s.name}")

    async def _call(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    # ----- parts ----------------------------------------------------------------------------
    def _sources(self) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
        """Tables for the receivers that publish here, made before SWMR mode begins (a table
        made later needs the file opened once more)."""
        readouts, generic = [], []
        for name, rec in sorted(getattr(self.host, "receivers", {}).items()):
            if self.name not in getattr(rec.settings, "publish_to", ()):
                continue
            if rec.settings.type == "slowsignal":
                readouts.append((self.layout.readout_path(name), name))
            else:
                generic.append((self.layout.generic_path(name), name))
        return readouts, generic

    def _open_part(self) -> RunFileWriter:
        """Create the next part of the run's series (raises OSError, or h5py's errors)."""
        number = self._parts + 1
        stem = self._meta["stem"] if number == 1 else None
        if self._first is not None and number > 1:
            stem = f"{self._first.name.removesuffix(SUFFIX)}.p{number}"
        assert stem is not None
        st = os.statvfs(self.directory)
        if st.f_bavail * st.f_frsize < 4 * ROOM_RESERVE:  # HDF5 copes badly with a full disk
            raise OSError(errno.ENOSPC, "No space left on device", str(self.directory))
        path, fd = create_exclusive(self.directory, stem, SUFFIX)
        os.close(fd)
        attrs = {k: v for k, v in self._meta.items() if k != "stem"}
        attrs.update(publisher=self.name, part=number)
        if number > 1:
            attrs.update(self._previous)
            attrs["dropped_before"] = dict(self._gap)
        readouts, generic = self._sources()
        for path_, source in self._known.items():  # tables the parts before had
            (readouts if path_.startswith("/SlowSignal/") else generic).append((path_, source))
        try:
            writer = RunFileWriter(
                path,
                self.options,
                attrs,
                swmr=self.settings.swmr,
                readout_paths=dict(readouts).items(),
                generic_paths=dict(generic).items(),
            )
        except BaseException:
            try:
                path.unlink()
            except OSError:
                pass
            raise
        self._parts = number
        if number == 1:
            self._first = path
        files: list[str] = self.counters.extra["files"]
        files.append(str(path))
        del files[:-8]
        return writer

    async def _next_part(self) -> RunFileWriter | None:
        """The part to write to; a new one if the last ended. None if none can be created."""
        if self._writer is not None:
            return self._writer
        try:
            self._writer = await self._call(self._open_part)
        except Exception as exc:
            self.counters.error("create")
            self._limited.warning(
                "create", "%s: cannot create a file in %s: %s", self.name, self.directory, _why(exc)
            )
            return None
        self._gap = {}
        if self._parts > 1:
            self.log.warning(
                "%s: writing %s (part %d; %s)",
                self.name,
                self._writer.path,
                self._parts,
                self._previous.get("previous_ended", ""),
            )
        else:
            self.log.info("writing %s", self._writer.path)
        return self._writer

    async def _end_part(self, why: str, attrs: dict[str, Any] | None) -> None:
        """Close the current part; `attrs`: its end attributes (the run's end, or why it ended)."""
        writer, self._writer = self._writer, None
        if writer is None:
            return
        self._last = writer
        self._previous = {"previous_part": writer.path.name, "previous_ended": why}
        self._known.update({p: t.source for p, t in writer.tables.items()})
        try:
            await self._call(writer.close, attrs)
        except Exception as exc:
            self.counters.error("close")
            self.log.error(
                "%s: closing %s failed (%s): its end attributes may be missing",
                self.name,
                writer.path,
                _why(exc),
            )
            writer.abandon()

    # ----- writing --------------------------------------------------------------------------
    async def send(self, records: list[Record]) -> None:
        if self._run is None:
            self.counters.drop("outside_run", len(records))
            self.progress = len(records)
            return
        self.layout.add(self._batch, records)
        self.progress = len(records)
        if (
            self._batch.records >= self.settings.flush_records
            or time.monotonic() - self._last_flush >= self.settings.flush_interval_s
        ):
            await self._flush()

    async def _flush_forever(self) -> None:
        interval = self.settings.flush_interval_s
        while True:
            await asyncio.sleep(interval / 2)
            if self._batch and time.monotonic() - self._last_flush >= interval:
                try:
                    await self._flush()
                except Exception as exc:  # never stop flushing (_flush counts what it can)
                    self.counters.error("flush")
                    self._limited.error("flush", "%s: flush failed: %r", self.name, exc)

    async def _flush(self) -> None:
        """Write what waits; count it delivered when flushed, or dropped "write_error"."""
        async with self._lock:
            batch, self._batch = self._batch, Batch()
            self._last_flush = time.monotonic()
            if not batch:
                return
            limit = self.settings.max_file_mib
            # a full part ends when the next rows come (so the run's last part gets its end)
            if (
                self._writer is not None
                and limit is not None
                and self._writer.size() >= limit * (1 << 20)
            ):
                why = f"reached max_file_mib ({limit:g})"
                await self._end_part(why, {"ended": why})
            writer = await self._next_part()
            if writer is None:
                self._lost(batch.records)
                return
            fut = asyncio.get_running_loop().run_in_executor(self._pool, writer.write, batch)
            self._writing = (fut, batch)
            try:
                await asyncio.shield(fut)
            except asyncio.CancelledError:
                raise  # close() settles the write still running
            except Exception as exc:
                self._writing = None
                self._failed(writer, batch, exc)
                why = f"write failed: {_why(exc)}"
                await self._end_part(why, {"ended": why})
                return
            self._writing = None
            self.delivered(batch.records, batch.nbytes)

    def _failed(self, writer: RunFileWriter, batch: Batch, exc: BaseException) -> None:
        self.counters.error("write")
        self._limited.warning(
            f"write:{getattr(exc, 'errno', '')}",
            "%s: writing %s failed (%s); %d records not written; going on in a new part",
            self.name,
            writer.path,
            _why(exc),
            batch.records,
        )
        self._lost(batch.records)

    def _lost(self, n: int) -> None:
        self.counters.drop("write_error", n)
        self._gap["write_error"] = self._gap.get("write_error", 0) + n

    # ----- runs -----------------------------------------------------------------------------
    async def begin_run(self, run: RunInfo) -> None:
        if self._run is not None:  # a run never ended: its file is closed as aborted
            await self._abort_run()
        self._meta = {**run.metadata(), "stem": f"run-{run.run_id}"}
        for k in ("time_end", "condition", "condition_code", "accounting", "reasons", "records"):
            self._meta.pop(k, None)
        self._first, self._parts, self._previous, self._gap = None, 0, {}, {}
        self._known = {}
        self._last = None
        try:
            self._writer = await self._call(self._open_part)
        except Exception as exc:
            raise DaqdError(
                f"cannot create an HDF5 run file in {self.directory}: {_why(exc)}"
            ) from None
        self._run = run
        self._last_flush = time.monotonic()
        self.log.info("writing %s", self._writer.path)

    async def flush_run(self, run: RunInfo) -> None:
        if self._run is not None:
            await self._flush()

    async def end_run(self, run: RunInfo) -> None:
        if self._run is None or self._run.run_id != run.run_id:
            return  # begin_run refused this run
        await self._flush()
        self._run = None
        if self._writer is None and self._last is not None:
            # the last part ended on an error and none could follow: the run's end goes there
            try:
                await self._call(self._last.annotate, run.metadata())
            except Exception as exc:
                self.counters.error("end_attributes")
                self.log.error(
                    "%s: the end of run %s could not be written to %s (%s)",
                    self.name,
                    run.run_id,
                    self._last.path,
                    _why(exc),
                )
        await self._end_part(run.metadata().get("condition", ""), run.metadata())
        self.log.info("closed the run %s (%s)", run.run_id, run.condition.describe())

    async def _abort_run(self) -> None:
        await self._flush()
        cond = RunCondition.ABORTED | RunCondition.INCOMPLETE
        end: dict[str, Any] = {"time_end": time.time_ns(), "condition_code": int(cond)}
        end["condition"] = cond.describe()
        self._run = None
        await self._end_part("aborted", end)

    async def close(self) -> None:
        self._timer.cancel()
        await asyncio.gather(self._timer, return_exceptions=True)
        if self._writing is not None:  # a write cut short by the drain deadline
            fut, batch = self._writing
            self._writing = None
            try:
                await fut
                self.delivered(batch.records, batch.nbytes)
            except Exception as exc:
                if self._writer is not None:
                    self._failed(self._writer, batch, exc)
        if self._run is not None:
            await self._abort_run()
        elif self._batch:
            self.counters.drop("outside_run", self._batch.records)
        self._pool.shutdown(wait=True)
