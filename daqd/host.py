"""The host: builds receivers and publishers from settings, routes records, runs the run state."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import time
from typing import Any

import msgpack
import zmq
import zmq.asyncio

from daqd.config import Config, parse_config, publisher_class, receiver_class
from daqd.constellation.discovery import Discovery
from daqd.deadline import Deadline
from daqd.endpoints import bind_ipc
from daqd.errors import ConfigError, ControlError, DaqdError
from daqd.publisher import Publisher, PublisherQueue, PublisherSettings
from daqd.receiver import ReceiverServer, ReceiverSettings
from daqd.record import Record
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
from daqd.ssdaq_monitor import MonitorPush

log = logging.getLogger("daqd.host")

_hosts: dict[asyncio.AbstractEventLoop, Host] = {}


def current_host() -> Host:
    """The Host running in this event loop (for handler code: `daqd.http.grab`, DHS operations)."""
    try:
        return _hosts[asyncio.get_running_loop()]
    except (KeyError, RuntimeError):
        raise RuntimeError("no daqd host is running in this event loop") from None


def _minus(now: dict[str, int], then: dict[str, int]) -> dict[str, int]:
    return {k: n - then.get(k, 0) for k, n in now.items() if n - then.get(k, 0)}


def _reasons(counts: dict[str, int]) -> str:
    shown = {k: n for k, n in counts.items() if n}
    return ", ".join(f"{n} {k}" for k, n in sorted(shown.items())) if shown else "none"


class Host:
    """One daemon's receivers, publishers, routes, run state and live tap."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.name = config.daemon.name
        self.machine = StateMachine()
        self.zmq_context = zmq.asyncio.Context()
        self.receivers: dict[str, ReceiverServer] = {}
        self.publishers: dict[str, Publisher] = {}
        self.queues: dict[str, PublisherQueue] = {}
        self.run: RunInfo | None = None
        self.last_run: RunInfo | None = None
        self.started_ns = time.time_ns()
        self.taps_active = False
        self._tap: zmq.asyncio.Socket | None = None
        self._tap_topics: set[str] = set()
        self._tap_task: asyncio.Task[None] | None = None
        self._sampler: asyncio.Task[None] | None = None
        self.monitor_push: MonitorPush | None = None
        # CHIRP, with a [constellation] table: the satellite offers through it, and receivers
        # that find their senders by it subscribe to its registry (Discovery.subscribe)
        self.discovery: Discovery | None = None
        self._run_base: dict[str, Any] = {}
        self.stopped = asyncio.Event()
        self.stop_requested = asyncio.Event()
        self.stop_reason = RunCondition.INTERRUPTED

    @property
    def state(self) -> State:
        return self.machine.state

    # ----- building --------------------------------------------------------------------------
    def _make_publisher(self, settings: PublisherSettings) -> Publisher:
        return publisher_class(settings.type)(settings, self)

    def _make_receiver(self, settings: ReceiverSettings) -> ReceiverServer:
        if settings.process:
            from daqd.worker import WorkerReceiver  # a receiver run in its own process

            return WorkerReceiver(settings, self)
        return receiver_class(settings.type)(settings, self)

    def _link(self, receiver: ReceiverServer) -> None:
        receiver.queues = [self.queues[p] for p in receiver.settings.publish_to]

    # ----- life cycle ------------------------------------------------------------------------
    async def start(self) -> None:
        """NEW → initialize → INIT → launch → ORBIT: publishers first, then receivers."""
        _hosts[asyncio.get_running_loop()] = self
        if self.config.daemon.monitor_push:
            try:
                self.monitor_push = MonitorPush(self.zmq_context, self.config.daemon.monitor_push)
            except zmq.ZMQError as exc:
                raise ConfigError(f"[daemon] monitor_push: {exc}") from exc
        if self.config.constellation is not None:
            self.discovery = Discovery.for_settings(self.config.constellation, self.name)
            self.discovery.open()
        self.machine.begin("initialize")
        self.machine.finish()
        self.machine.begin("launch")
        try:
            for ps in self.config.publishers:
                await self._start_publisher(ps)
            for rs in self.config.receivers:
                await self._start_receiver(rs)
        except Exception as exc:
            self.machine.fail(f"launch: {exc}")
            await self._shutdown_components(
                RunCondition.ABORTED, Deadline(self.config.daemon.drain_timeout_s)
            )
            if self.discovery is not None:
                self.discovery.close()
            raise
        self.machine.finish()
        self._sampler = asyncio.create_task(self._sample_forever(), name="sampler")

    async def _start_publisher(
        self, settings: PublisherSettings, previous: Publisher | None = None
    ) -> None:
        pub = self._make_publisher(settings)
        if previous is not None:  # a replacement keeps counting where its predecessor stopped
            pub.counters = previous.counters
        try:
            await pub.start()
        except Exception as exc:
            raise ConfigError(f"publisher {settings.name!r} cannot start: {exc}") from exc
        self.publishers[pub.name] = pub
        queue = PublisherQueue(pub)
        self.queues[pub.name] = queue
        queue.start()
        log.info("publisher %s (%s) started %s", pub.name, settings.type, pub.addresses or "")

    async def _start_receiver(
        self,
        settings: ReceiverSettings,
        previous: ReceiverServer | None = None,
        receiving: bool = True,
    ) -> None:
        """Make the receiver and start it, or (not `receiving`: in INIT) only make it: the
        next launch starts it with the others."""
        rec = self._make_receiver(settings)
        if previous is not None:  # same source name: seq stays gap-free, counters go on
            rec.counters = previous.counters
            rec._seq = previous._seq
        self._link(rec)
        if not receiving:
            self.receivers[rec.name] = rec
            log.info("receiver %s (%s) made; it starts at launch", rec.name, settings.type)
            return
        try:
            await rec.start()
        except Exception as exc:
            await rec.stop_receiving()
            raise ConfigError(f"receiver {settings.name!r} cannot start: {exc}") from exc
        self.receivers[rec.name] = rec
        log.info("receiver %s (%s) started %s", rec.name, settings.type, rec.addresses or "")

    async def _sample_forever(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            for rec in self.receivers.values():
                rec.sample()
            for pub in self.publishers.values():
                pub.counters.sample()
            if self.monitor_push is not None:
                self.monitor_push.tick(self.receivers.values())

    async def stop(self, condition: RunCondition = RunCondition.INTERRUPTED) -> None:
        """Stop receiving, end the run with `condition` (OR'd with what happened), drain, close.

        One deadline (`drain_timeout_s`) covers it all; `force()` (a second signal) cuts it
        short. Whatever is not delivered by then is counted under the deadline's reason.
        """
        if self.stopped.is_set():
            return
        self.deadline = Deadline(self.config.daemon.drain_timeout_s)
        if self._force_requested:
            self.deadline.force()
        log.info(
            "stopping: no more input; draining within %.1f s", self.config.daemon.drain_timeout_s
        )
        await self._shutdown_components(condition, self.deadline)
        if self.discovery is not None:
            self.discovery.close()
        if self._sampler is not None:
            self._sampler.cancel()
        if self._tap_task is not None:
            self._tap_task.cancel()
        if self._tap is not None:
            self._tap.close(linger=0)
            if self.tap_endpoint and self.tap_endpoint.startswith("ipc://"):
                with contextlib.suppress(OSError):
                    os.unlink(self.tap_endpoint[6:])
        self.zmq_context.destroy(linger=0)
        _hosts.pop(asyncio.get_running_loop(), None)
        self.log_accounting()
        self.stopped.set()
        log.info("stopped")

    deadline: Deadline | None = None
    _force_requested = False

    def force(self) -> None:
        """Cut the shutdown's drain short (a second SIGTERM/SIGINT)."""
        self._force_requested = True
        if self.deadline is not None:
            self.deadline.force()

    async def _shutdown_components(self, condition: RunCondition, deadline: Deadline) -> None:
        for rec in self.receivers.values():
            rec.stop_input()  # before anything awaits: the loop reads no more datagrams
        await asyncio.gather(*(r.stop_receiving(deadline) for r in self.receivers.values()))
        if self.run is not None:
            await self._end_run(condition, deadline)
        await asyncio.gather(*(q.close(deadline) for q in self.queues.values()))

    def request_stop(self, condition: RunCondition = RunCondition.INTERRUPTED) -> None:
        """Ask the daemon's main loop to stop (signal handlers, `daqctl shutdown`)."""
        self.stop_reason = condition
        self.stop_requested.set()

    def log_accounting(self) -> None:
        """One line per receiver and publisher with what it counted since start; WARNING if
        anything was dropped. The same totals are in `daqctl status`."""
        for name, rec in self.receivers.items():
            c = rec.counters
            level = logging.WARNING if any(c.drops.values()) else logging.INFO
            log.log(
                level,
                "accounting: receiver %s: received %d, input dropped %s, errors %s",
                name,
                c.records,
                _reasons(c.drops),
                _reasons(c.errors),
            )
        for name, q in self.queues.items():
            a = q.accounting()
            level = logging.WARNING if any(a["drops"].values()) or a["queued"] else logging.INFO
            log.log(
                level,
                "accounting: publisher %s: offered %d, delivered %d, dropped %s%s",
                name,
                a["offered"],
                a["delivered"],
                _reasons(a["drops"]),
                f", {a['queued']} still queued" if a["queued"] else "",
            )

    # ----- runs ------------------------------------------------------------------------------
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

    # ----- reconfiguration -------------------------------------------------------------------
    async def reconfigure(self, text: str, path: str | None = None) -> list[str]:
        """Apply a new configuration; validated first, and on any error nothing changes.

        Receivers and publishers whose settings did not change keep running untouched.
        """
        return await self.apply_config(parse_config(text, path or self.config.path))

    async def apply_config(self, new: Config, receiving: bool = True) -> list[str]:
        """Apply the validated configuration `new` (from a file, or a Constellation controller's
        `initialize`); on any error nothing changes. Not `receiving` (in INIT): receivers it
        makes are started by the next launch."""
        if new.daemon.monitor_push != self.config.daemon.monitor_push:
            raise ConfigError(
                f'{new.path}: [daemon]: key "monitor_push": cannot change on a running daemon; '
                "restart it"
            )
        if new.daemon.name != self.config.daemon.name:
            raise ConfigError(
                f'{new.path}: [daemon]: key "name": cannot change from {self.name!r} on a '
                "running daemon; restart it"
            )
        old_r = {r.name: r for r in self.config.receivers}
        old_p = {p.name: p for p in self.config.publishers}
        new_r = {r.name: r for r in new.receivers}
        new_p = {p.name: p for p in new.publishers}
        gone_r = [n for n, r in old_r.items() if new_r.get(n) != r]  # changed or removed
        gone_p = [n for n, p in old_p.items() if new_p.get(n) != p]
        add_r = [n for n, r in new_r.items() if old_r.get(n) != r]  # changed or added
        add_p = [n for n, p in new_p.items() if old_p.get(n) != p]
        # What changes must release its sockets before its replacement binds them: stop changed
        # receivers, then drain and close changed publishers (records that still reach a closing
        # queue are counted as drops "reconfigure").
        stopped: dict[str, ReceiverServer] = {}
        for n in gone_r:
            stopped[n] = self.receivers.pop(n)
            await stopped[n].stop_receiving()
        retired: dict[str, Publisher] = {}
        for n in gone_p:
            retired[n] = self.publishers.pop(n)
            await self.queues.pop(n).close(self._reconfigure_deadline(), "reconfigure")
        started_p: list[str] = []
        started_r: list[str] = []
        try:
            for n in add_p:
                await self._start_publisher(new_p[n], retired.get(n))
                started_p.append(n)
            for rec in self.receivers.values():
                self._link(rec)
            for n in add_r:
                await self._start_receiver(new_r[n], stopped.get(n), receiving)
                started_r.append(n)
        except Exception as exc:
            await self._roll_back(started_r, started_p, stopped, retired, old_r, old_p, receiving)
            raise ConfigError(f"{new.path}: {exc}; the previous configuration is running") from exc
        changed = [f"publisher {n}" for n in sorted(set(gone_p) | set(add_p))]
        changed += [f"receiver {n}" for n in sorted(set(gone_r) | set(add_r))]
        self.config = new
        log.info("reconfigured: %s", ", ".join(changed) or "nothing changed")
        return changed

    def _reconfigure_deadline(self) -> Deadline:
        return Deadline(self.config.daemon.drain_timeout_s)

    async def _roll_back(
        self,
        started_r: list[str],
        started_p: list[str],
        stopped: dict[str, ReceiverServer],
        retired: dict[str, Publisher],
        old_r: dict[str, ReceiverSettings],
        old_p: dict[str, PublisherSettings],
        receiving: bool,
    ) -> None:
        """Undo a reconfiguration that failed part-way: back to the settings that were running."""
        try:
            for n in started_r:
                await self.receivers.pop(n).stop_receiving()
            for n in started_p:
                self.publishers.pop(n)
                await self.queues.pop(n).close(self._reconfigure_deadline(), "reconfigure")
            for n, pub in retired.items():
                await self._start_publisher(old_p[n], pub)
            for rec in self.receivers.values():
                self._link(rec)
            for n, rec in stopped.items():
                await self._start_receiver(old_r[n], rec, receiving)
        except Exception as exc:
            self.machine.fail(f"reconfiguration failed and could not be undone: {exc}")
            raise

    # ----- control requests ------------------------------------------------------------------
    async def handle_request(self, code: str, args: dict[str, Any]) -> Any:
        """Serve one ICCP REQUEST; refusals raise ControlError with a one-line message."""
        try:
            if code == "STAT":
                return self.status()
            if code == "CTRL":
                transition = args.get("transition")
                if not isinstance(transition, str):
                    raise ControlError('CTRL needs {"transition": <name>}')
                state = await self.transition(transition, args.get("args") or {})
                reply: dict[str, Any] = {"state": state.name}
                if transition in ("stop", "interrupt") and self.last_run is not None:
                    reply["run"] = self.last_run.metadata()  # daqctl shows why it is not GOOD
                return reply
            if code == "CMD ":
                return await self._command(args)
            if code == "CONF":
                text = args.get("config")
                if not isinstance(text, str):
                    raise ControlError('CONF needs {"config": <TOML text>}')
                return {"changed": await self.reconfigure(text, args.get("path"))}
            if code == "TAPS":
                return {
                    "tap": self.tap_endpoint,
                    "names": sorted([*self.receivers, *self.publishers]),
                }
        except TransitionRefused as exc:
            raise ControlError(str(exc)) from None
        except ConfigError as exc:
            raise ControlError(str(exc)) from None
        raise ControlError(f"unknown request code {code!r}; known: STAT, CTRL, CMD , CONF, TAPS")

    async def _command(self, args: dict[str, Any]) -> Any:
        target = args.get("target")
        rec = self.receivers.get(target) if isinstance(target, str) else None
        if rec is None:
            known = ", ".join(sorted(self.receivers)) or "none"
            raise ControlError(f"no receiver named {target!r}; receivers: {known}")
        try:
            return await rec.call_command(
                str(args.get("name")), list(args.get("args") or []), dict(args.get("kwargs") or {})
            )
        except KeyError as exc:
            raise ControlError(str(exc.args[0])) from None
        except TypeError as exc:
            raise ControlError(f"{rec.name}.{args.get('name')}: {exc}") from None
        except ControlError:
            raise
        except DaqdError as exc:
            # the command ran and says why it could not do it (a camera that answers 503): the
            # client gets that reason, not an "internal error" of the daemon
            raise ControlError(f"{rec.name}.{args.get('name')}: {exc}") from None

    # ----- live tap --------------------------------------------------------------------------
    tap_endpoint: str | None = None
    tap_drops = 0  # records a slow `daqctl tap` could not take (status shows it)

    def open_tap(self, endpoint: str) -> None:
        """Bind an XPUB where `daqctl tap NAME` subscribes to one receiver's or publisher's records."""
        sock = self.zmq_context.socket(zmq.XPUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 10000)
        bind_ipc(sock, endpoint, self.config.daemon.control_group)  # as the control socket
        self._tap = sock
        self.tap_endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._tap_task = asyncio.create_task(self._tap_subscriptions(sock), name="tap")

    async def _tap_subscriptions(self, sock: zmq.asyncio.Socket) -> None:
        counts: dict[str, int] = {}
        while True:
            msg = await sock.recv()
            if not msg:
                continue
            topic = msg[1:].decode("utf-8", "replace")
            counts[topic] = counts.get(topic, 0) + (1 if msg[0] == 1 else -1)
            self._tap_topics = {t for t, n in counts.items() if n > 0}
            self.taps_active = bool(self._tap_topics)

    def tap(self, name: str, record: Record) -> None:
        if name not in self._tap_topics or self._tap is None:
            return
        header = msgpack.packb(record.header(), use_bin_type=True)
        try:
            self._tap.send_multipart(
                [name.encode(), header, *record.payload], flags=zmq.NOBLOCK, copy=False
            )
        except zmq.Again:  # a tap is for looking: a slow `daqctl tap` must not slow the data path
            self.tap_drops += 1

    # ----- status ----------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        now = time.time_ns()
        return {
            "name": self.name,
            "pid": os.getpid(),
            "state": self.state.name,
            "state_since_ns": self.machine.since_ns,
            "allowed": self.machine.allowed(),
            "uptime_s": round((now - self.started_ns) / 1e9, 3),
            "config": self.config.path,
            "run": self._run_status(self.run),
            "last_run": self.last_run.metadata() if self.last_run else None,
            "tap": {"endpoint": self.tap_endpoint, "drops": self.tap_drops},
            **({"monitor_push": self.monitor_push.status()} if self.monitor_push else {}),
            "receivers": {n: r.status() for n, r in self.receivers.items()},
            "publishers": {n: q.status() for n, q in self.queues.items()},
        }

    def _run_status(self, run: RunInfo | None) -> dict[str, Any] | None:
        if run is None:
            return None
        return {"run_id": run.run_id, "time_start": run.start_ns}
