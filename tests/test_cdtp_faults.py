"""CDTP under faults: a transmitter with no receiver, bad input into the receiver, senders that
break the protocol, more sender names than the receiver tracks, and a seeded fuzz of the PULL
socket of a real `daqd serve`. Real ZeroMQ sockets on 127.0.0.1 throughout."""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import zmq
import zmq.asyncio
from daqd.publishers.cdtp import CdtpPublisher
from daqd.receivers.cdtp import CdtpReceiver

from daqd.protocols import cdtp
from daqd.record import Record
from daqd.runstate import RunCondition

from .conftest import wait_for, wait_until
from .test_accounting import accounting_lines
from .test_cdtp import DAQD, ended, receiver_toml, start_host, tx_toml


def data_message(enc: cdtp.Encoder, seqs: list[int], size: int = 16) -> bytes:
    parts: list[cdtp.Block] = []
    for seq in seqs:
        enc.record_parts(seq, {}, [bytes([seq & 0xFF]) * size], parts)
    return enc.data_message(len(seqs), parts)


def bor(name: str) -> bytes:
    return bytes(cdtp.Encoder(name).encode(cdtp.BeginOfRun(name))[0])


def eor(name: str, last: int) -> bytes:
    return bytes(cdtp.Encoder(name).encode(cdtp.EndOfRun(name, {}, {"data_records": last}))[0])


class Push:
    """A bound PUSH socket that a cdtp receiver connects to (as to a transmitter)."""

    def __init__(self) -> None:
        self.ctx = zmq.asyncio.Context()
        self.sock = self.ctx.socket(zmq.PUSH)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDHWM, 100_000)
        self.endpoint = f"127.0.0.1:{self.sock.bind_to_random_port('tcp://127.0.0.1')}"

    async def send(self, *frames: bytes) -> None:
        await self.sock.send_multipart(list(frames))

    def close(self) -> None:
        self.sock.close()
        self.ctx.term()


SIM_N = ["--records", "1000", "--size", "256"]
BOR_S = 6.0
SIM_64K = ["--records", "300", "--size", "65536"]


