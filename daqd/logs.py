"""Logging set-up (journal-aware) and rate-limited logging for per-packet problems."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from collections import deque

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")  # [daemon] log_level and --log-level, any case

# sd-daemon(3) priority prefixes: journald reads "<N>" at the start of each stderr line.
_PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6}


def journal_stream(stream: object = None) -> bool:
    """Whether `stream` (default stderr) is the journal's stream, as $JOURNAL_STREAM says.

    systemd sets JOURNAL_STREAM to the device and inode of the stream it connected; a process
    whose stderr was redirected elsewhere (a file, a terminal) inherits the variable but not the
    stream, so the two are compared (sd-daemon(3), systemd.exec(5)).
    """
    value = os.environ.get("JOURNAL_STREAM", "")
    dev, sep, ino = value.partition(":")
    if not sep:
        return False
    try:
        fd = (stream or sys.stderr).fileno()  # type: ignore[union-attr]
        st = os.fstat(fd)
        return (st.st_dev, st.st_ino) == (int(dev), int(ino))
    except (OSError, ValueError, AttributeError):
        return False


class JournalFormatter(logging.Formatter):
    """Each line of a message with its syslog priority prefix, so `journalctl -p err` finds it."""

    def format(self, record: logging.LogRecord) -> str:
        level = record.levelno
        pri = next((p for lv, p in sorted(_PRIORITY.items(), reverse=True) if level >= lv), 7)
        text = super().format(record)
        return "\n".join(f"<{pri}>{line}" for line in text.splitlines() or [""])


def setup_logging(level: str = "INFO") -> None:
    """One line per event; under systemd (JOURNAL_STREAM set) the journal adds the timestamps,
    and when stderr is the journal's stream each line carries its priority (`<3>` error, `<4>`
    warning, `<6>` info, `<7>` debug)."""
    handler = logging.StreamHandler(sys.stderr)
    if journal_stream():
        handler.setFormatter(JournalFormatter("%(name)s: %(message)s"))
    elif os.environ.get("JOURNAL_STREAM"):
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)


def _render(msg: str, args: tuple[object, ...]) -> str:
    try:
        return msg % args if args else msg
    except (TypeError, ValueError):
        return f"{msg} {args!r}"


class LimitedLogger:
    """Logging for problems that input can trigger: the first lines, then a summary per interval.

    Each kind of problem has a key. The first `burst` lines of a key are logged as they come (at
    most `max_burst_lines` such lines a minute for the whole logger), so the first instances are
    seen with their details; later lines are held back and counted, and once per `interval_s`
    one summary line says how many of each key were held and repeats the last of them. A key
    quiet for `quiet_s` gets its burst again. So a flood of bad input costs at most
    `max_burst_lines + 60 / interval_s` lines a minute per logger (12 with the defaults), while
    every problem stays counted where the caller counts it.

    With an asyncio loop running, the summary is written when the interval ends; without one, it
    is written by the next call after that.
    """

    def __init__(
        self,
        log: logging.Logger,
        interval_s: float = 15.0,
        *,
        burst: int = 2,
        max_burst_lines: int = 8,
        quiet_s: float = 60.0,
    ) -> None:
        self.log = log
        self.interval_s = interval_s
        self.burst = burst
        self.max_burst_lines = max_burst_lines
        self.quiet_s = quiet_s
        self._passed: dict[str, int] = {}  # lines of a key let through since it was last quiet
        self._seen: dict[str, float] = {}
        self._burst_times: deque[float] = deque()
        self._held: dict[str, int] = {}
        self._held_since = 0.0
        self._last: tuple[int, str, tuple[object, ...]] = (logging.WARNING, "", ())
        self._level = logging.NOTSET
        self._report_at: float | None = None
        self._timer: asyncio.TimerHandle | None = None

    @property
    def held(self) -> int:
        """Lines held back since the last summary."""
        return sum(self._held.values())

    def warning(self, key: str, msg: str, *args: object) -> None:
        self.emit(logging.WARNING, key, msg, *args)

    def info(self, key: str, msg: str, *args: object) -> None:
        self.emit(logging.INFO, key, msg, *args)

    def error(self, key: str, msg: str, *args: object) -> None:
        self.emit(logging.ERROR, key, msg, *args)

    def emit(self, level: int, key: str, msg: str, *args: object) -> None:
        """Log `msg % args` at `level` if the key's burst allows, else hold it for the summary."""
        if not self.log.isEnabledFor(level):
            return
        now = time.monotonic()
        if self._report_at is not None and now >= self._report_at:
            self.report(now)
        if now - self._seen.get(key, -1e18) > self.quiet_s:
            self._passed[key] = 0
        self._seen[key] = now
        if len(self._seen) > 4096:  # keys are kinds of problems; never let them pile up
            self._seen.clear()
            self._passed.clear()
        times = self._burst_times
        while times and now - times[0] >= 60.0:
            times.popleft()
        passed = self._passed.get(key, 0)
        if passed < self.burst and len(times) < self.max_burst_lines:
            self._passed[key] = passed + 1
            times.append(now)
            self.log.log(level, msg, *args)
            return
        if not self._held:
            self._held_since = now
        self._held[key] = self._held.get(key, 0) + 1
        self._last = (level, msg, args)
        self._level = max(self._level, level)
        if self._report_at is None:
            self._report_at = now + self.interval_s
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return
            self._timer = loop.call_later(self.interval_s, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self.report(time.monotonic())

    def report(self, now: float | None = None) -> None:
        """Write the summary of what was held back now (also called at the interval's end)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._report_at = None
        if not self._held:
            return
        now = time.monotonic() if now is None else now
        held, self._held = self._held, {}
        level, self._level = self._level, logging.NOTSET
        kinds = ", ".join(f"{n} x {key}" for key, n in sorted(held.items()))
        _, msg, args = self._last
        self.log.log(
            level,
            "%d more lines like these held back in the last %.0f s (%s); the last: %s",
            sum(held.values()),
            max(now - self._held_since, 0.0),
            kinds,
            _render(msg, args),
        )
