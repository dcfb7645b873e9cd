"""Benchmark: highest lossless trigger-packet rate of the `trigger` receiver vs a bare uvloop counter.

Both receivers run in their own process with the same SO_RCVBUF and are fed by the backplane
simulator (daqd.sim.trigger) in another process, at rising rates, packet types cycling 0,1,2,3
(V1 1115 B, V2 with a 64-sample window 4189 B, V3 about 100 B). daqd decodes every packet and
publishes one record per packet through the `zmq` publisher to a SUB in this process; a trial is
lossless when every packet arrived, the kernel dropped none and (daqd) every record reached the
SUB. Prints the highest lossless rate of each, their ratio (goal >= 0.5) and CPU us per packet.

    .venv/bin/python bench/trigger.py [--duration-s 1.5] [--format record|ssdaq] [--types 0,1,2,3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import socket
import subprocess
import sys
import threading
import time
from typing import Any

from _common import JsonChild, cpu_s, serve_json_lines

RATES = [2000, 5000, 10000, 15000, 20000, 25000, 30000, 40000, 50000, 60000, 70000, 80000, 100000,
         120000, 150000]  # fmt: skip
RCVBUF = 8 << 20


def daqd_config(fmt: str) -> str:
    return f"""
[daemon]
name = "bench-trigger"
drain_timeout_s = 5

[[receiver]]
type = "trigger"
name = "trig"
listen = "127.0.0.1:0"
rcvbuf_bytes = {RCVBUF}
format = "{fmt}"
publish_to = ["live"]

