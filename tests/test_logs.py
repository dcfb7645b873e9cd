"""LimitedLogger: the first lines of each kind pass, then one summary per interval."""

from __future__ import annotations

import asyncio
import logging

import pytest

from daqd.logs import LimitedLogger

from .conftest import wait_for


def lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "t.limited"]


def test_a_flood_gives_the_first_lines_then_one_summary(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="t.limited")
    # no loop runs here, and the interval is long: the summary waits for report()
    limited = LimitedLogger(logging.getLogger("t.limited"), interval_s=3600.0, burst=2)
    for i in range(1000):
        limited.warning("bad", "bad packet %d", i)
    for i in range(10):
        limited.info("odd", "odd packet %d", i)
    assert lines(caplog) == ["bad packet 0", "bad packet 1", "odd packet 0", "odd packet 1"]
    assert limited.held == 998 + 8
    limited.report()
    summary = lines(caplog)[-1]
    assert summary.startswith("1006 more lines like these held back in the last")
    assert "(998 x bad, 8 x odd); the last: odd packet 9" in summary
    assert caplog.records[-1].levelno == logging.WARNING  # the highest level held
    assert limited.held == 0


def test_the_burst_budget_is_shared_by_all_keys(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="t.limited")
    limited = LimitedLogger(logging.getLogger("t.limited"), burst=2, max_burst_lines=5)
    for key in "abcdef":
        for _ in range(3):
            limited.warning(key, "problem %s", key)
    assert len(lines(caplog)) == 5  # a a b b c; the rest held
    assert limited.held == 13


async def test_the_summary_comes_when_the_interval_ends(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="t.limited")
    limited = LimitedLogger(logging.getLogger("t.limited"), interval_s=0.2, burst=1)
    for i in range(50):
        limited.warning("bad", "bad %d", i)
    await wait_for(lambda: len(lines(caplog)) == 2, 10.0, "the summary")
    assert "49 more lines like these held back" in lines(caplog)[1]
    await asyncio.sleep(0.3)
    assert len(lines(caplog)) == 2  # nothing held, nothing more said
