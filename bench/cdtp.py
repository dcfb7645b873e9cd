"""Benchmark: CDTP records/s and MB/s, daqd vs constellationdaq vs raw pyzmq, in the same run.

Three transports move the same records from a sender process to a receiver process over TCP on
127.0.0.1, each timed at the receiver from the first record's arrival to the last:
  * raw   - pyzmq PUSH -> PULL, one message per record, nothing else (the baseline);
  * daqd  - a Host whose `cdtp` publisher is fed through its queue -> a Host with a `cdtp`
            receiver that decodes every record into a daqd Record and publishes it (both uvloop);
  * cnstl - constellationdaq 1.0.2 DataTransmitter -> DataReceiver (peer venv, tests/peers.py).
Sizes: 1 KiB x 100k and 64 KiB x 10k records (one block each). Goal: daqd/raw >= 1.0 at 1 KiB
and >= 0.9 at 64 KiB. `--scale 0.5` halves the counts if the machine is slow; the output says so.

    .venv/bin/python bench/cdtp.py [--scale 1.0] [--rounds 3] [--skip-constellation]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from _common import hear, say

ROOT = Path(__file__).resolve().parent.parent
PEER_SCRIPT = ROOT / "tests" / "cdtp_peer.py"
CASES = [(1024, 100_000), (65536, 10_000)]


def run_uvloop(main: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main())


def spawn(*argv: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        list(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT
    )


def daemon_gc() -> None:
    """The process settings `daqd serve` applies once its host has started (garbage collector,
    malloc), so that the in-process hosts here run as the daemon does."""
    from daqd.daemon import tune_for_throughput

    tune_for_throughput()


# ----- raw pyzmq ------------------------------------------------------------------------------
def raw_sender(endpoint: str, size: int, count: int) -> None:
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.connect(endpoint)
    payload = bytes(size)
    cpu = time.process_time()
    for _ in range(count):
        sock.send(payload, copy=False)
    sock.close(linger=-1)
    ctx.term()
    print(json.dumps({"cpu_s": time.process_time() - cpu}), flush=True)


Result = tuple[int, float, float, float]  # records, seconds, sender CPU s, receiver CPU s


def bench_raw(size: int, count: int) -> Result:
    import zmq

    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    sender = spawn(
        sys.executable, __file__, "_raw_sender", f"tcp://127.0.0.1:{port}", f"{size}", f"{count}"
    )
    copy = size < 65536  # bytes are cheaper below pyzmq's zero-copy threshold, frames above it
    pull.recv(copy=copy)
    first = time.perf_counter()
    cpu = time.process_time()
    for _ in range(count - 1):
        pull.recv(copy=copy)
    elapsed = time.perf_counter() - first
    cpu = time.process_time() - cpu
    tx_cpu = hear(sender)["cpu_s"]
    sender.wait()
    pull.close()
    ctx.term()
    return count, elapsed, tx_cpu, cpu


# ----- daqd -----------------------------------------------------------------------------------
TX_CONFIG = """
[daemon]
name = "bench-cdtp-tx"
[[publisher]]
type = "cdtp"
name = "tx"
endpoint = "tcp://127.0.0.1:0"
"""

RX_CONFIG = """
[daemon]
name = "bench-cdtp-rx"
[[receiver]]
type = "cdtp"
name = "rx"
senders = ["{endpoint}"]
"""


def daqd_sender(size: int, count: int) -> None:
    """A Host with one cdtp publisher; records go in through the host's queue, as from a receiver
    that hands on a received message's records at once (as the cdtp receiver does)."""

    async def main() -> None:
        from daqd.config import parse_config
        from daqd.host import Host
        from daqd.record import Record

        host = Host(parse_config(TX_CONFIG, "<bench>"))
        await host.start()
        daemon_gc()
        tx = host.publishers["tx"]
        print(json.dumps({"endpoint": tx.addresses["endpoint"]}), flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        cpu = time.process_time()
        await host.begin_run("bench")
        queue = host.queues["tx"]
        payload = [bytes(size)]
        now = time.time_ns()
        per = max(1, (128 << 10) // size)  # the records one 128 KiB CDTP message holds
        for first in range(1, count + 1, per):
            batch = [
                Record("bench", k, now, {}, payload)
                for k in range(first, min(first + per, count + 1))
            ]
            # as receivers hand on what one message held (ReceiverServer.publish_many): in one
            # queue operation while the queue has room, else record by record as room comes
            if queue.size - queue.depth >= len(batch):
                queue.put_many(batch, size * len(batch))
            else:
                for record in batch:
                    await queue.put(record)
        await host.end_run()
        await queue.drained()
        cpu = time.process_time() - cpu
        await host.stop()
        print(json.dumps({"sent": count, "cpu_s": cpu}), flush=True)

    run_uvloop(main)


def bench_daqd(size: int, count: int) -> Result:
    sender = spawn(sys.executable, __file__, "_daqd_sender", f"{size}", f"{count}")
    endpoint = hear(sender)["endpoint"]

    async def main() -> tuple[int, float, float]:
        from daqd.receivers.cdtp import CdtpReceiver, SenderState

        from daqd.config import parse_config
        from daqd.host import Host

        host = Host(parse_config(RX_CONFIG.format(endpoint=endpoint), "<bench>"))
        await host.start()
        daemon_gc()
        rx = host.receivers["rx"]
        assert isinstance(rx, CdtpReceiver)
        say(sender, "go")
        cpu = time.process_time()
        while True:
            state = rx.senders.get("daqd.tx")
            if state is not None and state.state is SenderState.EOR_RECEIVED:
                break
            await asyncio.sleep(0.01)
        cpu = time.process_time() - cpu
        await host.stop()
        if state.missed or state.records != count:
            raise RuntimeError(f"daqd lost records: {state.snapshot()}")
        return state.records, (state.last_data_ns - state.first_data_ns) / 1e9, cpu

    n, seconds, rx_cpu = run_uvloop(main)
    tx_cpu = hear(sender)["cpu_s"]
    sender.wait()
    return n, seconds, tx_cpu, rx_cpu


# ----- constellationdaq -----------------------------------------------------------------------
def bench_constellation(size: int, count: int) -> Result:
    sys.path.insert(0, str(ROOT))
    from tests.peers import peer_python

    python = str(peer_python("constellation"))
    settings = {"name": "Bench.tx", "count": count, "sizes": [size], "bench": True, "wait": True}
    sender = spawn(python, str(PEER_SCRIPT), "send")
    say(sender, json.dumps(settings))
    port = int(hear(sender)["endpoint"].rsplit(":", 1)[1])
    receiver = spawn(python, str(PEER_SCRIPT), "receive")
    say(receiver, json.dumps({"port": port, "sender": "Bench.tx", "count_only": True}))
    hear(receiver)  # ready
    say(sender, "go")
    result = hear(receiver)
    tx_cpu = hear(sender)["cpu_s"]
    sender.wait()
    receiver.wait()
    if result.get("error") or result["records"] != count:
        raise RuntimeError(f"constellationdaq lost records: {result}")
    return result["records"], result["seconds"], tx_cpu, result["cpu_s"]


# ----- main -----------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0, help="multiply the record counts")
    parser.add_argument("--rounds", type=int, default=3, help="rounds: best and median kept")
    parser.add_argument("--skip-constellation", action="store_true")
    args = parser.parse_args()
    started = time.monotonic()
    if args.scale != 1.0:
        print(
            f"NOTE: record counts scaled by {args.scale} (--scale) to stay within the time budget"
        )
    kinds: list[tuple[str, Callable[[int, int], Result]]] = [
        ("raw", bench_raw),
        ("daqd", bench_daqd),
    ]
    if not args.skip_constellation:
        kinds.append(("cnstl", bench_constellation))
    print(
        f"{'size':>7} {'records':>8} {'transport':>9} {'rec/s':>9} {'MB/s':>7} {'x raw':>6}"
        f" {'tx us/rec':>9} {'rx us/rec':>9} {'cpu x raw':>9} {'med x raw':>9}"
    )
    for size, base_count in CASES:
        count = max(100, int(base_count * args.scale))
        rates: dict[str, list[float]] = {name: [] for name, _ in kinds}
        cpu: dict[str, tuple[float, float]] = {}
        for _ in range(args.rounds):
            for name, fn in kinds:  # alternate, so that load changes hit every transport alike
                n, seconds, tx_cpu, rx_cpu = fn(size, count)
                rates[name].append(n / seconds)
                per = (tx_cpu / n * 1e6, rx_cpu / n * 1e6)
                if name not in cpu or sum(per) < sum(cpu[name]):
                    cpu[name] = per
        rate = {name: max(r) for name, r in rates.items()}
        for name, _ in kinds:
            tx_us, rx_us = cpu[name]
            # CPU per record of the busier side decides the rate on an idle machine
            cpu_ratio = max(cpu["raw"]) / max(tx_us, rx_us)
            # the ratio to raw within each round (measured seconds apart), median over the rounds
            paired = statistics.median(
                a / b for a, b in zip(rates[name], rates["raw"], strict=True)
            )
            print(
                f"{size:>7} {count:>8} {name:>9} {rate[name]:>9.0f} {rate[name] * size / 1e6:>7.1f}"
                f" {rate[name] / rate['raw']:>6.2f} {tx_us:>9.2f} {rx_us:>9.2f} {cpu_ratio:>9.2f}"
                f" {paired:>9.2f}"
            )
    load = os.getloadavg()[0]
    print(f"load average {load:.1f} on {os.cpu_count()} cpus: wall-clock rates are noisy on a busy")
    print("machine; 'cpu x raw' compares CPU time per record of each pipeline's busier process;")
    print(
        "'x raw' is of the best rates over the rounds, 'med x raw' the median of each round's ratio"
    )
    print(f"cpus: {os.cpu_count()}, wall time {time.monotonic() - started:.1f} s")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_raw_sender":
        raw_sender(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    elif len(sys.argv) > 1 and sys.argv[1] == "_daqd_sender":
        sys.path.insert(0, str(ROOT))
        daqd_sender(int(sys.argv[2]), int(sys.argv[3]))
    else:
        main()
