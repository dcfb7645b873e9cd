"""Counters and rates for every receiver and publisher, and the status snapshot built from them."""

from __future__ import annotations

import time
from collections import deque
from typing import Any

RATE_WINDOW_S = 10.0


class Counters:
    """Records, bytes, drops and errors by reason, last-seen time, and a rate over the last 10 s."""

    __slots__ = (
        "_history",
        "bytes",
        "dropped",
        "drops",
        "errors",
        "extra",
        "last_seen_ns",
        "records",
    )

    def __init__(self) -> None:
        self.records = 0
        self.bytes = 0
        self.drops: dict[str, int] = {}
        self.dropped = 0  # the sum of what drop() counted, for the per-batch accounting
        self.errors: dict[str, int] = {}
        self.last_seen_ns = 0
        self.extra: dict[str, Any] = {}
        # (monotonic time, records, bytes) samples, taken when a snapshot is asked for or by sample()
        self._history: deque[tuple[float, int, int]] = deque(maxlen=64)

    def count(self, nbytes: int, n: int = 1) -> None:
        self.records += n
        self.bytes += nbytes

    def drop(self, reason: str, n: int = 1) -> None:
        self.drops[reason] = self.drops.get(reason, 0) + n
        self.dropped += n

    def error(self, reason: str, n: int = 1) -> None:
        self.errors[reason] = self.errors.get(reason, 0) + n

    def sample(self) -> None:
        """Remember the current totals; the host calls this once a second so rates are fresh."""
        now = time.monotonic()
        if not self._history or self._history[-1][1] != self.records:
            self.last_seen_ns = (
                time.time_ns()
            )  # to the second: cheaper than a clock read per record
        self._history.append((now, self.records, self.bytes))
        while len(self._history) > 2 and now - self._history[1][0] > RATE_WINDOW_S:
            self._history.popleft()

    def rates(self) -> tuple[float, float]:
        """Records/s and bytes/s over (at most) the last 10 s of samples."""
        self.sample()
        t0, r0, b0 = self._history[0]
        t1, r1, b1 = self._history[-1]
        dt = t1 - t0
        if dt <= 0:
            return 0.0, 0.0
        return (r1 - r0) / dt, (b1 - b0) / dt

    def snapshot(self) -> dict[str, Any]:
        rate, byte_rate = self.rates()
        return {
            "records": self.records,
            "bytes": self.bytes,
            "drops": dict(self.drops),
            "errors": dict(self.errors),
            "last_seen_ns": self.last_seen_ns,
            "rate_hz": round(rate, 3),
            "byte_rate": round(byte_rate, 1),
            **({"extra": self.extra} if self.extra else {}),
        }
