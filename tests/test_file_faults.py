"""The file publisher when the disk fails, and `daqd dump` on files that are not whole.

Through real daemons: a full disk (a small tmpfs) cuts the file back to its last whole record,
counts what did not make it as dropped "write_error", and when space returns the records go on in
a new part whose header names the gap; a read-only directory refuses the run; a file removed
mid-run goes on in a new part. Through the real `daqd dump`: every kind of damage is named and
exits 1, a whole file exits 0.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import msgpack
import pytest

from daqd.record import Record
from daqd.runfile import RunFileReader, read_items, verify

from .conftest import DAQD, Daemon, wait_until

MakeDaemon = Callable[..., Daemon]

CONFIG = """
[daemon]
name = "t"
drain_timeout_s = 20

[[receiver]]
type = "udp"
name = "raw"
listen = "127.0.0.1:0"
publish_to = ["disk"]

[[publisher]]
type = "file"
name = "disk"
directory = "{directory}"
live = false
"""


@contextmanager
def tmpfs(path: Path, size: str = "2m", options: str = "") -> Iterator[Path]:
    """A small tmpfs mounted at `path` (skips the test where mounting is not permitted)."""
    path.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755{options}", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip() or r.returncode}")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def udp_address(d: Daemon) -> tuple[str, int]:
    host, port = d.status()["receivers"]["raw"]["addresses"]["listen"].rsplit(":", 1)
    return host, int(port)


class Sender:
    """Sends numbered datagrams in chunks, each chunk waited for until the publisher has
    accounted for every record of it (delivered or dropped): no kernel drops, no sleeps."""

    def __init__(self, d: Daemon, size: int = 1000) -> None:
        self.d = d
        self.address = udp_address(d)
        self.size = size
        self.sent = 0
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)

    def send(self, n: int) -> dict[str, Any]:
        pad = b"x" * (self.size - 8)
        for _ in range(n):
            self.sock.sendto(self.sent.to_bytes(8, "big") + pad, self.address)
            self.sent += 1

        def settled() -> dict[str, Any] | None:
            st = self.d.status()
            pub = st["publishers"]["disk"]
            received = st["receivers"]["raw"]["records"]
            done = received == self.sent and pub["records"] + sum(pub["drops"].values()) == received
            return st if done else None

        st: dict[str, Any] = wait_until(settled, 60, f"{self.sent} records accounted for")
        return st

    def close(self) -> None:
        self.sock.close()


def dump(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [DAQD, "dump", *map(str, args)], capture_output=True, text=True, timeout=60
    )


def file_records(path: Path) -> tuple[list[Record], dict[str, Any], dict[str, Any] | None]:
    """A file's records (up to its last whole one), header, and end marker (None if absent)."""
    records: list[Record] = []
    header: dict[str, Any] = {}
    end = None
    reader = RunFileReader(path)
    try:
        for item in reader:
            if isinstance(item, Record):
                records.append(item)
            elif not header:
                header = item
            else:
                end = item["end"]
    except EOFError:
        pass
    return records, header, end


