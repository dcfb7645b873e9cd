"""Seeded fuzz of the SSDAQ-stream receivers of one real `daqd serve`: 1,000 garbage, truncated,
extended and corrupted trigger datagrams (UDP) and TriggerBunches (through a ZeroMQ PUB). After
them: the daemon answers, every input is accounted for exactly (published, or counted under the
reason the codec gives; a readable packet whose patterns name SPs outside its union is both), no
component logged more than 20 lines, and a valid input still gets in.
"""

from __future__ import annotations

import random
import shutil
import socket
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from daqd.protocols import ssdaq_pb as pb
from daqd.protocols import trigger as tp
from daqd.sim.timestamp import TimingBoard
from daqd.sim.trigger import FAULTS, TriggerSource

from .conftest import Daemon, wait_until
from .test_fuzz import check_log, corrupt, delta, paced_udp, receiver

N = 1000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def streamd() -> Iterator[tuple[Daemon, int]]:
    port = _free_port()
    workdir = Path(tempfile.mkdtemp(prefix="daqd-fs"))
    runtime = workdir / "run"
    runtime.mkdir(mode=0o700)
    config = f"""
[daemon]
name = "fuzzs"
drain_timeout_s = 5

[[receiver]]
type = "trigger"
name = "f_trig"
listen = "127.0.0.1:0"

[[receiver]]
type = "timestamp"
name = "f_ts"
connect = "tcp://127.0.0.1:{port}"
check_bunch_counter = false
max_message_bytes = 65536
"""
    d = Daemon(workdir, runtime, config, "fuzzs").start()
    try:
        yield d, port
    finally:
        code = d.stop()
        text = d.log()
        shutil.rmtree(workdir, ignore_errors=True)
        assert code == 0, text


def test_trigger_datagrams(streamd: tuple[Daemon, int]) -> None:
    d, _ = streamd
    rng = random.Random(2024)
    before = receiver(d, "f_trig")
    host, port = before["addresses"]["listen"].rsplit(":", 1)
    expected: Counter[str] = Counter()
    valid = 0

    def refused(errors: dict[str, int]) -> int:
        # a union_mismatch packet is published and counted: it is a record, not refused
        return sum(n for reason, n in errors.items() if reason != "union_mismatch")

    def taken(status: dict[str, Any]) -> int:
        return int(
            status["records"] + refused(status["errors"]) + status["drops"].get("kernel", 0)
        ) - int(before["records"] + refused(before["errors"]))

    check = paced_udp(d, "f_trig", taken, 64 << 10)
    with (
        TriggerSource((host, int(port)), readout_length=rng.choice([8, 64, 128])) as sim,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s,
    ):
        s.connect((host, int(port)))
        for i in range(N):
            k = rng.randrange(4096)
            kind = rng.random()
            if kind < 0.2:
                data = rng.randbytes(rng.randint(0, 1300))
            elif kind < 0.4:
                data = sim.packet(k)[: rng.randint(0, 200)]
            elif kind < 0.5:
                data = sim.packet(k) + rng.randbytes(rng.randint(1, 64))
            elif kind < 0.7:
                data = corrupt(rng, sim.packet(k), rng.randint(1, 4))
            elif kind < 0.8:
                data = sim.faulty(rng.choice(FAULTS), k)
            else:
                data = sim.packet(k)
            try:
                packet = tp.decode(data)
                valid += 1
                if packet.outside_union():
                    expected["union_mismatch"] += 1
            except tp.TriggerError as exc:
                expected[exc.reason] += 1
            s.send(data)
            check(i + 1, len(data) + 64)
    wait_until(lambda: taken(receiver(d, "f_trig")) == N, 60, "every datagram accounted for")
    after = receiver(d, "f_trig")
    assert after["drops"].get("kernel", 0) == before["drops"].get("kernel", 0)
    assert after["records"] - before["records"] == valid
    assert delta(before["errors"], after["errors"]) == dict(expected)
    assert set(expected) >= {"short", "bad_magic", "unknown_type", "bad_length", "bad_phase"}
    with TriggerSource((host, int(port))) as sim:
        sim.send(sim.packet(0))
    wait_until(
        lambda: receiver(d, "f_trig")["records"] == after["records"] + 1, 30, "a valid packet"
    )
    check_log(d)


def test_trigger_bunches(streamd: tuple[Daemon, int]) -> None:
    d, port = streamd
    rng = random.Random(77)
    before = receiver(d, "f_ts")
    expected: Counter[str] = Counter()
    triggers = 0

    def taken(status: dict[str, Any]) -> int:
        extra = status["extra"]
        return int(extra["bunches"] + sum(status["errors"].values())) - int(
            before["extra"]["bunches"] + sum(before["errors"].values())
        )

    def caught_up(n: int) -> None:
        wait_until(lambda: taken(receiver(d, "f_ts")) >= n, 60, "f_ts to catch up")

    with TimingBoard(f"tcp://127.0.0.1:{port}", per_bunch=2) as board:
        assert board.wait_subscriber(30), "the receiver never subscribed"
        for i in range(N):
            b = rng.randrange(1 << 20)
            good = pb.encode_trigger_bunch(board.bunch(b))
            kind = rng.random()
            if kind < 0.2:
                data = rng.randbytes(rng.randint(0, 300))
            elif kind < 0.45:
                data = good[: rng.randint(0, len(good) - 1)]
            elif kind < 0.7:
                data = corrupt(rng, good, rng.randint(1, 4))
            elif kind < 0.75:
                board.sock.send_multipart([good, b"x"])
                expected["multipart"] += 1
                continue
            else:
                data = good
            try:
                triggers += len(pb.decode_trigger_bunch(data).triggers)
            except pb.PbError as exc:
                expected[exc.reason] += 1
            board.sock.send(data)
            if i % 100 == 99:
                caught_up(i + 1)
        wait_until(lambda: taken(receiver(d, "f_ts")) == N, 60, "every message accounted for")
        after = receiver(d, "f_ts")
        assert after["records"] - before["records"] == triggers
        assert after["extra"]["triggers"] - before["extra"]["triggers"] == triggers
        assert delta(before["errors"], after["errors"]) == dict(expected)
        assert {"truncated", "multipart"} <= set(expected)
        board.send_bunch(5)
        wait_until(
            lambda: receiver(d, "f_ts")["records"] == after["records"] + 2, 30, "a valid bunch"
        )
    check_log(d)
