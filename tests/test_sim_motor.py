"""The simulated DCSS motor through the real commands: `daqd sim dcss` moves it, `daqd serve`
(a dcss receiver with a built-in SimulatedMotor) drives it; the simulator prints what it gets."""

from __future__ import annotations

import re
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

from tests.conftest import DAQD, Daemon

CONFIG = """
[daemon]
name = "mot"

[[receiver]]
type = "dcss"
name = "dhs"
connect = "127.0.0.1:{port}"
dhs_name = "dhs"
reconnect_first_s = 0.05

[receiver.motors.m]
speed_units_per_s = 2.0
update_interval_s = 0.1
"""


EXERCISE = ["--exercise-interval-s", "2", "--count", "3"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_one_update_per_interval_rounded_and_an_exact_completion(
    daemon: Callable[..., Daemon], workdir: Path
) -> None:
    port = free_port()
    sim = subprocess.Popen(
        [DAQD, "sim", "dcss", "--listen", f"127.0.0.1:{port}", "--motor", "m", *EXERCISE],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    d = daemon(CONFIG.format(port=port), name="mot")
    try:
        out, err = sim.communicate(timeout=120)
    finally:
        if sim.poll() is None:
            sim.kill()
    assert sim.returncode == 0, err
    assert d.stop() == 0
    lines = [ln.removeprefix("dhs> ") for ln in out.splitlines()]
    # each round moves the motor to -1, then +1, ... (the last round's lines may not be
    # printed: the simulator ends with it)
    moves: list[list[str]] = []
    for ln in lines:
        if ln.startswith("htos_motor_move_started m"):
            moves.append([ln])
        elif moves and ln.startswith(("htos_update_motor_position m", "htos_motor_move_")):
            moves[-1].append(ln)
    done = [m for m in moves if m[-1].startswith("htos_motor_move_completed")]
    assert len(done) >= 2, out
    begin = 0.0
    for started, *updates, completed in done:
        end = float(started.split()[2])
        assert end in (-1.0, 1.0) and end != begin, started
        # the destination exactly, not the last step's float
        assert completed == f"htos_motor_move_completed m {end} normal", completed
        positions = [float(u.split()[2]) for u in updates]
        intervals = round(abs(end - begin) / 2.0 / 0.1)  # 2 units/s, an update each 0.1 s
        # at most one update per interval before the end (13 identical ones were sent before),
        # each a different position on the way, in order, on the motor's 0.001 steps
        # (scale_factor 1000): 0.4, never 0.39999999999954525
        assert 1 <= len(positions) <= intervals - 1, updates
        assert len(set(positions)) == len(positions), updates
        assert positions == sorted(positions, reverse=end < begin), updates
        assert all(min(begin, end) < p < max(begin, end) for p in positions), updates
        for u in updates:
            assert re.fullmatch(r"htos_update_motor_position m -?\d\.\d{1,3} moving", u), u
        begin = end
