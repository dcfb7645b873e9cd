"""`daqd demo`: the bundled config, a built-in UDP traffic source, a rate table, a run file."""

from __future__ import annotations

import asyncio
import shutil
import signal
import socket
import struct
import sys
import time
from importlib import resources
from pathlib import Path

import click
import zmq
import zmq.asyncio

from daqd import render
from daqd.config import parse_config
from daqd.host import Host
from daqd.receiver import ReceiverServer
from daqd.runstate import RunCondition


def demo_config(directory: str) -> str:
    text = resources.files("daqd").joinpath("demo.toml").read_text()
    return text.replace('directory = "daqd-demo-data"', f"directory = {directory!r}")


async def _send_traffic(addr: tuple[str, int], rate: int, stop: asyncio.Event) -> int:
    """Send numbered 1400-byte datagrams at `rate`/s in 10 ms bursts; return how many were sent."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    body = bytes(1392)
    sent = 0
    start = time.monotonic()
    try:
        while not stop.is_set():
            due = int((time.monotonic() - start) * rate)
            while sent < due:
                sock.sendto(struct.pack(">Q", sent) + body, addr)
                sent += 1
            await asyncio.sleep(0.01)
    finally:
        sock.close()
    return sent


async def _count_live(endpoint: str, ctx: zmq.asyncio.Context, counts: list[int]) -> None:
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(endpoint)
    try:
        while True:
            await sub.recv_multipart()
            counts[0] += 1
    finally:
        sub.close()


def _table(host: Host, live: int) -> str:
    st = host.status()
    rows = [["name", "kind", "records", "rate/s", "bytes", "drops"]]
    for kind in ("receivers", "publishers"):
        for name, s in st[kind].items():
            rows.append(
                [
                    name,
                    s["type"],
                    f"{s['records']:,}",
                    f"{s['rate_hz']:,.0f}",
                    render.size(s.get("bytes", 0)),
                    render.reasons(s["drops"]),
                ]
            )
    head = f"state {st['state']}  run {(st['run'] or {}).get('run_id', '-')}  live SUB got {live}"
    return "\n".join([head, *render.table(rows, right=(2, 3, 4, 5), indent="  ")])


async def _arrived(receiver: ReceiverServer, sent: int, timeout_s: float = 10.0) -> None:
    """Wait until every datagram sent was received or counted as dropped by the kernel (a
    loaded machine may take a while to read the socket buffer), at most timeout_s."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout_s
    while loop.time() < end:
        receiver.sample()  # reads the kernel's drop count
        c = receiver.counters
        if c.records + c.drops.get("kernel", 0) >= sent:
            return
        await asyncio.sleep(0.01)


async def run_demo(seconds: float, rate: int, directory: str) -> None:
    host = Host(parse_config(demo_config(directory), "daqd/demo.toml"))
    await host.start()
    ctx = zmq.asyncio.Context()
    live = [0]
    counter = asyncio.create_task(
        _count_live(host.publishers["live"].addresses["endpoint"], ctx, live)
    )
    run = await host.begin_run(f"demo-{time.strftime('%Y%m%dT%H%M%S')}")
    host_addr, port = host.receivers["camera"].addresses["listen"].rsplit(":", 1)
    stop = asyncio.Event()
    sender = asyncio.create_task(_send_traffic((host_addr, int(port)), rate, stop))
    click.echo(
        f"demo: sending {rate} datagrams/s to {host_addr}:{port} for {seconds:.0f} s (Ctrl-C ends it)"
    )
    condition = RunCondition.GOOD
    interrupted = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, interrupted.set)
    try:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            try:
                await asyncio.wait_for(interrupted.wait(), 1.0)
            except TimeoutError:
                click.echo(_table(host, live[0]))
                continue
            condition = RunCondition.INTERRUPTED
            click.echo("\ndemo: interrupted, ending the run")
            break
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        stop.set()
        sent = await sender
        await _arrived(host.receivers["camera"], sent)
        await host.end_run(condition)
        files = list(host.publishers["disk"].counters.extra.get("files", []))
        await host.stop(condition)
        counter.cancel()
        await asyncio.gather(counter, return_exceptions=True)
        ctx.destroy(linger=0)
    rec = host.receivers["camera"].counters
    run_files = [f for f in files if "/run-" in f]
    click.echo(
        f"demo: sent {sent} datagrams, received {rec.records}, "
        f"kernel drops {rec.drops.get('kernel', 0)}; run {run.run_id} ended {run.condition.describe()}"
    )
    daqd = _command_name()
    for f in run_files:
        click.echo(
            f"run file: {f}\n  read it with: {daqd} dump {f} --limit 5"
            f"\n  check it with: {daqd} dump {f} --verify"
        )


def _command_name() -> str:
    """How the user can run `daqd` again: plain `daqd` if it is on PATH, else the path used now
    (after `make demo`, `.venv/bin/daqd`)."""
    used = Path(sys.argv[0])
    found = shutil.which("daqd")
    if found and used.name == "daqd" and Path(found).resolve() == used.resolve():
        return "daqd"
    if used.name == "daqd":
        try:
            return str(used.resolve().relative_to(Path.cwd()))
        except ValueError:
            return str(used.resolve())
    return "daqd"
