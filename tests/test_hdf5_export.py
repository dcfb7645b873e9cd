"""`daqd export RUNFILE --to hdf5 OUT` on run files made here: every kind of slow-signal payload,
generic records with bytes in their tags and payloads of several blocks, msgpack tags, a progress
bar, and a run file cut in the middle of a record."""

from __future__ import annotations

import base64
import json
import subprocess
from pathlib import Path
from typing import Any

import h5py
import msgpack
import numpy as np

from daqd.protocols.slowsignal import MV_PER_COUNT, encode_ssdaq_frame
from daqd.record import Record

from .conftest import DAQD

N = 600  # readouts: about 2.5 MiB of run file, so that the progress bar moves


def counts(k: int) -> np.ndarray:
    rng = np.random.default_rng(k)
    return rng.integers(0, 65536, (32, 64), dtype=np.uint16)


def readout(k: int) -> Record:
    """Readout k as the slowsignal receiver publishes it: counts, mV float32, or SSDAQ frames."""
    c = counts(k)
    present = 0xFFFF if k % 2 else 0xFFFFFFFF  # odd readouts lack modules 16-31
    tags: dict[str, Any] = {
        "tack": 10**12 + k * 10**8,
        "readout": k + 1,
        "modules_present": present,
        "complete": True,
        "cpu_time_ns": 1_700_000_000_123_456_789 + k,
    }
    mv = c * MV_PER_COUNT
    if k % 2:
        mv[16:] = np.nan
    if k % 3 == 0:
        tags.update(dtype="<u2", unit="counts", shape=[32, 64])
        payload = c.astype("<u2").tobytes()
    elif k % 3 == 1:
        tags.update(dtype="<f4", unit="mV", shape=[32, 64])
        payload = mv.astype("<f4").tobytes()
    else:
        s, ns = divmod(tags["cpu_time_ns"], 10**9)
        payload = encode_ssdaq_frame(k + 1, tags["tack"], s, ns, mv)
        tags["format"] = "ssdaq"
    return Record("ss", k + 1, tags["cpu_time_ns"], tags, [payload])


def generic(i: int) -> Record:
    return Record(
        "raw",
        i + 1,
        1_700_000_000_000_000_000 + i,
        {"peer": "127.0.0.1:9", "blob": b"\x00\xff" * i, "n": i},
        [b"head%d|" % i, bytes(range(i % 200))],
    )


def odd(i: int) -> Record:
    """Looks like a readout but its payload has the wrong size; tags with a bytes key."""
    tags = {"tack": 5, "readout": 1, "cpu_time_ns": 1, "dtype": "<u2", b"k": 1}
    return Record("ss", 10_000 + i, 7, tags, [b"short"])


