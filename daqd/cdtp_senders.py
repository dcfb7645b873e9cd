"""The `cdtp` receiver's senders: each one's run state, the table that bounds them, and what
their runs add up to in a daqd run.

A sender is keyed by the canonical name in its messages, as Constellation does. The table keeps
those named in `receive_from` (and refuses every other name), or at most `max_senders` others: a
new one takes the place of the one idle the longest, and is refused if every one is in a run.
The RunAccount sums up the sender runs that ended in one daqd run: the flags they give it, and
its report.
"""

from __future__ import annotations

import enum
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from daqd.errors import ProtocolError
from daqd.runstate import RunCondition, RunInfo

STATUS_SENDERS = 64  # senders status shows at most (those in a run first, then the latest)
REPORTED = 16  # flawed sender runs, and names without a BOR, kept per daqd run for the report


class Refused(ProtocolError):
    """A well-formed message that cannot be taken here; `reason` names the error counted."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class SenderState(enum.Enum):
    NOT_CONNECTED = "NOT_CONNECTED"
    BOR_RECEIVED = "BOR_RECEIVED"
    EOR_RECEIVED = "EOR_RECEIVED"


@dataclass
class Sender:
    """What the receiver knows about one transmitter's current (or last) run."""

    name: str
    state: SenderState = SenderState.NOT_CONNECTED
    seq: int = 0  # last sequence number received in this run
    missed: int = 0
    records: int = 0
    bytes: int = 0
    flags: RunCondition = RunCondition.GOOD  # what we saw go wrong during the run
    condition: RunCondition | None = None  # the run's final condition, once it ended
    ended_ns: int = 0  # when that run ended here (EOR or substitute)
    endpoint: str = ""
    runs: int = 0
    user_tags: dict[str, Any] = field(default_factory=dict)  # of the BOR
    eor_tags: dict[str, Any] = field(default_factory=dict)  # user tags of the EOR
    configuration: dict[str, Any] = field(default_factory=dict)
    run_metadata: dict[str, Any] = field(default_factory=dict)
    abort_at: float | None = None  # monotonic deadline after the sender vanished mid-run
    back: bool = False  # reconnected since it vanished: its next message cancels abort_at
    first_data_ns: int = 0  # arrival of the run's first and last DATA message
    last_data_ns: int = 0
    active: float = field(default_factory=time.monotonic)  # last message (monotonic)
    configured: bool = False  # named in receive_from: never forgotten

    def snapshot(self) -> dict[str, Any]:
        return {
            "state": self.state.value,
            "seq": self.seq,
            "missed": self.missed,
            "records": self.records,
            "bytes": self.bytes,
            "endpoint": self.endpoint,
            "runs": self.runs,
            "condition_code": None if self.condition is None else int(self.condition),
            "condition": None if self.condition is None else self.condition.describe(),
            "run_id": self.run_metadata.get("run_id"),
        }


class SenderTable:
    """The senders a receiver tracks, bounded: `receive_from`'s, or at most `max_senders`."""

    def __init__(
        self,
        receive_from: list[str] | None,
        max_senders: int,
        on_evict: Callable[[Sender], None],
    ):
        self.senders: dict[str, Sender] = {
            n: Sender(n, configured=True) for n in receive_from or ()
        }
        self._allowed = frozenset(receive_from) if receive_from else None
        self._others = 0  # tracked senders not named in receive_from (at most max_senders)
        self.max_senders = max_senders
        self.on_evict = on_evict  # the owner counts it (its counters may be swapped)

    def known(self, name: str, kind: str) -> Sender | None:
        """The sender of a DATA or EOR message, if tracked; refuses names outside receive_from."""
        if self._allowed is not None and name not in self._allowed:
            raise Refused(
                "not_in_receive_from",
                f"{kind} from {name!r}, which is not in receive_from "
                f"({', '.join(sorted(self._allowed))})",
            )
        return self.senders.get(name)

    def full(self) -> bool:
        return self._allowed is None and self._others >= self.max_senders

    @staticmethod
    def evictable(sender: Sender) -> bool:
        return not sender.configured and sender.state is not SenderState.BOR_RECEIVED

    def evict(self, sender: Sender) -> None:
        del self.senders[sender.name]
        self._others -= 1
        self.on_evict(sender)

    def track(self, name: str) -> Sender:
        """The state of a sender that sent a BOR: made if new. At max_senders the sender idle
        the longest is forgotten; if every one is in a run, the new one is refused."""
        sender = self.known(name, "BOR")
        if sender is not None:
            return sender
        if self.full():
            idle = [s for s in self.senders.values() if self.evictable(s)]
            if not idle:
                raise Refused(
                    "too_many_senders",
                    f"BOR from {name!r} refused: max_senders={self.max_senders} "
                    "senders are all in a run",
                )
            self.evict(min(idle, key=lambda s: s.active))
        sender = self.senders[name] = Sender(name)
        self._others += 1
        return sender

    def status(self) -> dict[str, dict[str, Any]]:
        """At most STATUS_SENDERS senders: those in a run first, then the latest active."""
        senders = list(self.senders.values())
        if len(senders) > STATUS_SENDERS:
            senders.sort(key=lambda s: (s.state is SenderState.BOR_RECEIVED, s.active))
            senders = senders[-STATUS_SENDERS:]
        return {sender.name: sender.snapshot() for sender in senders}


