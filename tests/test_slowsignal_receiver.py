"""The slow-signal receiver through real UDP from the TARGET-module simulator, in-process Host."""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import zmq
import zmq.asyncio

from daqd.config import parse_config
from daqd.errors import ConfigError
from daqd.host import Host
from daqd.protocols.slowsignal import encode_datagram
from daqd.sim.slowsignal import Faults, SendStats, TargetModules

from .conftest import DAQD, wait_for, wait_until

P = 10  # blocks per packet


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return f'"{v}"'
    if isinstance(v, dict):
        return "{" + ", ".join(f'"{k}" = {toml_value(x)}' for k, x in v.items()) + "}"
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return str(v)


def config_text(tmp_path: Path, publisher: str = "file", **receiver: Any) -> str:
    settings = {"modules": 4, "flush_after_s": 30.0, **receiver}
    lines = [
        "[daemon]",
        'name = "sstest"',
        "drain_timeout_s = 10",
        "[[receiver]]",
        'type = "slowsignal"',
        'name = "ss"',
        'listen = "127.0.0.1:0"',
        'publish_to = ["out"]',
        *(f"{k} = {toml_value(v)}" for k, v in settings.items()),
        "[[publisher]]",
        'name = "out"',
    ]
    if publisher == "file":
        lines += ['type = "file"', f'directory = "{tmp_path}"', 'fsync = "never"']
    else:
        lines += [
            'type = "zmq"',
            'endpoint = "tcp://127.0.0.1:0"',
            'framing = "payload"',
            'policy = "block"',
        ]
    return "\n".join(lines) + "\n"


class Rig:
    def __init__(self, host: Host, tmp_path: Path) -> None:
        self.host = host
        self.rec: Any = host.receivers["ss"]
        self.tmp_path = tmp_path
        h, port = self.rec.addresses["listen"].rsplit(":", 1)
        self.target = (h, int(port))

    def sim(self, modules: int = 4, **kw: Any) -> TargetModules:
        return TargetModules(self.target, modules, P, **kw)

    async def wait(self, what: str, cond: Callable[[], bool], timeout: float = 30.0) -> None:
        try:
            await wait_for(cond, timeout, what)
        except AssertionError as e:
            raise AssertionError(f"{e}: {self.rec.cmd_stats()}") from None

    async def send(self, sim: TargetModules, count: int, faults: Faults | None = None) -> SendStats:
        """Send in a thread at a modest rate, so the receiving loop keeps up in real time."""
        return await asyncio.to_thread(sim.run, count, 2000.0, faults)

    def records(self, kind: str = "run") -> list[list[Any]]:
        """Records of the newest run/live file, read with msgpack (not daqd's reader)."""
        files = sorted(self.tmp_path.glob(f"{kind}-*.daqd"))
        assert files, f"no {kind} file in {self.tmp_path}"
        with open(files[-1], "rb") as f:
            items = list(msgpack.Unpacker(f, raw=False, strict_map_key=False))
        assert items[0]["kind"] == kind and "end" in items[-1]
        return [i for i in items[1:-1] if i[0] == "ss"]


