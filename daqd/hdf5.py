"""HDF5 run files: the layout (SSDAQ's slow-signal table, a generic table per source) and a writer.

Shared by the `hdf5` publisher (publishers/hdf5.py) and `daqd export` (daqd/export.py), so that a
file written live and one converted from a daqd run file look the same. Uses h5py; the file is
written in HDF5 1.10 format (readable by HDF5 >= 1.10, PyTables included) so that it can be
followed while being written (SWMR).

Layout:
- `/SlowSignal/readout`: slow-signal camera readouts with SSDAQ's columns and dtypes (`iro` u64,
  `time` u64 = TACK, `cpu_t` f64, `cpu_t_s` u64, `cpu_t_ns` u64, `data` f32 (32, 64) mV, NaN for a
  missing module), PyTables' table attributes, and SSDAQ's `ss_data_version`, `ssdaq_version` and
  `ssl2asic_ch` (the pixel mapping SSDAQ's reader applies). A second readout source gets
  `/SlowSignal/readout_<source>`.
- `/records/<source>`: every other record: `time_ns` i64, `seq` u64, `tags` (JSON text, or msgpack
  bytes), `payload` (variable-length bytes: the record's payload blocks joined).
- Attributes of `/` (and of each `/records/<source>` table): the run's metadata; at the end its
  condition, accounting and reasons, and what this file holds.
"""

from __future__ import annotations

import base64
import errno
import json
import os
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import msgpack
import numpy as np

from daqd import __version__
from daqd.errors import DaqdError
from daqd.protocols.slowsignal import MV_PER_COUNT, N_MODULES, N_PIXELS, SSDAQ_FRAME_BYTES
from daqd.record import Record

Compression = Literal["none", "gzip", "bzip2", "blosc-lz4", "blosc-zstd", "zstd"]
TagsFormat = Literal["json", "msgpack"]
LAYOUT_VERSION = 1
SUFFIX = ".h5"
SSDAQ_TITLE = "CHEC-S Slow signal monitor data"
ROOM_RESERVE = 256 << 10  # free space kept for closing a file and its end attributes

# SSDAQ's /SlowSignal/readout row, its fields in the order PyTables stores them (by name)
READOUT_DTYPE = np.dtype(
    [
        ("cpu_t", "<f8"),
        ("cpu_t_ns", "<u8"),
        ("cpu_t_s", "<u8"),
        ("data", "<f4", (N_MODULES, N_PIXELS)),
        ("iro", "<u8"),
        ("time", "<u8"),
    ]
)
# SSDAQ's mapping from slow-signal pixel order to ASIC channel (its reader's default)
# fmt: off
SSL2ASIC_CH = np.array(
    [29, 23, 21, 22, 30, 27, 24, 0, 25, 31, 20, 18, 28, 26, 17, 3, 2, 16, 10, 12, 19, 4, 15, 9,
     1, 8, 11, 14, 6, 7, 5, 13, 62, 56, 54, 53, 59, 60, 55, 50, 57, 58, 52, 49, 61, 63, 32, 35,
     51, 47, 42, 46, 33, 34, 45, 48, 44, 36, 41, 43, 40, 38, 39, 37],
    dtype=np.uint64,
)
# fmt: on
_FRAME_HEAD = struct.Struct("<4Q")
_COUNTS_BYTES = N_MODULES * N_PIXELS * 2
_MV32_BYTES = N_MODULES * N_PIXELS * 4
_BITS = np.uint64(1) << np.arange(N_MODULES, dtype=np.uint64)


