"""The `file` publisher: one run file per run, a live file outside runs, fsync by policy."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any, BinaryIO, Literal

import msgpack
from pydantic import Field

from daqd.publisher import Publisher, PublisherSettings
from daqd.record import Record
from daqd.runfile import create_exclusive
from daqd.runstate import RunCondition, RunInfo


class FileSettings(PublisherSettings):
    directory: str
    fsync: Literal["never", "per_run", "interval"] = "per_run"
    fsync_interval_s: float = Field(1.0, gt=0)
    live: bool = True  # also write records that arrive outside runs, to live-<time>.daqd


class FilePublisher(Publisher):
    """Writes msgpack record streams (see daqd.runfile); `daqd dump FILE` reads them back."""

    Settings = FileSettings
    settings: FileSettings

    async def start(self) -> None:
        self.directory = Path(self.settings.directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.addresses["directory"] = str(self.directory.resolve())
        self._packer = msgpack.Packer(use_bin_type=True)
        self._file: BinaryIO | None = None
        self._path: Path | None = None
        self._header: dict[str, Any] = {}
        self._last_sync = time.monotonic()
        self.counters.extra["files"] = []

    def _open(self, kind: str, stem: str, meta: dict[str, Any]) -> None:
        self._path, self._file = create_exclusive(self.directory, stem)
        self._header = {
            "daqd": "runfile",
            "version": 1,
            "kind": kind,
            "publisher": self.name,
            **meta,
        }
        self._file.write(self._packer.pack(self._header))
        files: list[str] = self.counters.extra["files"]
        files.append(str(self._path))
        del files[:-8]  # status shows the newest few
        self.log.info("writing %s", self._path)

    async def _close_file(self, end: dict[str, Any], sync: bool) -> None:
        f, path = self._file, self._path
        if f is None:
            return
        self._file = None
        f.write(self._packer.pack({"end": end}))
        f.flush()
        if sync:
            await asyncio.to_thread(os.fsync, f.fileno())
        f.close()
        self.log.info("closed %s (%s)", path, end.get("condition", "live"))

    async def send(self, records: list[Record]) -> None:
        if self._file is None:
            if not self.settings.live:
                self.counters.drop("outside_run", len(records))
                return
            self._open(
                "live", f"live-{time.strftime('%Y%m%dT%H%M%S')}", {"time_start": time.time_ns()}
            )
        f = self._file
        assert f is not None
        for r in records:
            f.write(r.pack())
        if self.settings.fsync == "interval":
            now = time.monotonic()
            if now - self._last_sync >= self.settings.fsync_interval_s:
                self._last_sync = now
                f.flush()
                await asyncio.to_thread(os.fsync, f.fileno())

    async def begin_run(self, run: RunInfo) -> None:
        if self._file is not None:  # the live file ends where the run begins
            await self._close_file({"time_end": time.time_ns()}, self.settings.fsync != "never")
        self._open("run", f"run-{run.run_id}", run.metadata())

    async def end_run(self, run: RunInfo) -> None:
        await self._close_file(run.metadata(), self.settings.fsync != "never")

    async def close(self) -> None:
        if self._file is not None and self._header.get("kind") == "run":
            # a run still open here was not ended by the host: say so in the file
            meta = {**self._header, "time_end": time.time_ns()}
            cond = RunCondition.ABORTED | RunCondition.INCOMPLETE
            meta.update(condition_code=int(cond), condition=cond.describe())
            await self._close_file(meta, True)
        else:
            await self._close_file({"time_end": time.time_ns()}, self.settings.fsync != "never")
