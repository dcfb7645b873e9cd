"""`daqd export RUNFILE --to hdf5|sof OUT`: a daqd run file converted for SSDAQ's users.

- hdf5: the same tables, columns and attributes as a file the `hdf5` publisher writes live
  (daqd.hdf5): the run file's header gives the run's metadata, its end marker the condition,
  accounting and reasons.
- sof: SSDAQ's streamed object files (daqd.sof), one per source of the trigger, timestamp and
  log streams, in the directory OUT: `<source>.sof` holds each record's payload (the trigger
  packet as received, the TriggerMessage's or the LogData's bytes), what SSDAQ's ATriggerWriter,
  ATimestampWriter and LogWriter stored.
  One file per source, not per kind: SOF keeps no source per object, so two trigger receivers'
  packets in one file could not be told apart. The run file header's `receiver_types` says which
  receiver made each source (`kinds` adds or overrides); records of any other source are counted
  and reported as skipped.

A run file without an end marker (cut, or not closed) is converted up to its last whole record,
and the export says so (hdf5: in its `export_note` attribute).
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from daqd import sof
from daqd.errors import DaqdError
from daqd.hdf5 import Batch, Layout, Options, RunFileWriter
from daqd.record import Record
from daqd.runfile import CutFile, RunFileReader

BATCH_RECORDS = 4096

# header keys that describe the daqd file, not the run
_FILE_KEYS = {"daqd", "version", "kind", "publisher", "part", "previous_part", "previous_ended"}
# run metadata that is only final at the end (the end marker has it)
_END_KEYS = {"time_end", "condition", "condition_code", "accounting", "reasons", "records"}


@dataclass
class ExportSummary:
    records: int = 0
    tables: dict[str, dict[str, Any]] = field(default_factory=dict)
    note: str = ""  # why the run file ended early, if it did


def export_hdf5(
    runfile: str | os.PathLike[str],
    out: str | os.PathLike[str],
    options: Options | None = None,
    progress: bool = False,
) -> ExportSummary:
    """Convert `runfile` to the HDF5 file `out` (which must not exist). Raises DaqdError with
    the reason if the run file cannot be read or `out` cannot be written."""
    options = options or Options()
    out_path = Path(out)
    try:
        fd = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    except FileExistsError:
        raise DaqdError(f"{out_path} exists; export never writes over a file") from None
    except OSError as exc:
        raise DaqdError(f"cannot create {out_path}: {exc.strerror}") from None
    os.close(fd)
    try:
        return _convert(RunFileReader(runfile), out_path, options, progress)
    except BaseException:
        out_path.unlink(missing_ok=True)
        raise


class _Items:
    """A run file's items in order, with a progress bar on stderr if asked. A cut file, or an
    unreadable item after the header, ends the items and says why in `note`; a file that is not
    a run file raises DaqdError."""

    def __init__(self, reader: RunFileReader, progress: bool) -> None:
        self.reader = reader
        self.progress = progress
        self.note = ""

    def __iter__(self) -> Iterator[Record | dict[str, Any]]:
        reader = self.reader
        size = os.path.getsize(reader.path)
        bar = (
            click.progressbar(length=size, label=f"exporting {reader.path}", file=sys.stderr)
            if self.progress
            else None
        )
        shown = 0
        items = iter(reader)
        try:
            while True:
                try:
                    item = next(items)
                except StopIteration:
                    break
                except CutFile as exc:
                    self.note = (
                        f"the run file is cut: converted up to byte {exc.offset} of {exc.size}"
                    )
                    break
                except ValueError as exc:
                    if not reader.items:
                        raise DaqdError(str(exc)) from None
                    self.note = f"converted up to an unreadable item ({exc})"
                    break
                yield item
                if bar is not None and reader.offset - shown >= (1 << 20):
                    bar.update(reader.offset - shown)
                    shown = reader.offset
        finally:
            if bar is not None:
                bar.update(size - shown)
                bar.render_finish()


def _convert(reader: RunFileReader, out: Path, options: Options, progress: bool) -> ExportSummary:
    layout = Layout(options.tags_format)
    summary = ExportSummary()
    writer: RunFileWriter | None = None
    pending: list[Record] = []
    end: dict[str, Any] | None = None
    items = _Items(reader, progress)
    try:
        for item in items:
            if isinstance(item, Record):
                pending.append(item)
                if len(pending) >= BATCH_RECORDS:
                    assert writer is not None
                    _write(writer, layout, pending, summary)
                    pending = []
            elif writer is None:  # the header
                meta = {k: v for k, v in item.items() if k not in _FILE_KEYS | _END_KEYS}
                meta["exported_from"] = os.path.basename(reader.path)
                if "part" in item:
                    meta["part"] = item["part"]
                writer = RunFileWriter(out, options, meta, swmr=False)
            elif "end" in item:
                end = dict(item["end"])
        summary.note = items.note
        if writer is None:
            raise DaqdError(f"{reader.path}: no header")
        if pending:
            _write(writer, layout, pending, summary)
        if end is None and not summary.note:
            summary.note = "the run file has no end marker (the run was not closed)"
        attrs: dict[str, Any] = {}
        if end is not None:
            attrs = {k: v for k, v in end.items() if k != "file"}
        if summary.note:
            attrs["export_note"] = summary.note
        summary.tables = writer.content()
        writer.close(attrs)
        writer = None
    finally:
        if writer is not None:
            writer.abandon()
    return summary


def _write(writer: RunFileWriter, layout: Layout, records: list[Record], s: ExportSummary) -> None:
    batch = Batch()
    layout.add(batch, records)
    writer.write(batch)
    s.records += batch.records


# ----- sof ------------------------------------------------------------------------------------
# receiver type -> the SOF data type its records' payloads are stored as
SOF_STREAMS = {"trigger": sof.TRIGGER, "timestamp": sof.TIMESTAMP, "log": sof.LOG}


@dataclass
class SofFileSummary:
    path: Path
    receiver_type: str
    objects: int = 0
    bytes: int = 0


@dataclass
class SofSummary:
    records: int = 0
    files: dict[str, SofFileSummary] = field(default_factory=dict)  # by source
    skipped: dict[str, tuple[int, str]] = field(default_factory=dict)  # source -> (records, why)
    note: str = ""  # why the run file ended early, if it did


class _SofOut:
    """One source's SOF file being written."""

    def __init__(self, path: Path, data_type: int, created_s: int, complevel: int | None) -> None:
        self.file = open(path, "xb")  # noqa: SIM115 - closed by close(), or export_sof on an error
        self.writer = sof.SofWriter(
            data_type, created_s, compress=complevel is not None, complevel=complevel or 9
        )

    def add(self, obj: bytes) -> None:
        self.file.write(self.writer.add(obj))

    def close(self) -> int:
        self.file.write(self.writer.close())
        self.file.close()
        return self.writer.pos