@dataclass(frozen=True)
class Options:
    """How tables are stored: compression, chunking, and how tags are encoded."""

    compression: Compression = "gzip"
    complevel: int = 1
    shuffle: bool = True
    fletcher32: bool = True
    chunk_kib: int = 128
    tags_format: TagsFormat = "json"

    def filters(self) -> dict[str, Any]:
        """h5py create_dataset keywords for the compression, shuffle and checksum."""
        kw: dict[str, Any] = {"fletcher32": self.fletcher32}
        c = self.compression
        if c == "gzip":
            kw.update(compression="gzip", compression_opts=self.complevel, shuffle=self.shuffle)
        elif c == "none":
            kw["shuffle"] = self.shuffle
        else:
            import hdf5plugin  # registers the filters below with HDF5

            if c == "bzip2":  # filter 307, the one PyTables (and so SSDAQ) writes
                plugin: Any = hdf5plugin.BZip2(blocksize=max(1, min(self.complevel, 9)))
                kw["shuffle"] = self.shuffle
            elif c == "zstd":
                plugin = hdf5plugin.Zstd(clevel=max(1, self.complevel))
                kw["shuffle"] = self.shuffle
            else:  # blosc shuffles inside its own filter
                shuffle = hdf5plugin.Blosc.SHUFFLE if self.shuffle else hdf5plugin.Blosc.NOSHUFFLE
                cname: Any = c.removeprefix("blosc-")
                plugin = hdf5plugin.Blosc(cname=cname, clevel=self.complevel, shuffle=shuffle)
            kw.update(plugin)
        return kw

    def rows_per_chunk(self, itemsize: int) -> int:
        return max(1, self.chunk_kib * 1024 // itemsize)


def _h5py() -> Any:
    try:
        import h5py
    except ImportError as exc:  # pragma: no cover - a dependency of daqd
        raise DaqdError(f"the hdf5 publisher needs h5py: {exc}") from None
    return h5py


def generic_dtype(tags_format: TagsFormat) -> np.dtype[Any]:
    h5py = _h5py()
    tags = h5py.string_dtype("utf-8") if tags_format == "json" else h5py.vlen_dtype(np.uint8)
    return np.dtype(
        [
            ("time_ns", "<i8"),
            ("seq", "<u8"),
            ("tags", tags),
            ("payload", h5py.vlen_dtype(np.uint8)),
        ]
    )


# ----- records -> rows ------------------------------------------------------------------------
# how a readout's payload holds its data
_COUNTS, _MV32, _FRAME = 0, 1, 2
# readout number, TACK, cpu time ns, payload kind, payload block, modules present (bitmask)
ReadoutRow = tuple[int, int, int, int, Any, int]
_FRAME_DTYPE = np.dtype([("head", "<u8", (4,)), ("mv", "<f8", (N_MODULES, N_PIXELS))])


def readout_row(record: Record) -> ReadoutRow | None:
    """What a slow-signal readout record (any of the slowsignal receiver's payload settings)
    holds, to be converted with others in one go (_readout_array); None if it is not one."""
    tags = record.tags
    if len(record.payload) != 1 or "tack" not in tags or "readout" not in tags:
        return None
    block = record.payload[0]
    if type(block) is not bytes:  # held until written: a copy of what could change
        block = bytes(block)
    size = len(block)
    try:
        if tags.get("format") == "ssdaq":
            if size != SSDAQ_FRAME_BYTES:
                return None
            iro, tack, cpu_s, cpu_ns = _FRAME_HEAD.unpack_from(block, 0)
            return iro, tack, cpu_s * 1_000_000_000 + cpu_ns, _FRAME, block, -1
        iro, tack, cpu = int(tags["readout"]), int(tags["tack"]), int(tags["cpu_time_ns"])
        if not (0 <= iro < 2**64 and 0 <= tack < 2**64 and 0 <= cpu < 2**64):
            return None
        dtype = tags.get("dtype")
        if dtype == "<u2" and size == _COUNTS_BYTES:
            present = int(tags.get("modules_present", -1)) & (2**64 - 1)
            return iro, tack, cpu, _COUNTS, block, present
        if dtype == "<f4" and size == _MV32_BYTES:
            return iro, tack, cpu, _MV32, block, -1
    except (KeyError, TypeError, ValueError, OverflowError, struct.error):
        return None
    return None


def _jsonable(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"$bytes": base64.b64encode(bytes(value)).decode()}
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def encode_tags(tags: dict[str, Any], tags_format: TagsFormat) -> Any:
    """Tags as stored: JSON text (bytes values as {"$bytes": base64}), or msgpack bytes."""
    if tags_format == "json":
        try:
            return json.dumps(tags, separators=(",", ":"), default=_jsonable)
        except (TypeError, ValueError):  # e.g. bytes as map keys: kept whole, as msgpack
            packed = msgpack.packb(tags, use_bin_type=True)
            return json.dumps({"$msgpack": base64.b64encode(packed).decode()})
    return np.frombuffer(msgpack.packb(tags, use_bin_type=True), np.uint8)


def _safe_name(source: str) -> str:
    """A source name as an HDF5 link name (no '/', not '.' or empty)."""
    name = re.sub(r"[/\x00]", "_", source)
    return name if name not in ("", ".", "..") else f"_{name}"


@dataclass
class Batch:
    """Rows waiting to be written, by table path; `records`/`nbytes`: what they came from."""

    readouts: dict[str, list[ReadoutRow]] = field(default_factory=dict)
    generic: dict[str, list[tuple[int, int, Any, Any]]] = field(default_factory=dict)
    seqs: dict[str, list[int]] = field(default_factory=dict)  # path -> [first, last] seq
    sources: dict[str, str] = field(default_factory=dict)  # path -> source
    records: int = 0
    nbytes: int = 0

    def __bool__(self) -> bool:
        return self.records > 0


class Layout:
    """Which table a record goes to; stable over the parts of a run and over runs."""

    def __init__(self, tags_format: TagsFormat) -> None:
        self.tags_format = tags_format
        self._readout_paths: dict[str, str] = {}

    def readout_path(self, source: str) -> str:
        path = self._readout_paths.get(source)
        if path is None:
            path = "/SlowSignal/readout"
            if self._readout_paths:
                path = f"/SlowSignal/readout_{_safe_name(source)}"
            self._readout_paths[source] = path
        return path

    @staticmethod
    def generic_path(source: str) -> str:
        return f"/records/{_safe_name(source)}"

    def add(self, batch: Batch, records: Iterable[Record]) -> None:
        """Convert records to rows of `batch`."""
        fmt = self.tags_format
        for r in records:
            ro = readout_row(r)
            if ro is not None:
                path = self.readout_path(r.source)
                batch.readouts.setdefault(path, []).append(ro)
            else:
                path = self.generic_path(r.source)
                p = r.payload
                if len(p) == 1:  # held until written: a copy unless immutable
                    b = p[0]
                    payload = np.frombuffer(b if type(b) is bytes else bytes(b), np.uint8)
                else:
                    payload = np.frombuffer(b"".join(p), np.uint8)
                row = (r.time_ns, r.seq, encode_tags(r.tags, fmt), payload)
                batch.generic.setdefault(path, []).append(row)
            seqs = batch.seqs.get(path)
            if seqs is None:
                batch.seqs[path] = [r.seq, r.seq]
                batch.sources[path] = r.source
            else:
                seqs[1] = r.seq
            batch.records += 1
            batch.nbytes += r.nbytes


def _readout_array(rows: list[ReadoutRow]) -> np.ndarray:
    """SSDAQ's rows, converted in bulk: counts -> mV in float64 (NaN for absent modules), as
    SSDAQ does, stored float32; float32 mV as they are; SSDAQ frames' float64 mV as float32."""
    n = len(rows)
    a = np.empty(n, READOUT_DTYPE)
    cpu = np.array([r[2] for r in rows], dtype=np.uint64)
    s, ns = np.divmod(cpu, np.uint64(1_000_000_000))
    a["cpu_t"] = s + ns * 1e-9  # as SSDAQ: float(seconds) + nanoseconds * 1e-9
    a["cpu_t_ns"] = ns
    a["cpu_t_s"] = s
    a["iro"] = np.array([r[0] for r in rows], dtype=np.uint64)
    a["time"] = np.array([r[1] for r in rows], dtype=np.uint64)
    kinds = {r[3] for r in rows}
    for kind in kinds:
        index = slice(None) if len(kinds) == 1 else [i for i, r in enumerate(rows) if r[3] == kind]
        part = rows if len(kinds) == 1 else [rows[i] for i in index]  # type: ignore[union-attr]
        joined = b"".join(r[4] for r in part)
        if kind == _COUNTS:
            counts = np.frombuffer(joined, "<u2").reshape(-1, N_MODULES, N_PIXELS)
            mv = counts * MV_PER_COUNT
            masks = np.array([r[5] for r in part], dtype=np.uint64)
            mv[(masks[:, None] & _BITS) == 0] = np.nan
            a["data"][index] = mv
        elif kind == _MV32:
            a["data"][index] = np.frombuffer(joined, "<f4").reshape(-1, N_MODULES, N_PIXELS)
        else:
            a["data"][index] = np.frombuffer(joined, _FRAME_DTYPE)["mv"]
    return a


def _generic_array(rows: list[tuple[int, int, Any, Any]], dtype: np.dtype[Any]) -> np.ndarray:
    a = np.empty(len(rows), dtype)
    for i, row in enumerate(rows):
        a[i] = row
    return a


def attr_value(value: Any) -> Any:
    """A metadata value as an HDF5 attribute: numbers and text as they are, lists of text as
    text arrays, anything else (maps, None, mixed lists) as JSON text."""
    if isinstance(value, bool):
        return np.bool_(value)
    if isinstance(value, (int, float, str)) and not (isinstance(value, int) and value >= 2**63):
        return value
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return np.array(value, dtype=_h5py().string_dtype("utf-8"))
    return json.dumps(value, separators=(",", ":"), default=_jsonable)


def _bytes_attr(text: str) -> np.bytes_:
    """Fixed-length ASCII, as PyTables writes its own attributes."""
    return np.bytes_(text.encode())


@dataclass
class TableInfo:
    source: str
    rows: int = 0
    first_seq: int = -1
    last_seq: int = -1


class RunFileWriter:
    """One HDF5 file: tables made on first use (or up front), rows appended, flushed, and the
    end metadata written as attributes at close. Synchronous; one thread at a time."""

    def __init__(
        self,
        path: Path,
        options: Options,
        attrs: dict[str, Any],
        *,
        swmr: bool,
        readout_paths: Iterable[tuple[str, str]] = (),
        generic_paths: Iterable[tuple[str, str]] = (),
    ) -> None:
        h5py = _h5py()
        self.path = path
        self.options = options
        self._filters = options.filters()
        self._generic_dtype = generic_dtype(options.tags_format)
        self.swmr = swmr
        self.tables: dict[str, TableInfo] = {}
        self._datasets: dict[str, Any] = {}  # open handles of the tables written to
        self._attrs = attrs
        readouts, generics = list(readout_paths), list(generic_paths)
        # 'w' on a name create_exclusive reserved for us: nothing else is ever truncated
        self.file = h5py.File(path, "w", libver=("v110", "v110"))
        try:
            root = self.file.attrs
            root["CLASS"] = _bytes_attr("GROUP")
            root["PYTABLES_FORMAT_VERSION"] = _bytes_attr("2.1")
            root["TITLE"] = _bytes_attr("daqd run file")  # SSDAQ's with a readout table
            root["VERSION"] = _bytes_attr("1.0")
            root["daqd_layout"] = LAYOUT_VERSION
            root["daqd_version"] = __version__
            for k, v in attrs.items():
                if v is not None:
                    root[k] = attr_value(v)
            for path_, source in readouts:
                self._create(path_, source, readout=True)
            for path_, source in generics:
                self._create(path_, source, readout=False)
            self.file.flush()
            if swmr:
                self.file.swmr_mode = True
        except BaseException:
            self.file.close()
            raise

    # ----- tables ---------------------------------------------------------------------------
    def _group(self, name: str, title: str) -> Any:
        g = self.file.get(name)
        if g is None:
            g = self.file.create_group(name)
            g.attrs["CLASS"] = _bytes_attr("GROUP")
            g.attrs["TITLE"] = _bytes_attr(title)
            g.attrs["VERSION"] = _bytes_attr("1.0")
        return g

    def _create(self, path: str, source: str, readout: bool) -> None:
        if path in self.tables:
            return
        group, name = path.rsplit("/", 1)
        if readout:
            self.file.attrs["TITLE"] = _bytes_attr(SSDAQ_TITLE)
            g = self._group(group, "Slow signal data")
            chunk = self.options.rows_per_chunk(READOUT_DTYPE.itemsize)
            d = g.create_dataset(
                name, (0,), READOUT_DTYPE, maxshape=(None,), chunks=(chunk,), **self._filters
            )
            a = d.attrs
            a["CLASS"] = _bytes_attr("TABLE")
            a["VERSION"] = _bytes_attr("2.7")
            a["TITLE"] = _bytes_attr("Slow signal readout")
            for i, fname in enumerate(READOUT_DTYPE.names or ()):
                a[f"FIELD_{i}_NAME"] = _bytes_attr(fname)
                a[f"FIELD_{i}_FILL"] = np.zeros((), READOUT_DTYPE[fname].base)
            a["NROWS"] = np.int64(0)
            a["ss_data_version"] = np.int64(0)
            a["ssdaq_version"] = _bytes_attr(f"daqd-{__version__}")
            a["ssl2asic_ch"] = SSL2ASIC_CH
        else:
            g = self._group(group, "daqd records by source")
            chunk = self.options.rows_per_chunk(self._generic_dtype.itemsize)
            d = g.create_dataset(
                name,
                (0,),
                self._generic_dtype,
                maxshape=(None,),
                chunks=(chunk,),
                **self._filters,
            )
            d.attrs["source"] = source
            d.attrs["tags_format"] = self.options.tags_format
            d.attrs["payload"] = "the record's payload blocks, joined"
            for k, v in self._attrs.items():
                if v is not None:
                    d.attrs[k] = attr_value(v)
        self.tables[path] = TableInfo(source)

    def _ensure(self, wanted: dict[str, tuple[str, bool]]) -> None:
        """Create the tables in `wanted` (path -> (source, readout)) that do not exist yet.
        Objects cannot be created in SWMR mode: the file is closed and opened once more for
        that (a reader following the file opens it again to see the new table)."""
        missing = {p: w for p, w in wanted.items() if p not in self.tables}
        if not missing:
            return
        if self.swmr:
            self._flush_datasets()
            self._datasets.clear()
            self.file.close()
            self.file = _reopen(self.path)
        for path, (source, readout) in missing.items():
            self._create(path, source, readout)
        self.file.flush()
        if self.swmr:
            self.file.swmr_mode = True

    # ----- rows -----------------------------------------------------------------------------
    def write(self, batch: Batch) -> None:
        """Append the batch's rows and flush: when this returns, they are in the file.

        Raises OSError(ENOSPC) without touching the file when the file system has less room
        than the rows need (uncompressed) plus a reserve for closing the file: HDF5 loses rows
        silently, or worse, when it meets a full disk while writing chunks."""
        self._room(2 * batch.nbytes + 256 * batch.records)
        wanted = {p: (batch.sources[p], True) for p in batch.readouts}
        wanted.update({p: (batch.sources[p], False) for p in batch.generic})
        self._ensure(wanted)
        for path, rows in batch.readouts.items():
            self._append(path, _readout_array(rows))
        for path, grows in batch.generic.items():
            self._append(path, _generic_array(grows, self._generic_dtype))
        # each dataset explicitly: its chunk cache would otherwise be written when the handle
        # closes, where an error cannot be reported
        self._flush_datasets()
        self.file.flush()
        for path, (first, last) in batch.seqs.items():
            info = self.tables[path]
            if info.first_seq < 0:
                info.first_seq = first
            info.last_seq = last
        for path, rows in batch.readouts.items():
            self.tables[path].rows += len(rows)
        for path, grows in batch.generic.items():
            self.tables[path].rows += len(grows)

    def _room(self, need: int) -> None:
        st = os.statvfs(self.path.parent)
        free = st.f_bavail * st.f_frsize
        want = need + ROOM_RESERVE + 2 * self.options.chunk_kib * 1024 * max(1, len(self.tables))
        if free < want:
            raise OSError(
                errno.ENOSPC,
                f"No space left on device ({free} bytes free, {want} needed to write and close)",
                str(self.path),
            )

    def _flush_datasets(self) -> None:
        for d in self._datasets.values():
            d.flush()

    def _append(self, path: str, rows: np.ndarray) -> None:
        d = self._datasets.get(path)
        if d is None:
            d = self._datasets[path] = self.file[path]
        n = d.shape[0]
        d.resize((n + len(rows),))
        d[n:] = rows

    def size(self) -> int:
        return int(self.file.id.get_filesize())

    def content(self) -> dict[str, dict[str, Any]]:
        return {
            p: {
                "source": t.source,
                "rows": t.rows,
                "first_seq": t.first_seq,
                "last_seq": t.last_seq,
            }
            for p, t in self.tables.items()
        }

    # ----- the end --------------------------------------------------------------------------
    def close(self, attrs: dict[str, Any] | None = None) -> None:
        """Flush and close; then write `attrs` (the run's end) and this file's content as
        attributes, with the file opened once more outside SWMR mode (attributes are metadata
        that SWMR mode may not change)."""
        try:
            self._flush_datasets()
            self.file.flush()
        finally:
            self._datasets.clear()
            self.file.close()
        if attrs is not None:
            self.annotate(attrs)

    def annotate(self, attrs: dict[str, Any]) -> None:
        """Write `attrs` and this file's content as attributes of the closed file."""
        with _reopen(self.path) as f:
            end = {**attrs, "content": self.content()}
            for k, v in end.items():
                if v is not None:
                    f.attrs[k] = attr_value(v)
            for path, info in self.tables.items():
                d = f[path]
                if path.startswith("/SlowSignal/"):
                    d.attrs["NROWS"] = np.int64(info.rows)
                else:
                    for k, v in end.items():
                        if v is not None and k != "content":
                            d.attrs[k] = attr_value(v)

    def abandon(self) -> None:
        """Close after a failure, keeping what was flushed; errors are not raised again."""
        self._datasets.clear()
        try:
            self.file.close()
        except Exception:
            pass


def _reopen(path: Path) -> Any:
    """Open a closed file of ours for writing outside SWMR mode (to add tables or attributes)."""
    h5py = _h5py()
    try:
        return h5py.File(path, "r+", libver=("v110", "v110"))
    except OSError as exc:
        if "lock" not in str(exc):
            raise
        # a reader follows the file (SWMR readers hold a lock on it): every row is flushed, and
        # what is added goes beside them
        return h5py.File(path, "r+", libver=("v110", "v110"), locking=False)