def test_full_disk_cuts_to_whole_records_counts_drops_and_goes_on_in_a_new_part(
    daemon: MakeDaemon, workdir: Path
) -> None:
    with tmpfs(workdir / "disk") as disk:
        data = disk / "data"
        data.mkdir()
        filler = disk / "filler"
        filler.write_bytes(b"\0" * (1536 << 10))  # 0.5 MiB left for the run file
        d = daemon(CONFIG.format(directory=data))
        sender = Sender(d)
        try:
            out = d.ctl("start", "full1")
            assert out.returncode == 0, out.stderr

            # fill the disk: writes fail, records are counted as dropped "write_error"
            st: dict[str, Any] = {}
            for _ in range(40):
                st = sender.send(100)
                if st["publishers"]["disk"]["drops"].get("write_error", 0) >= 200:
                    break
            pub = st["publishers"]["disk"]
            assert pub["drops"].get("write_error", 0) >= 200, pub
            assert pub["errors"].get("write", 0) >= 1, pub
            assert set(pub["drops"]) == {"write_error"}, pub
            path = data / "run-full1.daqd"
            assert f"writing {path} failed (ENOSPC: No space left on device)" in d.log()

            # space returns: the next batches land in a new part
            filler.unlink()
            before = pub["records"]
            st = sender.send(300)
            assert st["publishers"]["disk"]["records"] >= before + 300
            parts = sorted(data.glob("run-full1.p*.daqd"))
            assert parts, sorted(os.listdir(data))

            out = d.ctl("stop")
            assert out.returncode == 0, out.stderr
            assert "DEGRADED" in out.stdout and "INCOMPLETE" in out.stdout, out.stdout
            assert "write_error" in out.stdout, out.stdout
            final = d.status()
        finally:
            sender.close()
            d.stop()

        received = final["receivers"]["raw"]["records"]
        pub = final["publishers"]["disk"]
        dropped = pub["drops"]["write_error"]
        assert received == sender.sent
        parts = list(data.glob("run-full1.p*.daqd"))
        files = [data / "run-full1.daqd", *sorted(parts, key=lambda p: int(p.stem[11:]))]
        assert sorted(os.listdir(data)) == sorted(f.name for f in files)

        # every file is readable up to its last whole record; together with the drops they
        # hold every record received, each once, in order
        seqs: list[int] = []
        contents = [file_records(f) for f in files]
        for records, header, _end in contents:
            assert header["daqd"] == "runfile" and header["run_id"] == "full1"
            seqs.extend(r.seq for r in records)
        assert seqs == sorted(set(seqs)) and set(seqs) <= set(range(1, received + 1))
        assert len(seqs) + dropped == received == pub["records"] + dropped

        # no silent gap: each later part's header names how many were dropped before it
        assert "dropped_before" not in contents[0][1]
        done: list[int] = list(r.seq for r in contents[0][0])
        for records, header, _ in contents[1:]:
            after = done[-1] if done else 0
            first = records[0].seq if records else received + 1
            assert header["dropped_before"] == {"write_error": first - after - 1}, header
            assert header["previous_ended"].startswith("write failed: ENOSPC"), header
            done.extend(r.seq for r in records)

        # the last part has the end marker, and it agrees with the content
        last_records, _, end = contents[-1]
        assert end is not None
        assert "DEGRADED" in end["condition"]
        assert end["file"]["drops"] == {"write_error": dropped}
        assert end["file"]["content"] == {
            "raw": {
                "count": len(last_records),
                "first_seq": last_records[0].seq,
                "last_seq": last_records[-1].seq,
            }
        }
        assert end["accounting"]["publishers"]["disk"]["drops"] == {"write_error": dropped}
        # ... and lists the parts before it, with what each holds
        before = end["file"]["previous_parts"]
        assert [p["file"] for p in before] == [f.name for f in files[:-1]]
        for p, (records, _, _) in zip(before, contents, strict=False):
            if records:
                assert p["content"] == {
                    "raw": {
                        "count": len(records),
                        "first_seq": records[0].seq,
                        "last_seq": records[-1].seq,
                    }
                }
            assert p["ended"].startswith("write failed: ENOSPC")
        ok = dump("--verify", files[-1])
        assert ok.returncode == 0, ok.stdout
        assert ok.stdout.rstrip().endswith("OK")
        assert f"part before: {files[0].name} {{'raw': {len(contents[0][0])}}}" in ok.stdout

        # the first part ended on the error: no end marker, but whole up to its last record
        first = verify(files[0])
        assert first.whole_bytes == first.size
        assert [p.split(":")[0] for p in first.problems] == ["no end marker"]
        bad = dump("--verify", files[0])
        assert bad.returncode == 1
        assert "problem: no end marker" in bad.stdout
        assert f"{files[1].name} goes on after" in bad.stdout
        plain = dump(files[0])
        assert plain.returncode == 1
        assert "no end marker" in plain.stderr
        assert len(plain.stdout.splitlines()) == 1 + len(contents[0][0])


def fill(path: Path) -> None:
    """Write `path` until the file system is full."""
    with open(path, "wb", buffering=0) as f:
        block = b"\0" * 4096
        try:
            while f.write(block):
                pass
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc


