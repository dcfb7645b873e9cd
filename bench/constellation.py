"""Benchmark: daqd as a Constellation satellite against constellationdaq 1.0.2's own Python
satellites, in the same run, seen by the real controller (a ScriptableController driven by
tests/constellation_control.py). Everything runs in a private network namespace: the script runs
itself again under `unshare -n`, so CHIRP never leaves it.

  * discovery: from starting the process to the controller knowing it (its CONTROL offer taken and
    its heartbeat state in hand): `daqd serve` (udp -> file) vs `SatellitePyDevNullReceiver`.
    Goal: daqd < 1 s.
  * transitions: initialize, launch, start, stop, land, each from the controller sending the
    command to the controller seeing the state reached (by heartbeat): the same two satellites.
    Goal: daqd <= the Python satellite.
  * throughput: Constellation runs of `SatellitePyRandomTransmitter` (1 KiB records) into
    `SatellitePyDevNullReceiver`, directly and through daqd (a `cdtp` receiver that finds the
    transmitter by CHIRP -> a `cdtp` publisher the receiver finds by CHIRP), alternating:
    records/s over the transmitter's run (from the controller sending it `start` to sending it
    `stop`), counted by the receiver (its own `get_data_rate` times its own run, from its
    `start` to its `stop`). Goal: through daqd >= 1.0x. The receiver's rate alone is printed
    too, but it is not a throughput: its run also holds the time the rest of the chain takes
    to start after it and to stop before it, one more satellite (daqd) and two more
    transitions of ~100 ms as the controller sees them, 4% of a 5 s run with no data to
    receive. The transmitter's own pace moves by a quarter between identical runs (57k-135k
    records/s seen on one day, always at a full core), so the verdict is the median of each
    round's ratio over many alternating rounds.
    The chain's parts stand for nodes of their own, but this box may have two cores for three
    processes, and the Python transmitter needs a whole core: whatever CPU a relay took from it
    would be measured as the relay's slowness. So (unless --no-pin) the transmitter has CPU 0 to
    itself in both kinds of run, and the receiver, daqd and the controller share the others: a
    relay too slow for the transmitter's pace still shows (the receiver then gets less), a
    relay that keeps up does not cost the transmitter.

    .venv/bin/python bench/constellation.py [--rounds 9] [--seconds 4] [--cycles 5] [--no-pin]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from _common import cpu_s  # noqa: E402

from daqd.control_client import ControlClient  # noqa: E402
from tests.peers import peer_python  # noqa: E402

CONTROL_SCRIPT = ROOT / "tests" / "constellation_control.py"
DAQD = str(Path(sys.executable).parent / "daqd")
GROUP = "bench"
IN_NAMESPACE = "DAQD_BENCH_NETNS"
BLOCK = 1024
STEPS = [
    ("initialize", "INIT"),
    ("launch", "ORBIT"),
    ("start", "RUN"),
    ("stop", "ORBIT"),
    ("land", "INIT"),
]


def into_namespace() -> None:
    """Run this script again in a new network namespace with lo up (root, or where permitted)."""
    if os.environ.get(IN_NAMESPACE) == "1":
        return
    if not shutil.which("unshare"):
        raise SystemExit("bench/constellation.py needs unshare (util-linux) for its namespace")
    argv = ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$@"', "sh"]
    env = {**os.environ, IN_NAMESPACE: "1"}
    result = subprocess.run([*argv, sys.executable, *sys.argv], env=env)
    raise SystemExit(result.returncode)


class Controller:
    def __init__(self, peer: str) -> None:
        self.proc = subprocess.Popen(
            [peer, str(CONTROL_SCRIPT)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            preexec_fn=pinned("rest"),
        )
        self._say({"group": GROUP, "interface": ["lo"]})
        self._hear()

    def _say(self, what: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(what) + "\n")
        self.proc.stdin.flush()

    def _hear(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the controller exited with {self.proc.wait()}")
        result: dict[str, Any] = json.loads(line)
        return result

    def ask(self, op: str, **args: Any) -> dict[str, Any]:
        self._say({"op": op, **args})
        return self._hear()

    def transition(self, name: str, cmd: str, state: str, payload: Any = None) -> float:
        out = self.ask("transition", name=name, cmd=cmd, payload=payload, state=state, timeout=60)
        if not out["ok"]:
            raise RuntimeError(f"{name} {cmd}: {out}")
        seconds: float = out["seconds"]
        return seconds

    def close(self) -> None:
        self._say({"op": "quit"})
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# CPUs for the transmitter, and for everything else, once main() has decided (--no-pin: none)
PINS: dict[str, set[int]] = {}


def pinned(role: str) -> Any:
    """A preexec_fn putting the child on the CPUs of `role` ("transmitter" or "rest")."""
    cpus = PINS.get(role)
    return None if cpus is None else (lambda: os.sched_setaffinity(0, cpus))


class Process:
    """A satellite process: `daqd serve` or a constellationdaq satellite's command."""

    def __init__(
        self, argv: list[str], log: Path, env: dict[str, str] | None = None, role: str = "rest"
    ) -> None:
        self.log = log
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env or dict(os.environ),
                preexec_fn=pinned(role),
            )

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def start_daqd(tmp: Path, name: str, body: str) -> Process:
    runtime = tmp / f"run-{name}"
    runtime.mkdir()
    config = tmp / f"{name}.toml"
    config.write_text(
        f'[daemon]\nname = "{name}"\ndrain_timeout_s = 15\n{body}\n'
        f'[constellation]\ngroup = "{GROUP}"\ninterface = ["lo"]\n'
    )
    env = {**os.environ, "RUNTIME_DIRECTORY": str(runtime)}
    env.pop("NOTIFY_SOCKET", None)
    return Process([DAQD, "serve", str(config)], tmp / f"{name}.log", env)


