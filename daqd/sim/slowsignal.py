"""A TARGET-module simulator: slow-signal datagrams from distinct loopback addresses, with faults.

Module m sends from 127.0.0.(100+m) (Linux routes all of 127/8 to lo), so a receiver maps the
sender address to the module exactly as it does for the camera. A *round* is one datagram from each
module holding P consecutive readouts; readout k has TACK `tack_start_ns + k * tack_step_ns` and
counts given by `counts()`, which tests use to check what a receiver assembled.
"""

from __future__ import annotations

import heapq
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import click
import numpy as np

from daqd.protocols.slowsignal import BLOCK_DTYPE, MAX_BLOCKS, N_MODULES, N_PIXELS


@dataclass
class Faults:
    """How many of each fault to inject, spread over the stream; `unequal` splits odd modules."""

    duplicate: int = 0  # a datagram sent twice
    empty: int = 0  # a zero-length datagram
    short: int = 0  # a datagram cut to 100 bytes (not a whole block)
    late: int = 0  # a datagram held back and sent `late_delay_s` later
    unequal: bool = False  # odd modules send each round as two datagrams of unequal block counts
    late_delay_s: float = 5.0


@dataclass
class SendStats:
    datagrams: int = 0  # every datagram sent, faulty ones included
    regular: int = 0  # datagram positions of the stream that were sent (on time or late)
    injected: dict[str, int] = field(default_factory=dict)