class RunAccount:
    """What the sender runs that ended in one daqd run add up to: the flags they give it, and its
    report (at most REPORTED flawed runs and names without a BOR)."""

    def __init__(self) -> None:
        self.begin()

    def begin(self) -> None:
        """A daqd run begins: nothing ended in it yet."""
        # sender runs not GOOD, by their condition: how many, and the first as an example
        self.upstream: dict[RunCondition, tuple[int, str]] = {}
        self.ended = 0
        self.flawed: deque[dict[str, Any]] = deque(maxlen=REPORTED)
        self.without_bor: dict[str, int] = {}  # name -> messages without a BOR (REPORTED names)
        self.without_bor_total = 0

    def no_bor(self, name: str) -> None:
        """DATA or EOR from a sender not in a run: remembered for this daqd run's report (a few
        names), never as sender state."""
        self.without_bor_total += 1
        if name in self.without_bor or len(self.without_bor) < REPORTED:
            self.without_bor[name] = self.without_bor.get(name, 0) + 1

    def sender_run_ended(
        self, sender: Sender, metadata: dict[str, Any], condition: RunCondition
    ) -> None:
        # the daqd run holds the senders' data: a sender's flawed run makes ours flawed too
        # (an aborted sender means records are missing here, not that ours was aborted). Kept
        # from begin_run on, or from the start of a receiver replaced in the middle of a run.
        self.ended += 1
        if condition != RunCondition.GOOD:
            n, example = self.upstream.get(condition, (0, ""))
            run_id = metadata.get("run_id")
            first = example or sender.name + (f" run {run_id}" if run_id else "")
            self.upstream[condition] = (n + 1, first)
            self.flawed.append(
                {
                    "sender": sender.name,
                    "run": sender.runs,
                    "run_id": metadata.get("run_id"),
                    "condition": condition.describe(),
                    "records": sender.records,
                    "missed": sender.missed,
                }
            )

    def inherit(self, run: RunInfo, receiver: str) -> None:
        """Flag the daqd run `run` with the conditions of the sender runs not GOOD."""
        for condition, (n, example) in self.upstream.items():
            # an aborted sender run means records are missing here, not that ours was aborted
            flags = condition
            if flags & RunCondition.ABORTED:
                flags = (flags & ~RunCondition.ABORTED) | RunCondition.INCOMPLETE
            runs = "1 sender run" if n == 1 else f"{n} sender runs"
            run.inherit(
                flags,
                f"receiver {receiver}: {runs} ended {condition.describe()} ({example})",
            )

    def report(self, run: RunInfo, senders: Iterable[Sender]) -> tuple[list[str], dict[str, Any]]:
        """The daqd run's report, as the parts of one line and as a dict: the sender runs that
        ended in it, the flawed ones, configured senders that sent no BOR, and names that sent
        data without one."""
        silent = [
            s.name
            for s in senders
            if s.configured
            and s.state is not SenderState.BOR_RECEIVED
            and (s.state is SenderState.NOT_CONNECTED or s.ended_ns < run.start_ns)
        ]
        parts = [f"{self.ended} sender runs ended"]
        if self.flawed:
            flawed = ", ".join(f"{f['sender']} {f['condition']}" for f in self.flawed)
            parts.append(f"not GOOD: {flawed}")
        if silent:
            parts.append(f"never sent a BOR: {', '.join(sorted(silent)[:REPORTED])}")
        if self.without_bor_total:
            names = ", ".join(sorted(self.without_bor))
            more = "" if len(self.without_bor) < REPORTED else " ..."
            parts.append(f"{self.without_bor_total} messages without a BOR from {names}{more}")
        return parts, {
            "run_id": run.run_id,
            "sender_runs_ended": self.ended,
            "not_good": list(self.flawed),
            "never_sent_bor": sorted(silent)[:REPORTED],
            "without_bor": dict(self.without_bor),
            "without_bor_messages": self.without_bor_total,
        }
