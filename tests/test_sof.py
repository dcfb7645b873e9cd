"""SSDAQ's SOF files: the writer against bytes SSDAQ's own writer made, the reader's checks, and
`daqd export RUNFILE --to sof OUT` on a run file a daemon wrote from triggers, timestamps and log
records sent through real sockets; each SOF file is read back with daqd.sof and also walked by hand by the
spec's byte layout (header fields, bunch data, index, trailer)."""

from __future__ import annotations

import asyncio
import bz2
import socket
import struct
import subprocess
import zlib
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daqd.config import parse_config
from daqd.host import Host
from daqd.protocols.ssdaq_pb import LogData, encode_log_data, encode_trigger_message
from daqd.sim.timestamp import TimingBoard
from daqd.sim.trigger import TriggerSource
from daqd.sof import BZ2, LOG, NONE, TIMESTAMP, TRIGGER, SofError, SofWriter, read_sof

from .conftest import DAQD, wait_for
from .test_file_faults import tmpfs

# SSDAQ's RawObjectWriterV1 (sstcam/SSDAQ 7c70571, Python's bz2) writing the objects b"abc", b"",
# b"0123456789ab", b"zzzzz" with bunchsize=10 and the CHEC header extension (file version 1,
# data type 2, version "0.9.0"), at creation time 1796301617: uncompressed, then bz2.
SSDAQ_OBJECTS = [b"abc", b"", b"0123456789ab", b"zzzzz"]
SSDAQ_PLAIN = bytes.fromhex(
    "534f460000000000010000003163116b0000000000000a000100020005302e392e306162633031323334353637"
    "38396162c24124350000000032c9230603000000000000000c00000049000000000000002700000000000000"
    "4900000000000000000000000300000000007a7a7a7a7a53aba44d050000002f000000000000000d000000"
    "00000000780000000000000000000000010000000100"
)
SSDAQ_BZ2 = bytes.fromhex(
    "534f460000000000010000003163116b0000000001000a000100020005302e392e30425a683931415926535920"
    "2accbd00000589007fe0380020002200034201a0008acf13579a01278bb9229c28481015665e80c241243500"
    "00000032c9230603000000000000000c0000006c000000000000004a000000000000006c00000000000000"
    "00000000030000000000425a6839314159265359ad8f582500000240802000001020002100820b177245385090"
    "ad8f582553aba44d0500000051000000000000002f00000000000000bd0000000000000000000000010000000100"
)


def write(objects: list[bytes], **kw: Any) -> bytes:
    w = SofWriter(kw.pop("data_type", TRIGGER), kw.pop("created_s", 1), **kw)
    out = b"".join(w.add(o) for o in objects) + w.close()
    assert w.pos == len(out) and w.objects == len(objects)
    return out


@pytest.mark.parametrize("compress, golden", [(False, SSDAQ_PLAIN), (True, SSDAQ_BZ2)])
def test_the_writer_makes_the_bytes_ssdaqs_writer_made(compress: bool, golden: bytes) -> None:
    ours = write(
        SSDAQ_OBJECTS,
        data_type=TIMESTAMP,
        created_s=1796301617,
        compress=compress,
        bunch_bytes=10,
        software="0.9.0",
    )
    assert ours == golden
    f = read_sof(golden)
    assert f.objects == SSDAQ_OBJECTS and [b.count for b in f.bunches] == [3, 1]
    assert (f.data_type, f.software, f.created_s) == (TIMESTAMP, "0.9.0", 1796301617)
    assert f.compressor == (BZ2 if compress else NONE)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.binary(max_size=300), max_size=60),
    st.integers(1, 2000),
    st.booleans(),
)
def test_whatever_is_written_reads_back(objects: list[bytes], bunch: int, compress: bool) -> None:
    data = write(objects, bunch_bytes=bunch, compress=compress, complevel=1)
    f = read_sof(data)
    assert f.objects == objects and f.data_type == TRIGGER
    assert sum(b.count for b in f.bunches) == len(objects)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_damaged_files_raise_sof_error_only(data: st.DataObject) -> None:
    objects = [bytes([k]) * (k * 7 % 50) for k in range(30)]
    good = bytearray(write(objects, bunch_bytes=200, compress=data.draw(st.booleans())))
    cut = data.draw(st.integers(0, len(good)))
    where = data.draw(st.integers(0, len(good) - 1))
    bad = bytearray(good[:cut]) if data.draw(st.booleans()) else good
    if bad is good:
        bad[where] ^= data.draw(st.integers(1, 255))
    try:
        f = read_sof(bytes(bad))
    except SofError:
        return
    # what the checks cannot see (the creation time, the software's name, a cut right after a
    # bunch) never yields objects other than those written
    assert f.objects == objects[: len(f.objects)]
    if bad is good:
        assert f.objects == objects


