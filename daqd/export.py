"""`daqd export RUNFILE --to hdf5 OUT`: a daqd run file converted to the hdf5 publisher's layout.

The same tables, columns and attributes as a file the `hdf5` publisher writes live (daqd.hdf5):
the run file's header gives the run's metadata, its end marker the condition, accounting and
reasons. A run file without an end marker (cut, or not closed) is converted up to its last whole
record, and the HDF5 file says so in its `export_note` attribute.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

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


def _convert(reader: RunFileReader, out: Path, options: Options, progress: bool) -> ExportSummary:
    layout = Layout(options.tags_format)
    summary = ExportSummary()
    writer: RunFileWriter | None = None
    pending: list[Record] = []
    end: dict[str, Any] | None = None
    size = os.path.getsize(reader.path)
    bar = (
        click.progressbar(length=size, label=f"exporting {reader.path}", file=sys.stderr)
        if progress
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
                summary.note = (
                    f"the run file is cut: converted up to byte {exc.offset} of {exc.size}"
                )
                break
            except ValueError as exc:
                if writer is None:
                    raise DaqdError(str(exc)) from None
                summary.note = f"converted up to an unreadable item ({exc})"
                break
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
            if bar is not None and reader.offset - shown >= (1 << 20):
                bar.update(reader.offset - shown)
                shown = reader.offset
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
        if bar is not None:
            bar.update(size - shown)
            bar.render_finish()
    return summary


def _write(writer: RunFileWriter, layout: Layout, records: list[Record], s: ExportSummary) -> None:
    batch = Batch()
    layout.add(batch, records)
    writer.write(batch)
    s.records += batch.records
