"""The hdf5 publisher through a real daemon: TARGET-module datagrams and UDP records over real
sockets, `daqd serve` writing, the files read back with h5py (SWMR, during the run) and PyTables
(as SSDAQ's reader does), every column checked against what was sent and against the run file
that a file publisher wrote in the same daemon."""

from __future__ import annotations

import json
import socket
import subprocess
import time
import warnings
from pathlib import Path
from typing import Any

import h5py
import msgpack
import numpy as np
import pytest

from daqd.hdf5 import SSL2ASIC_CH
from daqd.protocols.slowsignal import MV_PER_COUNT
from daqd.sim.slowsignal import TargetModules

from .conftest import DAQD, Daemon, wait_until
from .test_file_faults import tmpfs

MODULES = 4
P = 10  # blocks (readouts) per datagram


def config(directory: Path, disk: bool = True, **hdf5: Any) -> str:
    hdf5 = {"flush_interval_s": 0.2, **hdf5}
    extra = "\n".join(f"{k} = {json.dumps(v)}" for k, v in hdf5.items())
    to = '["h5", "disk"]' if disk else '["h5"]'
    text = f"""
[daemon]
name = "h5t"
drain_timeout_s = 10

[[receiver]]
type = "slowsignal"
name = "ss"
listen = "127.0.0.1:0"
modules = {MODULES}
flush_after_s = 30.0
publish_to = {to}

[[receiver]]
type = "udp"
name = "raw"
listen = "127.0.0.1:0"
publish_to = {to}

[[publisher]]
type = "hdf5"
name = "h5"
directory = "{directory}"
{extra}

"""
    if disk:
        text += f"""
[[publisher]]
type = "file"
name = "disk"
directory = "{directory}"
fsync = "never"
live = false
"""
    return text


def address(d: Daemon, receiver: str) -> tuple[str, int]:
    host, port = d.status()["receivers"][receiver]["addresses"]["listen"].rsplit(":", 1)
    return host, int(port)


def delivered(d: Daemon, n: int, publisher: str = "h5") -> None:
    wait_until(
        lambda: d.status()["publishers"][publisher]["records"] >= n,
        60,
        f"{publisher} to deliver {n} records",
    )


def expected_mv(sim: TargetModules, k: int) -> np.ndarray:
    """What SSDAQ stores for readout k: mV computed in float64, stored float32, NaN for the
    modules that are not there."""
    want = np.full((32, 64), np.nan, np.float32)
    want[:MODULES] = (sim.counts(k)[0] * MV_PER_COUNT).astype(np.float32)
    return want


def run_file_records(directory: Path, run: str) -> list[list[Any]]:
    with open(directory / f"run-{run}.daqd", "rb") as f:
        items = list(msgpack.Unpacker(f, raw=False, strict_map_key=False))
    return [i for i in items[1:-1] if isinstance(i, list)]


