"""Benchmark: images/s the http_image receiver takes in, vs a bare aiohttp handler that only reads.

Two servers run side by side, each in its own uvloop process: daqd's `http_image` receiver (a Host
with one receiver, no publisher: the record is built, counted and offered to grab waiters), and a
bare aiohttp application whose handler only does `await request.read()`. A client process keeps 1
or 8 keep-alive connections busy with 64 KiB and 2 MiB JPEG POSTs (raw sockets, so that the client
costs little) and counts 200 answers after a short warm-up. Each configuration is measured in
adjacent pairs (bare then daqd, or the other way round), `--rounds` times; the median of the
pairs' ratios is reported, with the server CPU time per image. Goal: daqd/bare >= 0.8.

    .venv/bin/python bench/http_image.py [--duration-s 1] [--rounds 5] [--verbose]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from _common import JsonChild, cpu_s, serve_json_lines

SIZES = [64 * 1024, 2 * 1024 * 1024]
CLIENTS = [1, 8]
WARMUP_S = 0.3
DAQD_CONFIG = """
[daemon]
name = "bench-http-image"

[[receiver]]
type = "http_image"
name = "img"
listen = "127.0.0.1:0"
"""


def run_uvloop(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())


# ----- servers (child processes) -------------------------------------------------------------
async def serve_bare() -> None:
    from aiohttp import web

    received = [0]

    async def handler(request: web.Request) -> web.Response:
        await request.read()
        received[0] += 1
        return web.Response(text="ok")

    app = web.Application(client_max_size=64 << 20)
    app.router.add_route("POST", "/{path:.*}", handler)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    server: Any = site._server
    await serve_json_lines(
        {"port": server.sockets[0].getsockname()[1]},
        lambda: {"records": received[0], "cpu_s": cpu_s()},
    )
    await runner.cleanup()


async def serve_daqd() -> None:
    import logging

    from daqd.config import parse_config
    from daqd.host import Host

    logging.basicConfig(level=logging.WARNING)
    host = Host(parse_config(DAQD_CONFIG, path="<bench>"))
    await host.start()
    rec = host.receivers["img"]

    def report() -> dict[str, Any]:
        return {"records": rec.counters.records, "errors": rec.counters.errors, "cpu_s": cpu_s()}

    await serve_json_lines({"port": int(rec.addresses["listen"].rsplit(":", 1)[1])}, report)
    await host.stop()


# ----- load (child process) ------------------------------------------------------------------
async def load(port: int, size: int, clients: int, duration_s: float) -> None:
    loop = asyncio.get_running_loop()
    body = os.urandom(size)
    head = (
        f"POST /bench HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: image/jpeg\r\n"
        f"Content-Length: {size}\r\n\r\n"
    ).encode()
    length_re = re.compile(rb"(?i)\r\ncontent-length: *(\d+)")
    start = loop.time() + WARMUP_S
    stop = start + duration_s
    done = [0]

    async def client() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while loop.time() < stop:
                writer.write(head)
                writer.write(body)
                await writer.drain()
                answer = await reader.readuntil(b"\r\n\r\n")
                m = length_re.search(answer)
                await reader.readexactly(int(m.group(1)) if m else 0)
                if answer[9:12] != b"200":
                    raise RuntimeError(f"server answered {answer[:40]!r}")
                if loop.time() >= start:
                    done[0] += 1
        finally:
            writer.close()

    await asyncio.gather(*(client() for _ in range(clients)))
    print(json.dumps({"images": done[0], "per_s": done[0] / duration_s}), flush=True)


# ----- the orchestrating process -------------------------------------------------------------
class Server(JsonChild):
    """This script run with `--serve KIND`: a bare or a daqd image receiver."""

    def __init__(self, kind: str) -> None:
        super().__init__(__file__, "--serve", kind)
        self.port = int(self.ready["port"])


def measure(server: Server, size: int, clients: int, duration_s: float) -> tuple[float, float]:
    """(images/s seen by the client, server CPU microseconds per image)."""
    before = server.report()
    out = subprocess.run(
        [
            *(sys.executable, __file__, "--load", str(server.port), str(size), str(clients)),
            *("--duration-s", str(duration_s)),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    after = server.report()
    images = after["records"] - before["records"]
    cpu_us = (after["cpu_s"] - before["cpu_s"]) * 1e6 / max(images, 1)
    return float(json.loads(out.stdout)["per_s"]), cpu_us


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--duration-s", type=float, default=1.0)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--verbose", action="store_true", help="print every measurement")
    ap.add_argument("--serve", choices=["bare", "daqd"])
    ap.add_argument("--load", nargs=3, type=int, metavar=("PORT", "SIZE", "CLIENTS"))
    args = ap.parse_args()
    if args.serve:
        run_uvloop(serve_bare if args.serve == "bare" else serve_daqd)
        return 0
    if args.load:
        port, size, clients = args.load
        run_uvloop(lambda: load(port, size, clients, args.duration_s))
        return 0

    servers = {"bare": Server("bare"), "daqd": Server("daqd")}
    # Per configuration: rates, CPU per image, and the ratio of each adjacent (bare, daqd) pair, so
    # that load from elsewhere on the machine hits both sides of a ratio alike.
    rates: dict[tuple[str, int, int], list[float]] = {}
    cpu: dict[tuple[str, int, int], list[float]] = {}
    ratios: dict[tuple[int, int], list[float]] = {}
    try:
        for rnd in range(args.rounds):
            for size in SIZES:
                for clients in CLIENTS:
                    order = ["bare", "daqd"] if rnd % 2 == 0 else ["daqd", "bare"]
                    pair: dict[str, float] = {}
                    for kind in order:
                        rate, us = measure(servers[kind], size, clients, args.duration_s)
                        if args.verbose:
                            print(f"round {rnd} {kind} {size} {clients}: {rate:.0f}/s {us:.0f} us")
                        rates.setdefault((kind, size, clients), []).append(rate)
                        cpu.setdefault((kind, size, clients), []).append(us)
                        pair[kind] = rate
                    ratios.setdefault((size, clients), []).append(pair["daqd"] / pair["bare"])
        report = servers["daqd"].report()
    finally:
        for s in servers.values():
            s.close()

    med = statistics.median
    print(f"http_image: medians of {args.rounds} adjacent pairs x {args.duration_s:g} s")
    print(
        f"{'image':>8} {'clients':>7} {'bare img/s':>11} {'daqd img/s':>11} {'ratio':>6}"
        f" {'bare cpu us/img':>16} {'daqd cpu us/img':>16}"
    )
    worst = float("inf")
    for size in SIZES:
        for clients in CLIENTS:
            ratio = med(ratios[(size, clients)])
            worst = min(worst, ratio)
            label = f"{size // 1024} KiB" if size < 1 << 20 else f"{size >> 20} MiB"
            print(
                f"{label:>8} {clients:>7} {med(rates[('bare', size, clients)]):>11.0f}"
                f" {med(rates[('daqd', size, clients)]):>11.0f} {ratio:>6.2f}"
                f" {med(cpu[('bare', size, clients)]):>16.1f}"
                f" {med(cpu[('daqd', size, clients)]):>16.1f}"
            )
    print(f"daqd receiver: {report['records']} records, errors {report['errors'] or 'none'}")
    cpu_ratio = min(
        med(cpu[("bare", size, clients)]) / med(cpu[("daqd", size, clients)])
        for size in SIZES
        for clients in CLIENTS
    )
    print(f"worst ratio {worst:.2f} (goal >= 0.8): {'met' if worst >= 0.8 else 'NOT met'}")
    print(f"worst CPU-per-image ratio bare/daqd {cpu_ratio:.2f} (less sensitive to other load)")
    return 0 if not report["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