def export_sof(
    runfile: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    kinds: dict[str, str] | None = None,
    complevel: int | None = 9,
    progress: bool = False,
) -> SofSummary:
    """Write one SOF file per trigger, timestamp or log source of `runfile` into `out_dir` (made if
    missing; no file in it is written over). `kinds` maps a source to a receiver type, over what
    the run file's header says; `complevel` None stores the objects uncompressed, 1-9 is bz2's
    level (9, SSDAQ's). Raises DaqdError with the reason; on an error no SOF file is left."""
    out = Path(out_dir)
    made_dir = not out.exists()
    try:
        out.mkdir(exist_ok=True)
    except OSError as exc:
        raise DaqdError(f"cannot make the directory {out}: {exc.strerror}") from None
    summary = SofSummary()
    outs: dict[str, _SofOut] = {}
    try:
        _convert_sof(RunFileReader(runfile), out, kinds or {}, complevel, progress, summary, outs)
        for source, o in outs.items():
            try:
                summary.files[source].bytes = o.close()
            except OSError as exc:
                path = summary.files[source].path
                raise DaqdError(f"cannot write {path}: {exc.strerror}") from None
        if made_dir and not outs:
            out.rmdir()
    except BaseException:
        for source, o in outs.items():
            o.file.close()
            summary.files[source].path.unlink(missing_ok=True)
        if made_dir:
            with contextlib.suppress(OSError):
                out.rmdir()
        raise
    return summary


def _convert_sof(
    reader: RunFileReader,
    out: Path,
    kinds: dict[str, str],
    complevel: int | None,
    progress: bool,
    summary: SofSummary,
    outs: dict[str, _SofOut],
) -> None:
    types: dict[str, str] | None = None
    skipped: dict[str, int] = {}
    ended = False
    items = _Items(reader, progress)
    for item in items:
        if not isinstance(item, Record):
            if types is None:  # the header
                known = item.get("receiver_types")
                types = {**(known if isinstance(known, dict) else {}), **kinds}
            else:
                ended = ended or "end" in item
            continue
        assert types is not None  # the reader yields the header first
        source = item.source
        o = outs.get(source)
        if o is None:
            receiver_type = types.get(source)
            if receiver_type not in SOF_STREAMS:
                skipped[source] = skipped.get(source, 0) + 1
                continue
            path = out / f"{_file_name(source)}.sof"
            try:
                o = outs[source] = _SofOut(
                    path, SOF_STREAMS[receiver_type], item.time_ns // 1_000_000_000, complevel
                )
            except FileExistsError:
                raise DaqdError(f"{path} exists; export never writes over a file") from None
            except OSError as exc:
                raise DaqdError(f"cannot create {path}: {exc.strerror}") from None
            summary.files[source] = SofFileSummary(path, receiver_type)
        try:
            o.add(b"".join(item.payload))
        except OSError as exc:
            raise DaqdError(f"cannot write {summary.files[source].path}: {exc.strerror}") from None
        summary.files[source].objects += 1
        summary.records += 1
    if types is None:
        raise DaqdError(f"{reader.path}: no header")
    summary.note = items.note
    if not summary.note and not ended:
        summary.note = "the run file has no end marker (the run was not closed)"
    for source, n in skipped.items():
        if source in types:
            why = f"not a trigger/timestamp/log stream (receiver type {types[source]})"
        else:
            why = (
                "not a trigger/timestamp/log stream (the run file does not say which receiver "
                "made it; name its type with --kind SOURCE=trigger|timestamp|log)"
            )
        summary.skipped[source] = (n, why)


def _file_name(source: str) -> str:
    """A source name as a file name: letters, digits, '_', '-', '.' kept, anything else '_'."""
    name = re.sub(r"[^\w.-]", "_", source)
    return name if name.strip(".") else f"_{name}"
