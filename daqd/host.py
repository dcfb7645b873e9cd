"""The host: builds receivers and publishers from settings, routes records, reconfigures, serves
control requests and the live tap. Its run state (transitions, runs) is daqd/hostruns.py's."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
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
from daqd.hostruns import HostRuns
from daqd.publisher import Publisher, PublisherQueue, PublisherSettings
from daqd.receiver import ReceiverServer, ReceiverSettings
from daqd.record import Record
from daqd.runstate import RunCondition, RunInfo, StateMachine, TransitionRefused
from daqd.ssdaq_monitor import MonitorPush

log = logging.getLogger("daqd.host")

_hosts: dict[asyncio.AbstractEventLoop, Host] = {}


def current_host() -> Host:
    """The Host running in this event loop (for handler code: `daqd.http.grab`, DHS operations)."""
    try:
        return _hosts[asyncio.get_running_loop()]
    except (KeyError, RuntimeError):
        raise RuntimeError("no daqd host is running in this event loop") from None


def _reasons(counts: dict[str, int]) -> str:
    shown = {k: n for k, n in counts.items() if n}
    return ", ".join(f"{n} {k}" for k, n in sorted(shown.items())) if shown else "none"


class Host(HostRuns):
    """One daemon's receivers, publishers, routes, run state and live tap; the run state's
    transitions and runs are HostRuns' (daqd/hostruns.py)."""

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
