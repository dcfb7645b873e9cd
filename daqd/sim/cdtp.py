"""A CDTP2 transmitter for demos, tests and benchmarks: BOR, N records in DATA batches, EOR.

It speaks the wire format directly with daqd's codec and a plain PUSH socket, so that it can also
misbehave on purpose: skip sequence numbers (`--skip`), lie in the EOR (`--data-records`) or
vanish mid-run (`--vanish-after`). Record k carries tags {"k": k} unless `--no-tags`, and
`--blocks` blocks of `--size` bytes each whose first 8 bytes are k (big-endian) for checking.
"""

from __future__ import annotations

import json
import os
import struct
import sys
import time

import click
import msgpack
import zmq

from daqd.protocols import cdtp
from daqd.runstate import RunCondition


def record_blocks(k: int, size: int, blocks: int) -> list[bytes]:
    """The blocks of record k: each starts with k as 8 big-endian bytes, then a fill byte."""
    if size < 8:
        return [bytes([k & 0xFF]) * size for _ in range(blocks)]
    fill = bytes([k % 251]) * (size - 8)
    head = struct.pack(">Q", k)
    return [head + fill for _ in range(blocks)]


class Transmitter:
    """A bound or connected PUSH socket sending one CDTP run at a time."""

    def __init__(
        self,
        name: str,
        *,
        bind: str | None = None,
        connect: str | None = None,
        threshold_kib: int = 128,
        sndhwm: int = 1000,
    ) -> None:
        self.name = name
        self.encoder = cdtp.Encoder(name)
        self.context = zmq.Context()
        self.sock = self.context.socket(zmq.PUSH)
        self.sock.setsockopt(zmq.LINGER, 5000)
        self.sock.setsockopt(zmq.SNDHWM, sndhwm)
        if bind is not None:
            self.sock.bind(bind[:-2] + ":*" if bind.endswith(":0") else bind)
            self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        elif connect is not None:
            self.sock.connect(connect)
            self.endpoint = connect
        else:
            raise ValueError("give bind= or connect=")
        self.threshold = threshold_kib * 1024
        self.messages = 0

    def _send(self, frame: bytes, timeout_s: float, what: str) -> None:
        self.sock.setsockopt(zmq.SNDTIMEO, int(timeout_s * 1000))
        try:
            self.sock.send(frame, copy=False)
        except zmq.Again:
            raise TimeoutError(f"{what} not taken by a receiver within {timeout_s} s") from None
        self.messages += 1

    def bor(self, user_tags: dict, configuration: dict, timeout_s: float = 10.0) -> None:
        [frame] = self.encoder.encode(cdtp.BeginOfRun(self.name, user_tags, configuration))
        self._send(frame, timeout_s, "BOR")

    def eor(self, user_tags: dict, metadata: dict, timeout_s: float = 10.0) -> None:
        [frame] = self.encoder.encode(cdtp.EndOfRun(self.name, user_tags, metadata))
        self._send(frame, timeout_s, "EOR")

    def data(
        self,
        records: int,
        size: int,
        blocks: int,
        *,
        tags: bool = True,
        skip: frozenset[int] = frozenset(),
        vanish_after: int | None = None,
        rate_hz: float = 0.0,
        timeout_s: float = 10.0,
    ) -> int:
        """Send records 1..N (leaving out `skip`); returns the last sequence number used."""
        parts: list[cdtp.Block] = []
        count = payload = 0
        start = time.monotonic()
        same = record_blocks(0, size, blocks) if rate_hz == 0 and not tags else None
        for k in range(1, records + 1):
            if vanish_after is not None and k > vanish_after:
                if count:
                    self._send(self.encoder.data_message(count, parts), timeout_s, "DATA")
                # what was sent leaves first (term() returns once it has), however slow the
                # receiver is: a loaded machine must not turn "vanished after N" into fewer
                self.sock.close(linger=30_000)
                self.context.term()
                os._exit(0)  # vanish: no EOR, no goodbye
            if k in skip:
                continue
            body = same if same is not None else record_blocks(k, size, blocks)
            payload += self.encoder.record_parts(k, {"k": k} if tags else None, body, parts)[1]
            count += 1
            if payload >= self.threshold:
                self._send(self.encoder.data_message(count, parts), timeout_s, "DATA")
                parts, count, payload = [], 0, 0
            if rate_hz:
                delay = start + k / rate_hz - time.monotonic()
                if delay > 0:
                    if count:
                        self._send(self.encoder.data_message(count, parts), timeout_s, "DATA")
                        parts, count, payload = [], 0, 0
                    time.sleep(delay)
        if count:
            self._send(self.encoder.data_message(count, parts), timeout_s, "DATA")
        return records

    def close(self) -> None:
        self.sock.close()
        self.context.term()


