"""`daqd send-packets`: send a file (or stdin) as packet stream requests, print the responses."""

from __future__ import annotations

import asyncio
import sys
from typing import Any, BinaryIO

import click

from daqd.packetstream.tcp import connect
from daqd.protocols.packetstream import Response

# ---- `daqd send-packets` ----


def _split_input(data: bytes, split: str, chunk_bytes: int) -> list[bytes]:
    if split == "lines":
        return [line for line in data.splitlines() if line]
    if split == "chunks":
        return [data[i : i + chunk_bytes] for i in range(0, len(data), chunk_bytes)] or [b""]
    return [data]


def _show(payload: bytes) -> str:
    text = payload.decode("utf-8", "backslashreplace")
    return text.replace("\n", "\\n")


async def _send_all(
    host: str,
    port: int,
    payloads: list[bytes],
    rq_type: int,
    flags: int,
    channel: int,
    in_flight: int,
    out: Any,
) -> tuple[int, int]:
    conn = await connect(host, port, name=f"{host}:{port}")
    results: list[Response | None] = [None] * len(payloads)
    printed = 0
    failed = 0

    def print_ready() -> None:
        nonlocal printed, failed
        while printed < len(results) and results[printed] is not None:
            rsp = results[printed]
            assert rsp is not None
            if rsp.ok:
                print(f"ok {rsp.flags} {_show(rsp.payload)}".rstrip(), file=out)
            else:
                failed += 1
                print(f"failed {rsp.flags} {_show(rsp.payload)}".rstrip(), file=out)
            printed += 1

    next_index = iter(range(len(payloads)))

    async def worker() -> None:
        # each worker keeps one request in flight: `in_flight` workers form a sliding window
        for i in next_index:
            results[i] = await conn.request(rq_type, payloads[i], flags, channel)
            print_ready()

    try:
        await asyncio.gather(*(worker() for _ in range(min(in_flight, len(payloads)))))
    finally:
        await conn.close()
    return len(payloads), failed


@click.command("send-packets")
@click.argument("address")
@click.argument("source", type=click.File("rb"), default="-")
@click.option("--rq-type", type=click.IntRange(min=0), required=True, help="request type (>= 0)")
@click.option("--flags", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--channel", type=click.IntRange(min=0), default=0, show_default=True)
@click.option(
    "--split",
    type=click.Choice(["none", "lines", "chunks"]),
    default="none",
    show_default=True,
    help="none: the whole input is one request; lines: one request per non-empty line; "
    "chunks: one request per --chunk-kib",
)
@click.option("--chunk-kib", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--in-flight", type=click.IntRange(min=1), default=64, show_default=True)
def send_packets_command(
    address: str,
    source: BinaryIO,
    rq_type: int,
    flags: int,
    channel: int,
    split: str,
    chunk_kib: int,
    in_flight: int,
) -> None:
    """Send SOURCE (a file, or - for stdin) as packet stream requests to ADDRESS (HOST:PORT).

    Prints one line per response, in request order: `ok FLAGS PAYLOAD` or `failed FLAGS REASON`.
    Exits 0 if every request succeeded, 1 if any failed, 2 if the connection failed.
    """
    host, sep, port_text = address.rpartition(":")
    if not sep or not port_text.isdigit():
        raise click.BadParameter(f"expected HOST:PORT, got {address!r}", param_hint="ADDRESS")
    host = host.strip("[]") or "127.0.0.1"
    payloads = _split_input(source.read(), split, chunk_kib << 10)
    try:
        total, failed = asyncio.run(
            _send_all(
                host, int(port_text), payloads, rq_type, flags, channel, in_flight, sys.stdout
            )
        )
    except (ConnectionError, OSError) as exc:
        click.echo(f"send-packets: {address}: {exc}", err=True)
        sys.exit(2)
    click.echo(f"send-packets: {total} requests, {failed} failed", err=True)
    sys.exit(1 if failed else 0)