def test_full_disk_at_the_end_of_the_run_leaves_the_file_whole_without_end_marker(
    daemon: MakeDaemon, workdir: Path
) -> None:
    with tmpfs(workdir / "disk") as disk:
        data = disk / "data"
        data.mkdir()
        (disk / "filler").write_bytes(b"\0" * (1792 << 10))
        d = daemon(CONFIG.format(directory=data))
        sender = Sender(d)
        try:
            assert d.ctl("start", "full2").returncode == 0
            for _ in range(40):
                st = sender.send(100)
                if st["publishers"]["disk"]["drops"].get("write_error"):
                    break
            fill(disk / "filler2")  # what cutting back freed is taken too: no room at all
            out = d.ctl("stop")
            assert out.returncode == 0 and "DEGRADED" in out.stdout, out.stdout
            final = d.status()
        finally:
            sender.close()
            d.stop()
        pub = final["publishers"]["disk"]
        assert pub["errors"]["end_marker"] == 1, pub
        assert "no end marker written for run-full2" in d.log()
        # the part that would have held the end marker is not left behind empty
        assert sorted(os.listdir(data)) == ["run-full2.daqd"]
        records, _, end = file_records(data / "run-full2.daqd")
        assert end is None
        assert len(records) + pub["drops"]["write_error"] == sender.sent
        assert [r.seq for r in records] == list(range(1, len(records) + 1))
        r = dump("--verify", data / "run-full2.daqd")
        assert r.returncode == 1
        problems = [line.strip() for line in r.stdout.splitlines() if "problem:" in line]
        assert len(problems) == 1 and problems[0].startswith("problem: no end marker"), r.stdout


def test_no_room_for_the_end_marker_at_the_end_of_the_run_marks_it_degraded(
    daemon: MakeDaemon, workdir: Path
) -> None:
    """Every record written, then the disk fills: the run cannot be GOOD, since its file may not
    get its end marker; the room is checked (reserved) before the run's condition is decided."""
    with tmpfs(workdir / "disk") as disk:
        data = disk / "data"
        data.mkdir()
        d = daemon(CONFIG.format(directory=data))
        sender = Sender(d)
        try:
            assert d.ctl("start", "room1").returncode == 0
            st = sender.send(50)
            assert st["publishers"]["disk"]["drops"] == {}
            fill(disk / "filler")
            out = d.ctl("stop")
            assert out.returncode == 0, out.stderr
            assert "DEGRADED" in out.stdout and "(end_marker_room)" in out.stdout, out.stdout
            final = d.status()["publishers"]["disk"]
        finally:
            sender.close()
            d.stop()
        assert final["drops"] == {} and final["records"] == 50
        assert final["errors"]["end_marker_room"] == 1
        assert "no room for the end marker of" in d.log()
        s = verify(data / "run-room1.daqd")
        assert s.records == {"raw": 50} and s.whole_bytes == s.size
        if s.end is None:  # the last page had no room for it either
            assert [p.split(":")[0] for p in s.problems] == ["no end marker"]
            assert final["errors"]["end_marker"] == 1
        else:  # it fitted in what was left of the last page
            assert s.ok and "DEGRADED" in s.end["condition"]