def test_reader_errors_name_what_is_wrong() -> None:
    good = write([b"x" * 10, b"y"], bunch_bytes=5, compress=False)
    with pytest.raises(SofError, match="shorter than"):
        read_sof(good[:10])
    with pytest.raises(SofError, match="not a SOF file"):
        read_sof(b"XYZ" + good[3:])
    with pytest.raises(SofError, match="protocol 2"):
        read_sof(good[:8] + b"\x02" + good[9:])
    with pytest.raises(SofError, match="says it is at byte"):
        read_sof(good[:-3])
    crc_at = len(good) - 34 - 8 - 1  # a byte of the last object: its CRC32 no longer fits
    with pytest.raises(SofError, match="CRC32 mismatch"):
        read_sof(good[:crc_at] + b"z" + good[crc_at + 1 :])


# ----- the export -----------------------------------------------------------------------------
N_TRIGGERS = 800  # all four packet types: about 1.3 MB, more than one SOF bunch
N_BUNCHES = 10  # TriggerBunches of 3 TriggerMessages
N_LOGS = 12


def config_text(tmp_path: Path, board: str) -> str:
    return f"""
[daemon]
name = "softest"
drain_timeout_s = 10

[[receiver]]
type = "trigger"
name = "trig"
listen = "127.0.0.1:0"
publish_to = ["out"]

[[receiver]]
type = "timestamp"
name = "ts"
connect = "{board}"
format = "ssdaq"
publish_to = ["out"]

[[receiver]]
type = "log"
name = "logs"
listen = "127.0.0.1:0"
publish_to = ["out"]

[[receiver]]
type = "udp"
name = "raw"
listen = "127.0.0.1:0"
publish_to = ["out"]

[[publisher]]
type = "file"
name = "out"
directory = "{tmp_path}"
fsync = "never"
"""


def target(host: Host, name: str) -> tuple[str, int]:
    h, port = host.receivers[name].addresses["listen"].rsplit(":", 1)
    return h, int(port)


def by_hand(data: bytes) -> tuple[tuple[Any, ...], bytes, list[bytes]]:
    """The file header, the header extension and the objects, read by the spec's layout alone:
    trailers walked back from the end, each bunch's index and data just before its trailer."""
    head = struct.unpack_from("<4s4sIQ2H", data)
    first = 24 + head[5]
    bunches: list[tuple[int, list[bytes]]] = []
    at = len(data) - 34
    while True:
        prev, size, fileoff, crc, n, number = struct.unpack_from("<3Q2IH", data, at)
        assert (fileoff, crc) == (at, 0)
        start = at - size
        crcs = struct.unpack_from(f"<{n}I", data, at - 8 * n)
        lengths = struct.unpack_from(f"<{n}I", data, at - 4 * n)
        stored = data[start : at - 8 * n]
        raw = bz2.decompress(stored) if head[4] == 1 else stored
        assert sum(lengths) == len(raw)
        objects, k = [], 0
        for crc32, length in zip(crcs, lengths, strict=True):
            objects.append(raw[k : k + length])
            assert zlib.crc32(objects[-1]) == crc32
            k += length
        bunches.append((number, objects))
        if start == first:  # the first bunch counts its offset from the start of the file
            assert prev == at
            break
        assert at - prev + 34 == start  # the previous trailer ends where this bunch begins
        at -= prev
    bunches.reverse()
    assert [b[0] for b in bunches] == list(range(len(bunches)))
    return head, data[24:first], [o for _, objs in bunches for o in objs]