def daqd_status(tmp: Path, name: str) -> dict[str, Any]:
    with ControlClient(f"ipc://{tmp}/run-{name}/{name}.ctl", timeout_s=10.0) as c:
        result: dict[str, Any] = c.request("STAT", {})
    return result


def start_python(peer_bin: Path, kind: str, name: str, tmp: Path) -> Process:
    argv = [str(peer_bin / f"Satellite{kind}"), "--group", GROUP, "--name", name]
    role = "transmitter" if kind == "PyRandomTransmitter" else "rest"
    return Process(
        [*argv, "--interface", "lo", "--level", "WARNING"], tmp / f"{name}.log", role=role
    )


def disk_config(tmp: Path, name: str) -> str:
    return f"""
[[receiver]]
type = "udp"
name = "raw"
listen = "127.0.0.1:0"
publish_to = ["disk"]

[[publisher]]
type = "file"
name = "disk"
directory = "{tmp / f"data-{name}"}"
"""


BRIDGE_CONFIG = """
[[receiver]]
type = "cdtp"
name = "in"
discover = true
receive_from = ["PyRandomTransmitter.tx"]
seq_tag = ""    # a relay: records go on as they came, without the upstream seq as a tag
publish_to = ["pub"]

[[publisher]]
type = "cdtp"
name = "pub"
endpoint = "tcp://127.0.0.1:0"
"""


# ----- discovery and transitions --------------------------------------------------------------
def satellite_trial(
    ctrl: Controller, start: Any, canonical: str, cycles: int, run_prefix: str
) -> tuple[float, dict[str, list[float]]]:
    """Start a satellite; the seconds until the controller knows it, and each transition's."""
    began = time.monotonic()
    process = start()
    try:
        found = ctrl.ask("await", names=[canonical], timeout=60)
        if not found["ok"]:
            raise RuntimeError(f"the controller did not find {canonical}: {found}")
        discovery = found["seen"] - began
        seconds: dict[str, list[float]] = {cmd: [] for cmd, _ in STEPS}
        for k in range(cycles):
            for cmd, state in STEPS:
                payload: Any = {} if cmd == "initialize" else None
                if cmd == "start":
                    payload = f"{run_prefix}{k}"
                seconds[cmd].append(ctrl.transition(canonical, cmd, state, payload))
    finally:
        process.stop()
    return discovery, seconds


