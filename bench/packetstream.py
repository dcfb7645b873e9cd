"""Benchmark: packet stream requests/s, daqd PacketConnection vs the real cs.packetstream.

Every figure is a client process sending echo requests to a server process over TCP on 127.0.0.1
and timing the whole exchange (the first response after a warm-up request to the last):
  * raw   - the baseline: uvloop protocols echoing bare bytes, no framing, no matching;
  * daqd  - our client (`connect`) -> our server (`start_server`, as the receiver uses), uvloop;
  * cs    - cs.packetstream 20240630 client -> its server (peer venv, tests/peers.py), once with
            packet_grace=0 and once with its default 0.01 s.
Payloads of 16 B and 64 KiB, one request at a time ("seq") and 64 in flight ("x64").
Goal on this machine: daqd >= 10k/s seq and >= 50k/s x64 at 16 B. Ratios: daqd / raw, daqd / cs.

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


def serve(kind: str) -> None:
    """Child process: an echo server (ours, or raw bytes); prints its port; ends when stdin closes."""
    import uvloop

    from daqd.packetstream import start_server

    class RawEcho(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport: asyncio.Transport = transport  # type: ignore[assignment]

        def data_received(self, data: bytes) -> None:
            self.transport.write(data)

    async def main() -> None:
        if kind == "raw":
            srv = await asyncio.get_running_loop().create_server(RawEcho, "127.0.0.1", 0)
        else:
            srv = await start_server("127.0.0.1", 0, lambda rq: rq.payload)
        print("PORT", srv.sockets[0].getsockname()[1], flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        srv.close()

    uvloop.run(main())


class RawClient(asyncio.Protocol):
    """Keeps `in_flight` messages of `size` bytes outstanding until `n` have come back."""

    def __init__(self, size: int, n: int, in_flight: int) -> None:
        self.size = size
        self.n = n
        self.in_flight = in_flight
        self.payload = b"x" * size
        self.received = 0
        self.sent = 0
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]

    def start(self) -> None:
        first = min(self.in_flight, self.n)
        self.sent = first
        self.transport.write(self.payload * first)

    def data_received(self, data: bytes) -> None:
        before = self.received // self.size
        self.received += len(data)
        back = self.received // self.size
        more = min(back - before, self.n - self.sent)
        if more > 0:
            self.sent += more
            self.transport.write(self.payload * more)
        if back >= self.n and not self.done.done():
            self.done.set_result(None)


async def client_raw(port: int, n: int, size: int, in_flight: int) -> float:
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_connection(
        lambda: RawClient(size, n, in_flight), "127.0.0.1", port
    )
    start = time.perf_counter()
    proto.start()
    await proto.done
    elapsed = time.perf_counter() - start
    transport.close()
    return n / elapsed


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


def bench_uvloop(kind: str, scale: float) -> dict[tuple[int, int], float]:
    import uvloop

    client = client_raw if kind == "raw" else client_ours
    port, proc = start_server([sys.executable, __file__, "--serve", kind])
    rates: dict[tuple[int, int], float] = {}
    try:
        for (size, in_flight), (n, _, _) in CASES.items():
            count = max(in_flight, int(n * scale))
            rates[(size, in_flight)] = uvloop.run(client(port, count, size, in_flight))
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
    parser.add_argument("--serve", choices=["raw", "daqd"], help=argparse.SUPPRESS)
    parser.add_argument("--scale", type=float, default=1.0, help="multiply request counts")
    parser.add_argument("--skip-cs", action="store_true", help="only measure daqd")
    args = parser.parse_args()
    if args.serve:
        serve(args.serve)
        return
    t0 = time.perf_counter()
    raw = bench_uvloop("raw", args.scale)
    ours = bench_uvloop("daqd", args.scale)
    cs0: dict[tuple[int, int], float] = {}
    csd: dict[tuple[int, int], float] = {}
    if not args.skip_cs:
        sys.path.insert(0, str(ROOT))
        from tests.peers import peer_python

        python = peer_python("packetstream")
        cs0 = bench_cs(python, 0.0, args.scale)
        csd = bench_cs(python, 0.01, args.scale)
    print(f"packet stream echo requests/s (scale {args.scale}), client and server processes")
    header = f"{'payload':>8} {'mode':>5} {'raw':>9} {'daqd':>9} {'daqd/raw':>9}"
    if cs0:
        header += f" {'cs g=0':>8} {'cs g=.01':>8} {'daqd/cs0':>9} {'daqd/cs.01':>10}"
    print(header)
    for size, in_flight in CASES:
        key = (size, in_flight)
        label = "16 B" if size == 16 else "64 KiB"
        mode = "seq" if in_flight == 1 else f"x{in_flight}"
        line = f"{label:>8} {mode:>5} {raw[key]:>9.0f} {ours[key]:>9.0f}"
        line += f" {ours[key] / raw[key]:>9.2f}"
        if cs0:
            line += f" {cs0[key]:>8.0f} {csd[key]:>8.0f}"
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
