"""A CHEC-S backplane simulator: trigger packets of every type over UDP, with faults.

Packet k of a stream is fully determined by k (see `TriggerSource.packet`): its type cycles
through `types`, TACK is `tack_start_ns + k * tack_step_ns`, phase `k % 8`, ro/PPS/clock counters
k, k // 1000 and 10 * k, and three SPs trigger (two at the phase sample, one elsewhere), chosen
from k modulo 256. Tests rebuild packet k to check what a receiver decoded.
"""

from __future__ import annotations

import socket
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import click
import numpy as np

from daqd.protocols.trigger import (
    HEADER,
    MAX_DATAGRAM_BYTES,
    N_SP,
    V1_HEAD,
    V1_TAIL,
    V1_WINDOW,
    V2_FIXED,
    V2_HEAD,
    encode_v1,
    encode_v2,
)

ALL_TYPES = (0, 1, 2, 3)
_POOL = 256  # distinct pattern sets; counters and TACK still differ for every packet
FAULTS = ("bad_magic", "short", "bad_phase", "unknown_type", "bad_length")


@dataclass
class SendStats:
    packets: int = 0  # every datagram sent, faulty ones included
    regular: int = 0  # stream packets sent
    per_type: dict[int, int] = field(default_factory=dict)
    injected: dict[str, int] = field(default_factory=dict)