def test_read_only_directory_refuses_the_run_with_the_reason(
    daemon: MakeDaemon, workdir: Path
) -> None:
    with tmpfs(workdir / "ro") as ro:
        r = subprocess.run(["mount", "-o", "remount,ro", str(ro)], capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot remount the tmpfs read-only: {r.stderr.strip()}")
        d = daemon(CONFIG.format(directory=ro))
        try:
            out = d.ctl("start", "ro1")
            assert out.returncode != 0, out.stdout
            assert "Traceback" not in out.stderr
            assert f"cannot create a run file in {ro}" in out.stderr
            assert "EROFS: Read-only file system" in out.stderr
            st = d.status()
            assert st["state"] == "ORBIT"
            assert st["publishers"]["disk"]["errors"].get("begin_run") == 1
            assert d.proc is not None and d.proc.poll() is None
        finally:
            d.stop()
        assert os.listdir(ro) == []


def test_run_file_removed_mid_run_goes_on_in_a_new_part(daemon: MakeDaemon, workdir: Path) -> None:
    data = workdir / "data"
    d = daemon(CONFIG.format(directory=data))
    sender = Sender(d, size=64)
    try:
        assert d.ctl("start", "rm1").returncode == 0
        sender.send(50)
        (data / "run-rm1.daqd").unlink()
        sender.send(70)
        out = d.ctl("stop")
        assert out.returncode == 0 and "DEGRADED" in out.stdout, out.stdout
        assert "file_removed" in out.stdout
        st = d.status()
        # removed just before the end: the end marker goes to a new part, and describes that part
        assert d.ctl("start", "rm2").returncode == 0
        sender.send(30)
        (data / "run-rm2.daqd").unlink()
        assert d.ctl("stop").returncode == 0
    finally:
        sender.close()
        d.stop()
    assert st["publishers"]["disk"]["errors"]["file_removed"] == 1
    assert sorted(os.listdir(data)) == ["run-rm1.p2.daqd", "run-rm2.p2.daqd"]
    records, header, end = file_records(data / "run-rm1.p2.daqd")
    assert [r.seq for r in records] == list(range(51, 121))
    assert header["part"] == 2 and header["previous_part"] == "run-rm1.daqd"
    assert "removed" in header["previous_ended"]
    assert end is not None and end["file"]["content"]["raw"]["count"] == 70
    assert end["file"]["part"] == 2
    assert dump("--verify", data / "run-rm1.p2.daqd").returncode == 0
    records, header, end = file_records(data / "run-rm2.p2.daqd")
    assert records == [] and header["previous_part"] == "run-rm2.daqd"
    assert end is not None and end["file"]["part"] == 2 and end["file"]["content"] == {}
    assert dump("--verify", data / "run-rm2.p2.daqd").returncode == 0


# ----- `daqd dump` on damaged files -----------------------------------------------------------
@pytest.fixture(scope="module")
def good_file(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A whole run file of 50 records written by a real daemon."""
    import tempfile

    work = Path(tempfile.mkdtemp(prefix="daqd-t"))
    runtime = work / "run"
    runtime.mkdir(mode=0o700)
    d = Daemon(work, runtime, CONFIG.format(directory=work / "data"), "t").start()
    sender = Sender(d, size=32)
    try:
        assert d.ctl("start", "g1").returncode == 0
        sender.send(50)
        assert d.ctl("stop").returncode == 0
    finally:
        sender.close()
        d.stop()
    path = work / "data" / "run-g1.daqd"
    keep = tmp_path_factory.mktemp("dump") / path.name
    keep.write_bytes(path.read_bytes())
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    yield keep


def items_with_offsets(path: Path) -> list[tuple[int, int, Any]]:
    """(start, end, object) of every msgpack item of a file."""
    data = path.read_bytes()
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
    unpacker.feed(data)
    out = []
    start = 0
    for obj in unpacker:
        out.append((start, unpacker.tell(), obj))
        start = unpacker.tell()
    return out


def pack(obj: Any) -> bytes:
    packed: bytes = msgpack.packb(obj, use_bin_type=True)
    return packed


def with_end(items: list[tuple[int, int, Any]], change: Callable[[dict[str, Any]], None]) -> bytes:
    """The file's bytes with its end marker changed by `change`."""
    end = json.loads(json.dumps(items[-1][2]))
    change(end["end"])
    return b"".join(pack(obj) for _, _, obj in items[:-1]) + pack(end)


def test_dump_verify_passes_a_whole_file(good_file: Path) -> None:
    r = dump("--verify", good_file)
    assert r.returncode == 0, r.stdout
    assert "raw: 50 records, seq 1..50, 0 gaps" in r.stdout
    assert "ends: end marker" in r.stdout
    assert r.stdout.rstrip().endswith(": OK")
    plain = dump(good_file)
    assert plain.returncode == 0, plain.stderr
    assert len(plain.stdout.splitlines()) == 52  # header, 50 records, end marker


def test_dump_names_a_gap(good_file: Path, tmp_path: Path) -> None:
    items = items_with_offsets(good_file)
    del items[10]  # the record of seq 10

    def fix(end: dict[str, Any]) -> None:
        end["file"]["content"]["raw"]["count"] = 49

    bad = tmp_path / "gap.daqd"
    bad.write_bytes(with_end(items, fix))
    r = dump("--verify", bad)
    assert r.returncode == 1
    assert "gap: after 9 comes 11" in r.stdout
    problems = [line for line in r.stdout.splitlines() if "problem:" in line]
    assert (
        len(problems) == 1 and "problem: gap in seq: raw: 1 gaps, 1 records missing" in problems[0]
    )


def test_dump_names_a_cut_tail_and_reads_up_to_the_last_whole_record(
    good_file: Path, tmp_path: Path
) -> None:
    items = items_with_offsets(good_file)
    start, end, obj = items[30]  # the record of seq 30
    assert obj[1] == 30
    bad = tmp_path / "cut.daqd"
    bad.write_bytes(good_file.read_bytes()[: start + (end - start) // 2])
    r = dump("--verify", bad)
    assert r.returncode == 1
    assert f"problem: cut tail: the file ends inside an item at byte {start}" in r.stdout
    assert "raw: 29 records, seq 1..29" in r.stdout
    assert "problem: no end marker" in r.stdout
    plain = dump(bad)
    assert plain.returncode == 1
    assert f"cut inside an item at byte {start}" in plain.stderr
    assert "29 records" in plain.stderr
    assert plain.stdout.splitlines()[-1].startswith("raw 29 ")


def test_dump_names_a_missing_end_marker(good_file: Path, tmp_path: Path) -> None:
    items = items_with_offsets(good_file)
    bad = tmp_path / "noend.daqd"
    bad.write_bytes(good_file.read_bytes()[: items[-1][0]])
    r = dump("--verify", bad)
    assert r.returncode == 1
    problems = [line for line in r.stdout.splitlines() if "problem:" in line]
    assert len(problems) == 1 and "problem: no end marker" in problems[0]
    plain = dump(bad)
    assert plain.returncode == 1
    assert "no end marker" in plain.stderr and f"at byte {items[-1][0]}" in plain.stderr
    assert len(plain.stdout.splitlines()) == 51


def test_dump_names_a_missing_header_and_a_file_that_is_no_run_file(
    good_file: Path, tmp_path: Path
) -> None:
    items = items_with_offsets(good_file)
    headless = tmp_path / "headless.daqd"
    headless.write_bytes(good_file.read_bytes()[items[0][1] :])
    text = tmp_path / "notes.txt"
    text.write_text("these are notes, not records\n")
    for bad in (headless, text):
        r = dump("--verify", bad)
        assert r.returncode == 1
        assert "problem: no header: " in r.stdout and "not a daqd run file" in r.stdout
        plain = dump(bad)
        assert plain.returncode == 1
        assert plain.stderr == f"daqd: {bad}: not a daqd run file\n"
        assert "5-element" not in plain.stderr


def test_dump_names_an_end_marker_that_disagrees_with_the_content(
    good_file: Path, tmp_path: Path
) -> None:
    items = items_with_offsets(good_file)

    def more(end: dict[str, Any]) -> None:
        end["file"]["content"]["raw"]["count"] = 51

    def later(end: dict[str, Any]) -> None:
        end["file"]["content"]["raw"]["last_seq"] = 60

    def other(end: dict[str, Any]) -> None:
        end["file"]["content"]["ghost"] = {"count": 3, "first_seq": 1, "last_seq": 3}

    for change, expected in (
        (more, "problem: count mismatch: raw: the end marker says 51 records, found 50"),
        (later, "problem: seq range mismatch: raw: the end marker says seq 1..60, found 1..50"),
        (other, "problem: count mismatch: ghost: the end marker says 3 records, found 0"),
    ):
        bad = tmp_path / f"{change.__name__}.daqd"
        bad.write_bytes(with_end(items, change))
        r = dump("--verify", bad)
        assert r.returncode == 1, r.stdout
        problems = [line.strip() for line in r.stdout.splitlines() if "problem:" in line]
        assert problems == [expected], r.stdout


def test_reader_yields_every_whole_record_of_a_cut_file(good_file: Path, tmp_path: Path) -> None:
    items = items_with_offsets(good_file)
    bad = tmp_path / "cut.daqd"
    bad.write_bytes(good_file.read_bytes()[: items[5][1] + 3])
    got = []
    with pytest.raises(EOFError, match=f"cut inside an item at byte {items[5][1]}"):
        for item in read_items(bad):
            got.append(item)
    assert [r.seq for r in got if isinstance(r, Record)] == [1, 2, 3, 4, 5]
