"""Autonomy for the satellite: the other satellites' heartbeats, and CHP's rules for when one fails.

Every HEARTBEAT service CHIRP finds in the group is subscribed to. A satellite has 3 lives and
loses one whenever 1.5 intervals (its own announced interval) pass without a message; at none
left it is DEAD. A satellite fails when it reports ERROR or SAFE, dies, or departs. Once per
failure, by the failed satellite's flags: MARK_DEGRADED marks the current run DEGRADED with a
named reason (`constellation.peer_failed:<name>`, `peer_lost`, `peer_departed`); TRIGGER_INTERRUPT
(for a departure: DENY_DEPARTURE) interrupts daqd (toward SAFE) if it is in ORBIT or RUN. A
satellite that reports a good state again is well again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import zmq
import zmq.asyncio

from daqd.constellation.discovery import Offer
from daqd.errors import ProtocolError
from daqd.logs import LimitedLogger
from daqd.protocols import chirp, chp
from daqd.runstate import State

if TYPE_CHECKING:
    from daqd.host import Host

log = logging.getLogger("daqd.satellite.autonomy")

LIVES = 3
CHECK_S = 0.05
#: Until a satellite's first heartbeat says its interval, assume Constellation's default maximum.
FIRST_INTERVAL_MS = 30_000
FAILED_STATES = frozenset({State.ERROR.value, State.SAFE.value})
#: the flags that make a satellite's failure matter to daqd
ACTED_ON = chp.Flags.TRIGGER_INTERRUPT | chp.Flags.MARK_DEGRADED
# transition -> its transitional state, the name `_conditions` keys use
TRANSITIONAL = {
    "initialize": "initializing",
    "launch": "launching",
    "land": "landing",
    "start": "starting",
    "stop": "stopping",
}
DEFAULT_TRANSITION_TIMEOUT_S = 30.0


class ConditionFailed(Exception):
    """A satellite a transition waits for failed, or did not get there in time."""


def parse_conditions(config: dict[str, Any]) -> tuple[dict[str, list[str]], float]:
    """The `_conditions` section of a controller's configuration: transition -> the canonical
    names it waits for (`require_<starting>_after`, or `require_<start>_after`), and the timeout.
    Raises ValueError saying what is wrong."""
    section = config.get("_conditions")
    if section is None:
        return {}, DEFAULT_TRANSITION_TIMEOUT_S
    if not isinstance(section, dict):
        raise ValueError("_conditions must be a map")
    timeout = section.get("transition_timeout", DEFAULT_TRANSITION_TIMEOUT_S)
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0:
        raise ValueError(f"_conditions.transition_timeout {timeout!r} is not a positive number")
    keys = {f"require_{name}_after": t for t, via in TRANSITIONAL.items() for name in (t, via)}
    out: dict[str, list[str]] = {}
    for key, value in section.items():
        if key == "transition_timeout":
            continue
        if key not in keys:
            raise ValueError(f"_conditions.{key} is not known; known: {', '.join(sorted(keys))}")
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"_conditions.{key} must be a list of canonical names")
        out.setdefault(keys[key], []).extend(value)
    return out, float(timeout)


@dataclass
class Remote:
    """What the heartbeats of one other satellite said last."""

    endpoint: str
    name: str = ""
    state: int | None = None
    flags: int = 0
    interval_ms: int = FIRST_INTERVAL_MS
    lives: int = LIVES
    last_seen: float = 0.0
    failed: bool = False  # a failure was acted on; cleared when it reports a good state

    def summary(self) -> dict[str, object]:
        try:
            state = State(self.state).name if self.state is not None else None
        except ValueError:
            state = f"0x{self.state:02x}"
        return {
            "endpoint": self.endpoint,
            "state": "DEAD" if self.lives == 0 else state,
            "flags": self.flags,
            "lives": self.lives,
        }


class HeartbeatWatcher:
    def __init__(
        self,
        host: Host,
        counters: dict[str, int],
        on_interrupt: Callable[[str], None],
        on_degraded: Callable[[str], None],
    ) -> None:
        self.host = host
        self.counters = counters
        self.on_interrupt = on_interrupt  # the satellite interrupts, with this reason
        self.on_degraded = on_degraded  # the satellite marks the run, with this named reason
        self.remotes: dict[bytes, Remote] = {}  # host UUID -> what its heartbeats said
        self.interrupts = 0  # failures that interrupted (TRIGGER_INTERRUPT)
        self.marks = 0  # failures that marked a run (MARK_DEGRADED, in a run)
        self._sub: zmq.asyncio.Socket | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._limited = LimitedLogger(log)

    def start(self) -> None:
        sub = self.host.zmq_context.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        self._sub = sub
        self._tasks = [
            asyncio.create_task(self._read(), name="chp-watch"),
            asyncio.create_task(self._check_lives(), name="chp-lives"),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._sub is not None:
            self._sub.close(linger=0)
            self._sub = None

    def on_offer(self, new: Offer | None, old: Offer | None) -> None:
        """Discovery's listener: follow HEARTBEAT services as they come, move and go."""
        if self._sub is None:
            return
        if old is not None and old.service == chirp.Service.HEARTBEAT:
            remote = self.remotes.pop(old.host, None)
            if remote is not None:
                with contextlib.suppress(zmq.ZMQError):
                    self._sub.disconnect(remote.endpoint)
                if new is None and not remote.failed:
                    self._fail(remote, "peer_departed", "departed", chp.Flags.DENY_DEPARTURE)
        if new is not None and new.service == chirp.Service.HEARTBEAT:
            endpoint = f"tcp://{new.address}:{new.port}"
            self._sub.connect(endpoint)
            self.remotes[new.host] = Remote(endpoint, last_seen=time.monotonic())

    async def _read(self) -> None:
        assert self._sub is not None
        while True:
            frames = await self._sub.recv_multipart()
            try:
                hb = chp.decode(frames)
            except ProtocolError as exc:
                self.counters["chp_malformed"] = self.counters.get("chp_malformed", 0) + 1
                self._limited.warning("chp_malformed", "CHP: malformed heartbeat: %s", exc)
                continue
            remote = self.remotes.get(chirp.name_uuid(hb.sender))
            if remote is None:  # a satellite CHIRP has not told us of (or has since departed)
                continue
            remote.name, remote.state, remote.flags = hb.sender, hb.state, hb.flags
            remote.interval_ms = max(hb.interval_ms, 1)
            remote.lives = LIVES
            remote.last_seen = time.monotonic()
            if hb.state in FAILED_STATES and hb.flags & ACTED_ON:
                if not remote.failed:
                    self._fail(remote, "peer_failed", f"reports {State(hb.state).name}")
            else:
                remote.failed = False

    async def _check_lives(self) -> None:
        while True:
            await asyncio.sleep(CHECK_S)
            now = time.monotonic()
            for remote in list(self.remotes.values()):
                if remote.lives == 0 or now - remote.last_seen <= remote.interval_ms * 1.5e-3:
                    continue
                remote.lives -= 1
                remote.last_seen = now  # the next life goes after another 1.5 intervals
                if remote.lives == 0:
                    name = remote.name or remote.endpoint
                    log.warning("CHP: no signs of life from %s any more: DEAD", name)
                    if remote.flags & ACTED_ON and not remote.failed:
                        self._fail(remote, "peer_lost", "shows no signs of life")

    async def wait_for(self, names: list[str], target: State, timeout_s: float) -> None:
        """Until every satellite in `names` reports `target`; ConditionFailed if one is in ERROR,
        SAFE or dead, or the time is up."""
        deadline = time.monotonic() + timeout_s
        wanted = {n.lower() for n in names}
        while True:
            seen = {r.name.lower(): r for r in self.remotes.values() if r.name}
            missing = []
            for name in sorted(wanted):
                remote = seen.get(name)
                if remote is None or remote.state != target.value:
                    missing.append(name)
                if remote is not None and (remote.lives == 0 or remote.state in FAILED_STATES):
                    said = remote.summary()["state"]
                    raise ConditionFailed(f"{remote.name} is {said}")
            if not missing:
                return
            if time.monotonic() > deadline:
                raise ConditionFailed(
                    f"not in {target.name} after {timeout_s:g} s: {', '.join(missing)}"
                )
            await asyncio.sleep(CHECK_S)

    def _fail(
        self,
        remote: Remote,
        kind: str,
        what: str,
        interrupt_flag: chp.Flags = chp.Flags.TRIGGER_INTERRUPT,
    ) -> None:
        """Act on one failure of `remote` by its flags: mark the run (MARK_DEGRADED), then
        interrupt (`interrupt_flag`: DENY_DEPARTURE for a departure, as Constellation does)."""
        remote.failed = True
        name = remote.name or remote.endpoint
        if remote.flags & chp.Flags.MARK_DEGRADED and self.host.run is not None:
            self.marks += 1
            self.on_degraded(f"constellation.{kind}:{name}")
        if remote.flags & interrupt_flag:
            self.interrupts += 1
            self.on_interrupt(f"{name} {what}")
