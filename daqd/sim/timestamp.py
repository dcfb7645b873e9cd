"""A timing-board simulator: a ZeroMQ PUB of CTA.ACTL.CDTS TriggerBunches (SSDAQ's 6666 stream).

It binds an XPUB, so it knows when a subscriber is there and can wait for one before sending
(a PUB drops what it sends while nobody is subscribed). Bunch b is fully determined by b (see
`TimingBoard.bunch`), so tests can rebuild what a receiver should have published.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import click
import zmq

from daqd.protocols.ssdaq_pb import (
    TimeStamp,
    TriggerBunch,
    TriggerMessage,
    encode_trigger_bunch,
)

FAULTS = ("garbage", "truncated", "multipart")


@dataclass
class SendStats:
    bunches: int = 0
    triggers: int = 0
    injected: dict[str, int] = field(default_factory=dict)


class TimingBoard:
    """An XPUB bound on `endpoint` sending TriggerBunches of `per_bunch` TriggerMessages."""

    def __init__(
        self,
        endpoint: str = "tcp://127.0.0.1:0",
        per_bunch: int = 3,
        *,
        telescope: int = 1,
        first_second: int = 1_700_000_000,
        context: zmq.Context[zmq.Socket[bytes]] | None = None,
    ) -> None:
        if per_bunch < 0:
            raise ValueError("per_bunch must be >= 0")
        self.per_bunch = per_bunch
        self.telescope = telescope
        self.first_second = first_second
        self._own_context = context is None
        self.context = zmq.Context() if context is None else context
        self.sock = self.context.socket(zmq.XPUB)
        self.sock.setsockopt(zmq.LINGER, 2000)
        self.sock.setsockopt(zmq.SNDHWM, 0)
        try:
            self.sock.bind(endpoint[:-2] + ":*" if endpoint.endswith(":0") else endpoint)
        except zmq.ZMQError:
            self.close()
            raise
        self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.subscribers = 0

    def close(self) -> None:
        self.sock.close()
        if self._own_context:
            self.context.term()

    def __enter__(self) -> TimingBoard:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def wait_subscriber(self, timeout_s: float = 30.0) -> bool:
        """Wait until a subscriber has subscribed (XPUB hands us its subscription)."""
        deadline = time.monotonic() + timeout_s
        while self.subscribers == 0:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if self.sock.poll(int(min(left, 0.2) * 1000)):
                frame = self.sock.recv()
                if frame[:1] == b"\x01":
                    self.subscribers += 1
                elif frame[:1] == b"\x00":
                    self.subscribers = max(0, self.subscribers - 1)
        return True

    # ----- what bunch b holds ------------------------------------------------------------------
    def message(self, b: int, j: int) -> TriggerMessage:
        """TriggerMessage j of bunch b."""
        n = b * self.per_bunch + j
        return TriggerMessage(
            telescope=self.telescope,
            event_counter=n,
            pps_counter=self.first_second + n // 1000,
            clock_counter=(n % 1000) * 125_000,
            time=TimeStamp(seconds=self.first_second + n // 1000, pico_seconds=(n % 1000) * 10**9),
            type=2 if n % 7 == 3 else 1,
            status=5,
            pattern=(n * 0x9E3779B97F4A7C15) & ((1 << 64) - 1),
        )

    def bunch(self, b: int) -> TriggerBunch:
        return TriggerBunch(
            telescope=self.telescope,
            bunch_counter=b,
            triggers=[self.message(b, j) for j in range(self.per_bunch)],
            arrival_time=TimeStamp(seconds=self.first_second + b, pico_seconds=5),
        )

    def send_bunch(self, b: int) -> None:
        self.sock.send(encode_trigger_bunch(self.bunch(b)))

    def send_fault(self, fault: str, b: int) -> None:
        good = encode_trigger_bunch(self.bunch(b))
        if fault == "garbage":
            self.sock.send(b"\x1f\xff\xff")  # field 3, wire type 7: not protobuf
        elif fault == "truncated":
            self.sock.send(good[:-1])  # the last field (arrival_time) runs past the end
        elif fault == "multipart":
            self.sock.send_multipart([good, b"extra"])
        else:
            raise ValueError(f"unknown fault {fault!r}; known: {', '.join(FAULTS)}")

    def run(
        self,
        count: int | None,
        rate: float,
        *,
        first: int = 0,
        faults: dict[str, int] | None = None,
        progress: Callable[[SendStats, float, bool], None] | None = None,
        should_stop: Callable[[], bool] = lambda: False,
    ) -> SendStats:
        """Send bunches first.. (`count`, None: until should_stop) at `rate` per second; each
        fault kind's broken messages follow the first bunches sent."""
        if rate <= 0:
            raise ValueError("rate must be positive")
        stats = SendStats()
        pending = [kind for kind, n in (faults or {}).items() for _ in range(n)]
        for kind in pending:
            if kind not in FAULTS:
                raise ValueError(f"unknown fault {kind!r}; known: {', '.join(FAULTS)}")
        start = time.monotonic()
        last_progress = start
        i = 0
        while (count is None or i < count) and not should_stop():
            now = time.monotonic()
            due = int((now - start) * rate) + 1
            if count is not None:
                due = min(due, count)
            if i >= due:
                time.sleep(min((i + 1) / rate - (now - start), 0.05))
                continue
            while i < due:
                self.send_bunch(first + i)
                stats.bunches += 1
                stats.triggers += self.per_bunch
                if pending:
                    kind = pending.pop()
                    self.send_fault(kind, first + i)
                    stats.injected[kind] = stats.injected.get(kind, 0) + 1
                i += 1
            if progress is not None and now - last_progress >= 0.5:
                last_progress = now
                progress(stats, now - start, False)
        if progress is not None:
            progress(stats, time.monotonic() - start, True)
        return stats


