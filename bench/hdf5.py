"""Benchmark: slow-signal readouts/s written by the `hdf5` publisher vs a bare h5py append loop.

The same readouts (32 x 64 counts, pedestals plus noise, as the slowsignal receiver publishes
them) go, in the same run, (a) through daqd's publisher queue into the `hdf5` publisher, until it
counts them delivered (written and flushed), and (b) into a bare loop that converts them to
SSDAQ's rows and appends 1024 at a time to an h5py table with the same chunks and filters,
flushing after each append. Prints readouts/s of each and their ratio (goal >= 0.8), CPU per
readout, and bytes per readout on disk for each compression, SSDAQ's (bzip2 9, shuffle,
fletcher32) included.

    .venv/bin/python bench/hdf5.py [--readouts 4096] [--compression gzip none bzip2]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from _common import cpu_s
from daqd.publishers.hdf5 import Hdf5Publisher, Hdf5Settings

from daqd.hdf5 import READOUT_DTYPE, Options
from daqd.protocols.slowsignal import MV_PER_COUNT
from daqd.publisher import PublisherQueue
from daqd.record import Record
from daqd.runstate import RunInfo

LEVELS = {"none": 0, "gzip": 1, "bzip2": 9, "blosc-zstd": 5, "zstd": 3}


class _Host:
    """What a publisher and its queue look at on the host."""

    taps_active = False
    receivers: dict[str, Any] = {}


def make_counts(n: int) -> np.ndarray:
    rng = np.random.default_rng(7)
    pedestal = rng.normal(2000, 200, (32, 64))
    drift = np.sin(np.arange(n) / 50.0)[:, None, None] * 3
    noise = rng.normal(0, 4, (n, 32, 64))
    return np.rint(pedestal + drift + noise).clip(0, 65535).astype(np.uint16)


def records(counts: np.ndarray) -> list[Record]:
    out = []
    t0 = time.time_ns()
    for k, c in enumerate(counts):
        tags = {
            "tack": 10**12 + k * 10**8,
            "readout": k + 1,
            "modules_present": 0xFFFFFFFF,
            "complete": True,
            "cpu_time_ns": t0 + k * 10**8,
            "dtype": "<u2",
            "unit": "counts",
            "shape": [32, 64],
        }
        out.append(Record("ss", k + 1, t0 + k * 10**8, tags, [c.tobytes()]))
    return out


async def publisher_run(recs: list[Record], directory: Path, compression: str) -> float:
    """Seconds until the publisher has counted every readout delivered."""
    settings = Hdf5Settings(
        type="hdf5",
        name="h5",
        directory=str(directory),
        compression=compression,  # type: ignore[arg-type]
        complevel=LEVELS[compression],
        queue_size=len(recs) + 1,
        flush_records=1024,  # as the bare loop: 1024 rows per append and flush
    )
    pub = Hdf5Publisher(settings, _Host())  # type: ignore[arg-type]
    await pub.start()
    queue = PublisherQueue(pub)
    queue.start()
    run = RunInfo("bench", time.time_ns())
    queue.put_marker("begin", run)
    t = time.perf_counter()
    for i in range(0, len(recs), 1024):
        queue.put_many(recs[i : i + 1024])
        await asyncio.sleep(0)
    while pub.counters.records < len(recs):
        await asyncio.sleep(0.001)
    elapsed = time.perf_counter() - t
    assert not pub.counters.drops, pub.counters.drops
    end = queue.put_marker("end", run)
    end.ledger.add_done_callback(lambda _f: end.decided.set())
    await end.done
    await pub.close()
    return elapsed


def bare_run(recs: list[Record], path: Path, compression: str) -> float:
    """Seconds for the same rows through a plain h5py loop: convert, append, flush."""
    options = Options(compression=compression, complevel=LEVELS[compression])  # type: ignore[arg-type]
    t = time.perf_counter()
    with h5py.File(path, "w", libver=("v110", "v110")) as f:
        chunk = options.rows_per_chunk(READOUT_DTYPE.itemsize)
        d = f.create_dataset(
            "readout", (0,), READOUT_DTYPE, maxshape=(None,), chunks=(chunk,), **options.filters()
        )
        f.swmr_mode = True
        for i in range(0, len(recs), 1024):
            part = recs[i : i + 1024]
            rows = np.empty(len(part), READOUT_DTYPE)
            cpu = np.array([r.tags["cpu_time_ns"] for r in part], np.uint64)
            s, ns = np.divmod(cpu, np.uint64(10**9))
            rows["cpu_t"], rows["cpu_t_s"], rows["cpu_t_ns"] = s + ns * 1e-9, s, ns
            c = np.frombuffer(b"".join(r.payload[0] for r in part), "<u2")
            rows["data"] = (c * MV_PER_COUNT).astype(np.float32).reshape(-1, 32, 64)
            rows["iro"] = [r.tags["readout"] for r in part]
            rows["time"] = [r.tags["tack"] for r in part]
            n = d.shape[0]
            d.resize((n + len(rows),))
            d[n:] = rows
            d.flush()
            f.flush()
    return time.perf_counter() - t


def ssdaq_size(counts: np.ndarray, path: Path) -> int:
    """Bytes of a file written with SSDAQ's settings: bzip2 9, shuffle, fletcher32, 15-row
    chunks (what PyTables picks for this row), flushed every 1000 rows."""
    with h5py.File(path, "w") as f:
        import hdf5plugin

        d = f.create_dataset(
            "readout",
            (0,),
            READOUT_DTYPE,
            maxshape=(None,),
            chunks=(15,),
            shuffle=True,
            fletcher32=True,
            **hdf5plugin.BZip2(blocksize=9),
        )
        for i in range(0, len(counts), 1000):
            c = counts[i : i + 1000]
            rows = np.zeros(len(c), READOUT_DTYPE)
            rows["data"] = (c * MV_PER_COUNT).astype(np.float32)
            rows["iro"] = np.arange(i + 1, i + 1 + len(c))
            n = d.shape[0]
            d.resize((n + len(rows),))
            d[n:] = rows
            f.flush()
    return path.stat().st_size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--readouts", type=int, default=4096, help="a multiple of 1024")
    ap.add_argument("--compression", nargs="+", default=["gzip", "none", "bzip2"])
    args = ap.parse_args()
    counts = make_counts(args.readouts)
    recs = records(counts)
    raw = READOUT_DTYPE.itemsize
    work = Path(tempfile.mkdtemp(prefix="bench-hdf5-"))
    try:
        print(f"{args.readouts} readouts of {raw} bytes (SSDAQ's row); {os.cpu_count()} CPUs")
        print(
            f"{'compression':<12} {'publisher/s':>12} {'bare loop/s':>12} {'ratio':>6} "
            f"{'pub CPU us':>10} {'B/readout':>10}"
        )
        for comp in args.compression:
            d = work / comp
            d.mkdir()
            c0 = cpu_s()
            t_pub = asyncio.run(publisher_run(recs, d, comp))
            cpu_pub = cpu_s() - c0
            size = (d / "run-bench.h5").stat().st_size
            t_bare = bare_run(recs, work / f"bare-{comp}.h5", comp)
            rate_pub, rate_bare = args.readouts / t_pub, args.readouts / t_bare
            print(
                f"{comp + '-' + str(LEVELS[comp]):<12} {rate_pub:>12.0f} {rate_bare:>12.0f} "
                f"{rate_pub / rate_bare:>6.2f} {cpu_pub / args.readouts * 1e6:>10.0f} "
                f"{size / args.readouts:>10.0f}"
            )
        size = ssdaq_size(counts, work / "ssdaq.h5")
        print(f"SSDAQ's settings (bzip2 9, shuffle, fletcher32, 15-row chunks): "
              f"{size / args.readouts:.0f} B/readout")  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