class TargetModules:
    """N simulated TARGET modules sending to one receiver address."""

    def __init__(
        self,
        target: tuple[str, int],
        modules: int = N_MODULES,
        blocks_per_packet: int = 10,
        *,
        tack_start_ns: int = 1_000_000_000_000,
        tack_step_ns: int = 100_000_000,
        source_prefix: str = "127.0.0",
        first_octet: int = 100,
        seed: int = 0,
    ) -> None:
        if not 1 <= modules <= N_MODULES:
            raise ValueError(f"modules must be 1 to {N_MODULES}, not {modules}")
        if not 1 <= blocks_per_packet <= MAX_BLOCKS:
            raise ValueError(
                f"blocks per packet must be 1 to {MAX_BLOCKS}, not {blocks_per_packet}"
            )
        self.target = target
        self.modules = modules
        self.blocks_per_packet = blocks_per_packet
        self.tack_start_ns = tack_start_ns
        self.tack_step_ns = tack_step_ns
        self.seed = seed
        self.refused = 0
        self.socks: list[socket.socket] = []
        try:
            for m in range(modules):
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                self.socks.append(sock)
                sock.bind((f"{source_prefix}.{first_octet + m}", 0))
                sock.connect(target)
        except OSError:
            self.close()
            raise
        self._pix = np.arange(N_PIXELS, dtype=np.int64)[None, None, :]
        self._mod = np.arange(modules, dtype=np.int64)[None, :, None]

    def close(self) -> None:
        for sock in self.socks:
            sock.close()
        self.socks = []

    def __enter__(self) -> TargetModules:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def tack(self, k: int) -> int:
        """TACK of readout k."""
        return self.tack_start_ns + k * self.tack_step_ns

    def readout_index(self, tack: int) -> int:
        return (tack - self.tack_start_ns) // self.tack_step_ns

    def counts(self, first: int, n: int = 1) -> np.ndarray:
        """Counts of readouts first..first+n-1: (n, modules, 64) uint16, every value in use."""
        k = np.arange(first, first + n, dtype=np.int64)[:, None, None]
        values = k * 40503 + self._mod * 4099 + self._pix * 257 + self.seed * 7919
        return (values & 0xFFFF).astype(np.uint16)

    def round_datagrams(self, r: int) -> list[bytes]:
        """Round r: one datagram per module, readouts r*P .. r*P+P-1."""
        p = self.blocks_per_packet
        wire = np.empty((self.modules, p), dtype=BLOCK_DTYPE)
        raw = self.counts(r * p, p).transpose(1, 0, 2) ^ 0x8000
        wire["tack"] = [self.tack(r * p + i) for i in range(p)]
        wire["second"] = time.time_ns()
        wire["lo"] = raw[:, :, :32]
        wire["hi"] = raw[:, :, 32:]
        return [wire[m].tobytes() for m in range(self.modules)]

    def send(self, module: int, data: bytes) -> None:
        try:
            self.socks[module].send(data)
        except ConnectionRefusedError:
            # an ICMP port-unreachable from an earlier datagram: nobody listens (yet); go on
            self.refused += 1

    def send_round(self, r: int, skip: frozenset[tuple[int, int]] = frozenset()) -> int:
        """Send round r from every module except (r, module) pairs in `skip`; returns datagrams."""
        n = 0
        for m, data in enumerate(self.round_datagrams(r)):
            if (r, m) not in skip:
                self.send(m, data)
                n += 1
        return n

    def run(
        self,
        count: int | None,
        rate: float,
        faults: Faults | None = None,
        progress: Callable[[SendStats, float, bool], None] | None = None,
        should_stop: Callable[[], bool] = lambda: False,
    ) -> SendStats:
        """Send `count` stream datagrams (None: until should_stop) at `rate` per second, in rounds."""
        if rate <= 0:
            raise ValueError("rate must be positive")
        faults = faults or Faults()
        stats = SendStats()
        plan = _fault_plan(faults, count)
        late: list[tuple[float, int, int, bytes]] = []  # (send at, position, module, datagram)
        start = time.monotonic()
        last_progress = start
        position = 0
        r = 0
        datagrams: list[bytes] = []
        while (count is None or position < count) and not should_stop():
            now = time.monotonic()
            due = min(int((now - start) * rate) + 1, count if count is not None else 1 << 62)
            if position >= due:
                time.sleep(min((position + 1) / rate - (now - start), 0.05))
                continue
            while position < due:
                m = position % self.modules
                if m == 0:
                    r = position // self.modules
                    datagrams = self.round_datagrams(r)
                data = datagrams[m]
                fault = plan.get(position)
                if fault == "late":
                    heapq.heappush(late, (now + faults.late_delay_s, position, m, data))
                else:
                    self._send_regular(m, data, faults.unequal, stats)
                    if fault is not None:
                        self._inject(fault, m, data, stats)
                position += 1
            while late and late[0][0] <= now:
                self._send_late(heapq.heappop(late), faults.unequal, stats)
            if progress is not None and now - last_progress >= 0.5:
                last_progress = now
                progress(stats, now - start, False)
        while late and not should_stop():
            wait = late[0][0] - time.monotonic()
            if wait > 0:
                time.sleep(min(wait, 0.1))
                continue
            self._send_late(heapq.heappop(late), faults.unequal, stats)
        if progress is not None:
            progress(stats, time.monotonic() - start, True)
        return stats

    def _send_regular(self, m: int, data: bytes, unequal: bool, stats: SendStats) -> None:
        p = self.blocks_per_packet
        if unequal and m % 2 == 1 and p >= 2:
            cut = (p // 3 or 1) * 144
            self.send(m, data[:cut])
            self.send(m, data[cut:])
            stats.datagrams += 2
        else:
            self.send(m, data)
            stats.datagrams += 1
        stats.regular += 1

    def _send_late(
        self, item: tuple[float, int, int, bytes], unequal: bool, stats: SendStats
    ) -> None:
        self._send_regular(item[2], item[3], unequal, stats)
        stats.injected["late"] = stats.injected.get("late", 0) + 1

    def _inject(self, fault: str, m: int, data: bytes, stats: SendStats) -> None:
        if fault == "duplicate":
            self.send(m, data)
        elif fault == "empty":
            self.send(m, b"")
        elif fault == "short":
            self.send(m, data[:100])
        stats.datagrams += 1
        stats.injected[fault] = stats.injected.get(fault, 0) + 1


def _fault_plan(faults: Faults, count: int | None) -> dict[int, str]:
    """Stream position -> fault; spread evenly over `count`, else one every 97 datagrams."""
    remaining = {k: getattr(faults, k) for k in ("duplicate", "empty", "short", "late")}
    kinds: list[str] = []
    while any(remaining.values()):  # round-robin, so each kind is spread over the whole stream
        for kind, left in remaining.items():
            if left:
                kinds.append(kind)
                remaining[kind] = left - 1
    if not kinds:
        return {}
    if count is None:
        positions = [97 * (i + 1) for i in range(len(kinds))]
    else:
        if len(kinds) > count:
            raise ValueError(f"{len(kinds)} faults do not fit in {count} datagrams")
        positions = [(i + 1) * count // (len(kinds) + 1) for i in range(len(kinds))]
    plan: dict[int, str] = {}
    for pos, kind in zip(positions, kinds, strict=True):
        while pos in plan:
            pos += 1
        plan[pos] = kind
    return plan


def _parse_target(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise click.BadParameter(f"expected HOST:PORT, got {value!r}")
    return host or "127.0.0.1", int(port)


def _print_progress(stats: SendStats, elapsed: float, final: bool) -> None:
    rate = stats.regular / elapsed if elapsed > 0 else 0.0
    injected = ", ".join(f"{k} {v}" for k, v in sorted(stats.injected.items())) or "none"
    line = (
        f"\rsent {stats.datagrams} datagrams ({stats.regular} in stream, {rate:,.0f}/s) "
        f"in {elapsed:.1f} s; injected: {injected}"
    )
    if not sys.stderr.isatty():  # a log, not a terminal: one line per report
        line = line[1:] + "\n"
    elif final:
        line += "\n"
    sys.stderr.write(line)
    sys.stderr.flush()


@click.command("slowsignal")
@click.option("--target", default="127.0.0.1:17000", show_default=True, help="receiver HOST:PORT")
@click.option(
    "--rate", type=float, default=32.0, show_default=True, help="stream datagrams per second"
)
@click.option("--modules", type=click.IntRange(1, 32), default=32, show_default=True)
@click.option(
    "--blocks-per-packet", type=click.IntRange(1, MAX_BLOCKS), default=10, show_default=True
)
@click.option("--count", type=click.IntRange(1), default=None, help="stop after N datagrams")
@click.option("--tack-step-ns", type=click.IntRange(1), default=100_000_000, show_default=True)
@click.option(
    "--source-prefix",
    default="127.0.0",
    show_default=True,
    help="module m sends from PREFIX.(100+m)",
)
@click.option("--duplicate", type=click.IntRange(0), default=0, help="datagrams sent twice")
@click.option("--empty", type=click.IntRange(0), default=0, help="zero-length datagrams")
@click.option("--short", type=click.IntRange(0), default=0, help="100-byte datagrams")
@click.option("--late", type=click.IntRange(0), default=0, help="datagrams sent late")
@click.option("--late-delay-s", type=float, default=5.0, show_default=True)
@click.option("--unequal", is_flag=True, help="odd modules split each datagram unequally")
@click.option("--quiet", is_flag=True, help="no progress line")
def command(
    target: str,
    rate: float,
    modules: int,
    blocks_per_packet: int,
    count: int | None,
    tack_step_ns: int,
    source_prefix: str,
    duplicate: int,
    empty: int,
    short: int,
    late: int,
    late_delay_s: float,
    unequal: bool,
    quiet: bool,
) -> None:
    """Send slow-signal datagrams like the CHEC-S camera's TARGET modules."""
    faults = Faults(duplicate, empty, short, late, unequal, late_delay_s)
    try:
        sim = TargetModules(
            _parse_target(target),
            modules,
            blocks_per_packet,
            tack_start_ns=time.time_ns(),
            tack_step_ns=tack_step_ns,
            source_prefix=source_prefix,
        )
    except OSError as exc:
        raise click.ClickException(f"cannot open the module sockets: {exc}") from exc
    with sim:
        try:
            sim.run(count, rate, faults, None if quiet else _print_progress)
        except KeyboardInterrupt:
            sys.stderr.write("\n")
        except (OSError, ValueError) as exc:
            raise click.ClickException(str(exc)) from exc
