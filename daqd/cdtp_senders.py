"""The `cdtp` receiver's senders: each one's run state, and the table that bounds them.

A sender is keyed by the canonical name in its messages, as Constellation does. The table keeps
those named in `receive_from` (and refuses every other name), or at most `max_senders` others: a
new one takes the place of the one idle the longest, and is refused if every one is in a run.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

from daqd.errors import ProtocolError
from daqd.monitor import Counters
from daqd.runstate import RunCondition

STATUS_SENDERS = 64  # senders status shows at most (those in a run first, then the latest)


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

    def __init__(self, receive_from: list[str] | None, max_senders: int, counters: Counters):
        self.senders: dict[str, Sender] = {
            n: Sender(n, configured=True) for n in receive_from or ()
        }
        self._allowed = frozenset(receive_from) if receive_from else None
        self._others = 0  # tracked senders not named in receive_from (at most max_senders)
        self.max_senders = max_senders
        self.counters = counters  # senders_evicted is counted here

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
        self.counters.extra["senders_evicted"] = self.counters.extra.get("senders_evicted", 0) + 1

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
