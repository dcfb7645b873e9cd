"""The run state machine (Constellation's satellite states) and what a run carries."""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("daqd.runstate")


class RunCondition(enum.IntFlag):
    """How a run ended, as CDTP's condition flags."""

    GOOD = 0x00
    TAINTED = 0x01
    INCOMPLETE = 0x02
    INTERRUPTED = 0x04
    ABORTED = 0x08
    DEGRADED = 0x10

    def describe(self) -> str:
        """Flag names joined by '|', or GOOD: the `condition` string of a CDTP EOR."""
        if self == RunCondition.GOOD:
            return "GOOD"
        return "|".join(f.name for f in RunCondition if f.value and f.value & self.value and f.name)


class State(enum.Enum):
    NEW = 0x10
    initializing = 0x12
    INIT = 0x20
    launching = 0x23
    ORBIT = 0x30
    landing = 0x32
    reconfiguring = 0x33
    starting = 0x34
    RUN = 0x40
    stopping = 0x43
    interrupting = 0x0E
    SAFE = 0xE0
    ERROR = 0xF0


# transition -> (states it starts from, transitional state, target state)
TRANSITIONS: dict[str, tuple[frozenset[State], State, State]] = {
    "initialize": (
        frozenset({State.NEW, State.INIT, State.SAFE, State.ERROR}),
        State.initializing,
        State.INIT,
    ),
    "launch": (frozenset({State.INIT}), State.launching, State.ORBIT),
    "land": (frozenset({State.ORBIT}), State.landing, State.INIT),
    "start": (frozenset({State.ORBIT}), State.starting, State.RUN),
    "stop": (frozenset({State.RUN}), State.stopping, State.ORBIT),
    "reconfigure": (frozenset({State.ORBIT, State.RUN}), State.reconfiguring, State.ORBIT),
    "interrupt": (frozenset({State.ORBIT, State.RUN}), State.interrupting, State.SAFE),
    "recover": (frozenset({State.SAFE}), State.initializing, State.INIT),
    "reset": (frozenset({State.ERROR}), State.initializing, State.INIT),
}


class TransitionRefused(Exception):
    """A transition that does not apply in the current state; the message names both."""


@dataclass
class RunInfo:
    """One run: its id, start and end, how it ended, and how many records each source gave."""

    run_id: str
    start_ns: int
    end_ns: int | None = None
    condition: RunCondition = RunCondition.GOOD
    records: dict[str, int] = field(default_factory=dict)
    # what was counted in this run (see judge()); filled when the run ends
    accounting: dict[str, Any] = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)  # one line per flag: why it is not GOOD
    # named reasons something outside the data marked the run with while it ran (Host.mark_run:
    # a Constellation peer that failed, say), each with how often; judged DEGRADED
    marked: dict[str, int] = field(default_factory=dict)
    # flags the run takes over from upstream, each with its reason (a CDTP sender's run that
    # ended TAINTED makes ours TAINTED): [flags, reason]; judged as given
    inherited: list[tuple[int, str]] = field(default_factory=list)

    def inherit(self, flags: RunCondition, reason: str) -> None:
        """A receiver's data came with a condition of its own: the run takes `flags`, and its
        reasons say why."""
        self.inherited.append((int(flags), reason))

    def metadata(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "time_start": self.start_ns,
            "time_end": self.end_ns,
            "condition_code": int(self.condition),
            "condition": self.condition.describe(),
            "records": dict(self.records),
            "accounting": self.accounting,
            "reasons": list(self.reasons),
        }


# ----- the one rule table: what was counted in a run -> its condition -------------------------
# Receiver errors that say a link or the receiver itself broke, not that its input was bad.
RECEIVER_FAULTS = frozenset(
    {"crash", "socket", "connect", "connection", "link_dropped", "handshake_timeout", "rejected"}
)
# Publisher drops that mean the destination failed (not that it was merely busy or absent).
PUBLISHER_FAULTS = frozenset({"write_error", "send_error"})