def test_readouts_and_records_are_written_column_by_column_and_followed_live(
    daemon: Any, workdir: Path
) -> None:
    out = workdir / "out"
    d = daemon(config(out), name="h5t")
    ss, raw = address(d, "ss"), address(d, "raw")
    assert d.ctl("start", "r1").returncode == 0
    t0 = time.time_ns()
    sent_raw = [b"datagram %d " % i + bytes(range(i % 256)) for i in range(7)]
    with (
        TargetModules(ss, MODULES, P) as sim,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u,
    ):
        sim.run(MODULES * 3, 2000.0, None)  # 3 rounds: readouts 1..30
        for b in sent_raw[:3]:
            u.sendto(b, raw)
        delivered(d, 33)
        # the file is being written: a SWMR reader sees what was delivered, and follows
        path = out / "run-r1.h5"
        live = h5py.File(path, "r", swmr=True)
        table = live["SlowSignal/readout"]
        assert table.shape == (30,)
        assert list(table["iro"]) == list(range(1, 31))
        np.testing.assert_array_equal(table[29]["data"], expected_mv(sim, 29))
        assert live["records/raw"].shape == (3,)
        for r in range(3, 6):
            sim.send_round(r)
        for b in sent_raw[3:]:
            u.sendto(b, raw)
        delivered(d, 67)
        table.refresh()
        live["records/raw"].refresh()
        assert table.shape == (60,)
        assert list(table["time"][30:]) == [sim.tack(k) for k in range(30, 60)]
        assert live["records/raw"].shape == (7,)
        # the reader still follows when the run ends: the run's end is written all the same
        stop = d.ctl("stop")
        assert stop.returncode == 0, stop.stderr
        assert "run r1 ended: GOOD, 67 records" in stop.stdout, stop.stdout
        t1 = time.time_ns()
        table.refresh()
        assert table.shape == (60,) and table[59]["iro"] == 60
        live.close()

        # the run file of the same daemon has each record's tags: the HDF5 file must agree
        records = run_file_records(out, "r1")
        readouts = [r for r in records if r[0] == "ss"]
        raws = [r for r in records if r[0] == "raw"]
        assert len(readouts) == 60 and len(raws) == 7
        with h5py.File(path, "r") as f:
            t = f["SlowSignal/readout"][:]
            assert t.dtype == np.dtype(
                [
                    ("cpu_t", "<f8"),
                    ("cpu_t_ns", "<u8"),
                    ("cpu_t_s", "<u8"),
                    ("data", "<f4", (32, 64)),
                    ("iro", "<u8"),
                    ("time", "<u8"),
                ]
            )
            for k in range(60):
                row, tags = t[k], readouts[k][3]
                assert row["iro"] == k + 1 == tags["readout"]
                assert row["time"] == sim.tack(k) == tags["tack"]
                cpu = tags["cpu_time_ns"]
                assert t0 - 10**10 <= cpu <= t1
                assert (row["cpu_t_s"], row["cpu_t_ns"]) == divmod(cpu, 10**9)
                assert row["cpu_t"] == float(row["cpu_t_s"]) + row["cpu_t_ns"] * 1e-9
                np.testing.assert_array_equal(row["data"], expected_mv(sim, k))
            a = f["SlowSignal/readout"].attrs
            assert a["ss_data_version"] == 0
            np.testing.assert_array_equal(a["ssl2asic_ch"], SSL2ASIC_CH)
            assert a["ssl2asic_ch"].dtype == np.uint64
            assert a["NROWS"] == 60

            g = f["records/raw"]
            assert g.dtype.names == ("time_ns", "seq", "tags", "payload")
            for i, (row, rec) in enumerate(zip(g[:], raws, strict=True)):
                assert bytes(row["payload"]) == sent_raw[i] == rec[4][0]
                assert row["seq"] == rec[1] and row["time_ns"] == rec[2]
                assert json.loads(row["tags"]) == rec[3]
            assert g.attrs["source"] == "raw" and g.attrs["condition"] == "GOOD"

            root = f.attrs
            assert root["run_id"] == "r1" and root["condition"] == "GOOD"
            assert root["condition_code"] == 0 and root["part"] == 1
            accounting = json.loads(root["accounting"])
            assert accounting["publishers"]["h5"] == {
                "offered": 67,
                "delivered": 67,
                "drops": {},
                "errors": {},
            }
            content = json.loads(root["content"])
            assert content["/SlowSignal/readout"]["rows"] == 60
            assert content["/records/raw"] == {
                "source": "raw",
                "rows": 7,
                "first_seq": raws[0][1],
                "last_seq": raws[-1][1],
            }


def test_pytables_opens_the_file_as_ssdaqs_reader_does(daemon: Any, workdir: Path) -> None:
    """SSDAQ's SSDataReader: tables.open_file, the readout table's ss_data_version, iterrows,
    and data[:, ssl2asic_ch]. Here with SSDAQ's own compression (bzip2 9, fletcher32)."""
    tables = pytest.importorskip("tables")
    out = workdir / "out"
    d = daemon(config(out, compression="bzip2", complevel=9), name="h5t")
    with TargetModules(address(d, "ss"), MODULES, P) as sim:
        assert d.ctl("start", "r2").returncode == 0
        sim.run(MODULES * 2, 2000.0, None)
        delivered(d, 20)
        assert d.ctl("stop").returncode == 0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # /records/raw has no rows and is not a PyTables table
            f = tables.open_file(str(out / "run-r2.h5"), mode="r")
        try:
            assert f.title == "CHEC-S Slow signal monitor data"
            t = f.root.SlowSignal.readout
            assert isinstance(t, tables.Table)
            assert t.attrs.ss_data_version == 0
            assert "bzip2" in repr(t.filters) and t.filters.complevel == 9 and t.filters.fletcher32
            mapping = t.attrs.ssl2asic_ch
            assert t.nrows == 20
            for k, r in enumerate(t.iterrows()):
                want = expected_mv(sim, k)
                np.testing.assert_array_equal(r["data"][:, mapping], want[:, SSL2ASIC_CH])
                assert r["iro"] == k + 1 and r["time"] == sim.tack(k)
        finally:
            f.close()


