"""Benchmark: highest lossless trigger-packet rate of the `trigger` receiver vs a bare uvloop counter.

Both receivers run in their own process with the same SO_RCVBUF and are fed by the backplane
simulator (daqd.sim.trigger) in another process, at rising rates, packet types cycling 0,1,2,3
(V1 1115 B, V2 with a 64-sample window 4189 B, V3 about 100 B). daqd decodes every packet and
publishes one record per packet through the `zmq` publisher to a SUB in this process (with
`--format ssdaq`, SSDAQ's drop-in: each packet as one bare frame, `framing = "payload"`, as
examples/chec-camera.toml publishes it for SSDAQ's consumers); a trial is
lossless when every packet arrived, the kernel dropped none and (daqd) every record reached the
SUB. Prints the highest lossless rate of each, their ratio (goal >= 0.5) and CPU us per packet;
by default for both formats in turn (SSDAQ's drop-in first).
The machinery is bench/_common.py's (shared with slowsignal.py).

    .venv/bin/python bench/trigger.py [--duration-s 1.5] [--format both|record|ssdaq] [--types 0,1,2,3]
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

RATES = [2000, 5000, 10000, 15000, 20000, 25000, 30000, 40000, 50000, 60000, 70000, 80000, 100000,
         120000, 150000]  # fmt: skip
RCVBUF = 8 << 20
FORMATS = {
    "ssdaq": "SSDAQ's drop-in: decode and check, then each packet as one bare frame",
    "record": "decoded records: decode, tags, three frames each",
}


def daqd_config(fmt: str) -> str:
    return f"""
[daemon]
name = "bench-trigger"
drain_timeout_s = 5

[[receiver]]
type = "trigger"
name = "rx"
listen = "127.0.0.1:0"
rcvbuf_bytes = {RCVBUF}
format = "{fmt}"
publish_to = ["live"]

[[publisher]]
type = "zmq"
name = "live"
endpoint = "tcp://127.0.0.1:0"
framing = "{"payload" if fmt == "ssdaq" else "record"}"
"""


def report(rec: Any) -> dict[str, Any]:
    return {"received": sum(rec.per_type.values()), "faults": sum(rec.counters.errors.values())}


def send(port: int, rate: float, count: int, types: str) -> None:
    from daqd.sim.trigger import TriggerSource

    type_list = tuple(int(t) for t in types.split(","))
    with TriggerSource(("127.0.0.1", port), type_list, 64) as sim:
        for k in range(256 * len(type_list)):  # fill the template cache before timing
            sim.packet(k)
        t0 = time.monotonic()
        stats = sim.run(count, rate)
        elapsed = time.monotonic() - t0
    print(json.dumps({"sent": stats.packets, "elapsed_s": elapsed}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--duration-s", type=float, default=1.5)
    ap.add_argument("--format", choices=["both", "record", "ssdaq"], default="both")
    ap.add_argument("--types", default="0,1,2,3")
    args = ap.parse_args()
    print(
        f"trigger bench: packet types {args.types}, {args.duration_s} s per trial, SO_RCVBUF "
        f"{RCVBUF} bytes asked, {os.cpu_count()} CPUs; bare and daqd trials interleaved so both "
        "see the same load"
    )

    def run(child: JsonChild, rate: int, duration_s: float, sub: SubCounter | None) -> Any:
        count = max(1, math.ceil(rate * duration_s))
        port = str(child.ready["port"])
        sender = [sys.executable, __file__, "--send", port, str(rate), str(count), args.types]
        return trial(child, rate, sender, sub, lambda sent: sent)  # one record per packet

    formats = ["ssdaq", "record"] if args.format == "both" else [args.format]
    for fmt in formats:
        what = FORMATS[fmt]
        print(f"\n== format {fmt!r}: {what}")
        compare_udp(__file__, RATES, args.duration_s, run, "packet", "trigger", what, fmt)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--serve":
        serve(daqd_config(sys.argv[3]), report, RCVBUF)
    elif len(sys.argv) > 1 and sys.argv[1] == "--send":
        send(int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
    else:
        main()