# ----- throughput -----------------------------------------------------------------------------
def throughput_trial(
    ctrl: Controller,
    tmp: Path,
    via_daqd: bool,
    seconds: float,
    run_id: str,
    pids: dict[str, int],
) -> tuple[float, str, dict[str, float]]:
    """One run transmitter -> (daqd ->) receiver: records/s over the transmitter's run, a note,
    and the CPU seconds each process used from the first start to the last stop."""
    tx, null = "PyRandomTransmitter.tx", "PyDevNullReceiver.null"
    sats = [null, tx]
    daqd: Process | None = None
    name = f"bridge{run_id}"
    if via_daqd:
        daqd = start_daqd(tmp, name, BRIDGE_CONFIG)
        sats = [null, f"Daqd.{name}", tx]
        if not ctrl.ask("await", names=sats, timeout=60)["ok"]:
            raise RuntimeError(f"the controller did not find {name}")
    try:
        configs = {
            tx: {"block_size": BLOCK, "number_of_blocks": 1},
            null: {"_data": {"receive_from": ["daqd.pub" if via_daqd else tx]}},
            f"Daqd.{name}": {},
        }
        for sat in sats:
            ctrl.transition(sat, "initialize", "INIT", configs[sat])
        for sat in sats:
            ctrl.transition(sat, "launch", "ORBIT")
        procs = dict(pids, **({"daqd": daqd.proc.pid} if daqd is not None else {}))
        cpu = {kind: cpu_s(pid) for kind, pid in procs.items()}
        sent: dict[tuple[str, str], float] = {}  # when each command went out
        for sat in sats:  # the receiving end first
            sent[sat, "start"] = time.monotonic()
            ctrl.transition(sat, "start", "RUN", run_id)
        time.sleep(seconds)  # the run: the transmitter sends as fast as it can
        for sat in reversed(sats):  # the sending end first, so every EOR goes through
            sent[sat, "stop"] = time.monotonic()
            ctrl.transition(sat, "stop", "ORBIT")
        cpu = {kind: cpu_s(pid) - cpu[kind] for kind, pid in procs.items()}
        gbps = ctrl.ask("cmd", name=null, cmd="get_data_rate")["reply"][2]
        own_rate = float(gbps) * 1e9 / 8 / BLOCK  # over the receiver's run
        null_s = sent[null, "stop"] - sent[null, "start"]
        tx_s = sent[tx, "stop"] - sent[tx, "start"]
        rate = own_rate * null_s / tx_s
        note = f"runs: transmitter {tx_s:.2f} s, receiver {null_s:.2f} s at {own_rate:.0f}/s."
        if via_daqd:
            last = daqd_status(tmp, name)["last_run"]
            pub = last["accounting"]["publishers"]["pub"]
            note += f" daqd run {last['condition']}, {pub['delivered']} records delivered"
            if last["condition"] != "GOOD" or pub["delivered"] != pub["offered"]:
                note += f" (NOT GOOD: {last['reasons']})"
        for sat in sats:
            ctrl.transition(sat, "land", "INIT")
    finally:
        if daqd is not None:
            daqd.stop()
    return rate, note, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9, help="trials of each kind, alternating")
    parser.add_argument("--seconds", type=float, default=4.0, help="length of a throughput run")
    parser.add_argument("--cycles", type=int, default=5, help="transition cycles per satellite")
    parser.add_argument(
        "--no-pin", action="store_true", help="no CPU of its own for the transmitter"
    )
    args = parser.parse_args()
    into_namespace()
    cpus = sorted(os.sched_getaffinity(0))
    if not args.no_pin and len(cpus) >= 2:
        PINS.update(transmitter={cpus[0]}, rest=set(cpus[1:]))
    started = time.monotonic()
    peer = str(peer_python("constellation"))
    peer_bin = Path(peer).parent
    ctrl = Controller(peer)
    discovery: dict[str, list[float]] = {"daqd": [], "python": []}
    transitions: dict[str, dict[str, list[float]]] = {
        kind: {cmd: [] for cmd, _ in STEPS} for kind in discovery
    }
    rates: dict[str, list[float]] = {"direct": [], "daqd": []}
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="bench-constellation-") as where:
        tmp = Path(where)
        try:
            for k in range(args.rounds):  # alternate, so load changes hit both alike
                trials = {
                    "daqd": (
                        lambda n=f"d{k}": start_daqd(tmp, n, disk_config(tmp, n)),
                        f"Daqd.d{k}",
                    ),
                    "python": (
                        lambda n=f"n{k}": start_python(peer_bin, "PyDevNullReceiver", n, tmp),
                        f"PyDevNullReceiver.n{k}",
                    ),
                }
                for kind, (start, canonical) in trials.items():
                    found, seconds = satellite_trial(ctrl, start, canonical, args.cycles, f"r{k}_")
                    discovery[kind].append(found)
                    for cmd, values in seconds.items():
                        transitions[kind][cmd].extend(values)
            tx = start_python(peer_bin, "PyRandomTransmitter", "tx", tmp)
            null = start_python(peer_bin, "PyDevNullReceiver", "null", tmp)
            pids = {"transmitter": tx.proc.pid, "receiver": null.proc.pid}
            try:
                sats = ["PyRandomTransmitter.tx", "PyDevNullReceiver.null"]
                if not ctrl.ask("await", names=sats, timeout=60)["ok"]:
                    raise RuntimeError("the controller did not find the Python satellites")
                for k in range(args.rounds):
                    for kind in rates:
                        rate, note, cpu = throughput_trial(
                            ctrl, tmp, kind == "daqd", args.seconds, f"t{k}{kind}", pids
                        )
                        rates[kind].append(rate)
                        use = ", ".join(f"{p} {c:.1f}" for p, c in cpu.items())
                        notes.append(f"{kind}: {rate:.0f} records/s; CPU s: {use}. {note}")
            finally:
                tx.stop()
                null.stop()
        finally:
            ctrl.close()
    report(args, discovery, transitions, rates, notes, time.monotonic() - started)


