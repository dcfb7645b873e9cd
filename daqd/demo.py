"""`daqd demo`: the bundled config with its control socket, a built-in UDP traffic source, a rate
table, and run files of a bounded size."""

from __future__ import annotations

import asyncio
import os
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
from daqd.daemon import open_control, refuse_if_running
from daqd.errors import DaqdError
from daqd.host import Host
from daqd.receiver import ReceiverServer
from daqd.runstate import RunCondition, TransitionRefused

DATAGRAM_BYTES = 256  # an 8-byte sequence number, then zeros
RECORD_BYTES = DATAGRAM_BYTES + 64  # one datagram in a run file, with its record header (~310)


def demo_config(directory: str) -> str:
    text = resources.files("daqd").joinpath("demo.toml").read_text()
    return text.replace('directory = "daqd-demo-data"', f"directory = {directory!r}")


def margin_bytes(rate: int) -> int:
    """How far below the bound a run ends: one second of the demo's traffic (the run file grows
    while the demo notices and ends the run, which takes a small part of that)."""
    return rate * RECORD_BYTES


def bound_problem(rate: int, max_run_bytes: int) -> str:
    """Why this rate cannot keep run files under the bound ("" if it can)."""
    if 2 * margin_bytes(rate) <= max_run_bytes:
        return ""
    return (
        f"--rate {rate} writes {render.size(margin_bytes(rate))} a second: too much for run "
        f"files of at most {render.size(max_run_bytes)} (--max-run-mb); lower the rate or raise "
        "the bound"
    )


async def _send_traffic(addr: tuple[str, int], rate: int, stop: asyncio.Event) -> int:
    """Send numbered datagrams at `rate`/s in 10 ms bursts; return how many were sent."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    body = bytes(DATAGRAM_BYTES - 8)
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


def _run_file(host: Host) -> tuple[str, int] | None:
    """The file the open run is being written to, and its size; None outside runs."""
    disk = host.publishers.get("disk")
    if host.run is None or disk is None:
        return None
    files = disk.counters.extra.get("files") or []
    if not files or f"run-{host.run.run_id}" not in files[-1]:
        return None
    try:
        return files[-1], os.stat(files[-1]).st_size
    except OSError:
        return None


async def _keep_bound(host: Host, max_run_bytes: int, rate: int) -> None:
    """End the open run (GOOD) once its file is within `margin_bytes` of the bound: the demo's
    own run and any run started with `daqctl start` while the demo runs."""
    current = _run_file(host)
    if current is None or current[1] < max_run_bytes - margin_bytes(rate):
        return
    assert host.run is not None
    run_id = host.run.run_id
    try:
        await host.end_run(RunCondition.GOOD)
    except TransitionRefused:
        return  # a daqctl stop got there first
    click.echo(
        f"demo: run {run_id} ended at {render.size(current[1])}, near the demo's bound of "
        f"{render.size(max_run_bytes)} a run file (--max-run-mb); datagrams still reach the "
        "live PUB, and the file publisher counts them as outside_run (no run is open): "
        "daqctl --name demo start starts another"
    )


def _table(host: Host, live: int, max_run_bytes: int) -> str:
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
    run = (st["run"] or {}).get("run_id", "-")
    current = _run_file(host)
    if current is not None:
        run += f" (file {render.size(current[1])} of at most {render.size(max_run_bytes)})"
    head = f"state {st['state']}  run {run}  live SUB got {live}"
    return "\n".join([head, *render.table(rows, right=(2, 3, 4, 5), indent="  ")])


async def _arrived(receiver: ReceiverServer, sent: int, timeout_s: float = 10.0) -> None:
    """Wait until every datagram sent was received or counted as dropped (a loaded machine may
    take a while to read the socket buffer): at most timeout_s, and at most 2 s without progress
    (a receiver stopped with daqctl land reads nothing more)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout_s
    seen, since = -1, loop.time()
    while loop.time() < end and loop.time() - since < 2.0:
        receiver.sample()  # reads the kernel's drop count
        c = receiver.counters
        done = c.records + sum(c.drops.values())
        if done >= sent:
            return
        if done != seen:
            seen, since = done, loop.time()
        await asyncio.sleep(0.01)


