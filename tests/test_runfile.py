"""The file publisher's write path on its own: a batch of large records is written in chunks, and a
disk that fills in the middle of one keeps every whole record before the failure, no more."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest
from daqd.publishers.file import CHUNK_BYTES, FilePublisher, FileSettings
from hypothesis import given, settings
from hypothesis import strategies as st

from daqd.record import Record
from daqd.runfile import read_items, verify
from daqd.runstate import RunInfo

from .test_file_faults import fill, tmpfs


def publisher(directory: Path) -> FilePublisher:
    settings = FileSettings(type="file", name="disk", directory=str(directory), live=False)
    return FilePublisher(settings, host=None)  # type: ignore[arg-type]  # send() needs no host


def items(path: Path) -> tuple[list[Record], list[dict[str, Any]]]:
    records: list[Record] = []
    maps: list[dict[str, Any]] = []
    for item in read_items(path):
        (records if isinstance(item, Record) else maps).append(item)  # type: ignore[arg-type]
    return records, maps


async def test_a_disk_full_in_the_second_chunk_keeps_the_whole_records_before_it(
    tmp_path: Path,
) -> None:
    block = b"r" * (1 << 20)
    per_chunk = CHUNK_BYTES // (len(block) + 64)  # records of 1 MiB in one chunk
    with tmpfs(tmp_path / "disk", size="6m") as disk:
        pub = publisher(disk)
        await pub.start()
        run = RunInfo("big1", time.time_ns())
        await pub.begin_run(run)
        batch = [Record("cam", i, time.time_ns(), {}, [block]) for i in range(1, 9)]
        await pub.send(batch)
        # 6 MiB hold the first chunk and some of the second; each record is whole or absent
        written = pub.counters.drops.get("write_error", 0)
        kept = len(batch) - written
        assert per_chunk < kept < len(batch), (per_chunk, kept)
        assert pub.counters.errors == {"write": 1}
        path = disk / "run-big1.daqd"
        s = verify(path)
        assert s.records == {"cam": kept} and s.whole_bytes == s.size
        assert [p.split(":")[0] for p in s.problems] == ["no end marker"]

        # still full: the next batch goes to a part 2 that cannot be written, and is not kept
        fill(disk / "filler")
        await pub.send([Record("cam", 9, time.time_ns(), {}, [b"small"])])
        assert pub.counters.drops["write_error"] == written + 1
        (disk / "filler").unlink()
        await pub.send([Record("cam", 10, time.time_ns(), {}, [b"small"])])
        await pub.end_run(run)
        await pub.close()
        records, maps = items(disk / "run-big1.p2.daqd")
        assert [r.seq for r in records] == [10]
        header, end = maps[0], maps[-1]["end"]
        assert header["part"] == 2 and header["previous_part"] == "run-big1.daqd"
        assert header["dropped_before"] == {"write_error": written + 1}
        assert end["file"]["content"] == {"cam": {"count": 1, "first_seq": 10, "last_seq": 10}}
        assert end["file"]["drops"] == {"write_error": written + 1}
        assert sorted(p.name for p in disk.iterdir()) == ["run-big1.daqd", "run-big1.p2.daqd"]


async def test_begin_run_on_a_full_disk_raises_and_leaves_no_file(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "disk", size="1m") as disk:
        pub = publisher(disk / "data")
        await pub.start()
        fill(disk / "filler")
        with pytest.raises(Exception, match=r"cannot write the run file .*run-f1\.daqd: ENOSPC"):
            await pub.begin_run(RunInfo("f1", time.time_ns()))
        assert list((disk / "data").iterdir()) == []
        await pub.end_run(RunInfo("f1", time.time_ns()))  # the host ends a refused run: no-op
        await pub.close()
        assert list((disk / "data").iterdir()) == []


async def write_run_file(directory: Path, n: int = 12) -> Path:
    """A whole run file of `n` records from two sources, written by the publisher."""
    pub = publisher(directory)
    await pub.start()
    run = RunInfo("cut1", time.time_ns())
    await pub.begin_run(run)
    seq = {"a": 0, "b": 0}
    for i in range(1, n + 1):
        source = "a" if i % 3 else "b"
        seq[source] += 1
        await pub.send([Record(source, seq[source], i, {"i": i}, [b"p" * i])])
    await pub.end_run(run)
    await pub.close()
    return directory / "run-cut1.daqd"


async def test_a_file_cut_at_any_byte_reads_up_to_its_last_whole_item(tmp_path: Path) -> None:
    path = await write_run_file(tmp_path)
    data = path.read_bytes()
    unpacker = msgpack.Unpacker(raw=False)
    unpacker.feed(data)
    bounds = [0]
    for _ in unpacker:
        bounds.append(unpacker.tell())
    assert bounds[-1] == len(data) and len(bounds) == 12 + 3  # header, 12 records, end marker
    whole = verify(path)
    assert whole.ok and whole.records == {"a": 8, "b": 4} and whole.ending == "end marker"
    cut = tmp_path / "cut.daqd"
    for size in range(len(data)):
        cut.write_bytes(data[:size])
        s = verify(cut)
        last = max(b for b in bounds if b <= size)  # where the last whole item ends
        names = [p.split(":")[0] for p in s.problems]
        assert s.whole_bytes == last and s.size == size, size
        if last == 0:  # not even the header
            assert names == ["no header"], (size, s.problems)
            continue
        items = bounds.index(last)  # whole items: the header and items - 1 records
        assert sum(s.records.values()) == items - 1, size
        assert names == (["no end marker"] if size == last else ["cut tail", "no end marker"])
        assert s.end is None and s.header is not None and not s.gaps


@settings(deadline=None, max_examples=300)
@given(st.binary(max_size=300), st.integers(0, 3))
def test_any_bytes_give_a_summary_with_problems_never_an_exception(
    tmp_path_factory: pytest.TempPathFactory, junk: bytes, where: int
) -> None:
    """Garbage alone, or garbage spliced into a real file: verify names problems, and the
    records it counts are whole ones (each a well-formed Record)."""
    base = tmp_path_factory.getbasetemp() / "junk"
    base.mkdir(exist_ok=True)
    path = base / "junk.daqd"
    header = msgpack.packb({"daqd": "runfile", "version": 2, "kind": "run"})
    record = Record("a", 1, 1, {}, [b"x"]).pack()
    path.write_bytes([junk, header + junk, header + record + junk, header + junk + record][where])
    s = verify(path)
    assert s.problems or s.end is not None  # only an end map in the junk makes it whole
    assert s.whole_bytes <= s.size == path.stat().st_size


async def test_a_new_part_that_cannot_be_created_drops_and_retries(tmp_path: Path) -> None:
    # three inodes: the root, the run file, the filler; part 2 cannot be created until the
    # filler goes
    with tmpfs(tmp_path / "disk", size="1m", options=",nr_inodes=3") as disk:
        pub = publisher(disk)
        await pub.start()
        run = RunInfo("ino1", time.time_ns())
        await pub.begin_run(run)
        await pub.send([Record("cam", 1, 1, {}, [b"first"])])
        fill(disk / "filler")
        big = [Record("cam", i, i, {}, [b"b" * 4096]) for i in range(2, 5)]
        await pub.send(big)  # fails: part 1 ends at its last whole record
        dropped = pub.counters.drops["write_error"]
        assert dropped >= 1
        await pub.send([Record("cam", 5, 5, {}, [b"x"])])  # part 2 cannot even be created
        await pub.send([Record("cam", 6, 6, {}, [b"x"])])
        assert pub.counters.drops["write_error"] == dropped + 2
        assert sorted(p.name for p in disk.iterdir()) == ["filler", "run-ino1.daqd"]
        (disk / "filler").unlink()
        await pub.send([Record("cam", 7, 7, {}, [b"x"])])
        await pub.end_run(run)
        await pub.close()
        assert pub.counters.errors["write"] == 3
        records, maps = items(disk / "run-ino1.p2.daqd")
        assert [r.seq for r in records] == [7]
        assert maps[0]["dropped_before"] == {"write_error": dropped + 2}
        first, _ = items(disk / "run-ino1.daqd")  # whole up to its last record: no CutFile
        assert [r.seq for r in first] == list(range(1, 5 - dropped))
        problems = verify(disk / "run-ino1.daqd").problems
        assert [p.split(":")[0] for p in problems] == ["no end marker"]
        assert verify(disk / "run-ino1.p2.daqd").ok


@pytest.mark.parametrize("policy", ["never", "per_run", "interval"])
async def test_fsync_policy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, policy: str) -> None:
    """never: no fsync; per_run: the records at the end of the run (before the run's ledger is
    taken) and the file with its end marker; interval: also every fsync_interval_s."""
    synced: list[int] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.fstat(fd).st_size)
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    settings = FileSettings(
        type="file",
        name="disk",
        directory=str(tmp_path),
        live=False,
        fsync=policy,
        fsync_interval_s=0.05,
    )
    pub = FilePublisher(settings, host=None)  # type: ignore[arg-type]
    await pub.start()
    run = RunInfo("s1", time.time_ns())
    await pub.begin_run(run)
    deadline = time.monotonic() + 0.3
    seq = 0
    while time.monotonic() < deadline:
        seq += 1
        await pub.send([Record("a", seq, seq, {}, [b"x" * 100])])
        await asyncio.sleep(0.01)
    await pub.flush_run(run)
    records_end = (tmp_path / "run-s1.daqd").stat().st_size
    await pub.end_run(run)
    size = (tmp_path / "run-s1.daqd").stat().st_size
    if policy == "never":
        assert synced == []
    elif policy == "per_run":
        assert synced == [records_end, size]
    else:
        assert len(synced) >= 3 and synced[-2:] == [records_end, size]
        assert synced[:-2] == sorted(synced[:-2]) and synced[0] < records_end


async def test_live_file_on_a_full_disk_starts_when_room_returns_naming_the_drops(
    tmp_path: Path,
) -> None:
    with tmpfs(tmp_path / "disk", size="1m") as disk:
        settings = FileSettings(type="file", name="disk", directory=str(disk / "d"), live=True)
        pub = FilePublisher(settings, host=None)  # type: ignore[arg-type]
        await pub.start()
        fill(disk / "filler")
        await pub.send([Record("a", 1, 1, {}, [b"x"]), Record("a", 2, 2, {}, [b"y"])])
        assert pub.counters.drops == {"write_error": 2}
        (disk / "filler").unlink()
        await pub.send([Record("a", 3, 3, {}, [b"z"])])
        await pub.begin_run(RunInfo("after", time.time_ns()))  # ends the live file
        [live] = (disk / "d").glob("live-*.daqd")
        assert ".p" not in live.name  # the first part that got written is part 1
        records, maps = items(live)
        assert [r.seq for r in records] == [3]
        assert maps[0]["kind"] == "live" and maps[0]["dropped_before"] == {"write_error": 2}
        assert maps[-1]["end"]["file"]["drops"] == {"write_error": 2}
        assert verify(live).ok
        await pub.close()


async def test_room_for_the_end_marker_is_reserved_when_the_run_is_flushed(
    tmp_path: Path,
) -> None:
    """flush_run reserves room for the end marker: a disk that fills up after it still gets
    the end marker, and the file occupies no more than it holds afterwards."""
    with tmpfs(tmp_path / "disk", size="1m") as disk:
        pub = publisher(disk)
        await pub.start()
        run = RunInfo("res1", time.time_ns())
        await pub.begin_run(run)
        await pub.send([Record("a", i, i, {}, [b"x" * 100]) for i in range(1, 11)])
        # one more record that ends the file at a page boundary: the end marker needs a page
        path = disk / "run-res1.daqd"
        room = (path.stat().st_size // 4096 + 2) * 4096 - path.stat().st_size
        [pad] = [
            n
            for n in range(room - 64, room)
            if len(Record("a", 11, 11, {}, [b"p" * n]).pack()) == room
        ]
        await pub.send([Record("a", 11, 11, {}, [b"p" * pad])])
        assert path.stat().st_size % 4096 == 0
        await pub.flush_run(run)
        fill(disk / "filler")
        await pub.end_run(run)
        await pub.close()
        assert verify(path).ok
        assert pub.counters.errors == {}
        (disk / "filler").unlink()
        st = path.stat()
        assert st.st_blocks * 512 <= (st.st_size + 4095) // 4096 * 4096  # the rest given back