class TriggerSource:
    """Sends trigger packets to one receiver address."""

    def __init__(
        self,
        target: tuple[str, int],
        types: tuple[int, ...] = ALL_TYPES,
        readout_length: int = 64,
        *,
        tack_start_ns: int = 1_000_000_000_000,
        tack_step_ns: int = 1_000_000,
        source: int = 7,
    ) -> None:
        if not types or any(t not in ALL_TYPES for t in types):
            raise ValueError(f"types must be among 0-3, not {types}")
        if readout_length <= 0 or readout_length % 8:
            raise ValueError(f"readout length must be a positive multiple of 8: {readout_length}")
        if 2 in types and V2_FIXED + N_SP * readout_length // 8 > MAX_DATAGRAM_BYTES:
            raise ValueError(
                f"a V2 packet of a {readout_length}-sample window exceeds a UDP datagram; "
                "use V3 (zero-suppressed) for long windows"
            )
        self.target = target
        self.types = types
        self.readout_length = readout_length
        self.tack_start_ns = tack_start_ns
        self.tack_step_ns = tack_step_ns
        self.source = source
        self.refused = 0
        self._templates: dict[tuple[int, int, bool], bytes] = {}
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            self.sock.connect(target)
        except OSError:
            self.sock.close()
            raise

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> TriggerSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----- what packet k holds -----------------------------------------------------------------
    def packet_type(self, k: int) -> int:
        return self.types[k % len(self.types)]

    def tack(self, k: int) -> int:
        return self.tack_start_ns + k * self.tack_step_ns

    def phase(self, k: int) -> int:
        return k % 8

    def counters(self, k: int) -> tuple[int, int, int]:
        """(readout, PPS, clock) counters of packet k."""
        return k & 0xFFFFFFFF, (k // 1000) & 0xFFFFFFFF, (10 * k) & 0xFFFFFFFF

    def window(self, k: int) -> int:
        return V1_WINDOW if self.packet_type(k) <= 1 else self.readout_length

    def trigger_sps(self, k: int) -> list[int]:
        """The SPs set at the phase sample of packet k, ascending."""
        j = k % _POOL
        return sorted({(j * 37 + 3) % N_SP, (j * 101 + 200) % N_SP})

    def other_sp(self, k: int) -> int:
        """An SP set at another sample than the phase (k's last sample)."""
        return (k % _POOL * 13 + 450) % N_SP

    def patterns(self, k: int) -> np.ndarray:
        """(window, 512) bool patterns of packet k."""
        pat = np.zeros((self.window(k), N_SP), dtype=bool)
        pat[self.phase(k), self.trigger_sps(k)] = True
        pat[-1, self.other_sp(k)] = True
        return pat

    def busy(self, k: int) -> bool:
        return self.packet_type(k) == 1 or (self.packet_type(k) >= 2 and k % 5 == 0)

    def packet(self, k: int) -> bytes:
        """Packet k, built from a cached template with TACK and counters filled in."""
        ptype = self.packet_type(k)
        # patterns depend on k % _POOL, V2/V3's busy bit on k % 5; the rest is patched in
        key = (ptype, k % _POOL, self.busy(k))
        template = self._templates.get(key)
        if template is None:
            template = self._templates[key] = self._encode(k)
        buf = bytearray(template)
        ro, pps, clock = self.counters(k)
        if ptype <= 1:
            struct.pack_into("<Q", buf, HEADER.size + 1, self.tack(k))
            struct.pack_into("<3I", buf, len(buf) - V1_TAIL.size, ro, pps, clock)
        else:
            struct.pack_into("<Q", buf, HEADER.size + 5, self.tack(k))
            struct.pack_into("<3I", buf, HEADER.size + V2_HEAD.size - 12, ro, pps, clock)
        return bytes(buf)

    def _encode(self, k: int) -> bytes:
        ptype = self.packet_type(k)
        ro, pps, clock = self.counters(k)
        if ptype <= 1:
            return encode_v1(
                self.tack(k), self.phase(k), self.patterns(k), busy=ptype == 1,
                ro_count=ro, pps_count=pps, clock_count=clock, source=self.source,
            )  # fmt: skip
        return encode_v2(
            self.tack(k), self.phase(k), self.patterns(k), zero_suppressed=ptype == 3,
            busy=self.busy(k), source=self.source, ro_count=ro, pps_count=pps, clock_count=clock,
        )  # fmt: skip

    def faulty(self, fault: str, k: int) -> bytes:
        """A broken packet of the given kind, made from packet k."""
        good = self.packet(k)
        if fault == "bad_magic":
            return b"\xfe\xcb" + good[2:]
        if fault == "short":
            return good[:20]
        if fault == "unknown_type":
            return good[:2] + b"\x09" + good[3:]
        if fault == "bad_length":
            return good + b"\x00"
        if fault == "bad_phase":
            buf = bytearray(good)
            at = HEADER.size + (V1_HEAD.size - 1 if buf[2] <= 1 else V2_HEAD.size - 13)
            buf[at] = 0x03  # two phase bits set
            return bytes(buf)
        raise ValueError(f"unknown fault {fault!r}; known: {', '.join(FAULTS)}")

    # ----- sending -----------------------------------------------------------------------------
    def send(self, data: bytes) -> None:
        try:
            self.sock.send(data)
        except ConnectionRefusedError:
            self.refused += 1  # an ICMP port-unreachable from an earlier packet: nobody listens

    def run(
        self,
        count: int | None,
        rate: float,
        faults: dict[str, int] | None = None,
        progress: Callable[[SendStats, float, bool], None] | None = None,
        should_stop: Callable[[], bool] = lambda: False,
        first: int = 0,
    ) -> SendStats:
        """Send packets first.. (`count` of them, None: until should_stop) at `rate` per second;
        `faults`: kind -> how many broken packets to send in between, spread over the stream."""
        if rate <= 0:
            raise ValueError("rate must be positive")
        stats = SendStats()
        plan = _fault_plan(faults or {}, count)
        start = time.monotonic()
        last_progress = start
        k = 0
        while (count is None or k < count) and not should_stop():
            now = time.monotonic()
            due = int((now - start) * rate) + 1
            if count is not None:
                due = min(due, count)
            if k >= due:
                time.sleep(min((k + 1) / rate - (now - start), 0.05))
                continue
            while k < due:
                n = first + k
                self.send(self.packet(n))
                stats.packets += 1
                stats.regular += 1
                ptype = self.packet_type(n)
                stats.per_type[ptype] = stats.per_type.get(ptype, 0) + 1
                fault = plan.get(k)
                if fault is not None:
                    self.send(self.faulty(fault, n))
                    stats.packets += 1
                    stats.injected[fault] = stats.injected.get(fault, 0) + 1
                k += 1
            if progress is not None and now - last_progress >= 0.5:
                last_progress = now
                progress(stats, now - start, False)
        if progress is not None:
            progress(stats, time.monotonic() - start, True)
        return stats


def _fault_plan(faults: dict[str, int], count: int | None) -> dict[int, str]:
    """Stream position -> fault, spread evenly over `count` (else one every 97 packets)."""
    for kind in faults:
        if kind not in FAULTS:
            raise ValueError(f"unknown fault {kind!r}; known: {', '.join(FAULTS)}")
    remaining = {k: n for k, n in faults.items() if n > 0}
    kinds: list[str] = []
    while remaining:
        for kind in list(remaining):
            kinds.append(kind)
            remaining[kind] -= 1
            if not remaining[kind]:
                del remaining[kind]
    if not kinds:
        return {}
    if count is None:
        return {97 * (i + 1): kind for i, kind in enumerate(kinds)}
    if len(kinds) > count:
        raise ValueError(f"{len(kinds)} faults do not fit in {count} packets")
    return {i * count // len(kinds): kind for i, kind in enumerate(kinds)}


def _parse_target(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise click.BadParameter(f"expected HOST:PORT, got {value!r}")
    return host or "127.0.0.1", int(port)


def _print_progress(stats: SendStats, elapsed: float, final: bool) -> None:
    rate = stats.regular / elapsed if elapsed > 0 else 0.0
    injected = ", ".join(f"{k} {v}" for k, v in sorted(stats.injected.items())) or "none"
    types = ", ".join(f"type {t}: {n}" for t, n in sorted(stats.per_type.items()))
    line = (
        f"\rsent {stats.regular} trigger packets ({rate:,.0f}/s; {types}) in {elapsed:.1f} s; "
        f"injected: {injected}"
    )
    if not sys.stderr.isatty():
        line = line[1:] + "\n"
    elif final:
        line += "\n"
    sys.stderr.write(line)
    sys.stderr.flush()


@click.command("trigger")
@click.option("--target", default="127.0.0.1:8307", show_default=True, help="receiver HOST:PORT")
@click.option("--rate", type=float, default=100.0, show_default=True, help="packets per second")
@click.option("--count", type=click.IntRange(1), default=None, help="stop after N packets")
@click.option(
    "--types",
    default="0,1,2,3",
    show_default=True,
    help="packet types to cycle through: 0 nominal V1, 1 busy V1, 2 V2, 3 V3 (zero-suppressed)",
)
@click.option(
    "--readout-length",
    type=click.IntRange(8),
    default=64,
    show_default=True,
    help="V2/V3 window in samples (a multiple of 8; over 2040 the u8 field wraps: V3 only)",
)
@click.option("--bad-magic", type=click.IntRange(0), default=0, help="packets with a bad magic")
@click.option("--short", type=click.IntRange(0), default=0, help="packets cut to 20 bytes")
@click.option("--bad-phase", type=click.IntRange(0), default=0, help="phase bytes not one-hot")
@click.option("--unknown-type", type=click.IntRange(0), default=0, help="packets of type 9")
@click.option("--bad-length", type=click.IntRange(0), default=0, help="packets one byte long")
@click.option("--quiet", is_flag=True, help="no progress line")
def command(
    target: str,
    rate: float,
    count: int | None,
    types: str,
    readout_length: int,
    bad_magic: int,
    short: int,
    bad_phase: int,
    unknown_type: int,
    bad_length: int,
    quiet: bool,
) -> None:
    """Send trigger packets like the CHEC-S backplane (SSDAQ's UDP 8307 stream)."""
    try:
        type_list = tuple(int(t) for t in types.split(","))
    except ValueError:
        raise click.BadParameter(f"expected types like 0,1,2,3, got {types!r}") from None
    faults = {
        "bad_magic": bad_magic,
        "short": short,
        "bad_phase": bad_phase,
        "unknown_type": unknown_type,
        "bad_length": bad_length,
    }
    try:
        sim = TriggerSource(
            _parse_target(target), type_list, readout_length, tack_start_ns=time.time_ns()
        )
    except (OSError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    with sim:
        try:
            sim.run(count, rate, faults, None if quiet else _print_progress)
        except KeyboardInterrupt:
            sys.stderr.write("\n")
        except (OSError, ValueError) as exc:
            raise click.ClickException(str(exc)) from exc
