"""CDTP receiver and transmitter, daqd to daqd: `daqd sim cdtp` → receiver → publisher → receiver.

Everything runs through real ZeroMQ sockets on 127.0.0.1 with the in-process Host; the simulator
is a separate process. Records are checked in the run files the file publisher writes.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio
from daqd.publishers.cdtp import CdtpPublisher
from daqd.receivers.cdtp import CdtpReceiver, SenderState

from daqd.config import parse_config
from daqd.host import Host
from daqd.protocols import cdtp
from daqd.record import Record
from daqd.runfile import read_items
from daqd.runstate import RunCondition, RunInfo
from daqd.sim.cdtp import record_blocks

from .conftest import wait_for

DAQD = str(Path(sys.executable).parent / "daqd")


class Proc:
    """A subprocess that talks JSON lines: the simulator or the Constellation peer."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    @classmethod
    async def start(cls, *argv: str, stdin_json: dict[str, Any] | None = None) -> Proc:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
        )
        self = cls(proc)
        if stdin_json is not None:
            await self.say(json.dumps(stdin_json))
        return self

    async def say(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        await self.proc.stdin.drain()

    async def line(self, timeout_s: float = 60.0) -> dict[str, Any]:
        assert self.proc.stdout is not None
        raw = await asyncio.wait_for(self.proc.stdout.readline(), timeout_s)
        if not raw:
            raise AssertionError(
                f"{self.proc.pid} ended without output (rc {self.proc.returncode})"
            )
        result: dict[str, Any] = json.loads(raw)
        return result

    async def end(self, timeout_s: float = 60.0) -> int:
        return await asyncio.wait_for(self.proc.wait(), timeout_s)

    async def stop(self) -> None:
        """Kill it if it still runs, and reap it."""
        if self.proc.returncode is None:
            self.proc.kill()
        await self.proc.wait()


async def start_sim(*args: str) -> tuple[Proc, str]:
    sim = await Proc.start(DAQD, "sim", "cdtp", "--bind", "tcp://127.0.0.1:0", "--wait", *args)
    return sim, (await sim.line())["endpoint"]


async def start_host(body: str, name: str = "t") -> Host:
    host = Host(parse_config(f'[daemon]\nname = "{name}"\ndrain_timeout_s = 10\n{body}', "<test>"))
    await host.start()
    return host


def receiver_toml(name: str, senders: list[str], publish_to: list[str], extra: str = "") -> str:
    return (
        f'[[receiver]]\ntype = "cdtp"\nname = "{name}"\nsenders = {json.dumps(senders)}\n'
        f"publish_to = {json.dumps(publish_to)}\n{extra}\n"
    )


def file_toml(name: str, directory: Path) -> str:
    return f'[[publisher]]\ntype = "file"\nname = "{name}"\ndirectory = "{directory}"\n'


def tx_toml(name: str = "tx", extra: str = "") -> str:
    return (
        f'[[publisher]]\ntype = "cdtp"\nname = "{name}"\nendpoint = "tcp://127.0.0.1:0"\n'
        f"flush_interval_s = 0.05\n{extra}\n"
    )


def run_file(directory: Path, run_id: str) -> tuple[dict[str, Any], list[Record], dict[str, Any]]:
    [path] = directory.glob(f"run-{run_id}.daqd")
    items = list(read_items(path))
    header, *records, end = items
    assert isinstance(header, dict) and isinstance(end, dict)
    assert all(isinstance(r, Record) for r in records)
    return header, records, end["end"]  # type: ignore[return-value]


def ended(rx: CdtpReceiver, sender: str) -> bool:
    state = rx.senders.get(sender)
    return state is not None and state.state is SenderState.EOR_RECEIVED


async def test_sim_to_receiver_keeps_every_record_and_reports_a_gap(tmp_path: Path) -> None:
    sim, endpoint = await start_sim(
        "--name", "Sim.a", "--records", "300", "--blocks", "2", "--skip", "7", "--skip", "8"
    )
    host = await start_host(
        receiver_toml("rx", [endpoint], ["disk"], "eor_timeout_s = 5") + file_toml("disk", tmp_path)
    )
    try:
        rx = host.receivers["rx"]
        assert isinstance(rx, CdtpReceiver)
        await host.begin_run("gap")
        await sim.say("go")
        assert (await sim.line())["runs"][0]["records"] == 298
        await wait_for(lambda: ended(rx, "Sim.a"), what="the EOR")
        run = await host.end_run()
        await host.queues["disk"].drained()
    finally:
        await host.stop()
        await sim.stop()
    sender = rx.senders["Sim.a"]
    assert (sender.seq, sender.missed, sender.records) == (300, 2, 298)
    assert sender.condition == RunCondition.INCOMPLETE
    assert rx.counters.drops == {"missed": 2}
    assert run.condition & RunCondition.INCOMPLETE  # the daqd run knows records were lost
    assert run.records == {"Sim.a": 298}
    _, records, end = run_file(tmp_path, "gap")
    expected = [k for k in range(1, 301) if k not in (7, 8)]
    assert [r.tags["cdtp_seq"] for r in records] == expected
    assert [r.tags["k"] for r in records] == expected
    assert [r.seq for r in records] == list(range(1, 299))  # daqd's own seq stays gap-free
    assert all(r.source == "Sim.a" for r in records)
    for r in records:
        assert [bytes(b) for b in r.payload] == record_blocks(r.tags["k"], 1024, 2)
    assert end["condition_code"] & RunCondition.INCOMPLETE
    status = host.status()["receivers"]["rx"]["extra"]["senders"]["Sim.a"]
    assert status["condition"] == "INCOMPLETE" and status["missed"] == 2


async def test_a_sender_that_vanishes_mid_run_ends_aborted(tmp_path: Path) -> None:
    sim, endpoint = await start_sim("--name", "Sim.v", "--records", "5000", "--vanish-after", "100")
    host = await start_host(receiver_toml("rx", [endpoint], [], "eor_timeout_s = 0.5"))
    try:
        rx = host.receivers["rx"]
        assert isinstance(rx, CdtpReceiver)
        await host.begin_run("vanish")
        await sim.say("go")
        assert await sim.end() == 0
        await wait_for(lambda: ended(rx, "Sim.v"), what="the substitute EOR")
        run = await host.end_run()
        # the daqd run holding that sender's data is incomplete (records missing), not aborted
        assert run.condition == RunCondition.INCOMPLETE
        sender = rx.senders["Sim.v"]
        assert sender.records == 100 and sender.seq == 100
        assert sender.condition == RunCondition.ABORTED
        assert sender.run_metadata["substitute"] is True
        assert rx.counters.drops["eor_missing"] == 1  # input lost: INCOMPLETE, not TAINTED
        assert run.reasons == [
            "receiver rx: 1 input lost (eor_missing) -> INCOMPLETE",
            "receiver rx: 1 sender run ended ABORTED (Sim.v) -> INCOMPLETE",
        ]
        assert rx.state == "running"
    finally:
        await host.stop()


async def test_end_of_run_waits_for_eors_then_aborts_the_silent(tmp_path: Path) -> None:
    sim, endpoint = await start_sim("--name", "Sim.slow", "--records", "100000", "--rate", "100")
    host = await start_host(receiver_toml("rx", [endpoint], [], "eor_timeout_s = 0.5"))
    try:
        rx = host.receivers["rx"]
        assert isinstance(rx, CdtpReceiver)
        await host.begin_run("slow")
        await sim.say("go")
        await wait_for(lambda: rx.counters.records >= 5, what="some records")
        started = time.monotonic()
        await host.end_run()
        assert time.monotonic() - started >= 0.45  # it waited eor_timeout_s for the EOR
        sender = rx.senders["Sim.slow"]
        assert sender.state is SenderState.EOR_RECEIVED
        assert sender.condition is not None and sender.condition & RunCondition.ABORTED
    finally:
        await sim.stop()
        await host.stop()


async def test_bad_messages_are_counted_and_other_senders_carry_on(tmp_path: Path) -> None:
    ctx = zmq.asyncio.Context()
    bad = ctx.socket(zmq.PUSH)
    bad.setsockopt(zmq.LINGER, 0)
    port = bad.bind_to_random_port("tcp://127.0.0.1")
    sim, endpoint = await start_sim("--name", "Sim.good", "--records", "2000", "--size", "256")
    host = await start_host(
        receiver_toml("rx", [f"127.0.0.1:{port}", endpoint], ["disk"]) + file_toml("disk", tmp_path)
    )
    enc = cdtp.Encoder("Bad.one")
    try:
        rx = host.receivers["rx"]
        assert isinstance(rx, CdtpReceiver)
        await host.begin_run("mixed")
        await sim.say("go")
        await bad.send(b"not cdtp at all")
        await bad.send_multipart([b"two", b"frames"])
        await bad.send(b"\xa5CDTP\x02\xa7Bad.one\x00\x90")  # DATA with no records
        parts: list[cdtp.Block] = []
        enc.record_parts(1, {}, [b"x"], parts)
        await bad.send(enc.data_message(1, parts))  # DATA before BOR
        await bad.send(enc.encode(cdtp.BeginOfRun("Bad.one"))[0])
        for seq in (1, 2, 2, 3):  # a duplicate
            parts = []
            enc.record_parts(seq, {}, [b"y"], parts)
            await bad.send(enc.data_message(1, parts))
        await bad.send(enc.encode(cdtp.EndOfRun("Bad.one", {}, {"data_records": 3}))[0])
        await wait_for(lambda: ended(rx, "Bad.one") and ended(rx, "Sim.good"), what="both EORs")
        run = await host.end_run()
        await host.queues["disk"].drained()
    finally:
        await host.stop()
        await sim.stop()
        bad.close()
        ctx.term()
    assert rx.counters.errors == {"malformed": 3, "data_without_bor": 1, "sequence": 1}
    assert rx.counters.drops == {"no_bor": 1}
    assert rx.senders["Bad.one"].condition == RunCondition.TAINTED
    # each counted reason flags the daqd run by the host's table, and says why
    assert run.condition == RunCondition.TAINTED | RunCondition.INCOMPLETE
    assert "receiver rx: 3 errors (malformed) -> TAINTED" in run.reasons
    assert "receiver rx: 1 input lost (no_bor) -> INCOMPLETE" in run.reasons
    assert rx.senders["Sim.good"].condition == RunCondition.GOOD
    _, records, _ = run_file(tmp_path, "mixed")
    good = [r.tags["k"] for r in records if r.source == "Sim.good"]
    assert good == list(range(1, 2001))
    assert [r.tags["cdtp_seq"] for r in records if r.source == "Bad.one"] == [1, 2, 2, 3]


async def test_receive_from_refuses_other_senders(tmp_path: Path) -> None:
    sim, endpoint = await start_sim("--name", "Sim.other", "--records", "10")
    host = await start_host(receiver_toml("rx", [endpoint], [], 'receive_from = ["Sim.wanted"]'))
    try:
        rx = host.receivers["rx"]
        assert isinstance(rx, CdtpReceiver)
        await sim.say("go")
        await sim.line()
        await wait_for(
            lambda: rx.counters.errors.get("not_in_receive_from", 0) >= 2, what="refusals"
        )
        assert rx.counters.records == 0
        assert set(rx.senders) == {"Sim.wanted"}
        assert rx.cmd_senders()["Sim.wanted"]["state"] == "NOT_CONNECTED"
    finally:
        await host.stop()
        await sim.stop()


@asynccontextmanager
async def bridge(
    tmp_path: Path, sim_args: list[str], tx_extra: str = ""
) -> AsyncIterator[tuple[Host, Host, Proc]]:
    """sim → [host A: rx1 → tx] → [host B: rx2 → file]: both hosts in a run, sim waiting;
    all three stopped on leaving."""
    sim, endpoint = await start_sim(*sim_args)
    a = await start_host(receiver_toml("rx1", [endpoint], ["tx"]) + tx_toml("tx", tx_extra), "a")
    tx_endpoint = a.publishers["tx"].addresses["endpoint"]
    b = await start_host(
        receiver_toml("rx2", [tx_endpoint], ["disk"], "eor_timeout_s = 5")
        + file_toml("disk", tmp_path),
        "b",
    )
    try:
        await b.begin_run("bridged")
        await a.begin_run("upstream")
        yield a, b, sim
    finally:
        await a.stop()
        await b.stop()
        await sim.stop()


async def test_transmitter_to_receiver_64k_batches_and_run_metadata(tmp_path: Path) -> None:
    async with bridge(
        tmp_path, ["--name", "Sim.big", "--records", "20", "--size", "65536"], "bor_tags = {u = 1}"
    ) as (a, b, sim):
        rx1, rx2 = a.receivers["rx1"], b.receivers["rx2"]
        assert isinstance(rx1, CdtpReceiver) and isinstance(rx2, CdtpReceiver)
        await wait_for(lambda: "daqd.tx" in rx2.senders, what="the BOR")
        assert rx2.senders["daqd.tx"].user_tags == {"u": 1}
        assert rx2.senders["daqd.tx"].configuration["_data"]["payload_threshold"] == 128
        await sim.say("go")
        await wait_for(lambda: ended(rx1, "Sim.big"), what="upstream EOR")
        await a.end_run(RunCondition.TAINTED)
        await wait_for(lambda: ended(rx2, "daqd.tx"), what="EOR from our transmitter")
        downstream = await b.end_run()
        await b.queues["disk"].drained()
    # the upstream run's own condition reaches ours, and its reasons say where it came from
    assert downstream.condition == RunCondition.TAINTED
    assert downstream.reasons == [
        "receiver rx2: 1 sender run ended TAINTED (daqd.tx run upstream) -> TAINTED"
    ]
    tx = a.publishers["tx"]
    assert tx.counters.extra["messages"] == 10  # 64 KiB records go two per 128 KiB message
    sender = rx2.senders["daqd.tx"]
    assert sender.condition == RunCondition.TAINTED
    meta = sender.run_metadata
    assert meta["run_id"] == "upstream" and meta["data_records"] == 20
    assert meta["records"] == {"Sim.big": 20}
    assert meta["time_end"].to_unix_nano() >= meta["time_start"].to_unix_nano() > 0
    _, records, _ = run_file(tmp_path, "bridged")
    assert [r.tags["k"] for r in records] == list(range(1, 21))
    assert [r.tags["cdtp_seq"] for r in records] == list(range(1, 21))
    for r in records:
        assert r.source == "daqd.tx"
        assert [bytes(x) for x in r.payload] == record_blocks(r.tags["k"], 65536, 1)


async def test_tag_only_records_leave_on_the_flush_timer(tmp_path: Path) -> None:
    async with bridge(tmp_path, ["--name", "Sim.tags", "--records", "5", "--blocks", "0"]) as (
        a,
        b,
        sim,
    ):
        rx2 = b.receivers["rx2"]
        await sim.say("go")
        # no end of run yet: only the flush timer can have sent them
        await wait_for(lambda: rx2.counters.records == 5, what="5 tag-only records")
        assert a.run is not None
    _, records, _ = run_file(tmp_path, "bridged")
    assert [(r.tags["k"], list(r.payload)) for r in records] == [(k, []) for k in range(1, 6)]


async def test_a_record_too_big_for_a_message_is_refused_and_shows_as_a_gap(
    tmp_path: Path,
) -> None:
    async with bridge(
        tmp_path,
        ["--name", "Sim.huge", "--records", "3", "--size", "9000"],
        "max_message_bytes = 8192",
    ) as (a, b, sim):
        rx1, rx2 = a.receivers["rx1"], b.receivers["rx2"]
        assert isinstance(rx1, CdtpReceiver) and isinstance(rx2, CdtpReceiver)
        await sim.say("go")
        await wait_for(lambda: ended(rx1, "Sim.huge"), what="upstream EOR")
        await a.end_run()
        await wait_for(lambda: ended(rx2, "daqd.tx"), what="our EOR")
    tx = a.publishers["tx"]
    assert tx.counters.drops["refused"] == 3
    assert rx2.senders["daqd.tx"].records == 0
    assert rx2.senders["daqd.tx"].condition == RunCondition.INCOMPLETE


async def test_batches_are_split_to_stay_under_max_message_bytes(tmp_path: Path) -> None:
    async with bridge(
        tmp_path,
        ["--name", "Sim.split", "--records", "10", "--size", "3000"],
        "max_message_bytes = 8192",
    ) as (a, b, sim):
        rx1, rx2 = a.receivers["rx1"], b.receivers["rx2"]
        assert isinstance(rx1, CdtpReceiver) and isinstance(rx2, CdtpReceiver)
        await sim.say("go")
        await wait_for(lambda: ended(rx1, "Sim.split"), what="upstream EOR")
        await a.end_run()
        await wait_for(lambda: ended(rx2, "daqd.tx"), what="our EOR")
    assert a.publishers["tx"].counters.extra["messages"] == 5  # two 3 kB records per 8 KiB
    sender = rx2.senders["daqd.tx"]
    assert (sender.records, sender.missed, sender.condition) == (10, 0, RunCondition.GOOD)
    assert sender.bytes <= 5 * 8192


async def test_transmitter_timeouts_outside_run_and_second_receiver(tmp_path: Path) -> None:
    sim, endpoint = await start_sim(
        "--name", "Sim.t", "--records", "1000", "--size", "65536", "--runs", "2"
    )
    a = await start_host(
        receiver_toml("rx1", [endpoint], ["tx"])
        + tx_toml(
            "tx", "bor_timeout_s = 0.3\ndata_timeout_s = 0.5\neor_timeout_s = 0.3\nsndhwm = 1"
        ),
        "a",
    )
    tx = a.publishers["tx"]
    ctx = zmq.asyncio.Context()
    pulls: list[zmq.asyncio.Socket] = []
    try:
        # no receiver: the BOR times out, the run's records are dropped and counted
        await a.begin_run("nobody")
        await wait_for(lambda: tx.counters.errors.get("bor_timeout"), what="BOR timeout")
        assert tx.counters.extra["state"] == "no_receiver"
        await a.end_run()
        # records outside a run are dropped and counted, never sent without a BOR
        await sim.say("go")
        await wait_for(lambda: tx.counters.drops.get("outside_run", 0) >= 1, what="outside_run")
        # a receiver that takes the BOR and then stalls: the run ends ABORTED
        for _ in range(2):
            pull = ctx.socket(zmq.PULL)
            pull.setsockopt(zmq.RCVHWM, 1)
            pull.setsockopt(zmq.RCVBUF, 65536)
            pull.setsockopt(zmq.LINGER, 0)
            pull.connect(tx.addresses["endpoint"])
            pulls.append(pull)
        await wait_for(lambda: tx.counters.errors.get("second_receiver"), what="second receiver")
        assert tx.counters.extra["receivers_connected"] == 2
        pulls.pop().close()
        await wait_for(lambda: tx.counters.extra["receivers_connected"] == 1, what="disconnect")
        await a.begin_run("stalled")
        bor = cdtp.decode([await asyncio.wait_for(pulls[0].recv(), 10)])
        assert isinstance(bor, cdtp.BeginOfRun) and bor.sender == "daqd.tx"
        await sim.say("go")  # a second run of the simulator: 1000 x 64 KiB into a stalled socket
        await wait_for(lambda: tx.counters.errors.get("data_timeout"), what="data timeout")
        assert tx.counters.extra["state"] == "aborted"
        await a.end_run()
        await wait_for(lambda: tx.counters.errors.get("eor_timeout"), what="EOR timeout")
        assert tx.counters.drops["aborted"] >= 1
    finally:
        for pull in pulls:
            pull.close()
        await sim.stop()
        await a.stop()
        ctx.term()


async def test_a_message_over_the_limit_is_refused_and_the_link_comes_back(
    tmp_path: Path,
) -> None:
    ctx = zmq.asyncio.Context()
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    port = push.bind_to_random_port("tcp://127.0.0.1")
    host = await start_host(
        receiver_toml("rx", [f"127.0.0.1:{port}"], [], "max_message_bytes = 8192")
    )
    enc = cdtp.Encoder("Raw.big")

    def data(seq: int, size: int) -> bytes:
        parts: list[cdtp.Block] = []
        enc.record_parts(seq, {}, [bytes(size)], parts)
        return enc.data_message(1, parts)

    try:
        rx = host.receivers["rx"]
        assert isinstance(rx, CdtpReceiver)
        await push.send(enc.encode(cdtp.BeginOfRun("Raw.big"))[0])
        await push.send(data(1, 100))
        await push.send(data(2, 20000))  # over the limit: ZeroMQ drops the link unread
        await wait_for(lambda: rx.counters.errors.get("link_dropped"), what="the relink")
        # the link is back: a new run goes through; the old one ended ABORTED (no EOR)
        await push.send(enc.encode(cdtp.BeginOfRun("Raw.big"))[0])
        await push.send(data(1, 100))
        await push.send(enc.encode(cdtp.EndOfRun("Raw.big", {}, {"data_records": 1}))[0])
        await wait_for(lambda: ended(rx, "Raw.big") and rx.senders["Raw.big"].runs == 2, what="EOR")
        sender = rx.senders["Raw.big"]
        assert sender.condition == RunCondition.GOOD and sender.records == 1
        assert rx.counters.drops["eor_missing"] == 1  # the first run's substitute EOR
        assert rx.counters.errors["bor_twice"] == 1
        assert rx.counters.records == 2  # the 100-byte records of both runs, never the big one
        assert rx.counters.extra["disconnects"] >= 1
    finally:
        await host.stop()
        push.close()
        ctx.term()


SMALL = ["--records", "500", "--size", "2048"]


def test_daemon_pulls_a_run_and_daqctl_shows_the_senders(
    daemon: Callable[..., Any], workdir: Path
) -> None:
    sim = subprocess.Popen(
        [DAQD, "sim", "cdtp", "--bind", "tcp://127.0.0.1:0", "--wait", "--name", "Sim.d", *SMALL],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert sim.stdout is not None and sim.stdin is not None
        endpoint = json.loads(sim.stdout.readline())["endpoint"]
        data = workdir / "data"
        d = daemon(
            '[daemon]\nname = "t"\n'
            + receiver_toml("rx", [endpoint], ["disk"])
            + file_toml("disk", data)
        )
        assert d.ctl("start", "r1").returncode == 0
        sim.stdin.write("go\n")
        sim.stdin.flush()
        assert json.loads(sim.stdout.readline())["runs"][0]["records"] == 500

        def senders() -> dict[str, Any]:
            out = d.ctl("cmd", "rx", "senders")
            assert out.returncode == 0, out.stderr
            result: dict[str, Any] = json.loads(out.stdout)
            return result

        deadline = time.monotonic() + 30
        while senders().get("Sim.d", {}).get("state") != "EOR_RECEIVED":
            assert time.monotonic() < deadline, d.log()
            time.sleep(0.05)
        assert senders()["Sim.d"]["condition"] == "GOOD"
        assert d.ctl("stop").returncode == 0
        rx = d.status()["receivers"]["rx"]
        assert rx["records"] == 500 and rx["extra"]["senders"]["Sim.d"]["seq"] == 500
        assert d.stop() == 0
    finally:
        sim.kill()
        sim.wait()
    _, records, end = run_file(data, "r1")
    assert [r.tags["k"] for r in records] == list(range(1, 501))
    assert end["condition"] == "GOOD"


async def test_messages_waiting_in_zeromq_at_stop_are_handled_not_lost(tmp_path: Path) -> None:
    """What ZeroMQ took off the wire before the receiver stops reaches the run file."""
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    port = push.bind_to_random_port("tcp://127.0.0.1")
    host = await start_host(
        receiver_toml("rx", [f"127.0.0.1:{port}"], ["disk"]) + file_toml("disk", tmp_path)
    )
    enc = cdtp.Encoder("Raw.late")
    stopped = False
    try:
        rx = host.receivers["rx"]
        assert isinstance(rx, CdtpReceiver)
        await host.begin_run("late")
        push.send(enc.encode(cdtp.BeginOfRun("Raw.late"))[0])
        await wait_for(lambda: "Raw.late" in rx.senders, what="the BOR")
        # the receive loop stops here, as when the daemon stops right after this point
        [link] = rx.links.by_endpoint.values()
        pull = link.tasks[0]
        pull.cancel()
        await asyncio.gather(pull, return_exceptions=True)
        parts: list[cdtp.Block] = []
        for seq in range(1, 51):
            enc.record_parts(seq, {"k": seq}, [bytes([seq]) * 100], parts)
        push.send(enc.data_message(50, parts))
        sock = link.sock
        poller = zmq.Poller()
        poller.register(zmq.Socket.shadow(sock.underlying), zmq.POLLIN)
        assert poller.poll(30_000), "the DATA message never reached the receiver's socket"
        await host.stop()
        stopped = True
    finally:
        if not stopped:
            await host.stop()
        push.close()
        ctx.term()
    sender = rx.senders["Raw.late"]
    assert (sender.records, sender.seq, sender.missed) == (50, 50, 0)
    assert rx.counters.records == 50
    _, records, _ = run_file(tmp_path, "late")
    assert [r.tags["cdtp_seq"] for r in records] == list(range(1, 51))
    assert [bytes(r.payload[0]) for r in records] == [bytes([k]) * 100 for k in range(1, 51)]


async def test_close_finishes_a_flush_that_waits_for_a_slow_receiver() -> None:
    """Records a timer flush has taken when the publisher closes still reach the receiver."""
    host = await start_host(
        tx_toml("tx", "payload_threshold_kib = 1000000\nsndhwm = 1\ndata_timeout_s = 60")
    )
    ctx = zmq.asyncio.Context()
    pull = ctx.socket(zmq.PULL)
    pull.setsockopt(zmq.RCVHWM, 1)
    pull.setsockopt(zmq.RCVBUF, 4096)
    pull.setsockopt(zmq.LINGER, 0)
    try:
        tx = host.publishers["tx"]
        assert isinstance(tx, CdtpPublisher)
        pull.connect(tx.addresses["endpoint"])
        await tx.begin_run(RunInfo("slow", time.time_ns()))
        bor = cdtp.decode([await asyncio.wait_for(pull.recv(), 30)])
        assert isinstance(bor, cdtp.BeginOfRun)
        # the receiver reads nothing more: feed 1 MiB at a time until a flush by the timer has
        # made a DATA message that waits for room in the socket
        queue = host.queues["tx"]
        block = bytes(65536)
        fed = 0
        for _ in range(200):
            for _ in range(16):
                fed += 1
                queue.put_nowait(Record("src", fed, 0, {}, [block]))
            await queue.drained()
            await wait_for(lambda: tx._count == 0, what="the timer to flush")
            if tx._outbox:
                break
        assert tx._outbox, "the socket never filled up"
        closing = asyncio.create_task(tx.close())
        await asyncio.sleep(0)  # close() starts while that message still waits
        last = 0
        async with asyncio.timeout(60):
            while last < fed:
                message = cdtp.decode([await pull.recv()])
                assert isinstance(message, cdtp.Data)
                for record in message.records:
                    assert record.seq == last + 1
                    last = record.seq
        await asyncio.wait_for(closing, 60)
        assert not tx.counters.drops
        assert last == fed
    finally:
        await host.stop()
        pull.close()
        ctx.term()


async def test_plain_batches_gaps_and_repeats_reach_the_run_file(tmp_path: Path) -> None:
    """Untagged one-block records (the table fast path) keep every seq, gap and repeat."""
    ctx = zmq.asyncio.Context()
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    port = push.bind_to_random_port("tcp://127.0.0.1")
    host = await start_host(
        receiver_toml("rx", [f"127.0.0.1:{port}"], ["disk"]) + file_toml("disk", tmp_path)
    )
    enc = cdtp.Encoder("Raw.plain")
    batches = [
        list(range(1, 21)),
        list(range(21, 41)),
        list(range(43, 63)),  # 41 and 42 missed
        [*range(63, 71), 70, *range(71, 82)],  # 70 twice
        list(range(82, 102)),
    ]
    sent = [seq for batch in batches for seq in batch]
    try:
        rx = host.receivers["rx"]
        assert isinstance(rx, CdtpReceiver)
        await host.begin_run("plain")
        await push.send(enc.encode(cdtp.BeginOfRun("Raw.plain"))[0])
        for batch in batches:
            parts: list[cdtp.Block] = []
            for seq in batch:
                enc.record_parts(seq, {}, [seq.to_bytes(2, "big") * 300], parts)
            await push.send(enc.data_message(len(batch), parts))
        await push.send(enc.encode(cdtp.EndOfRun("Raw.plain", {}, {"data_records": 101}))[0])
        await wait_for(lambda: ended(rx, "Raw.plain"), what="the EOR")
        await host.end_run()
        await host.queues["disk"].drained()
    finally:
        await host.stop()
        push.close()
        ctx.term()
    sender = rx.senders["Raw.plain"]
    assert (sender.records, sender.seq, sender.missed) == (len(sent), 101, 2)
    assert sender.condition == RunCondition.INCOMPLETE | RunCondition.TAINTED
    assert rx.counters.drops == {"missed": 2} and rx.counters.errors == {"sequence": 1}
    assert (rx.counters.records, rx.counters.bytes) == (len(sent), len(sent) * 600)
    disk = host.publishers["disk"].counters
    assert (disk.records, disk.bytes) == (len(sent), len(sent) * 600)
    _, records, _ = run_file(tmp_path, "plain")
    assert [r.tags for r in records] == [{"cdtp_seq": seq} for seq in sent]
    assert [bytes(r.payload[0]) for r in records] == [s.to_bytes(2, "big") * 300 for s in sent]
    assert [r.seq for r in records] == list(range(1, len(sent) + 1))
    assert {r.source for r in records} == {"Raw.plain"}


async def test_transmitter_keeps_every_kind_of_record_in_order_past_seq_65535(
    tmp_path: Path,
) -> None:
    """Plain records (the transmitter's fast path), tagged ones, several or no blocks, and
    memoryview blocks, mixed in batches, across the 16/32-bit sequence number boundary."""
    a = await start_host(tx_toml("tx", "payload_threshold_kib = 64"), "a")
    tx_endpoint = a.publishers["tx"].addresses["endpoint"]
    b = await start_host(
        receiver_toml("rx", [tx_endpoint], ["disk"], "eor_timeout_s = 5")
        + file_toml("disk", tmp_path),
        "b",
    )
    count = 66_000
    backing = bytes(range(256)) * 40

    def record(k: int) -> Record:
        if k % 997 == 0:
            return Record("src", k, 0, {"k": k}, [k.to_bytes(4, "big")])
        if k % 1009 == 0:
            return Record("src", k, 0, {}, [b"x", k.to_bytes(4, "big")])
        if k % 1013 == 0:
            return Record("src", k, 0, {}, [])
        if k % 3 == 0:
            return Record("src", k, 0, {}, [memoryview(backing)[k % 256 : k % 256 + 8]])
        return Record("src", k, 0, {}, [k.to_bytes(4, "big")])

    try:
        rx = b.receivers["rx"]
        assert isinstance(rx, CdtpReceiver)
        await b.begin_run("kinds")
        await a.begin_run("upstream")
        queue = a.queues["tx"]
        for k in range(1, count + 1):  # as receivers hand records on
            if queue.depth < queue.size:
                queue.put_nowait(record(k))
            else:
                await queue.put(record(k))
        await a.end_run()
        await wait_for(lambda: ended(rx, "daqd.tx"), what="our EOR")
        await b.end_run()
        await b.queues["disk"].drained()
    finally:
        await a.stop()
        await b.stop()
    sender = rx.senders["daqd.tx"]
    assert (sender.records, sender.seq, sender.missed) == (count, count, 0)
    assert sender.condition == RunCondition.GOOD
    _, records, _ = run_file(tmp_path, "kinds")
    assert [r.tags.pop("cdtp_seq") for r in records] == list(range(1, count + 1))
    for k, got in enumerate(records, 1):
        want = record(k)
        assert (got.tags, [bytes(x) for x in got.payload]) == (
            want.tags,
            [bytes(x) for x in want.payload],
        ), k


async def test_stopping_with_a_stalled_publisher_counts_what_is_left_and_ends(
    tmp_path: Path,
) -> None:
    """Messages waiting at stop whose records do not fit a stuck publisher's queue are counted
    as dropped 'shutdown'; stopping does not wait for room that never comes."""
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    port = push.bind_to_random_port("tcp://127.0.0.1")
    # nobody pulls from the transmitter: its begin_run waits for the BOR, its queue fills up
    host = Host(
        parse_config(
            '[daemon]\nname = "t"\ndrain_timeout_s = 0.5\n'
            + receiver_toml("rx", [f"127.0.0.1:{port}"], ["tx"])
            + tx_toml("tx", "bor_timeout_s = 60\nqueue_size = 5"),
            "<test>",
        )
    )
    await host.start()
    enc = cdtp.Encoder("Raw.stuck")

    def data(first: int) -> bytes:
        parts: list[cdtp.Block] = []
        for seq in range(first, first + 10):
            enc.record_parts(seq, {}, [bytes(100)], parts)
        return enc.data_message(10, parts)

    stopped = False
    try:
        rx = host.receivers["rx"]
        assert isinstance(rx, CdtpReceiver)
        await host.begin_run("stuck")
        push.send(enc.encode(cdtp.BeginOfRun("Raw.stuck"))[0])
        push.send(data(1))
        await wait_for(lambda: host.queues["tx"].depth == 5, what="a full queue")
        push.send(data(11))
        [link] = rx.links.by_endpoint.values()
        sock = link.sock
        poller = zmq.Poller()
        poller.register(zmq.Socket.shadow(sock.underlying), zmq.POLLIN)
        assert poller.poll(30_000), "the second DATA message never reached the receiver's socket"
        started = time.monotonic()
        await asyncio.wait_for(host.stop(), 30)
        stopped = True
        assert time.monotonic() - started < 20
    finally:
        if not stopped:
            await host.stop()
        push.close()
        ctx.term()
    assert rx.counters.drops["shutdown"] == 10  # the second message, waiting in ZeroMQ
    assert rx.senders["Raw.stuck"].seq == 20


async def test_a_sender_gone_before_its_bor_is_handled_still_ends_aborted(tmp_path: Path) -> None:
    """The disconnect can be seen before the messages queued ahead of it are handled: the run
    those messages start is ended ABORTED all the same."""
    sim, endpoint = await start_sim("--name", "Sim.g", "--records", "500", "--vanish-after", "50")
    host = await start_host(receiver_toml("rx", [endpoint], [], "eor_timeout_s = 0.5"))
    try:
        rx = host.receivers["rx"]
        assert isinstance(rx, CdtpReceiver)
        await host.begin_run("gone")
        # nothing is handled until the sender is gone and its disconnect was seen
        [link] = rx.links.by_endpoint.values()
        pull = link.tasks[0]
        pull.cancel()
        await asyncio.gather(pull, return_exceptions=True)
        await sim.say("go")
        assert await sim.end() == 0
        await wait_for(lambda: rx.counters.extra.get("disconnects"), what="the disconnect")
        [link] = rx.links.by_endpoint.values()
        endpoint, sock = link.endpoint, link.sock
        await rx.links.drain(endpoint, sock)  # what the receive loop would have handled late
        await wait_for(lambda: ended(rx, "Sim.g"), timeout_s=10, what="the substitute EOR")
        sender = rx.senders["Sim.g"]
        assert (sender.records, sender.seq) == (50, 50)
        assert sender.condition == RunCondition.ABORTED
        assert sender.run_metadata["substitute"] is True
    finally:
        await host.stop()
        await sim.stop()


async def test_runs_of_plain_records_make_the_same_messages_as_record_by_record() -> None:
    """The transmitter encodes runs of plain records at once (cdtp.plain_records): mixed with
    other records, of other lengths, across every seq width, in batches that start and end
    anywhere, its messages still hold every record in order, stay within max_message_bytes and
    take no record past the payload threshold."""
    threshold, limit = 4096, 6000
    host = await start_host(
        tx_toml("tx", f"payload_threshold_kib = 4\nmax_message_bytes = {limit}\nsndhwm = 100000")
    )
    backing = bytes(range(256)) * 8

    def record(k: int) -> Record:
        if k % 701 == 0:
            return Record("src", k, 0, {"k": k}, [bytes(100)])
        if k % 509 == 0:
            return Record("src", k, 0, {}, [b"x", bytes(99)])
        if 1000 <= k < 1200:  # memoryviews, all alike but for every 7th one, a bytes block
            return Record("src", k, 0, {}, [memoryview(backing)[k % 256 : k % 256 + 100]])
        if 1200 <= k < 1300 and k % 7:
            return Record("src", k, 0, {}, [backing[k % 256 : k % 256 + 100]])
        if 2000 <= k < 2100:  # a run of longer blocks: the room decides before the threshold
            return Record("src", k, 0, {}, [k.to_bytes(4, "big") * 500])
        return Record("src", k, 0, {}, [k.to_bytes(4, "big") * 25])

    ctx = zmq.asyncio.Context()
    pull = ctx.socket(zmq.PULL)
    pull.setsockopt(zmq.LINGER, 0)
    count, fed, chunk = 66_000, 0, 1
    try:
        tx = host.publishers["tx"]
        assert isinstance(tx, CdtpPublisher)
        pull.connect(tx.addresses["endpoint"])
        await host.begin_run("runs")
        queue = host.queues["tx"]
        while fed < count:  # batches of 1, 2, 4, ... 256 records, then again
            batch = [record(k) for k in range(fed + 1, min(fed + chunk, count) + 1)]
            while queue.size - queue.depth < len(batch):
                await asyncio.sleep(0.001)
            queue.put_many(batch)
            fed += len(batch)
            chunk = chunk * 2 if chunk < 256 else 1
            await asyncio.sleep(0)
        await host.end_run()
        got: list[cdtp.DataRecord] = []
        async with asyncio.timeout(60):
            while True:
                frame = await pull.recv()
                message = cdtp.decode([frame])
                if isinstance(message, cdtp.EndOfRun):
                    break
                if isinstance(message, cdtp.Data):
                    assert len(frame) <= limit
                    assert sum(r.nbytes for r in message.records[:-1]) < threshold
                    got.extend(message.records)
    finally:
        await host.stop()
        pull.close()
        ctx.term()
    assert [r.seq for r in got] == list(range(1, count + 1))
    for k, r in enumerate(got, 1):
        want = record(k)
        assert (r.tags, [bytes(b) for b in r.blocks]) == (
            want.tags,
            [bytes(b) for b in want.payload],
        )
    assert tx.counters.records == count and not tx.counters.drops