def _print_progress(stats: SendStats, elapsed: float, final: bool) -> None:
    rate = stats.bunches / elapsed if elapsed > 0 else 0.0
    injected = ", ".join(f"{k} {v}" for k, v in sorted(stats.injected.items())) or "none"
    line = (
        f"\rsent {stats.bunches} TriggerBunches ({stats.triggers} TriggerMessages, {rate:,.0f}/s) "
        f"in {elapsed:.1f} s; injected: {injected}"
    )
    if not sys.stderr.isatty():
        line = line[1:] + "\n"
    elif final:
        line += "\n"
    sys.stderr.write(line)
    sys.stderr.flush()


@click.command("timestamp")
@click.option(
    "--bind", default="tcp://127.0.0.1:6666", show_default=True, help="the PUB's ZeroMQ endpoint"
)
@click.option("--rate", type=float, default=10.0, show_default=True, help="bunches per second")
@click.option("--count", type=click.IntRange(1), default=None, help="stop after N bunches")
@click.option(
    "--per-bunch", type=click.IntRange(0), default=3, show_default=True, help="TriggerMessages"
)
@click.option("--first", type=click.IntRange(0), default=0, help="bunch_counter of the first")
@click.option(
    "--wait-s",
    type=float,
    default=30.0,
    show_default=True,
    help="wait this long for a subscriber before sending (0: do not wait)",
)
@click.option("--garbage", type=click.IntRange(0), default=0, help="messages that are not protobuf")
@click.option("--truncated", type=click.IntRange(0), default=0, help="bunches one byte short")
@click.option("--multipart", type=click.IntRange(0), default=0, help="two-frame messages")
@click.option("--quiet", is_flag=True, help="no progress line")
def command(
    bind: str,
    rate: float,
    count: int | None,
    per_bunch: int,
    first: int,
    wait_s: float,
    garbage: int,
    truncated: int,
    multipart: int,
    quiet: bool,
) -> None:
    """Publish TriggerBunches like a timing board (SSDAQ's TimestampReceiver connects here)."""
    try:
        board = TimingBoard(bind, per_bunch, first_second=int(time.time()))
    except zmq.ZMQError as exc:
        raise click.ClickException(f"cannot bind {bind}: {exc}") from exc
    with board:
        if not quiet:
            sys.stderr.write(f"publishing on {board.endpoint}\n")
        if wait_s > 0 and not board.wait_subscriber(wait_s):
            raise click.ClickException(f"no subscriber within {wait_s:g} s")
        faults = {"garbage": garbage, "truncated": truncated, "multipart": multipart}
        try:
            board.run(
                count,
                rate,
                first=first,
                faults=faults,
                progress=None if quiet else _print_progress,
            )
        except KeyboardInterrupt:
            sys.stderr.write("\n")
        except (zmq.ZMQError, ValueError) as exc:
            raise click.ClickException(str(exc)) from exc