[[publisher]]
type = "zmq"
name = "live"
endpoint = "tcp://127.0.0.1:0"
"""


# ----- the receiving processes ---------------------------------------------------------------
async def serve_bare() -> None:
    from daqd.receiver import kernel_udp_drops

    class Counter(asyncio.DatagramProtocol):
        n = 0

        def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
            self.n += 1

    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
    sock.bind(("127.0.0.1", 0))
    proto = Counter()
    transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
        lambda: proto, sock=sock
    )

    def report() -> dict[str, Any]:
        return {"packets": proto.n, "cpu_s": cpu_s(), "kernel_drops": kernel_udp_drops(sock)}

    await serve_json_lines({"port": sock.getsockname()[1]}, report)
    transport.close()


async def serve_daqd(fmt: str) -> None:
    import logging

    from daqd.config import parse_config
    from daqd.host import Host

    logging.basicConfig(level=logging.WARNING)
    host = Host(parse_config(daqd_config(fmt), path="<bench>"))
    await host.start()
    rec: Any = host.receivers["trig"]
    pub = host.publishers["live"]

    def report() -> dict[str, Any]:
        rec.sample()
        return {
            "packets": sum(rec.per_type.values()),
            "refused": sum(rec.counters.errors.values()),
            "cpu_s": cpu_s(),
            "kernel_drops": rec.counters.drops.get("kernel", 0),
            "records": rec.counters.records,
            "publisher_drops": sum(pub.counters.drops.values()),
        }

    port = int(rec.addresses["listen"].rsplit(":", 1)[1])
    await serve_json_lines({"port": port, "endpoint": pub.addresses["endpoint"]}, report)
    await host.stop()


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


# ----- the orchestrating process -------------------------------------------------------------
class SubCounter(threading.Thread):
    """A ZMQ SUB counting the records daqd publishes."""

    def __init__(self, endpoint: str) -> None:
        super().__init__(daemon=True)
        import zmq

        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.RCVHWM, 0)
        self.sock.setsockopt(zmq.SUBSCRIBE, b"")
        self.sock.connect(endpoint)
        self.n = 0
        self.running = True

    def run(self) -> None:
        while self.running:
            if self.sock.poll(100):
                self.sock.recv_multipart(copy=False)
                self.n += 1

    def close(self) -> None:
        self.running = False
        self.join()
        self.sock.close(0)
        self.ctx.term()


def trial(
    child: JsonChild, rate: int, duration_s: float, sub: SubCounter | None, types: str
) -> dict[str, Any]:
    count = max(1, math.ceil(rate * duration_s))
    before = child.report()
    sub_before = sub.n if sub else 0
    out = subprocess.run(
        [sys.executable, __file__, "--send", str(child.ready["port"]), str(rate), str(count),
         types],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    sent = json.loads(out.stdout)
    deadline = time.monotonic() + 10.0
    last, still_since = -1, time.monotonic()
    while True:  # until everything is in, or nothing has moved for 1 s
        after = child.report()
        got = after["packets"] - before["packets"]
        done = got >= sent["sent"] and (sub is None or sub.n - sub_before >= sent["sent"])
        progress = got + (sub.n if sub else 0)
        now = time.monotonic()
        if progress != last:
            last, still_since = progress, now
        if done or now > deadline or now - still_since > 1.0:
            break
        time.sleep(0.05)
    kernel = (after["kernel_drops"] or 0) - (before["kernel_drops"] or 0)
    lossless = got == sent["sent"] and kernel == 0
    result = {
        "rate": rate,
        "achieved": sent["sent"] / sent["elapsed_s"],
        "sent": sent["sent"],
        "received": got,
        "kernel_drops": kernel,
        "cpu_us": (after["cpu_s"] - before["cpu_s"]) / max(got, 1) * 1e6,
    }
    if sub is not None:
        published = after["records"] - before["records"]
        delivered = sub.n - sub_before
        result.update(published=published, delivered=delivered)
        lossless = lossless and published == sent["sent"] == delivered
        lossless = lossless and after["publisher_drops"] == before["publisher_drops"]
        lossless = lossless and after["refused"] == before["refused"]
    result["lossless"] = lossless
    return result


class Ramp:
    """One receiver's way up the rates: the best lossless trial, and why it stopped."""

    def __init__(self, name: str, child: JsonChild, sub: SubCounter | None, types: str) -> None:
        self.name, self.child, self.sub, self.types = name, child, sub, types
        self.best: dict[str, Any] | None = None
        self.capped = False  # the sender could not go faster: the real limit is higher
        self.done = False
        self.short = 0

    def step(self, rate: int, duration_s: float) -> None:
        r = trial(self.child, rate, duration_s, self.sub, self.types)
        if not r["lossless"]:  # one retry: the box is shared, a single hiccup is not a limit
            self.show(r, " (retrying)")
            r = trial(self.child, rate, duration_s, self.sub, self.types)
        self.show(r, "")
        if not r["lossless"]:
            self.done = True
            return
        if self.best is None or r["achieved"] > self.best["achieved"]:
            self.best = r
        # the sender fell short of the rate asked twice running: it is the limit, not the receiver
        self.short = self.short + 1 if r["achieved"] < 0.9 * rate else 0
        if self.short >= 2:
            self.capped = self.done = True

    def show(self, r: dict[str, Any], note: str) -> None:
        extra = f", records at the SUB {r['delivered']}" if self.sub is not None else ""
        print(
            f"  {self.name:4} {r['rate']:6d}/s (sent at {r['achieved']:6.0f}/s): received "
            f"{r['received']}/{r['sent']}, kernel drops {r['kernel_drops']}{extra}, "
            f"{r['cpu_us']:5.1f} us CPU/packet -> {'lossless' if r['lossless'] else 'LOSS'}"
            f"{note}",
            flush=True,
        )

    def summary(self) -> str:
        if self.best is None:
            return "none lossless"
        b = self.best
        return (
            f"{'>=' if self.capped else ''}{b['achieved']:.0f}/s lossless, "
            f"{b['cpu_us']:.1f} us CPU/packet at that rate"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--duration-s", type=float, default=1.5)
    ap.add_argument("--format", choices=["record", "ssdaq"], default="record")
    ap.add_argument("--types", default="0,1,2,3")
    args = ap.parse_args()
    print(
        f"trigger bench: packet types {args.types}, daqd format {args.format!r}, "
        f"{args.duration_s} s per trial, SO_RCVBUF {RCVBUF} bytes asked, {os.cpu_count()} CPUs; "
        "bare and daqd trials interleaved so both see the same load"
    )
    t0 = time.monotonic()
    bare = JsonChild(__file__, "--serve", "bare")
    daqd = JsonChild(__file__, "--serve", "daqd", args.format)
    sub = SubCounter(daqd.ready["endpoint"])
    sub.start()
    try:
        # a PUB drops what it sends before a subscription arrives: warm up until the SUB hears
        for _ in range(50):
            trial(daqd, 2000, 0.05, None, args.types)
            if sub.n:
                break
        time.sleep(0.5)  # let the warm-up's records land before the first counted trial
        ramps = [Ramp("bare", bare, None, args.types), Ramp("daqd", daqd, sub, args.types)]
        for rate in RATES:
            for ramp in ramps:
                if not ramp.done:
                    ramp.step(rate, args.duration_s)
            if all(r.done for r in ramps):
                break
    finally:
        sub.close()
        daqd.close()
        bare.close()
    b, d = ramps
    print(f"bare uvloop counter: {b.summary()}")
    print(f"daqd trigger       : {d.summary()} (decode + zmq publish to a SUB)")
    if b.best and d.best:
        ratio = d.best["achieved"] / b.best["achieved"]
        note = ""
        if b.capped and not d.capped:
            note = " (the sender limited bare: its real limit is higher, the ratio at most this)"
        elif d.capped:
            note = " (the sender limited daqd too: both limits are higher)"
        print(f"ratio daqd/bare    : {ratio:.2f}{note}  (goal >= 0.5)")
        cpu = d.best["cpu_us"] / b.best["cpu_us"] if b.best["cpu_us"] else float("nan")
        print(f"CPU per packet     : daqd {d.best['cpu_us']:.1f} us, bare {b.best['cpu_us']:.1f} us "
              f"({cpu:.1f}x)")  # fmt: skip
    print(f"({time.monotonic() - t0:.0f} s)")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--serve":
        import uvloop

        uvloop.run(serve_bare() if sys.argv[2] == "bare" else serve_daqd(sys.argv[3]))
    elif len(sys.argv) > 1 and sys.argv[1] == "--send":
        send(int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
    else:
        main()