async def test_export_writes_a_sof_file_per_trigger_and_timestamp_source(tmp_path: Path) -> None:
    with TimingBoard("tcp://127.0.0.1:0", per_bunch=3) as board:
        host = Host(parse_config(config_text(tmp_path, board.endpoint), path="<test>"))
        await host.start()
        try:
            trig: Any = host.receivers["trig"]
            ts: Any = host.receivers["ts"]
            logs: Any = host.receivers["logs"]
            raw: Any = host.receivers["raw"]
            await host.begin_run("s1")
            with TriggerSource(target(host, "trig")) as sim:
                await asyncio.to_thread(sim.run, N_TRIGGERS, 4000.0)
                packets = [sim.packet(k) for k in range(N_TRIGGERS)]

            def send_bunches() -> None:
                assert board.wait_subscriber(30), "the timestamp receiver never subscribed"
                board.run(N_BUNCHES, 2000.0)

            await asyncio.to_thread(send_bunches)
            # log records in daqd's framing (a 4-byte big-endian length before each LogData)
            log_data = [
                encode_log_data(
                    LogData(1, 10 * (1 + k % 5), "cam", f"message {k}", 10**18 + k, 42, "x.py", k)
                )
                for k in range(N_LOGS)
            ]
            with socket.create_connection(target(host, "logs")) as c:
                c.sendall(b"".join(struct.pack(">I", len(m)) + m for m in log_data))
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                for k in range(5):
                    s.sendto(b"other %d" % k, target(host, "raw"))
            await wait_for(
                lambda: (
                    trig.counters.records == N_TRIGGERS
                    and ts.triggers == 3 * N_BUNCHES
                    and logs.counters.records == N_LOGS
                    and raw.counters.records == 5
                ),
                30.0,
                "every trigger, timestamp, log record and datagram",
            )
            await host.end_run()
        finally:
            await host.stop()
        messages = [
            encode_trigger_message(board.message(b, j)) for b in range(N_BUNCHES) for j in range(3)
        ]
    runfile = tmp_path / "run-s1.daqd"
    out = tmp_path / "sof"
    r = subprocess.run(
        [DAQD, "export", str(runfile), "--to", "sof", str(out)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert sorted(r.stdout.splitlines()) == [  # in the order each source's first record came
        f"wrote {out}/logs.sof: {N_LOGS} records of logs (log)",
        f"wrote {out}/trig.sof: {N_TRIGGERS} records of trig (trigger)",
        f"wrote {out}/ts.sof: {3 * N_BUNCHES} records of ts (timestamp)",
    ]
    assert r.stderr.splitlines() == [
        "skipped 5 records of source raw: not a trigger/timestamp/log stream (receiver type udp)"
    ]
    assert sorted(p.name for p in out.iterdir()) == ["logs.sof", "trig.sof", "ts.sof"]
    streams = (("trig", TRIGGER, packets), ("ts", TIMESTAMP, messages), ("logs", LOG, log_data))
    for name, data_type, sent in streams:
        data = (out / f"{name}.sof").read_bytes()
        f = read_sof(data)
        assert f.objects == sent
        assert (f.data_type, f.chec_file_version, f.compressor) == (data_type, 1, BZ2)
        head, ext, objects = by_hand(data)
        assert head[:3] == (b"SOF\x00", b"\x00" * 4, 1) and head[4] == 1
        assert head[3] == f.created_s and head[3] > 1_600_000_000
        assert struct.unpack_from("<2HB", ext) == (1, data_type, len(ext) - 5)
        assert ext[5:].startswith(b"daqd ")
        assert objects == sent
    assert len(read_sof((out / "trig.sof").read_bytes()).bunches) == 2  # > 1,000,000 bytes

    # uncompressed, into a directory that exists: the same objects, framed the same way
    r = subprocess.run(
        [DAQD, "export", str(runfile), "--to", "sof", str(out / "plain"), "--compression=none"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    data = (out / "plain" / "trig.sof").read_bytes()
    head, _, objects = by_hand(data)
    assert head[4] == 0 and objects == packets
    assert len(data) > sum(map(len, packets))  # stored as sent, plus header, index, trailers
    # never over a file
    r = subprocess.run(
        [DAQD, "export", str(runfile), "--to", "sof", str(out / "plain")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 1
    assert "trig.sof exists; export never writes over a file" in r.stderr
    assert sorted(p.name for p in (out / "plain").iterdir()) == ["logs.sof", "trig.sof", "ts.sof"]
    assert (out / "plain" / "trig.sof").read_bytes() == data


def handmade_runfile(path: Path, packets: list[bytes], header: dict[str, Any]) -> int:
    """A run file with the packets as records of source "t", no end marker; returns the offset
    where the last record begins."""
    items = [msgpack.packb({"daqd": "runfile", "version": 2, "kind": "run", **header})]
    for k, p in enumerate(packets):
        items.append(msgpack.packb(["t", k + 1, 10**18 + k, {"format": "ssdaq"}, [p]]))
    path.write_bytes(b"".join(items))
    return len(b"".join(items[:-1]))


def test_a_source_the_run_file_does_not_type_is_skipped_unless_named(tmp_path: Path) -> None:
    with TriggerSource(("127.0.0.1", 9)) as sim:
        packets = [sim.packet(k) for k in range(20)]
    runfile = tmp_path / "old.daqd"
    last = handmade_runfile(runfile, packets, {"run_id": "o1"})  # an older file: no types
    r = subprocess.run(
        [DAQD, "export", str(runfile), "--to", "sof", str(tmp_path / "a")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 1
    assert r.stderr.splitlines() == [
        "skipped 20 records of source t: not a trigger/timestamp/log stream (the run file does "
        "not say which receiver made it; name its type with --kind SOURCE=trigger|timestamp|log)",
        f"daqd: {runfile}: no trigger, timestamp or log records: no SOF file written",
    ]
    assert not (tmp_path / "a").exists()

    # named on the command line; the file is also cut inside its last record
    with open(runfile, "r+b") as f:
        f.truncate(last + 5)
    r = subprocess.run(
        [DAQD, "export", str(runfile), "--to", "sof", str(tmp_path / "b"), "--kind", "t=trigger"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 1
    assert r.stdout == f"wrote {tmp_path}/b/t.sof: 19 records of t (trigger)\n"
    assert f"the run file is cut: converted up to byte {last} of {last + 5}" in r.stderr
    assert read_sof((tmp_path / "b" / "t.sof").read_bytes()).objects == packets[:19]

    r = subprocess.run(
        [DAQD, "export", str(runfile), "--to", "sof", str(tmp_path / "c"), "--kind", "t=frame"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and "--kind t=frame: expected SOURCE=TYPE" in r.stderr


def test_a_file_that_is_not_a_run_file_is_refused_and_nothing_is_left(tmp_path: Path) -> None:
    bogus = tmp_path / "x.sof"
    bogus.write_bytes(write([b"a"], data_type=LOG))
    r = subprocess.run(
        [DAQD, "export", str(bogus), "--to", "sof", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 1
    assert r.stderr.startswith(f"daqd: {bogus}: not a daqd run file")
    assert not (tmp_path / "out").exists()


def test_a_full_disk_is_an_error_and_leaves_no_sof_file(tmp_path: Path) -> None:
    with TriggerSource(("127.0.0.1", 9), (2,)) as sim:
        packets = [sim.packet(k) for k in range(200)]  # 4189 bytes each: 838 kB, stored as sent
    runfile = tmp_path / "big.daqd"
    handmade_runfile(runfile, packets, {"run_id": "b1", "receiver_types": {"t": "trigger"}})
    with tmpfs(tmp_path / "disk", size="256k") as disk:
        r = subprocess.run(
            [DAQD, "export", str(runfile), "--to", "sof", str(disk / "out"), "--compression=none"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode == 1
        assert r.stderr == f"daqd: cannot write {disk}/out/t.sof: No space left on device\n"
        assert not (disk / "out").exists()
