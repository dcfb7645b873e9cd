"""The host's run state (daqd/host.py): HostRuns, the base class of Host. `transition` drives the
state machine by name (CTRL, daqctl, a Constellation controller); `begin_run` starts a run when
every publisher takes its begin; `_end_run` has the receivers hand over what they hold, collects
every publisher's ledger of the run's records and lets `judge()` decide the run's condition from
those counts; `mark_run` marks a run from outside its data. Building, the life cycle,
reconfiguration, control requests, the live tap and status are Host's, in daqd/host.py."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from typing import TYPE_CHECKING, Any

from daqd.config import Config
from daqd.deadline import Deadline
from daqd.errors import ControlError
from daqd.publisher import Publisher, PublisherQueue
from daqd.receiver import ReceiverServer
from daqd.runstate import (
    TRANSITIONS,
    RunCondition,
    RunInfo,
    State,
    StateMachine,
    TransitionRefused,
    default_run_id,
    judge,
)

log = logging.getLogger("daqd.host")


def _minus(now: dict[str, int], then: dict[str, int]) -> dict[str, int]:
    return {k: n - then.get(k, 0) for k, n in now.items() if n - then.get(k, 0)}


class HostRuns:
    """The run state of a Host: its transitions, its runs begun and ended, and their accounting.
    Host builds on this class; what it uses of the host (config, machine, receivers, queues, ...)
    is set by Host.__init__."""

    config: Config
    machine: StateMachine
    receivers: dict[str, ReceiverServer]
    publishers: dict[str, Publisher]
    queues: dict[str, PublisherQueue]
    run: RunInfo | None
    last_run: RunInfo | None
    _run_base: dict[str, Any]

    if TYPE_CHECKING:  # Host's

        async def apply_config(self, new: Config, receiving: bool = True) -> list[str]: ...

        def request_stop(self, condition: RunCondition = RunCondition.INTERRUPTED) -> None: ...

    @property
    def state(self) -> State:
        return self.machine.state

    async def begin_run(self, run_id: str | None = None) -> RunInfo:
        """Start a run; every publisher must take its begin (else the run does not start, the
        state stays ORBIT, and the refusal names the publisher and its reason)."""
        run_id = run_id or default_run_id()
        if not re.fullmatch(r"[\w.-]{1,80}", run_id):
            raise TransitionRefused(
                f"run id {run_id!r} is not usable: letters, digits, '_', '.', '-' (at most 80)"
            )
        self.machine.begin("start")
        run = RunInfo(run_id, time.time_ns())
        await asyncio.gather(*(rec.refresh_counters() for rec in self.receivers.values()))
        self.run = run
        for rec in self.receivers.values():
            await rec.begin_run(run)  # hands on what it held from before the run
        # From here to the markers nothing awaits: the run's counts start exactly here.
        self._run_base = {
            "seq": {n: dict(r._seq) for n, r in self.receivers.items()},
            "receivers": {n: self._receiver_tally(r) for n, r in self.receivers.items()},
        }
        markers = {n: q.put_marker("begin", run) for n, q in self.queues.items()}
        timeout = self.config.daemon.drain_timeout_s
        refusals: list[str] = []
        for name, marker in markers.items():
            try:
                exc = await asyncio.wait_for(asyncio.shield(marker.done), timeout)
            except TimeoutError:
                refusals.append(f"publisher {name}: did not begin within {timeout:g} s")
                continue
            if exc is not None:
                refusals.append(f"publisher {name}: {exc}")
        if refusals:
            await self._end_run(RunCondition.ABORTED, None, quiet=True)
            self.machine.abandon(f"run {run_id} not started")
            raise TransitionRefused(f"run {run_id} not started: " + "; ".join(refusals))
        self.machine.finish()
        log.info("run %s started", run.run_id)
        return run

    def mark_run(self, reason: str) -> bool:
        """Mark the current run with a named reason from outside its data (a Constellation peer
        that failed: `constellation.peer_lost:<name>`); judge() makes it DEGRADED and lists the
        reason. False if no run is on."""
        run = self.run
        if run is None:
            return False
        run.marked[reason] = run.marked.get(reason, 0) + 1
        log.warning("run %s marked DEGRADED: %s", run.run_id, reason)
        return True

    async def end_run(self, condition: RunCondition = RunCondition.GOOD) -> RunInfo:
        self.machine.begin("stop")
        run = await self._end_run(condition, None)
        self.machine.finish()
        return run

    def _receiver_tally(self, rec: ReceiverServer) -> dict[str, Any]:
        rec.sample()  # the kernel's drop count is read here
        c = rec.counters
        return {"received": c.records, "drops": dict(c.drops), "errors": dict(c.errors)}

    async def _end_run(
        self, condition: RunCondition, deadline: Deadline | None, quiet: bool = False
    ) -> RunInfo:
        """End the run: receivers hand over what they hold, every publisher accounts for the
        run's records (waiting up to drain_timeout_s, or the shutdown deadline), the condition is
        decided by the one rule table from those counts, then publishers get end_run."""
        run = self.run
        assert run is not None
        for rec in self.receivers.values():
            try:
                await rec.end_run(run)  # a receiver may OR protocol-level flags in here
            except Exception as exc:
                rec.counters.error("end_run")
                log.error("receiver %s: end_run failed: %r", rec.name, exc)
        # From here to the markers nothing awaits: the run's records are exactly those before them.
        base = self._run_base
        receivers: dict[str, Any] = {}
        for name, rec in self.receivers.items():
            now = self._receiver_tally(rec)
            then = base.get("receivers", {}).get(name, {"received": 0, "drops": {}, "errors": {}})
            receivers[name] = {
                "received": now["received"] - then["received"],
                "drops": _minus(now["drops"], then["drops"]),
                "errors": _minus(now["errors"], then["errors"]),
                **({"failed": True} if rec.state == "failed" else {}),
            }
            before = base.get("seq", {}).get(name, {})
            for source, seq in rec._seq.items():
                if seq - before.get(source, 0):
                    run.records[source] = seq - before.get(source, 0)
        markers = {n: q.put_marker("end", run) for n, q in self.queues.items()}
        self.run = None
        run.end_ns = time.time_ns()

        publishers: dict[str, Any] = {}
        wait_s = self.config.daemon.drain_timeout_s
        for name, marker in markers.items():
            queue = self.queues[name]
            if deadline is not None:
                ok, _ = await deadline.wait(asyncio.shield(marker.ledger))
                if not ok:
                    await queue.abandon(deadline.reason)
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(marker.ledger), wait_s)
            if marker.ledger.done():
                publishers[name] = marker.ledger.result()
            else:  # still delivering the run's records: account for it as it stands
                ledger = queue.ledger(marker)
                ledger["late"] = (
                    ledger["offered"] - ledger["delivered"] - sum(ledger["drops"].values())
                )
                publishers[name] = ledger
        run.accounting = {"receivers": receivers, "publishers": publishers}
        if run.marked:
            run.accounting["marked"] = dict(run.marked)
        if run.inherited:
            run.accounting["inherited"] = [list(entry) for entry in run.inherited]
        flags, reasons = judge(run.accounting)
        run.condition = condition | run.condition | flags
        run.reasons = reasons
        for marker in markers.values():
            marker.decided.set()
        errors_then = {n: dict(self.publishers[n].counters.errors) for n in markers}
        # end_run (EOR, end marker): bounded like the rest
        for name, marker in markers.items():
            queue = self.queues[name]
            remaining = deadline.remaining() if deadline is not None else wait_s
            try:
                await asyncio.wait_for(asyncio.shield(marker.done), max(remaining, 0.001))
            except TimeoutError:
                await queue.end_orphan(marker, 2.0)
        # An error in end_run itself (an EOR nobody took) comes after the ledger: the same
        # table judges it. (A run file whose end marker was already written cannot show it.)
        late: dict[str, Any] = {}
        for name in markers:
            errors = _minus(self.publishers[name].counters.errors, errors_then[name])
            if errors:
                late[name] = {"errors": errors}
                counted = publishers[name].setdefault("errors", {})
                for reason, n in errors.items():
                    counted[reason] = counted.get(reason, 0) + n
        if late:
            more, why = judge({"publishers": late})
            run.condition |= more
            run.reasons.extend(why)
        self.last_run = run
        if not quiet:
            total = sum(run.records.values())
            if run.condition == RunCondition.GOOD:
                log.info("run %s ended: GOOD, %d records", run.run_id, total)
            else:
                log.warning(
                    "run %s ended: %s, %d records: %s",
                    run.run_id,
                    run.condition.describe(),
                    total,
                    "; ".join(reasons) or "as requested",
                )
        return run

    async def transition(self, name: str, args: dict[str, Any]) -> State:
        """Drive a state transition by name (the CTRL request)."""
        if name == "start":
            await self.begin_run(args.get("run_id"))
        elif name == "stop":
            await self.end_run(RunCondition.GOOD)
        elif name == "interrupt":
            self.machine.begin("interrupt")
            if self.run is not None:
                await self._end_run(RunCondition.INTERRUPTED, None)
            await asyncio.gather(*(r.stop_receiving() for r in self.receivers.values()))
            self.machine.finish()
        elif name == "land":
            self.machine.begin("land")
            await asyncio.gather(*(r.stop_receiving() for r in self.receivers.values()))
            self.machine.finish()
        elif name in ("launch",):
            self.machine.begin("launch")
            for rec in self.receivers.values():
                try:
                    await rec.start()
                except Exception as exc:
                    # not left half-way in "launching" (where nothing is allowed): ERROR, from
                    # which `reset` leads back to INIT
                    self.machine.fail(f"launch: receiver {rec.name}: {exc}")
                    raise ControlError(
                        f"launch failed: receiver {rec.name}: {exc}; state ERROR (reset, then "
                        "launch again)"
                    ) from None
            self.machine.finish()
        elif name in ("initialize", "recover", "reset"):
            self.machine.begin(name)
            await asyncio.gather(*(r.stop_receiving() for r in self.receivers.values()))
            config = args.get("config")  # a Constellation controller's, validated
            if isinstance(config, Config):
                try:
                    await self.apply_config(config, receiving=False)
                except Exception as exc:
                    self.machine.fail(f"{name}: configuration not applied: {exc}")
                    raise
            self.machine.finish()
        elif name == "shutdown":
            self.request_stop(RunCondition.INTERRUPTED)
        elif name == "reconfigure" and isinstance(args.get("config"), Config):
            # a Constellation controller's (validated); daqctl reconfigure FILE needs no state
            self.machine.begin("reconfigure")
            try:
                await self.apply_config(args["config"])
            except Exception as exc:  # apply_config left the previous configuration running
                self.machine.abandon(f"reconfigure: {exc}")
                raise
            self.machine.finish()
        elif name == "reconfigure":  # without a configuration there is nothing to do
            raise TransitionRefused(
                "reconfigure needs a configuration: daqctl reconfigure FILE, or SIGHUP to re-read "
                "the file the daemon was started with"
            )
        else:
            raise TransitionRefused(
                f"unknown transition {name!r}; known: {', '.join(self.transitions())}"
            )
        return self.state

    @staticmethod
    def transitions() -> list[str]:
        """The transitions `transition` drives (CTRL, daqctl, a Constellation controller)."""
        return [*(t for t in TRANSITIONS if t != "reconfigure"), "shutdown"]