async def run_demo(seconds: float, rate: int, directory: str, max_run_bytes: int) -> None:
    config = parse_config(demo_config(directory), "daqd/demo.toml")
    name = config.daemon.name
    refuse_if_running(name)
    host = Host(config)
    await host.start()
    try:
        server = await open_control(host)
    except Exception:
        await host.stop(RunCondition.ABORTED)
        raise
    try:
        run = await host.begin_run(f"demo-{time.strftime('%Y%m%dT%H%M%S')}")
    except TransitionRefused as exc:  # the run file could not be created: one line, no traceback
        await host.stop(RunCondition.ABORTED)
        await server.close()
        raise DaqdError(str(exc)) from None
    ctx = zmq.asyncio.Context()
    live = [0]
    counter = asyncio.create_task(
        _count_live(host.publishers["live"].addresses["endpoint"], ctx, live)
    )
    receiver = host.receivers["camera"]
    host_addr, port = receiver.addresses["listen"].rsplit(":", 1)
    stop = asyncio.Event()
    sender = asyncio.create_task(_send_traffic((host_addr, int(port)), rate, stop))
    daqctl = _command_name("daqctl")
    click.echo(
        f"demo: sending {rate} datagrams/s of {DATAGRAM_BYTES} bytes to {host_addr}:{port} for "
        f"{seconds:g} s (Ctrl-C ends it); run files go to {directory}/, each at most "
        f"{render.size(max_run_bytes)}\n"
        f"demo: its control socket is open; while it runs, try in another terminal:\n"
        f"  {daqctl} --name {name} status"
    )
    condition = RunCondition.GOOD
    interrupted = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, interrupted.set)
    try:
        end = next_table = time.monotonic()
        end += seconds
        while time.monotonic() < end and not host.stop_requested.is_set():
            try:
                await asyncio.wait_for(interrupted.wait(), 0.1)
            except TimeoutError:
                await _keep_bound(host, max_run_bytes, rate)
                if time.monotonic() >= next_table:
                    next_table += 2.0
                    click.echo(_table(host, live[0], max_run_bytes))
                continue
            condition = RunCondition.INTERRUPTED
            click.echo("\ndemo: interrupted, ending the run")
            break
        if host.stop_requested.is_set():
            click.echo(f"demo: {daqctl} shutdown asked it to stop")
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        stop.set()
        sent = await sender
        await _arrived(receiver, sent)
        if host.run is not None:
            try:
                await host.end_run(condition)
            except TransitionRefused:
                pass  # ended by a daqctl request at this moment: nothing left to end
        disk = host.publishers.get("disk")
        files = list(disk.counters.extra.get("files", [])) if disk is not None else []
        await host.stop(condition)
        await server.close()
        counter.cancel()
        await asyncio.gather(counter, return_exceptions=True)
        ctx.destroy(linger=0)
    rec = receiver.counters
    click.echo(
        f"demo: sent {sent} datagrams, received {rec.records}, "
        f"dropped {render.reasons(rec.drops)}; run {run.run_id} ended {run.condition.describe()}"
    )
    daqd = _command_name("daqd")
    for f in files:
        if "/run-" not in f or not Path(f).exists():
            continue
        click.echo(
            f"run file: {f} ({render.size(Path(f).stat().st_size)})"
            f"\n  read it with: {daqd} dump {f} --limit 5"
            f"\n  check it with: {daqd} dump {f} --verify"
        )
    click.echo(f"demo: remove its files with: rm -r {directory}")


def _command_name(command: str) -> str:
    """How the user can run `command` (daqd, daqctl): its plain name if the one on PATH is the
    one beside the `daqd` running now, else its path beside it (after `make demo`, in .venv/bin)."""
    used = Path(sys.argv[0])
    if used.name != "daqd":
        return command
    beside = used.resolve().parent / command
    found = shutil.which(command)
    if found and Path(found).resolve() == beside:
        return command
    try:
        relative = str(beside.relative_to(Path.cwd()))
    except ValueError:
        return str(beside)
    return relative if "/" in relative else f"./{relative}"
