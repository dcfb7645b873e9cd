"""Benchmark: highest lossless datagram rate of the slow-signal receiver vs a bare uvloop counter.

Both receivers run in their own process, are fed 1440-byte datagrams (32 modules x 10 blocks) by the
TARGET-module simulator in another process, at rising rates, with the same SO_RCVBUF. daqd assembles
readouts and publishes them through the `zmq` publisher to a SUB in this process; a trial is
lossless when every datagram arrived, the kernel dropped none, and (daqd) every readout reached the
SUB. Prints the highest lossless rate of each, their ratio, and CPU microseconds per datagram.
The machinery is bench/_common.py's (shared with trigger.py).

    .venv/bin/python bench/slowsignal.py [--duration-s 1.5]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Any

from _common import JsonChild, SubCounter, compare_udp, serve, trial

RATES = [1000, 2000, 4000, 8000, 12000, 16000, 20000, 24000, 28000, 32000, 36000, 40000, 48000,
         56000, 64000, 72000, 80000]  # fmt: skip
MODULES = 32
BLOCKS = 10
RCVBUF = 8 << 20
DAQD_CONFIG = f"""
[daemon]
name = "bench-slowsignal"
drain_timeout_s = 5

[[receiver]]
type = "slowsignal"
name = "rx"
listen = "127.0.0.1:0"
rcvbuf_bytes = {RCVBUF}
modules = {MODULES}
flush_after_s = 1.0
publish_to = ["live"]

[[publisher]]
type = "zmq"
name = "live"
endpoint = "tcp://127.0.0.1:0"
"""


def report(rec: Any) -> dict[str, Any]:
    return {
        "received": sum(rec.per_module["datagrams"]),
        "faults": rec.incomplete,  # readouts published without every module
        "pending": len(rec.pending),
    }


def send(port: int, rate: float, count: int, tack_start_ns: int) -> None:
    from daqd.sim.slowsignal import TargetModules

    with TargetModules(("127.0.0.1", port), MODULES, BLOCKS, tack_start_ns=tack_start_ns) as sim:
        t0 = time.monotonic()
        stats = sim.run(count, rate)
        elapsed = time.monotonic() - t0
    print(json.dumps({"sent": stats.datagrams, "elapsed_s": elapsed}), flush=True)


_tack = [time.time_ns()]


def run(child: JsonChild, rate: int, duration_s: float, sub: SubCounter | None) -> Any:
    count = max(1, math.ceil(rate * duration_s / MODULES)) * MODULES
    deadline = time.monotonic() + 10.0
    while sub is not None and time.monotonic() < deadline:
        # what an earlier lossy trial left pending is flushed after flush_after_s: let it land
        n = sub.n
        time.sleep(0.2)
        if sub.n == n and child.report()["pending"] == 0:
            break
    _tack[0] += 10**15  # every trial its own TACK range: nothing pairs with an earlier trial
    port = str(child.ready["port"])
    sender = [sys.executable, __file__, "--send", port, str(rate), str(count), str(_tack[0])]
    # every datagram carries BLOCKS blocks, each one of the MODULES parts of a readout
    return trial(child, rate, sender, sub, lambda sent: sent // MODULES * BLOCKS)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--duration-s", type=float, default=1.5)
    args = ap.parse_args()
    print(
        f"slow-signal bench: {MODULES} modules x {BLOCKS} blocks = 1440-byte datagrams, "
        f"{args.duration_s} s per trial, SO_RCVBUF {RCVBUF} bytes asked, {os.cpu_count()} CPUs; "
        "bare and daqd trials interleaved so both see the same load"
    )
    what = "assembly + zmq publish to a SUB"
    compare_udp(__file__, RATES, args.duration_s, run, "datagram", "slowsignal", what)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--serve":
        serve(DAQD_CONFIG, report, RCVBUF)
    elif len(sys.argv) > 1 and sys.argv[1] == "--send":
        send(int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
    else:
        main()