# ----- the transmitter --------------------------------------------------------------------------
def test_stop_before_any_receiver_connected_waits_bor_timeout_and_drops_counted(
    daemon: Callable[..., Any], workdir: Path
) -> None:
    """`daqctl stop` with no CDTP receiver: stop waits for the BOR until bor_timeout_s after the
    run began, then the run's records are dropped as no_receiver, none counted delivered, and
    the run ends INCOMPLETE saying why."""
    sim = subprocess.Popen(
        [DAQD, "sim", "cdtp", "--bind", "tcp://127.0.0.1:0", "--wait", "--name", "Sim.n", *SIM_N],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert sim.stdout is not None and sim.stdin is not None
        endpoint = json.loads(sim.stdout.readline())["endpoint"]
        d = daemon(
            '[daemon]\nname = "t"\ndrain_timeout_s = 30\n'
            + receiver_toml("rx", [endpoint], ["tx"])
            + tx_toml("tx", f"bor_timeout_s = {BOR_S}\neor_timeout_s = 1")
        )
        began = time.monotonic()
        start = d.ctl("start", "nobody")
        assert start.returncode == 0, start.stderr
        # begin_run does not wait for a receiver (daqctl start used to take bor_timeout_s)
        assert time.monotonic() - began < BOR_S - 2
        sim.stdin.write("go\n")
        sim.stdin.flush()
        assert json.loads(sim.stdout.readline())["runs"][0]["records"] == 1000
        wait_until(lambda: d.status()["receivers"]["rx"]["records"] == 1000, what="1000 records")
        assert d.status()["publishers"]["tx"]["extra"]["state"] == "waiting"
        asked = time.monotonic()
        assert asked - began < BOR_S, "too slow to stop before bor_timeout_s"
        stop = d.ctl("stop")
        done = time.monotonic()
    finally:
        sim.kill()
        sim.wait()
    assert stop.returncode == 0, stop.stderr
    assert done - began >= BOR_S  # it waited for the BOR up to bor_timeout_s from the begin
    assert done - asked < BOR_S + 10
    out = stop.stdout
    # the dropped records make it INCOMPLETE; the BOR nobody took is a failed operation, which
    # the host's table counts DEGRADED for a publisher (and flags a run without records too)
    assert "run nobody ended: INCOMPLETE|DEGRADED, 1000 records" in out, out
    assert "publisher tx: offered 1000, delivered 0, dropped 1000 no_receiver" in out, out
    assert "why: publisher tx: 1000 records dropped (no_receiver) -> INCOMPLETE" in out, out
    assert "why: publisher tx: 1 errors (bor_timeout) -> DEGRADED" in out, out
    status = d.status()
    tx = status["publishers"]["tx"]
    assert tx["records"] == 0 and tx["drops"] == {"no_receiver": 1000}
    assert tx["errors"] == {"bor_timeout": 1}
    ledger = status["last_run"]["accounting"]["publishers"]["tx"]
    assert ledger == {
        "offered": 1000,
        "delivered": 0,
        "drops": {"no_receiver": 1000},
        "errors": {"bor_timeout": 1},
    }
    assert status["last_run"]["condition_code"] & RunCondition.INCOMPLETE
    assert d.stop() == 0


async def test_a_receiver_that_connects_after_the_start_gets_the_whole_run() -> None:
    """begin_run returns at once; records wait for the BOR; a receiver connecting within
    bor_timeout_s gets BOR, every record and the EOR, each counted delivered when sent."""
    host = await start_host(tx_toml("tx", "bor_timeout_s = 30"))
    ctx = zmq.asyncio.Context()
    pull = ctx.socket(zmq.PULL)
    pull.setsockopt(zmq.LINGER, 0)
    try:
        tx = host.publishers["tx"]
        assert isinstance(tx, CdtpPublisher)
        began = time.monotonic()
        await host.begin_run("late")
        assert time.monotonic() - began < 2.0
        queue = host.queues["tx"]
        queue.put_many([Record("src", k, 0, {"k": k}, [bytes(100)]) for k in range(1, 501)])
        await wait_for(lambda: tx.counters.extra["state"] == "waiting", what="the waiting BOR")
        assert tx.counters.records == 0
        pull.connect(tx.addresses["endpoint"])
        first = cdtp.decode([await asyncio.wait_for(pull.recv(), 30)])
        assert isinstance(first, cdtp.BeginOfRun)
        run = await host.end_run()
        seqs: list[int] = []
        async with asyncio.timeout(30):
            while True:
                message = cdtp.decode([await pull.recv()])
                if isinstance(message, cdtp.EndOfRun):
                    break
                assert isinstance(message, cdtp.Data)
                seqs += [r.seq for r in message.records]
    finally:
        await host.stop()
        pull.close()
        ctx.term()
    assert seqs == list(range(1, 501))
    assert message.run_metadata["condition"] == "GOOD"
    assert run.condition == RunCondition.GOOD
    assert run.accounting["publishers"]["tx"] == {
        "offered": 500,
        "delivered": 500,
        "drops": {},
        "errors": {},
    }


async def test_an_eor_nobody_takes_is_counted_and_flags_the_run() -> None:
    host = await start_host(tx_toml("tx", "eor_timeout_s = 0.5"))
    ctx = zmq.asyncio.Context()
    pull = ctx.socket(zmq.PULL)
    pull.setsockopt(zmq.LINGER, 0)
    try:
        tx = host.publishers["tx"]
        pull.connect(tx.addresses["endpoint"])
        await wait_for(lambda: tx.counters.extra["receivers_connected"] == 1, what="a receiver")
        await host.begin_run("gone")
        assert isinstance(cdtp.decode([await asyncio.wait_for(pull.recv(), 30)]), cdtp.BeginOfRun)
        pull.close()  # the receiver goes away before the EOR
        await wait_for(lambda: tx.counters.extra["receivers_connected"] == 0, what="it to go")
        run = await host.end_run()
    finally:
        await host.stop()
        ctx.term()
    assert tx.counters.errors == {"eor_timeout": 1}
    assert run.condition == RunCondition.DEGRADED
    assert run.reasons == ["publisher tx: 1 errors (eor_timeout) -> DEGRADED"]
    assert run.accounting["publishers"]["tx"]["errors"] == {"eor_timeout": 1}


# ----- the receiver ---------------------------------------------------------------------------
async def test_garbage_a_wrong_protocol_and_an_eor_without_bor_taint_the_run() -> None:
    push = Push()
    host = await start_host(receiver_toml("rx", [push.endpoint], []))
    try:
        rx = host.receivers["rx"]
        assert isinstance(rx, CdtpReceiver)
        await host.begin_run("bad")
        await push.send(b"\x00garbage")
        cscp = msgpack.packb("CDTP\x01") + bor("Raw.x")[6:]  # a CDTP1 BOR
        await push.send(cscp)
        await push.send(eor("Raw.x", 0))
        await wait_for(lambda: sum(rx.counters.errors.values()) == 3, what="3 errors")
        run = await host.end_run()
    finally:
        await host.stop()
        push.close()
    assert rx.counters.errors == {"malformed": 1, "protocol": 1, "eor_without_bor": 1}
    assert run.condition == RunCondition.TAINTED
    assert run.reasons == [
        "receiver rx: 1 errors (eor_without_bor) -> TAINTED",
        "receiver rx: 1 errors (malformed) -> TAINTED",
        "receiver rx: 1 errors (protocol) -> TAINTED",
    ]
    assert "Raw.x" not in rx.senders  # an EOR without BOR leaves no sender state behind
    assert rx.last_report is not None and rx.last_report["without_bor"] == {"Raw.x": 1}


async def test_a_second_bor_keeps_the_first_sender_runs_flags() -> None:
    push = Push()
    host = await start_host(receiver_toml("rx", [push.endpoint], [], "eor_timeout_s = 5"))
    enc = cdtp.Encoder("Raw.twice")
    try:
        rx = host.receivers["rx"]
        assert isinstance(rx, CdtpReceiver)
        await host.begin_run("twice")
        await push.send(bor("Raw.twice"))
        await push.send(data_message(enc, [1, 2, 4]))  # 3 missed
        await push.send(bor("Raw.twice"))  # no EOR for the first run
        await push.send(data_message(enc, [1, 2]))
        await push.send(eor("Raw.twice", 2))
        await wait_for(
            lambda: ended(rx, "Raw.twice") and rx.senders["Raw.twice"].runs == 2, what="EOR"
        )
        run = await host.end_run()
    finally:
        await host.stop()
        push.close()
    assert rx.senders["Raw.twice"].condition == RunCondition.GOOD  # the second sender run
    assert rx.counters.errors == {"bor_twice": 1}
    assert rx.counters.drops == {"missed": 1, "eor_missing": 1}
    # the first sender run: its gap, its missing EOR and the protocol error all stay in the run
    assert run.condition == RunCondition.TAINTED | RunCondition.INCOMPLETE
    assert rx.last_report is not None
    assert rx.last_report["sender_runs_ended"] == 2
    [first] = rx.last_report["not_good"]
    assert first["sender"] == "Raw.twice" and first["run"] == 1
    assert first["condition"] == "TAINTED|INCOMPLETE|ABORTED"
    assert (first["records"], first["missed"]) == (3, 1)


async def test_data_before_bor_is_reported_in_its_run_only() -> None:
    push = Push()
    host = await start_host(receiver_toml("rx", [push.endpoint], [], "eor_timeout_s = 5"))
    enc = cdtp.Encoder("Raw.early")
    try:
        rx = host.receivers["rx"]
        assert isinstance(rx, CdtpReceiver)
        await host.begin_run("one")
        await push.send(data_message(enc, [1, 2, 3]))
        await wait_for(lambda: rx.counters.drops.get("no_bor") == 3, what="the refusal")
        first = await host.end_run()
        assert rx.last_report is not None
        assert rx.last_report["without_bor"] == {"Raw.early": 1}
        # the next runs know nothing of it: it was never a sender here
        await host.begin_run("two")
        second = await host.end_run()
        assert rx.last_report == {
            "run_id": "two",
            "sender_runs_ended": 0,
            "not_good": [],
            "never_sent_bor": [],
            "without_bor": {},
            "without_bor_messages": 0,
        }
        await host.begin_run("three")
        await push.send(bor("Raw.early"))
        await push.send(data_message(enc, [1, 2, 3]))
        await push.send(eor("Raw.early", 3))
        await wait_for(lambda: ended(rx, "Raw.early"), what="its EOR")
        third = await host.end_run()
    finally:
        await host.stop()
        push.close()
    assert first.condition == RunCondition.TAINTED | RunCondition.INCOMPLETE
    assert rx.counters.errors == {"data_without_bor": 1}
    assert second.condition == RunCondition.GOOD
    assert third.condition == RunCondition.GOOD and third.records == {"Raw.early": 3}
    assert rx.last_report["without_bor"] == {} and rx.last_report["sender_runs_ended"] == 1


async def test_receive_from_names_without_a_run_are_reported_per_run() -> None:
    push = Push()
    host = await start_host(
        receiver_toml("rx", [push.endpoint], [], 'receive_from = ["Cfg.a", "Cfg.b"]')
    )
    enc = cdtp.Encoder("Cfg.a")
    try:
        rx = host.receivers["rx"]
        assert isinstance(rx, CdtpReceiver)
        await host.begin_run("one")
        await push.send(bor("Cfg.a"))
        await push.send(data_message(enc, [1]))
        await push.send(eor("Cfg.a", 1))
        await wait_for(lambda: ended(rx, "Cfg.a"), what="its EOR")
        first = await host.end_run()
        assert rx.last_report is not None and rx.last_report["never_sent_bor"] == ["Cfg.b"]
        await host.begin_run("two")
        await host.end_run()
        assert rx.last_report["never_sent_bor"] == ["Cfg.a", "Cfg.b"]
    finally:
        await host.stop()
        push.close()
    assert first.condition == RunCondition.GOOD  # a silent sender is reported, not counted
    assert set(rx.senders) == {"Cfg.a", "Cfg.b"}


async def test_many_sender_names_keep_the_tracked_state_and_status_bounded() -> None:
    """5,000 distinct senders, each a whole run: at most max_senders are tracked (the idle
    ones forgotten, counted), status stays small, and every sender run is accounted for."""
    push = Push()
    host = await start_host(receiver_toml("rx", [push.endpoint], [], "max_senders = 64"))
    names = [f"Many.s{i}" for i in range(5000)]
    try:
        rx = host.receivers["rx"]
        assert isinstance(rx, CdtpReceiver)
        await host.begin_run("many")
        for name in names:
            await push.send(bor(name))
            await push.send(data_message(cdtp.Encoder(name), [1]))
            await push.send(eor(name, 1))
        await wait_for(lambda: rx.counters.records == 5000, what="5000 records")
        await wait_for(lambda: ended(rx, names[-1]), what="the last EOR")
        assert len(rx.senders) <= 64
        status = json.dumps(host.status(), default=str)
        run = await host.end_run()
    finally:
        await host.stop()
        push.close()
    assert rx.counters.extra["senders_evicted"] == 5000 - 64
    assert rx.counters.extra["senders_tracked"] == 64
    print(f"status JSON: {len(status)} bytes")
    assert len(status) < 64 * 1024, len(status)
    assert not rx.counters.errors and not rx.counters.drops
    assert run.condition == RunCondition.GOOD
    assert rx.last_report is not None and rx.last_report["sender_runs_ended"] == 5000


async def test_new_senders_are_refused_while_all_tracked_are_in_a_run_and_idle_are_forgotten() -> (
    None
):
    push = Push()
    host = await start_host(
        receiver_toml("rx", [push.endpoint], [], "max_senders = 4\nsender_idle_s = 0.5")
    )
    try:
        rx = host.receivers["rx"]
        assert isinstance(rx, CdtpReceiver)
        await host.begin_run("full")
        for i in range(6):  # two more than max_senders, none ends its run
            await push.send(bor(f"Busy.s{i}"))
        await wait_for(lambda: rx.counters.errors.get("too_many_senders") == 2, what="refusals")
        await push.send(data_message(cdtp.Encoder("Busy.s5"), [1, 2, 3]))
        await wait_for(lambda: rx.counters.drops.get("too_many_senders") == 3, what="drops")
        assert set(rx.senders) == {f"Busy.s{i}" for i in range(4)}
        for i in range(4):
            await push.send(eor(f"Busy.s{i}", 0))
        await wait_for(lambda: ended(rx, "Busy.s3"), what="the EORs")
        # a tracked sender is out of its run: a new name could take its place, so DATA from
        # one is DATA without a BOR, not a refusal
        await push.send(data_message(cdtp.Encoder("Busy.s5"), [4]))
        await wait_for(lambda: rx.counters.drops.get("no_bor") == 1, what="no_bor")
        # idle for longer than sender_idle_s: forgotten
        await wait_for(lambda: not rx.senders, what="idle senders to be forgotten")
        run = await host.end_run()
    finally:
        await host.stop()
        push.close()
    assert rx.counters.errors == {"too_many_senders": 3, "data_without_bor": 1}
    assert rx.counters.drops == {"too_many_senders": 3, "no_bor": 1}
    assert rx.counters.extra["senders_evicted"] == 4
    assert run.condition == RunCondition.TAINTED | RunCondition.INCOMPLETE


async def test_senders_forgotten_after_a_rebuild_are_counted_in_status() -> None:
    """A reconfigure that rebuilds the receiver (same name) carries its counters on: senders
    the new receiver forgets are counted where status reads them, after the old one's."""
    # a transmitter for each receiver: a PUSH whose old peer is going away may still hand
    # messages to it (lost with it), so the rebuilt receiver gets a PUSH of its own
    before, after = Push(), Push()
    host = await start_host(receiver_toml("rx", [before.endpoint], [], "max_senders = 2"))
    try:

        async def whole_runs(push: Push, names: list[str]) -> None:
            rx = host.receivers["rx"]
            assert isinstance(rx, CdtpReceiver)
            for name in names:
                await push.send(bor(name))
                await push.send(eor(name, 0))
            await wait_for(lambda: ended(rx, names[-1]), what=f"{names[-1]}'s EOR")

        def evicted() -> int:
            return int(host.status()["receivers"]["rx"]["extra"]["senders_evicted"])

        await whole_runs(before, ["Old.a", "Old.b", "Old.c"])  # one more than max_senders
        assert evicted() == 1
        changed = await host.reconfigure(
            '[daemon]\nname = "t"\ndrain_timeout_s = 10\n'
            + receiver_toml("rx", [after.endpoint], [], "max_senders = 3")
        )
        assert changed == ["receiver rx"], changed
        await whole_runs(after, ["New.a", "New.b", "New.c", "New.d"])  # one more than fits
        assert evicted() == 2
    finally:
        await host.stop()
        before.close()
        after.close()


# ----- fuzz -----------------------------------------------------------------------------------
def fuzz_inputs(seed: int, count: int) -> tuple[list[list[bytes]], dict[str, int], dict[str, int]]:
    """`count` bad inputs of known kinds, and the errors and drops each must be counted as."""
    rng = random.Random(seed)
    errors: dict[str, int] = {}
    drops: dict[str, int] = {}
    inputs: list[list[bytes]] = []
    valid = [bor("Fuzz.v"), eor("Fuzz.v", 3), data_message(cdtp.Encoder("Fuzz.v"), [1, 2, 3])]
    # first bytes whose msgpack object is not a str or bin: never a protocol identifier
    not_str = [*range(0x00, 0x80), 0xC0, 0xC2, 0xC3, *range(0xCC, 0xD4), *range(0xE0, 0x100)]

    def expect(reason: str, frames: list[bytes]) -> None:
        errors[reason] = errors.get(reason, 0) + 1
        inputs.append(frames)

    for i in range(count):
        kind = rng.randrange(9)
        if kind == 0:  # garbage
            body = bytes([rng.choice(not_str)]) + rng.randbytes(rng.randrange(64))
            expect("malformed", [body])
        elif kind == 1:  # several frames
            n = rng.randrange(2, 4)
            expect("malformed", [rng.randbytes(rng.randrange(1, 32)) for _ in range(n)])
        elif kind == 2:  # another protocol's identifier in front of a valid body
            ident = rng.choice(["CDTP\x01", "CSCP\x01", "CHP\x01", "cdtp\x02", b"CDTP\x02"])
            expect("protocol", [msgpack.packb(ident, use_bin_type=True) + rng.choice(valid)[6:]])
        elif kind == 3:  # a valid message cut short
            m = rng.choice(valid)
            expect("malformed", [m[: rng.randrange(len(m))]])
        elif kind == 4:  # a valid message with bytes after its end
            expect("malformed", [rng.choice(valid) + rng.randbytes(rng.randrange(1, 8))])
        elif kind == 5:  # an unknown message type, or a BOR/EOR without its two records
            m = bor("Fuzz.t")
            at = 6 + 1 + len("Fuzz.t")
            if rng.random() < 0.5:
                expect("malformed", [m[:at] + bytes([rng.randrange(3, 0x80)]) + m[at + 1 :]])
            else:
                expect("malformed", [m[: at + 1] + b"\x90"])
        elif kind == 6:  # DATA with no records
            expect("malformed", [b"\xa5CDTP\x02\xa6Fuzz.e\x00\x90"])
        elif kind == 7:  # EOR from a sender without a run
            expect("eor_without_bor", [eor(f"Fuzz.eor{i}", rng.randrange(10))])
        else:  # DATA from a sender without a run
            n = rng.randrange(1, 5)
            name = f"Fuzz.data{i}"
            expect("data_without_bor", [data_message(cdtp.Encoder(name), list(range(1, n + 1)))])
            drops["no_bor"] = drops.get("no_bor", 0) + n
    return inputs, errors, drops


def test_fuzzing_the_pull_socket_counts_every_bad_input_and_logs_little(
    daemon: Callable[..., Any],
) -> None:
    inputs, errors, drops = fuzz_inputs(seed=20261203, count=2500)
    assert set(errors) == {"malformed", "protocol", "eor_without_bor", "data_without_bor"}
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    push.setsockopt(zmq.SNDHWM, 100_000)
    port = push.bind_to_random_port("tcp://127.0.0.1")
    try:
        d = daemon('[daemon]\nname = "t"\n' + receiver_toml("rx", [f"127.0.0.1:{port}"], []))
        assert d.ctl("start", "fuzz").returncode == 0
        for frames in inputs:
            push.send_multipart(frames)
        total = sum(errors.values())

        def counted() -> bool:
            rx = d.status()["receivers"]["rx"]
            return bool(sum(rx["errors"].values()) >= total)

        wait_until(counted, timeout_s=60, what=f"{total} errors counted")
        # still up and receiving: a good run goes through
        enc = cdtp.Encoder("Fuzz.good")
        push.send(bor("Fuzz.good"))
        push.send(data_message(enc, [1, 2, 3]))
        push.send(eor("Fuzz.good", 3))

        def good_run_ended() -> bool:
            senders = d.status()["receivers"]["rx"]["extra"]["senders"]
            return bool(senders.get("Fuzz.good", {}).get("condition") == "GOOD")

        wait_until(good_run_ended, what="the good run after the fuzz")
        stop = d.ctl("stop")
        assert stop.returncode == 0
        rx = d.status()["receivers"]["rx"]
        assert rx["errors"] == errors
        assert rx["drops"] == drops
        assert rx["records"] == 3
        assert rx["extra"]["senders_tracked"] == 1  # no state for any fuzzed name
        assert rx["extra"]["last_run"]["without_bor_messages"] == (
            errors["eor_without_bor"] + errors["data_without_bor"]
        )
        assert "run fuzz ended: TAINTED|INCOMPLETE" in stop.stdout
        assert d.stop() == 0
    finally:
        push.close()
        ctx.term()
    lines = [line for line in d.log().splitlines() if "daqd.receiver.rx" in line]
    print(f"{len(lines)} log lines from the receiver:", *lines, sep="\n")
    assert len(lines) <= 20, "\n".join(lines)


def test_sigterm_with_a_stalled_receiver_ends_within_the_deadline_and_accounts_exactly(
    daemon: Callable[..., Any],
) -> None:
    """The receiver took the BOR, then stopped reading: at SIGTERM the transmitter gives up
    within drain_timeout_s (not data_timeout_s), and every record is delivered or counted."""
    sim = subprocess.Popen(
        [
            DAQD,
            "sim",
            "cdtp",
            "--bind",
            "tcp://127.0.0.1:0",
            "--wait",
            "--name",
            "Sim.st",
            *SIM_64K,
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.setsockopt(zmq.RCVHWM, 1)
    pull.setsockopt(zmq.RCVBUF, 65536)
    pull.setsockopt(zmq.LINGER, 0)
    try:
        assert sim.stdout is not None and sim.stdin is not None
        endpoint = json.loads(sim.stdout.readline())["endpoint"]
        d = daemon(
            '[daemon]\nname = "t"\ndrain_timeout_s = 2\n'
            + receiver_toml("rx", [endpoint], ["tx"])
            + tx_toml("tx", "sndhwm = 1\ndata_timeout_s = 60\neor_timeout_s = 60")
        )
        pull.connect(d.status()["publishers"]["tx"]["addresses"]["endpoint"])
        wait_until(
            lambda: d.status()["publishers"]["tx"]["extra"]["receivers_connected"] == 1,
            what="the receiver to connect",
        )
        assert d.ctl("start", "stalled").returncode == 0
        assert pull.poll(30_000), "no BOR"
        assert isinstance(cdtp.decode([pull.recv()]), cdtp.BeginOfRun)
        sim.stdin.write("go\n")
        sim.stdin.flush()
        wait_until(lambda: d.status()["receivers"]["rx"]["records"] == 300, what="300 records")
        tx = d.status()["publishers"]["tx"]
        assert tx["records"] < 300  # the receiver stalled: most of the run is still here
        began = time.monotonic()
        code = d.stop()
        took = time.monotonic() - began
    finally:
        sim.kill()
        sim.wait()
        pull.close()
        ctx.term()
    assert code == 0
    assert took < 2 + 10, took  # data_timeout_s (60) and eor_timeout_s (60) did not hold it
    counts = accounting_lines(d.log())["tx"]
    print(f"stop took {took:.2f} s; tx: {counts}")
    assert counts["offered"] == 300
    assert counts["delivered"] + sum(counts["drops"].values()) == 300, counts
    assert counts["drops"], counts