def test_size_limit_starts_new_parts_that_hold_every_readout_once(
    daemon: Any, workdir: Path
) -> None:
    out = workdir / "out"
    d = daemon(config(out, max_file_mib=0.15, compression="none", flush_records=10), name="h5t")
    with TargetModules(address(d, "ss"), MODULES, P) as sim:
        assert d.ctl("start", "r3").returncode == 0
        for r in range(8):  # 80 readouts of 8 KiB: about 0.65 MiB, more than 4 parts
            sim.send_round(r)
            delivered(d, 10 * (r + 1))
        stop = d.ctl("stop")
        assert "run r3 ended: GOOD, 80 records" in stop.stdout, stop.stdout + d.log()
    parts = sorted(out.glob("run-r3*.h5"), key=lambda p: (len(p.name), p.name))
    assert [p.name for p in parts[:2]] == ["run-r3.h5", "run-r3.p2.h5"]
    assert len(parts) >= 4
    iro: list[int] = []
    for n, p in enumerate(parts, 1):
        with h5py.File(p, "r") as f:
            assert f.attrs["part"] == n
            if n > 1:
                assert f.attrs["previous_part"] == parts[n - 2].name
                assert f.attrs["previous_ended"] == "reached max_file_mib (0.15)"
                assert json.loads(f.attrs["dropped_before"]) == {}
            iro += list(f["SlowSignal/readout"]["iro"])
    assert iro == list(range(1, 81))
    with h5py.File(parts[-1], "r") as f:
        assert f.attrs["condition"] == "GOOD"
    with h5py.File(parts[0], "r") as f:
        assert f.attrs["ended"] == "reached max_file_mib (0.15)"