def write_runfile(path: Path) -> list[Record]:
    records: list[Record] = []
    for k in range(N):
        records.append(readout(k))
        if k % 20 == 0:
            records.append(generic(k // 20))
    records.append(odd(0))
    header = {"daqd": "runfile", "version": 2, "kind": "run", "part": 1, "run_id": "x1"}
    header.update(time_start=1, time_end=None, condition="GOOD", condition_code=0)
    end = {"run_id": "x1", "time_start": 1, "time_end": 2, "condition": "TAINTED"}
    end.update(condition_code=1, reasons=["receiver ss: 1 errors (malformed) -> TAINTED"])
    with open(path, "wb") as f:
        f.write(msgpack.packb(header, use_bin_type=True))
        for r in records:
            f.write(r.pack())
        f.write(msgpack.packb({"end": {**end, "file": {"part": 1}}}, use_bin_type=True))
    return records


def export(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [DAQD, "export", *args], capture_output=True, text=True, timeout=120, check=False
    )


def check(out: Path, records: list[Record], tags_format: str = "json") -> None:
    odds = [r for r in records if r.seq >= 10_000]
    readouts = [r for r in records if r.source == "ss" and r.seq < 10_000]
    generics = [r for r in records if r.source == "raw"]
    with h5py.File(out, "r") as f:
        t = f["SlowSignal/readout"][:]
        assert len(t) == len(readouts)
        for row, r in zip(t, readouts, strict=True):
            k = r.seq - 1
            want = (counts(k) * MV_PER_COUNT).astype(np.float32)
            if k % 2:
                want[16:] = np.nan
            if k % 3 == 1:  # the receiver's own float32 mV: stored as they came
                want = np.frombuffer(r.payload[0], "<f4").reshape(32, 64)
            np.testing.assert_array_equal(row["data"], want)
            assert row["iro"] == k + 1 and row["time"] == r.tags["tack"]
            assert row["cpu_t_s"] * 10**9 + row["cpu_t_ns"] == r.tags["cpu_time_ns"]
        g = f["records/raw"]
        assert len(g) == len(generics)
        for row, r in zip(g[:], generics, strict=True):
            assert row["seq"] == r.seq and row["time_ns"] == r.time_ns
            assert bytes(row["payload"]) == b"".join(r.payload)
            if tags_format == "json":
                tags = json.loads(row["tags"])
                assert tags["blob"] == {"$bytes": base64.b64encode(r.tags["blob"]).decode()}
                assert tags["n"] == r.tags["n"] and tags["peer"] == r.tags["peer"]
            else:
                assert msgpack.unpackb(bytes(row["tags"]), raw=False) == r.tags
        assert g.attrs["tags_format"] == tags_format
        if odds:  # not a readout: kept whole in the source's generic table
            o = f["records/ss"][:]
            assert len(o) == 1 and bytes(o[0]["payload"]) == b"short" and o[0]["seq"] == 10_000
            if tags_format == "json":
                packed = base64.b64decode(json.loads(o[0]["tags"])["$msgpack"])
            else:
                packed = bytes(o[0]["tags"])
            assert msgpack.unpackb(packed, raw=False, strict_map_key=False) == odds[0].tags


def test_export_converts_every_readout_payload_and_generic_records(tmp_path: Path) -> None:
    src = tmp_path / "run-x1.daqd"
    records = write_runfile(src)
    out = tmp_path / "x1.h5"
    r = export(str(src), "--to", "hdf5", str(out), "--progress")
    assert r.returncode == 0, r.stderr
    assert f"exporting {src}" in r.stderr  # the bar (on a terminal it draws itself)
    assert f"wrote {out}: {len(records)} records" in r.stdout
    check(out, records)
    with h5py.File(out, "r") as f:
        assert f.attrs["run_id"] == "x1" and f.attrs["condition"] == "TAINTED"
        assert list(f.attrs["reasons"]) == ["receiver ss: 1 errors (malformed) -> TAINTED"]
        assert f.attrs["exported_from"] == src.name
        assert "export_note" not in f.attrs
    out2 = tmp_path / "x1-msgpack.h5"
    r = export(str(src), "--to", "hdf5", str(out2), "--tags-format", "msgpack", "--no-progress")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    check(out2, records, "msgpack")


def test_export_of_a_cut_run_file_keeps_every_whole_record_and_says_so(tmp_path: Path) -> None:
    src = tmp_path / "run-x1.daqd"
    records = write_runfile(src)
    data = src.read_bytes()
    cut = len(data) - 1000  # the end marker and the last record or two go
    src.write_bytes(data[:cut])
    unpacker = msgpack.Unpacker(raw=False)
    unpacker.feed(data[:cut])
    next(unpacker)  # the header
    whole = unpacker.tell()
    kept = []
    for r in records:
        if whole + len(r.pack()) > cut:
            break
        whole += len(r.pack())
        kept.append(r)
    assert 0 < len(kept) < len(records)
    out = tmp_path / "cut.h5"
    r = export(str(src), "--to", "hdf5", str(out), "--no-progress")
    assert r.returncode == 1
    assert f"the run file is cut: converted up to byte {whole} of {cut}" in r.stderr, r.stderr
    check(out, kept)
    with h5py.File(out, "r") as f:
        assert f.attrs["export_note"].startswith("the run file is cut")
        assert "condition" not in f.attrs  # the end marker went with the cut


def test_export_refuses_what_is_not_a_run_file(tmp_path: Path) -> None:
    src = tmp_path / "junk.daqd"
    src.write_bytes(b"\x93hello")
    out = tmp_path / "junk.h5"
    r = export(str(src), "--to", "hdf5", str(out))
    assert r.returncode == 1 and "not a daqd run file" in r.stderr
    assert not out.exists()
