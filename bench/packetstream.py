"""Benchmark: packet stream requests/s, daqd PacketConnection vs the real cs.packetstream.

Every figure is a client process sending echo requests to a server process over TCP on 127.0.0.1
and timing the whole exchange (the first response after a warm-up request to the last):
  * daqd  - our client (uvloop) -> our server (`PacketConnection`, uvloop), plain handler;
  * cs    - cs.packetstream 20240630 client -> its server (peer venv, tests/peers.py), once with
            packet_grace=0 and once with its default 0.01 s.
Payloads of 16 B and 64 KiB, one request at a time ("seq") and 64 in flight ("x64").
Goal on this machine: daqd >= 10k/s seq and >= 50k/s x64 at 16 B. Ratios are daqd / cs.

    .venv/bin/python bench/packetstream.py [--scale 1.0] [--skip-cs]
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import time
from collections import deque
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PEER_SCRIPT = ROOT / "tests" / "packetstream_peer.py"
ECHO = 6  # the peer server's echo rq_type; our server echoes everything

# (payload bytes, in flight) -> requests for daqd, for cs with grace 0, for cs with its default
CASES: dict[tuple[int, int], tuple[int, int, int]] = {
    (16, 1): (20_000, 1_000, 60),
    (16, 64): (100_000, 3_000, 600),
    (65536, 1): (3_000, 300, 50),
    (65536, 64): (6_000, 600, 300),
}


def serve_ours() -> None:
    """Child process: our echo server; prints its port, runs until stdin closes."""
    import uvloop

    from daqd.packetstream import PacketConnection

    async def main() -> None:
        async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await PacketConnection(reader, writer, lambda rq: rq.payload).serve()

        srv = await asyncio.start_server(on_client, "127.0.0.1", 0)
        print("PORT", srv.sockets[0].getsockname()[1], flush=True)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, sys.stdin.read)
        srv.close()

    uvloop.run(main())


async def client_ours(port: int, n: int, size: int, in_flight: int) -> float:
    from daqd.packetstream import connect

    conn = await connect("127.0.0.1", port)
    payload = b"x" * size
    rsp = await conn.request(ECHO, payload)
    assert rsp.ok and rsp.payload == payload
    per_worker = n // in_flight

    async def worker() -> None:
        for _ in range(per_worker):
            await conn.request(ECHO, payload)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(in_flight)))
    elapsed = time.perf_counter() - start
    await conn.close()
    return per_worker * in_flight / elapsed


def start_server(argv: list[str]) -> tuple[int, subprocess.Popen[bytes]]:
    proc = subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().decode()
    if not line.startswith("PORT "):
        proc.kill()
        raise SystemExit(f"server did not start: {argv}")
    return int(line.split()[1]), proc


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    assert proc.stdin is not None
    proc.stdin.close()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def bench_ours(scale: float) -> dict[tuple[int, int], float]:
    import uvloop

    port, proc = start_server([sys.executable, __file__, "--serve"])
    rates: dict[tuple[int, int], float] = {}
    try:
        for (size, in_flight), (n, _, _) in CASES.items():
            count = max(in_flight, int(n * scale))
            rates[(size, in_flight)] = uvloop.run(client_ours(port, count, size, in_flight))
    finally:
        stop_server(proc)
    return rates


def bench_cs(python: Path, grace: float, scale: float) -> dict[tuple[int, int], float]:
    column = 1 if grace == 0 else 2
    port, proc = start_server([str(python), str(PEER_SCRIPT), "server", str(grace)])
    rates: dict[tuple[int, int], float] = {}
    try:
        for (size, in_flight), counts in CASES.items():
            count = max(in_flight, int(counts[column] * scale))
            out = subprocess.run(
                [
                    *(str(python), str(PEER_SCRIPT), "bench", str(port), str(grace)),
                    *(str(count), str(size), str(in_flight)),
                ],
                capture_output=True,
                text=True,
                timeout=120,
                check=True,
            ).stdout
            rate_lines = deque((line for line in out.splitlines() if line.startswith("RATE")), 1)
            rates[(size, in_flight)] = float(rate_lines[0].split()[1])
    finally:
        stop_server(proc)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--scale", type=float, default=1.0, help="multiply request counts")
    parser.add_argument("--skip-cs", action="store_true", help="only measure daqd")
    args = parser.parse_args()
    if args.serve:
        serve_ours()
        return
    t0 = time.perf_counter()
    ours = bench_ours(args.scale)
    cs0: dict[tuple[int, int], float] = {}
    csd: dict[tuple[int, int], float] = {}
    if not args.skip_cs:
        sys.path.insert(0, str(ROOT))
        from tests.peers import peer_python

        python = peer_python("packetstream")
        cs0 = bench_cs(python, 0.0, args.scale)
        csd = bench_cs(python, 0.01, args.scale)
    print(f"packet stream echo requests/s (scale {args.scale}), client and server processes")
    header = f"{'payload':>8} {'mode':>5} {'daqd':>10} {'cs g=0':>9} {'cs g=.01':>9}"
    print(header + f" {'daqd/cs0':>9} {'daqd/cs.01':>10}")
    for size, in_flight in CASES:
        key = (size, in_flight)
        label = "16 B" if size == 16 else "64 KiB"
        mode = "seq" if in_flight == 1 else f"x{in_flight}"
        line = f"{label:>8} {mode:>5} {ours[key]:>10.0f}"
        if cs0:
            line += f" {cs0[key]:>9.0f} {csd[key]:>9.0f}"
            line += f" {ours[key] / cs0[key]:>9.1f} {ours[key] / csd[key]:>10.1f}"
        print(line)
    seq, x64 = ours[(16, 1)], ours[(16, 64)]
    print(
        f"goal at 16 B: seq {seq:.0f}/s (>= 10000: {'met' if seq >= 10_000 else 'NOT met'}), "
        f"x64 {x64:.0f}/s (>= 50000: {'met' if x64 >= 50_000 else 'NOT met'})"
    )
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