@click.command()
@click.option("--bind", "bind", default=None, help="bind the PUSH socket here (tcp://HOST:PORT)")
@click.option("--connect", "connect", default=None, help="connect the PUSH socket here instead")
@click.option("--name", default="DaqdSim.cdtp", show_default=True, help="canonical sender name")
@click.option("--records", default=1000, show_default=True, help="records per run")
@click.option("--size", default=1024, show_default=True, help="bytes per block")
@click.option("--blocks", default=1, show_default=True, help="blocks per record (0: tag-only)")
@click.option("--no-tags", is_flag=True, help="send records with empty tags")
@click.option("--runs", default=1, show_default=True, help="runs to send, one after the other")
@click.option("--run-id", default="sim", show_default=True, help="run id (runs > 1 add -N)")
@click.option("--threshold-kib", default=128, show_default=True, help="payload per DATA message")
@click.option("--rate", "rate_hz", default=0.0, help="records per second (0: as fast as possible)")
@click.option("--skip", multiple=True, type=int, help="sequence numbers to leave out (a gap)")
@click.option("--vanish-after", type=int, default=None, help="exit without EOR after N records")
@click.option("--data-records", type=int, default=None, help="last seq to claim in the EOR")
@click.option(
    "--condition",
    type=click.Choice(list(RunCondition.__members__)),
    multiple=True,
    help="run condition flag to report in the EOR (repeat to combine; default GOOD)",
)
@click.option("--wait", is_flag=True, help="wait for a line on stdin before each run")
@click.option("--timeout", "timeout_s", default=10.0, show_default=True, help="send timeout, s")
def command(
    bind: str | None,
    connect: str | None,
    name: str,
    records: int,
    size: int,
    blocks: int,
    no_tags: bool,
    runs: int,
    run_id: str,
    threshold_kib: int,
    rate_hz: float,
    skip: tuple[int, ...],
    vanish_after: int | None,
    data_records: int | None,
    condition: tuple[str, ...],
    wait: bool,
    timeout_s: float,
) -> None:
    """Send CDTP runs like a Constellation satellite; prints the endpoint, then a JSON summary."""
    if (bind is None) == (connect is None):
        raise click.UsageError("give exactly one of --bind or --connect")
    tx = Transmitter(name, bind=bind, connect=connect, threshold_kib=threshold_kib)
    click.echo(json.dumps({"endpoint": tx.endpoint}), nl=True)
    sys.stdout.flush()
    summary = []
    try:
        for n in range(runs):
            rid = run_id if runs == 1 else f"{run_id}-{n + 1}"
            if wait and not sys.stdin.readline():
                break  # stdin closed: no more runs
            config = {"records": records, "size": size, "blocks": blocks, "_data": {}}
            started = time.time_ns()
            tx.bor({"run_id": rid}, config, timeout_s)
            last = tx.data(
                records,
                size,
                blocks,
                tags=not no_tags,
                skip=frozenset(skip),
                vanish_after=vanish_after,
                rate_hz=rate_hz,
                timeout_s=timeout_s,
            )
            code = RunCondition.GOOD
            for flag in condition:
                code |= RunCondition[flag]
            metadata = {
                "run_id": rid,
                "version": "daqd-sim",
                "time_start": msgpack.Timestamp.from_unix_nano(started),
                "time_end": msgpack.Timestamp.from_unix_nano(time.time_ns()),
                "condition_code": int(code),
                "condition": code.describe(),
                "data_records": last if data_records is None else data_records,
            }
            tx.eor({}, metadata, timeout_s)
            sent = records - len({k for k in skip if 1 <= k <= records})
            summary.append({"run_id": rid, "records": sent, "last_seq": last})
    except TimeoutError as exc:
        click.echo(f"daqd sim cdtp: {exc}", err=True)
        sys.exit(1)
    finally:
        tx.close()
    click.echo(json.dumps({"runs": summary, "messages": tx.messages}))
