"""Logging set-up (journal-aware) and rate-limited logging for per-packet problems."""

from __future__ import annotations

import logging
import os
import sys
import time


def setup_logging(level: str = "INFO") -> None:
    """One line per event; under systemd (JOURNAL_STREAM set) the journal adds the timestamps."""
    if os.environ.get("JOURNAL_STREAM"):
        fmt = "%(name)s: %(message)s"
    else:
        fmt = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
    logging.basicConfig(level=level.upper(), format=fmt, stream=sys.stderr, force=True)


class LimitedLogger:
    """Logs at most one message per key every `interval_s`, then says how many it held back.

    A flood of bad packets must be counted and visible, but must not flood the journal or cost the
    receiver its throughput.
    """

    def __init__(self, log: logging.Logger, interval_s: float = 5.0) -> None:
        self.log = log
        self.interval_s = interval_s
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def warning(self, key: str, msg: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last.get(key, -1e9) < self.interval_s:
            self._held[key] = self._held.get(key, 0) + 1
            return
        held = self._held.pop(key, 0)
        self._last[key] = now
        if held:
            self.log.warning(msg + " (and %d more like it since the last report)", *args, held)
        else:
            self.log.warning(msg, *args)