@pytest.fixture
async def rig_factory(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    hosts: list[Host] = []

    async def make(publisher: str = "file", **receiver: Any) -> Rig:
        host = Host(parse_config(config_text(tmp_path, publisher, **receiver), path="<test>"))
        await host.start()
        hosts.append(host)
        return Rig(host, tmp_path)

    yield make
    for host in hosts:
        await host.stop()


def counts_of(payload: bytes) -> np.ndarray:
    return np.frombuffer(payload, dtype="<u2").reshape(32, 64)


async def test_complete_readouts_are_bit_exact_and_the_run_file_holds_them_all(
    rig_factory: Callable[..., Any],
) -> None:
    rig = await rig_factory()
    await rig.host.begin_run("r1")
    t_start = time.time_ns()
    with rig.sim() as sim:
        await rig.send(sim, 4 * 6)  # 6 rounds x 4 modules = 60 readouts
        await rig.wait("60 complete readouts", lambda: rig.rec.complete == 60)
        await rig.host.end_run()
        await rig.host.stop()
        records = rig.records()
        assert len(records) == 60
        for n, (_source, seq, time_ns, tags, payload) in enumerate(records, 1):
            k = n - 1
            assert seq == n and tags["readout"] == n
            assert tags["tack"] == sim.tack(k)
            assert tags["modules_present"] == 0b1111 and tags["complete"] is True
            assert t_start - 1_000_000_000 <= tags["cpu_time_ns"] <= time.time_ns()
            assert time_ns == tags["cpu_time_ns"]
            assert all(s >= t_start for s in tags["second_ns"][:4])
            assert tags["second_ns"][4:] == [0] * 28
            got = counts_of(payload[0])
            np.testing.assert_array_equal(got[:4], sim.counts(k)[0])
            assert not got[4:].any()
    stats = rig.rec.cmd_stats()
    assert stats["readouts_incomplete"] == 0
    assert stats["modules"]["3"]["datagrams"] == 6 and stats["modules"]["3"]["blocks"] == 60
    assert rig.rec.counters.drops.get("kernel", 0) == 0


async def test_faults_are_counted_and_assembly_goes_on(rig_factory: Callable[..., Any]) -> None:
    rig = await rig_factory()
    with rig.sim() as sim:
        faults = Faults(duplicate=2, empty=1, short=1, unequal=True)
        sent = await rig.send(sim, 4 * 5, faults)
        assert sent.injected == {"duplicate": 2, "empty": 1, "short": 1}
        await rig.wait("50 complete readouts", lambda: rig.rec.complete == 50)
        # a sender that maps to no module (.150 -> 50) is counted per address and dropped
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as stray:
            stray.bind(("127.0.0.150", 0))
            stray.sendto(sim.round_datagrams(0)[0], rig.target)
            await rig.wait("unknown module", lambda: "unknown_module" in rig.rec.counters.errors)
        # the receiver still assembles after every fault
        for r in range(5, 8):
            sim.send_round(r)
        await rig.wait("80 complete readouts", lambda: rig.rec.complete == 80)
    c = rig.rec.counters
    # junk is refused input (errors: the run is TAINTED), not lost readouts (drops)
    assert c.errors["empty"] == 1 and c.errors["bad_size"] == 1
    assert c.errors["unknown_module"] == 1 and not c.drops
    assert c.errors["duplicate"] == 2 * P
    assert sum(rig.rec.per_module["duplicates"]) == 2 * P
    assert rig.rec.unknown_sources == {"127.0.0.150": 1}
    assert rig.rec.incomplete == 0 and rig.rec.state == "running"
    # odd modules sent every round as two datagrams (3 + 7 blocks); then 3 more rounds
    datagrams = rig.rec.per_module["datagrams"]
    assert sum(datagrams) == sent.datagrams - 2 + 3 * 4
    assert datagrams[1] >= 2 * 5 + 3 and datagrams[3] >= 2 * 5 + 3
    status = rig.host.status()["receivers"]["ss"]
    assert status["extra"]["readouts_complete"] == 80
    assert status["errors"]["empty"] == 1


async def test_relaxed_module_range_maps_out_of_range_senders(
    rig_factory: Callable[..., Any],
) -> None:
    rig = await rig_factory(modules=[0, 18], relaxed_module_range=True)
    with rig.sim(modules=1) as sim, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as far:
        far.bind(("127.0.0.150", 0))  # 150 % 100 = 50, 50 % 32 = 18
        far.sendto(sim.round_datagrams(0)[0], rig.target)
        sim.send_round(0)
        await rig.wait("10 complete readouts", lambda: rig.rec.complete == P)
    assert rig.rec.per_module["blocks"][18] == P


async def test_module_table_maps_addresses(rig_factory: Callable[..., Any]) -> None:
    rig = await rig_factory(modules=[7], module_from="table", module_table={"127.0.0.100": 7})
    with rig.sim(modules=2) as sim:
        sim.send_round(0)  # .100 is module 7; .101 is not in the table
        await rig.wait("complete readouts", lambda: rig.rec.complete == P)
        await rig.wait("unknown", lambda: rig.rec.counters.errors.get("unknown_module") == 1)
    assert rig.rec.unknown_sources == {"127.0.0.101": 1}


async def test_tail_of_a_stream_is_published_by_the_timeout(
    rig_factory: Callable[..., Any],
) -> None:
    rig = await rig_factory(flush_after_s=0.3)
    with rig.sim() as sim:
        await rig.send(sim, 4 * 2 + 3)  # the last round lacks module 3
        await rig.wait("20 complete", lambda: rig.rec.complete == 2 * P)
        await rig.wait("tail flushed", lambda: rig.rec.incomplete == P)
        await rig.host.stop()
    records = rig.records("live")
    assert len(records) == 3 * P
    tail = records[-P:]
    for i, (_s, _q, _t, tags, payload) in enumerate(tail):
        k = 2 * P + i
        assert tags["complete"] is False and tags["modules_present"] == 0b0111
        got = counts_of(payload[0])
        np.testing.assert_array_equal(got[:3], sim.counts(k)[0, :3])
        assert not got[3].any()
    assert rig.rec.per_module["missing"][:4] == [0, 0, 0, P]


async def test_mv_payload_is_float32_with_nan_for_missing_modules(
    rig_factory: Callable[..., Any],
) -> None:
    rig = await rig_factory(payload="mv", modules=[0, 1, 2, 3, 4], flush_after_s=0.2)
    with rig.sim() as sim:
        sim.send_round(0)  # modules 0-3 of the expected 0-4: published by the timeout
        await rig.wait("incomplete readouts", lambda: rig.rec.incomplete == P)
        await rig.host.stop()
    records = rig.records("live")
    assert len(records) == P
    for k, (*_, tags, payload) in enumerate(records):
        assert tags["unit"] == "mV" and tags["modules_present"] == 0b1111
        mv = np.frombuffer(payload[0], dtype="<f4").reshape(32, 64)
        want = (sim.counts(k)[0] * 0.0763).astype(np.float32)
        np.testing.assert_allclose(mv[:4], want, rtol=1e-6)
        assert np.isnan(mv[4:]).all()
    assert rig.rec.per_module["missing"][:5] == [0, 0, 0, 0, P]


async def test_late_blocks_after_a_timeout_flush(rig_factory: Callable[..., Any]) -> None:
    rig = await rig_factory(flush_after_s=0.3)
    with rig.sim() as sim:
        withheld = sim.round_datagrams(0)[3]
        sim.send_round(0, skip=frozenset({(0, 3)}))
        await rig.wait("incomplete round 0", lambda: rig.rec.incomplete == P)
        sim.send(3, withheld)
        await rig.wait("late blocks", lambda: rig.rec.counters.drops.get("late") == P)
        sim.send_round(1)
        await rig.wait("round 1 complete", lambda: rig.rec.complete == P)
    assert rig.rec.per_module["late"][3] == P and not rig.rec.pending


async def test_tack_progress_flushes_and_later_blocks_are_late(
    rig_factory: Callable[..., Any],
) -> None:
    # TACKs are 0.1 s apart: a 1.05 s buffer holds about one round of ten readouts
    rig = await rig_factory(buffer_ns=1_050_000_000, flush_after_s=60.0)
    with rig.sim() as sim:
        withheld = sim.round_datagrams(0)[1]
        sim.send_round(0, skip=frozenset({(0, 1)}))
        sim.send_round(1)
        sim.send_round(2)
        await rig.wait("round 0 flushed", lambda: rig.rec.incomplete == P)
        await rig.wait("rounds 1-2 complete", lambda: rig.rec.complete == 2 * P)
        sim.send(1, withheld)
        await rig.wait("late", lambda: rig.rec.counters.drops.get("late") == P)
        sim.send(1, sim.round_datagrams(2)[1])  # a repeat of a published complete readout
        await rig.wait("duplicates", lambda: rig.rec.counters.errors.get("duplicate") == P)


async def test_ssdaq_frames_read_back_by_an_independent_decoder(
    rig_factory: Callable[..., Any],
) -> None:
    rig = await rig_factory(publisher="zmq", format="ssdaq", flush_after_s=0.5)
    ctx = zmq.asyncio.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(rig.host.publishers["out"].addresses["endpoint"])
    try:
        with rig.sim(tack_start_ns=5_000_000_000) as primer:
            # a PUB drops what it sends before the subscription arrives: prime until one arrives
            r = 0
            while not await sub.poll(100):
                primer.send_round(r)
                r += 1
                assert r < 300, "subscription never arrived"
        while await sub.poll(500):
            await sub.recv()
        await rig.rec.call_command("reset_readout_count", [], {})
        before = time.time_ns()
        with rig.sim(tack_start_ns=10**15) as sim:
            sim.send_round(0)
            sim.send_round(1, skip=frozenset({(1, 2)}))  # module 2 missing: NaN, by timeout
            frames: list[bytes] = []
            while len(frames) < 2 * P:  # skip a late frame of the primer (earlier TACKs)
                frame = await asyncio.wait_for(sub.recv(), 30)
                if struct.unpack_from("<4Q", frame)[1] >= 10**15:
                    frames.append(frame)
        after = time.time_ns()
    finally:
        sub.close(0)
        ctx.term()
    for i, frame in enumerate(frames):
        assert len(frame) == 16416
        number, tack, cpu_s, cpu_ns = struct.unpack_from("<4Q", frame)
        mv = np.frombuffer(frame, dtype="<f8", offset=32).reshape(32, 64)
        assert number == i + 1
        assert tack == sim.tack(i)
        assert before - 2_000_000_000 <= cpu_s * 1_000_000_000 + cpu_ns <= after
        assert cpu_ns < 1_000_000_000
        sent = sim.counts(i)[0].astype(np.float64) * 0.03815 * 2.0
        present = [0, 1, 3] if i >= P else [0, 1, 2, 3]
        np.testing.assert_array_equal(mv[present], sent[present])
        assert np.isnan(mv[[m for m in range(32) if m not in present]]).all()


async def test_commands_pause_resume_reset_and_stats(rig_factory: Callable[..., Any]) -> None:
    rig = await rig_factory()
    rec = rig.rec
    with rig.sim() as sim:
        assert await rec.call_command("pause", [], {}) == {"paused": True}
        sim.send_round(0)
        await rig.wait("paused readouts counted", lambda: rec.counters.drops.get("paused") == P)
        assert rec.counters.records == 0
        assert await rec.call_command("resume", [], {}) == {"paused": False}
        sim.send_round(1)
        await rig.wait("published", lambda: rec.counters.records == P)
        assert await rec.call_command("reset_readout_count", [], {}) == {"next_readout": 1}
        sim.send_round(2)
        await rig.wait("published again", lambda: rec.counters.records == 2 * P)
        stats = await rec.call_command("stats", [], {})
        await rig.host.stop()
    assert stats["readouts_complete"] == 3 * P and stats["drops"]["paused"] == P
    assert stats["modules"]["0"] == {
        "datagrams": 3,
        "blocks": 3 * P,
        "missing": 0,
        "duplicates": 0,
        "late": 0,
    }
    numbers = [tags["readout"] for *_, tags, _p in rig.records("live")]
    assert numbers == [*range(1, P + 1), *range(1, P + 1)]


async def test_shutdown_publishes_what_is_pending(rig_factory: Callable[..., Any]) -> None:
    rig = await rig_factory()
    with rig.sim() as sim:
        sim.send_round(0, skip=frozenset({(0, 0)}))
        await rig.wait("blocks in", lambda: sum(rig.rec.per_module["blocks"]) == 3 * P)
    assert rig.rec.incomplete == 0
    await rig.host.begin_run("r2")
    await rig.host.stop()
    records = rig.records("live")  # pending before the run began: published before it
    assert [tags["modules_present"] for *_, tags, _p in records] == [0b1110] * P


@pytest.mark.parametrize(
    ("key", "value", "words"),
    [
        ("modules", 40, "modules"),
        ("modules", [1, 1], "distinct"),
        ("module_from", "table", "module_table"),
        ("format", "hdf5", "format"),
        ("tack_reset_ns", 5_000_000_000, "must exceed buffer_ns"),
    ],
)
def test_bad_settings_name_the_key(tmp_path: Path, key: str, value: Any, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        parse_config(config_text(tmp_path, **{key: value}), path="<test>")


def test_daemon_with_the_simulator_command_and_daqctl(
    daemon: Callable[..., Any], workdir: Path
) -> None:
    d = daemon(
        f"""
[daemon]
name = "sst"

[[receiver]]
type = "slowsignal"
name = "chec"
listen = "127.0.0.1:0"
publish_to = ["disk"]

[[publisher]]
type = "file"
name = "disk"
directory = "{workdir}/data"
""",
        name="sst",
    )
    listen = d.status()["receivers"]["chec"]["addresses"]["listen"]
    assert d.ctl("start", "r7").returncode == 0
    sim = subprocess.run(
        [DAQD, "sim", "slowsignal", "--target", listen, "--rate", "3000", "--modules", "32",
         "--count", "320", "--duplicate", "1", "--empty", "1", "--short", "1"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert sim.returncode == 0, sim.stderr
    assert "sent 323 datagrams (320 in stream" in sim.stderr
    wait_until(
        lambda: d.status()["receivers"]["chec"]["extra"]["readouts_complete"] == 100,
        what="100 complete readouts",
    )
    out = d.ctl("cmd", "chec", "stats", "--json")
    stats = json.loads(out.stdout)
    assert stats["readouts_complete"] == 100 and stats["readouts_incomplete"] == 0
    assert stats["errors"]["empty"] == 1 and stats["errors"]["bad_size"] == 1
    assert stats["errors"]["duplicate"] == P
    assert stats["modules"]["31"]["blocks"] == 10 * P
    assert "true" in d.ctl("cmd", "chec", "pause").stdout
    stopped = d.ctl("stop")
    assert stopped.returncode == 0 and "100 records" in stopped.stdout, stopped.stdout
    with open(workdir / "data" / "run-r7.daqd", "rb") as f:
        items = list(msgpack.Unpacker(f, raw=False, strict_map_key=False))
    numbers = [i[3]["readout"] for i in items[1:-1]]
    assert numbers == list(range(1, 101))
    assert items[-1]["end"]["run_id"] == "r7"


def test_example_config_is_ssdaq_s_default_deployment() -> None:
    path = Path(__file__).resolve().parent.parent / "examples" / "chec-slowsignal.toml"
    config = parse_config(path.read_text(), path=str(path))
    rec: Any = config.receivers[0]
    assert (rec.type, rec.listen, rec.format, rec.modules) == (
        "slowsignal",
        "0.0.0.0:17000",
        "ssdaq",
        32,
    )
    pubs: dict[str, Any] = {p.name: p for p in config.publishers}
    assert set(rec.publish_to) == set(pubs)
    zmq_pub = next(p for p in pubs.values() if p.type == "zmq")
    assert zmq_pub.endpoint == "tcp://127.0.0.101:9004" and zmq_pub.framing == "payload"
    assert any(p.type == "file" for p in pubs.values())


async def test_random_traffic_is_accounted_for_block_by_block(
    rig_factory: Callable[..., Any],
) -> None:
    """Random TACKs (repeats, near misses, jumps), bad sizes and garbage from 6 modules: every
    block ends up in exactly one published readout, or counted as a duplicate or late."""
    rig = await rig_factory(modules=6, buffer_ns=50_000, readout_window_ns=10, flush_after_s=0.2)
    rng = np.random.default_rng(7)
    base = 1 << 40
    sent_blocks = 0
    with rig.sim(modules=6) as sim:
        for n in range(300):
            m = int(rng.integers(6))
            p = int(rng.integers(1, 6))
            if n % 50 == 49:
                sim.send(m, rng.bytes(int(rng.integers(1, 500))))  # mostly bad sizes
                continue
            tacks = base + rng.choice([0, 5, 20, 1000, 1004, 60_000, 200_000], size=p)
            tacks += rng.integers(0, 3) * 100_000 * (n // 100)
            data = encode_datagram(tacks, tacks, rng.integers(0, 65536, size=(p, 64)))
            sim.send(m, data)
            sent_blocks += p
            if n % 20 == 0:
                await asyncio.sleep(0)
        await rig.wait("all blocks in", lambda: sum(rig.rec.per_module["blocks"]) == sent_blocks)
        await rig.wait("all flushed", lambda: not rig.rec.pending)
        assert rig.rec.state == "running"
        assert "assembly" not in rig.rec.counters.errors
        assert "datagram_handler" not in rig.rec.counters.errors
    with rig.sim(modules=6, tack_start_ns=1 << 50, tack_step_ns=1000) as clean:
        before = rig.rec.complete
        clean.send_round(0)  # and it still assembles clean data
        await rig.wait("a clean round", lambda: rig.rec.complete == before + P)
        await rig.host.stop()
    records = rig.records("live")
    stored = sum(bin(tags["modules_present"]).count("1") for *_, tags, _p in records)
    pm = rig.rec.per_module
    assert stored + sum(pm["duplicates"]) + sum(pm["late"]) == sent_blocks + 6 * P
    assert len(records) == rig.rec.complete + rig.rec.incomplete


async def test_readout_numbers_count_from_one_in_each_run(rig_factory: Callable[..., Any]) -> None:
    rig = await rig_factory()
    with rig.sim() as sim:
        sim.send_round(0)
        sim.send_round(1)
        await rig.wait("before the run", lambda: rig.rec.complete == 2 * P)
        await rig.host.begin_run("n1")
        sim.send_round(2)
        await rig.wait("in the run", lambda: rig.rec.complete == 3 * P)
        await rig.host.end_run()
        await rig.host.stop()
    run = rig.records("run")
    assert [tags["readout"] for *_, tags, _p in run] == list(range(1, P + 1))
    assert [tags["tack"] for *_, tags, _p in run] == [sim.tack(k) for k in range(2 * P, 3 * P)]
    live = rig.records("live")
    assert [tags["readout"] for *_, tags, _p in live] == list(range(1, 2 * P + 1))


async def test_simulator_late_option_gives_late_blocks(rig_factory: Callable[..., Any]) -> None:
    # a 1.05 s TACK buffer: round 5 (TACKs 5.0-5.9 s) flushes round 3 before the late datagram
    rig = await rig_factory(buffer_ns=1_050_000_000, flush_after_s=60.0)
    with rig.sim() as sim:
        sent = await rig.send(sim, 4 * 6, Faults(late=1, late_delay_s=1.0))
        assert sent.injected == {"late": 1} and sent.regular == 24
        await rig.wait("late blocks", lambda: rig.rec.counters.drops.get("late") == P)
    assert rig.rec.incomplete == P  # round 3, without the held-back module
    assert sum(rig.rec.per_module["late"]) == P


async def test_pending_readouts_are_bounded(rig_factory: Callable[..., Any]) -> None:
    rig = await rig_factory(modules=2, max_pending_readouts=5)
    with rig.sim(modules=1) as sim:  # module 1 never sends: nothing completes
        for r in range(3):
            sim.send_round(r)
        await rig.wait("30 blocks", lambda: rig.rec.per_module["blocks"][0] == 3 * P)
    assert len(rig.rec.pending) == 5
    assert rig.rec.counters.errors["overflow"] == 25 and rig.rec.incomplete == 25
    assert rig.rec.store.shape[0] == 64  # the store never grew past its first size


async def test_a_tack_restart_within_a_run_is_assembled_and_counted(
    rig_factory: Callable[..., Any],
) -> None:
    """The camera restarts its TACK count mid-run and re-sends TACKs already published: the new
    readouts are assembled and published (not refused as duplicates), the restart is counted."""
    rig = await rig_factory(buffer_ns=2_000_000_000, tack_reset_ns=3_000_000_000)
    await rig.host.begin_run("restart")
    with rig.sim() as before, rig.sim() as after:  # the same TACKs, 0.1 s apart
        for r in range(5):  # TACKs T .. T + 4.9 s
            before.send_round(r)
        await rig.wait("50 complete", lambda: rig.rec.complete == 5 * P)
        after.send_round(0)
        after.send_round(1)
        await rig.wait("20 more complete", lambda: rig.rec.complete == 7 * P)
        await rig.host.end_run()
    rec = rig.rec
    assert rec.tack_resets == 1 and rec.incomplete == 0
    assert not rec.counters.errors and "late" not in rec.counters.drops
    assert rec.status()["extra"]["tack_resets"] == 1
    run = rig.records("run")
    assert [tags["tack"] for *_, tags, _p in run] == [
        *(before.tack(k) for k in range(5 * P)),
        *(after.tack(k) for k in range(2 * P)),
    ]
    assert all(tags["complete"] for *_, tags, _p in run)


async def test_remembered_tacks_are_bounded_by_the_restart_window(
    rig_factory: Callable[..., Any],
) -> None:
    rig = await rig_factory(buffer_ns=1_050_000_000, tack_reset_ns=1_500_000_000)
    with rig.sim() as sim:
        for r in range(6):  # 60 readouts over 6 s of TACK time
            sim.send_round(r)
        await rig.wait("60 complete", lambda: rig.rec.complete == 6 * P)
        # TACKs more than 1.5 s behind the newest are forgotten: 15 of them 0.1 s apart remain
        await rig.wait("memory pruned", lambda: len(rig.rec.recent) <= 16)
        sim.send(0, sim.round_datagrams(5)[0])  # the newest round again: still a duplicate
        await rig.wait("duplicates", lambda: rig.rec.counters.errors.get("duplicate") == P)
    assert rig.rec.tack_resets == 0


def test_run_conditions_through_the_daemon(daemon: Callable[..., Any], workdir: Path) -> None:
    """One daemon, four runs: a TACK restart between runs loses nothing (GOOD); readouts
    published without a module make the run INCOMPLETE; junk datagrams with every readout
    complete make it TAINTED, not INCOMPLETE."""
    d = daemon(
        f"""
[daemon]
name = "ssr"

[[receiver]]
type = "slowsignal"
name = "cam"
listen = "127.0.0.1:0"
publish_to = ["disk"]
modules = 4
flush_after_s = 30.0
buffer_ns = 2_000_000_000
tack_reset_ns = 3_000_000_000

[[publisher]]
type = "file"
name = "disk"
directory = "{workdir}/data"
fsync = "never"
""",
        name="ssr",
    )
    host, port = d.status()["receivers"]["cam"]["addresses"]["listen"].rsplit(":", 1)
    target = (host, int(port))

    def cam() -> dict[str, Any]:
        result: dict[str, Any] = d.status()["receivers"]["cam"]
        return result

    def run(
        run_id: str, send: Callable[[TargetModules], None], complete: int, errors: int = 0
    ) -> str:
        assert d.ctl("start", run_id).returncode == 0
        with TargetModules(target, 4, P) as sim:
            send(sim)
            wait_until(
                lambda: (
                    cam()["extra"]["readouts_complete"] == complete
                    and sum(cam()["errors"].values()) == errors
                ),
                what=f"{complete} complete readouts and {errors} errors",
            )
        stopped = d.ctl("stop")
        assert stopped.returncode == 0, stopped.stderr
        return stopped.stdout

    def five_rounds(sim: TargetModules) -> None:
        for r in range(5):
            sim.send_round(r)

    out = run("r1", five_rounds, 5 * P)  # TACKs T .. T + 4.9 s
    assert "run r1 ended: GOOD, 50 records" in out, out
    out = run("r2", five_rounds, 10 * P)  # the camera starts again from T
    assert "run r2 ended: GOOD, 50 records" in out, out
    assert cam()["extra"]["tack_resets"] == 1
    assert "duplicate" not in cam()["errors"] and "late" not in cam()["drops"]
    with open(workdir / "data" / "run-r2.daqd", "rb") as f:
        items = list(msgpack.Unpacker(f, raw=False, strict_map_key=False))
    with TargetModules(target, 4, P) as sim:
        assert [i[3]["tack"] for i in items[1:-1]] == [sim.tack(k) for k in range(5 * P)]
    assert items[-1]["end"]["condition"] == "GOOD"

    def one_module_short(sim: TargetModules) -> None:
        sim.send_round(5, skip=frozenset({(5, 3)}))  # published incomplete at the run's end
        sim.send_round(6)

    out = run("r3", one_module_short, 11 * P)
    assert "run r3 ended: INCOMPLETE, 20 records" in out, out
    assert "receiver cam: 10 input lost (incomplete_readout)" in out, out

    def junk(sim: TargetModules) -> None:
        sim.send_round(7)
        for m in range(4):
            sim.send(m, b"")
        sim.send(0, b"x" * 100)

    out = run("r4", junk, 12 * P, errors=5)
    assert "run r4 ended: TAINTED, 10 records" in out, out
    assert "receiver cam: 4 errors (empty)" in out and "1 errors (bad_size)" in out, out
    assert "INCOMPLETE" not in out, out