def test_export_converts_the_run_file_to_the_same_layout(daemon: Any, workdir: Path) -> None:
    out = workdir / "out"
    d = daemon(config(out), name="h5t")
    with (
        TargetModules(address(d, "ss"), MODULES, P) as sim,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u,
    ):
        assert d.ctl("start", "r4").returncode == 0
        sim.run(MODULES * 2, 2000.0, None)
        for i in range(5):
            u.sendto(b"x%d" % i, address(d, "raw"))
        delivered(d, 25)
        delivered(d, 25, "disk")
        assert d.ctl("stop").returncode == 0
    converted = workdir / "converted.h5"
    r = subprocess.run(
        [DAQD, "export", str(out / "run-r4.daqd"), "--to", "hdf5", str(converted)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert "25 records" in r.stdout
    with h5py.File(out / "run-r4.h5", "r") as live, h5py.File(converted, "r") as conv:
        for name in ("SlowSignal/readout", "records/raw"):
            a, b = live[name][:], conv[name][:]
            assert a.dtype == b.dtype and len(a) == len(b) > 0
            for field in a.dtype.names:
                if a.dtype[field].kind == "O":
                    assert [bytes(x) for x in a[field]] == [bytes(x) for x in b[field]]
                else:
                    np.testing.assert_array_equal(a[field], b[field])
        for k in ("run_id", "condition", "accounting", "time_start", "time_end"):
            assert live.attrs[k] == conv.attrs[k], k
        assert dict(conv["SlowSignal/readout"].attrs)["ss_data_version"] == 0
    # never over an existing file
    again = subprocess.run(
        [DAQD, "export", str(out / "run-r4.daqd"), "--to", "hdf5", str(converted)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert again.returncode != 0 and "exists" in again.stderr


def test_full_disk_counts_write_errors_and_leaves_valid_files_holding_what_was_delivered(
    daemon: Any, workdir: Path
) -> None:
    with tmpfs(workdir / "disk", size="2m") as disk:
        d = daemon(config(disk, disk=False, compression="none", flush_records=10), name="h5t")
        with TargetModules(address(d, "ss"), MODULES, P) as sim:
            assert d.ctl("start", "r5").returncode == 0
            r = 0

            def handled() -> int:
                p = d.status()["publishers"]["h5"]
                return int(p["records"] + sum(p["drops"].values()))

            while not d.status()["publishers"]["h5"]["drops"] and r < 40:
                sim.send_round(r)
                r += 1
                wait_until(lambda r=r: handled() >= 10 * r, 60, "the round to be handled")  # type: ignore[misc]
            pub = d.status()["publishers"]["h5"]
            assert pub["drops"].get("write_error", 0) > 0, pub
            assert pub["errors"].get("write", 0) >= 1, pub
            stop = d.ctl("stop")
            assert "run r5 ended: INCOMPLETE|DEGRADED" in stop.stdout, stop.stdout
            assert "(write_error)" in stop.stdout
        assert "No space left on device" in d.log() or "ENOSPC" in d.log()
        pub = d.status()["publishers"]["h5"]
        assert pub["records"] + pub["drops"]["write_error"] == 10 * r
        # every file opens, and together they hold exactly the readouts counted delivered
        iro: list[int] = []
        for path in sorted(disk.glob("run-r5*.h5")):
            with h5py.File(path, "r") as f:
                rows = f["SlowSignal/readout"][:]
                iro += [int(x) for x in rows["iro"]]
                for row in rows:
                    np.testing.assert_array_equal(
                        row["data"], expected_mv(sim, int(row["iro"]) - 1)
                    )
        assert len(iro) == len(set(iro)) == pub["records"] > 0
        assert iro == sorted(iro)
        with h5py.File(disk / "run-r5.h5", "r") as f:
            assert f.attrs["ended"].startswith("write failed: ENOSPC"), dict(f.attrs)
            assert f.attrs["condition"] == "INCOMPLETE|DEGRADED"  # no part could follow
            assert json.loads(f.attrs["content"])["/SlowSignal/readout"]["rows"] == len(iro)


def test_check_names_a_compression_level_out_of_range(workdir: Path) -> None:
    path = workdir / "bad.toml"
    path.write_text(config(workdir / "out", compression="gzip", complevel=12))
    r = subprocess.run([DAQD, "check", str(path)], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert (
        '[[publisher]] #1 (name "h5")' in r.stderr
        and "complevel of gzip must be 0 to 9" in r.stderr
    )


def test_sigterm_during_a_run_closes_the_file_with_every_readout_and_interrupted(
    daemon: Any, workdir: Path
) -> None:
    out = workdir / "out"
    d = daemon(config(out, disk=False, flush_interval_s=300.0), name="h5t")
    with TargetModules(address(d, "ss"), MODULES, P) as sim:
        assert d.ctl("start", "r6").returncode == 0
        sim.run(MODULES * 2, 2000.0, None)
        wait_until(lambda: d.status()["publishers"]["h5"]["offered"] >= 20, 60, "20 offered")
        assert d.status()["publishers"]["h5"]["records"] == 0  # held: no flush for 300 s
        assert d.stop() == 0
    assert "accounting: publisher h5: offered 20, delivered 20, dropped none" in d.log()
    with h5py.File(out / "run-r6.h5", "r") as f:
        assert "INTERRUPTED" in f.attrs["condition"]
        assert list(f["SlowSignal/readout"]["iro"]) == list(range(1, 21))


def test_read_only_directory_refuses_the_run_and_records_outside_runs_are_counted(
    daemon: Any, workdir: Path
) -> None:
    with tmpfs(workdir / "ro") as ro:
        d = daemon(config(ro, disk=False), name="h5t")
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                u.sendto(b"before any run", address(d, "raw"))
            wait_until(
                lambda: d.status()["publishers"]["h5"]["drops"].get("outside_run") == 1,
                60,
                "the record outside a run to be counted",
            )
            r = subprocess.run(["mount", "-o", "remount,ro", str(ro)], capture_output=True)
            if r.returncode != 0:
                pytest.skip("cannot remount the tmpfs read-only")
            out = d.ctl("start", "ro1")
            assert out.returncode != 0, out.stdout
            assert f"cannot create an HDF5 run file in {ro}" in out.stderr, out.stderr
            assert "EROFS: Read-only file system" in out.stderr and "Traceback" not in out.stderr
            st = d.status()
            assert st["state"] == "ORBIT" and st["publishers"]["h5"]["errors"]["begin_run"] == 1
        finally:
            d.stop()
        assert list(ro.iterdir()) == []