def judge(accounting: dict[str, Any]) -> tuple[RunCondition, list[str]]:
    """The run's condition by the README's table, from what each part counted during the run.

    `accounting` = {"receivers": {name: {"received", "drops", "errors", "failed"?}},
    "publishers": {name: {"offered", "delivered", "drops", "errors", "late"?}},
    "marked"?: {reason: times}, "inherited"?: [[flags, reason]]}. Returns the flags and one line per finding, in the user's words.
    """
    flags = RunCondition.GOOD
    reasons: list[str] = []

    def flag(f: RunCondition, text: str) -> None:
        nonlocal flags
        flags |= f
        reasons.append(f"{text} -> {f.describe()}")

    for name, r in sorted(accounting.get("receivers", {}).items()):
        for reason, n in sorted(r.get("drops", {}).items()):
            flag(RunCondition.INCOMPLETE, f"receiver {name}: {n} input lost ({reason})")
        for reason, n in sorted(r.get("errors", {}).items()):
            # a worker process's own counts (worker.<reason>) are judged as in-process ones;
            # its link to the parent (worker.link.<reason>) is part of the receiver
            own = reason.removeprefix("worker.")
            if own in RECEIVER_FAULTS or own.startswith("link."):
                bad = RunCondition.DEGRADED
            else:
                bad = RunCondition.TAINTED
            flag(bad, f"receiver {name}: {n} errors ({reason})")
        if r.get("failed"):
            flag(RunCondition.DEGRADED, f"receiver {name}: failed")
    for name, p in sorted(accounting.get("publishers", {}).items()):
        for reason, n in sorted(p.get("drops", {}).items()):
            bad = RunCondition.INCOMPLETE
            if reason in PUBLISHER_FAULTS:
                bad |= RunCondition.DEGRADED
            flag(bad, f"publisher {name}: {n} records dropped ({reason})")
        for reason, n in sorted(p.get("errors", {}).items()):
            flag(RunCondition.DEGRADED, f"publisher {name}: {n} errors ({reason})")
        late = p.get("late", 0)
        if late:
            flag(
                RunCondition.INCOMPLETE | RunCondition.DEGRADED,
                f"publisher {name}: {late} records of the run not delivered within the stop deadline",
            )
        missing = p.get("offered", 0) - p.get("delivered", 0) - sum(p.get("drops", {}).values())
        if missing and not late:
            flag(RunCondition.INCOMPLETE, f"publisher {name}: {missing} records unaccounted for")
    for reason, n in sorted(accounting.get("marked", {}).items()):
        flag(RunCondition.DEGRADED, f"marked {reason}" + (f" ({n} times)" if n > 1 else ""))
    for inherited, reason in accounting.get("inherited", []):
        flag(RunCondition(inherited), reason)
    return flags, reasons


def default_run_id() -> str:
    """A run id from the local time, sortable and safe in file names."""
    return time.strftime("%Y%m%dT%H%M%S")


class StateMachine:
    """Holds the state; every change is checked, logged and timed. The host does the work."""

    def __init__(self) -> None:
        self.state = State.NEW
        self.since_ns = time.time_ns()
        self._listeners: list[Callable[[State], None]] = []
        self._began = 0.0
        self._target: State | None = None
        self._source: State | None = None

    def add_listener(self, listener: Callable[[State], None]) -> Callable[[], None]:
        """Call `listener(state)` on every state entered, transitional ones too, right after the
        change; returns the function that removes it. A listener's exception is logged, never
        passed on: it cannot break a transition."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    def allowed(self) -> list[str]:
        return [name for name, (sources, _, _) in TRANSITIONS.items() if self.state in sources]

    def begin(self, transition: str) -> None:
        """Enter the transitional state of `transition`, or refuse with a clear message."""
        if transition not in TRANSITIONS:
            raise TransitionRefused(
                f"unknown transition {transition!r}; known: {', '.join(TRANSITIONS)}"
            )
        sources, via, target = TRANSITIONS[transition]
        if self.state not in sources:
            allowed = ", ".join(self.allowed()) or "none"
            raise TransitionRefused(
                f"cannot {transition} in state {self.state.name}; allowed here: {allowed}"
            )
        log.info("transition %s: %s -> %s", transition, self.state.name, via.name)
        self._source = self.state
        self._set(via)
        self._target = target
        self._began = time.monotonic()

    def finish(self) -> State:
        """The transition's work is done: move to its target state."""
        assert self._target is not None, "finish() without begin()"
        target, self._target = self._target, None
        log.info("reached %s (%.1f ms)", target.name, (time.monotonic() - self._began) * 1000.0)
        self._set(target)
        return target

    def abandon(self, reason: str) -> None:
        """The transition could not be done and changed nothing: back to where it began."""
        assert self._source is not None, "abandon() without begin()"
        source, self._target = self._source, None
        log.warning("%s: back to %s", reason, source.name)
        self._set(source)

    def fail(self, reason: str) -> None:
        """Any failure goes to ERROR, logged with its reason."""
        log.error("failure in %s: %s -> ERROR", self.state.name, reason)
        self._target = None
        self._set(State.ERROR)

    def _set(self, state: State) -> None:
        self.state = state
        self.since_ns = time.time_ns()
        for listener in list(self._listeners):
            try:
                listener(state)
            except Exception as exc:
                log.exception("a state listener failed on %s: %r", state.name, exc)