def report(
    args: argparse.Namespace,
    discovery: dict[str, list[float]],
    transitions: dict[str, dict[str, list[float]]],
    rates: dict[str, list[float]],
    notes: list[str],
    wall_s: float,
) -> None:
    ms = 1000.0
    print(f"{'':<22} {'daqd':>9} {'python':>9} {'daqd/py':>8}   (medians)")
    d, p = statistics.median(discovery["daqd"]), statistics.median(discovery["python"])
    print(f"{'discovery ms':<22} {d * ms:>9.0f} {p * ms:>9.0f} {d / p:>8.2f}")
    total = {"daqd": 0.0, "python": 0.0}
    for cmd, _ in STEPS:
        d = statistics.median(transitions["daqd"][cmd])
        p = statistics.median(transitions["python"][cmd])
        total["daqd"] += d
        total["python"] += p
        print(f"{cmd + ' ms':<22} {d * ms:>9.1f} {p * ms:>9.1f} {d / p:>8.2f}")
    cycle = total["daqd"] / total["python"]
    d, p = total["daqd"], total["python"]
    print(f"{'all five ms':<22} {d * ms:>9.1f} {p * ms:>9.1f} {cycle:>8.2f}")
    direct, via = statistics.median(rates["direct"]), statistics.median(rates["daqd"])
    paired = statistics.median(v / r for v, r in zip(rates["daqd"], rates["direct"], strict=True))
    print(
        f"{'records/s, 1 KiB':<22} {'via daqd':>9} {'direct':>9} {'ratio':>8}   (over the transmitter's run)"
    )
    print(f"{'':<22} {via:>9.0f} {direct:>9.0f} {via / direct:>8.2f}")
    ratios = sorted(v / r for v, r in zip(rates["daqd"], rates["direct"], strict=True))
    print(f"  each round's daqd/direct, sorted: {' '.join(f'{r:.2f}' for r in ratios)}")
    for note in notes:
        print(f"  {note}")
    print()
    print(
        f"discovery daqd        : {statistics.median(discovery['daqd']) * ms:.0f} ms  (goal < 1000)"
    )
    print(f"ratio transitions     : daqd/python {cycle:.2f} (sum of the medians)  (goal <= 1.0)")
    print(
        "  (the Python controller reads one heartbeat per satellite every 50 ms or so, so each"
        " transition is seen in steps of that; daqd's log shows its transitions done in < 5 ms)"
    )
    print(f"ratio throughput      : daqd/direct {paired:.2f} (median of rounds)  (goal >= 1.0)")
    if PINS:
        print(
            f"  (the transmitter on CPU {sorted(PINS['transmitter'])} alone, the receiver, daqd"
            f" and the controller on {sorted(PINS['rest'])}, in both kinds of run)"
        )
    else:
        print(
            "  (not pinned: the transmitter is CPU-bound, so whatever CPU daqd takes on a busy"
            " machine it loses; compare the CPU seconds above)"
        )
    load = os.getloadavg()[0]
    print(
        f"rounds {args.rounds}, runs of {args.seconds:.0f} s, {args.cycles} transition cycles each;"
        f" load average {load:.1f} on {os.cpu_count()} cpus; wall time {wall_s:.1f} s"
    )


if __name__ == "__main__":
    main()
