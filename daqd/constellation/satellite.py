"""daqd as a Constellation satellite: CHIRP discovery, CSCP control and CHP heartbeats over the host.

Only with a [constellation] table. The satellite `Daqd.<name>` offers CONTROL (a REP socket serving
every standard CSCP command against the host's run state, the same state machine `daqctl` drives)
and HEARTBEAT (an XPUB sending CHP heartbeats, and an extrasystole on every state change) by CHIRP
multicast beacons, answers REQUESTs, keeps a registry of what other hosts of its group offer, and
DEPARTs when it stops. A malformed request of any kind gets its reply type and is counted; the
satellite keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import inspect
import logging
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import msgpack
import zmq
import zmq.asyncio

from daqd import __version__
from daqd.config import Config, ConstellationSettings, replace_tables
from daqd.constellation.autonomy import (
    DEFAULT_TRANSITION_TIMEOUT_S,
    ConditionFailed,
    HeartbeatWatcher,
    parse_conditions,
)
from daqd.constellation.commands import (
    HIDDEN,
    RUN_ID,
    SHUTDOWN_STATES,
    STANDARD,
    TRANSITION_COMMANDS,
    WrongArgument,
    describe_user_command,
    packable,
    parameters,
)
from daqd.constellation.discovery import Discovery, canonical_name
from daqd.constellation.monitoring import MonitoringPublisher
from daqd.errors import ConfigError, ProtocolError
from daqd.logs import LimitedLogger
from daqd.protocols import chirp, chp, cscp
from daqd.runstate import TRANSITIONS, State

if TYPE_CHECKING:
    from daqd.host import Host

log = logging.getLogger("daqd.satellite")

#: The Constellation release whose wire formats this module speaks (get_cnstln_version).
CONSTELLATION_VERSION = "1.0.2"
ROLES = tuple(chp.ROLE_FLAGS)

_T = cscp.Type
PUBLISHER_CHECK_S = 1.0  # how soon DATA offers follow a reload
STOP_TIMEOUT_S = 5.0


def _timestamp(ns: int) -> msgpack.Timestamp:
    return msgpack.Timestamp.from_unix_nano(ns)


class Satellite:
    """The Constellation face of one daemon; start() after the host, stop() before it stops."""

    def __init__(self, host: Host, settings: ConstellationSettings) -> None:
        self.host = host
        self.settings = settings
        self.name = canonical_name(settings, host.name)
        self.group = settings.group
        self.uuid = chirp.name_uuid(self.name)
        self.group_uuid = chirp.name_uuid(self.group)
        self.config: dict[str, Any] = {}
        # the receiver / publisher tables a controller gave (initialize, reconfigure) and runs now
        self._tables: dict[str, Any] = {}
        self._taking: dict[str, Any] = {}
        self.role = "DYNAMIC"
        self.conditions: dict[str, list[str]] = {}
        self.transition_timeout_s = DEFAULT_TRANSITION_TIMEOUT_S
        self.max_interval_ms = int(settings.max_heartbeat_interval_s * 1000)
        self.status_text = "started"
        # the host's discovery (made with the [constellation] table): its counts are ours
        self.chirp: Discovery | None = host.discovery
        self.counters: dict[str, int] = host.discovery.counters if host.discovery else {}
        self.subscribers = 0
        self.requests = 0
        self.heartbeats = 0
        self.extrasystoles = 0
        self.cmd_port = 0
        self.hb_port = 0
        self.monitoring = MonitoringPublisher(host, self.name, self.counters)
        self.autonomy = HeartbeatWatcher(host, self.counters, self.interrupt_for, self.mark_run)
        self._limited = LimitedLogger(log)
        self._rep: zmq.asyncio.Socket | None = None
        self._xpub: zmq.asyncio.Socket | None = None
        self._xpub_now: zmq.Socket[bytes] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._transition: asyncio.Task[None] | None = None
        self._waiting_for_others = False  # the transition waits on _conditions
        self._beat_now = asyncio.Event()
        self._closing = False
        self._unlisten: Callable[[], None] = lambda: None
        self._unsubscribe: Callable[[], None] = lambda: None

    # ----- life cycle ------------------------------------------------------------------------
    async def start(self) -> None:
        if self.chirp is None:
            raise RuntimeError("the satellite needs the host's discovery ([constellation] table)")
        ctx = self.host.zmq_context
        rep = ctx.socket(zmq.REP)
        rep.setsockopt(zmq.LINGER, 2000)
        rep.bind(f"tcp://*:{self.settings.cmd_port}")
        self._rep = rep
        self.cmd_port = int(rep.getsockopt_string(zmq.LAST_ENDPOINT).rsplit(":", 1)[1])
        xpub = ctx.socket(zmq.XPUB)
        xpub.setsockopt(zmq.LINGER, 0)
        xpub.setsockopt(zmq.XPUB_VERBOSER, 1)
        xpub.bind(f"tcp://*:{self.settings.hb_port}")
        self._xpub = xpub
        self._xpub_now = zmq.Socket.shadow(xpub.underlying)  # sends at once, from any callback
        self.hb_port = int(xpub.getsockopt_string(zmq.LAST_ENDPOINT).rsplit(":", 1)[1])
        self._unlisten = self.host.machine.add_listener(self._on_state)
        self.autonomy.start()
        self._unsubscribe = self.chirp.subscribe(self.autonomy.on_offer)
        self.monitoring.start()
        if self.settings.wait_for_controller and self.host.state == State.ORBIT:
            await self.host.transition("land", {})  # the controller initializes and launches
        self._tasks = [
            asyncio.create_task(self._serve_commands(), name="cscp"),
            asyncio.create_task(self._count_subscribers(), name="chp-subscriptions"),
            asyncio.create_task(self._heartbeats(), name="chp"),
            asyncio.create_task(self._follow_publishers(), name="chirp-data"),
        ]
        self.chirp.offer(chirp.Service.CONTROL, self.cmd_port)
        self.chirp.offer(chirp.Service.HEARTBEAT, self.hb_port)
        self.chirp.offer(chirp.Service.MONITORING, self.monitoring.port)
        for sender, port in self.data_senders().items():  # each CDTP publisher as its own host
            self.chirp.offer(chirp.Service.DATA, port, chirp.name_uuid(sender))
        for service in chirp.Service:  # fill the registry with what the group already offers
            self.chirp.request(service)
        log.info(
            "satellite %s in group %s: control port %d, heartbeat port %d, monitoring port %d, "
            "announced on %s",
            self.name,
            self.group,
            self.cmd_port,
            self.hb_port,
            self.monitoring.port,
            ", ".join(self.chirp.addresses),
        )

    async def stop(self) -> None:
        """DEPART every offered service, then close the sockets."""
        self._closing = True
        if self.chirp is not None:
            self.chirp.depart()
        self._unlisten()  # the state watch ends
        self._unlisten = lambda: None
        for task in self._tasks:
            task.cancel()
        if self._tasks:  # bounded: a task that ignores its cancellation must not hold shutdown
            _, stuck = await asyncio.wait(self._tasks, timeout=STOP_TIMEOUT_S)
            for task in stuck:
                self.count("stop_stuck")
                log.error("satellite: task %s did not end at shutdown", task.get_name())
        if self._transition is not None and not self._transition.done():
            if self._waiting_for_others:  # nothing done yet: do not hold the shutdown for it
                self._transition.cancel()
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await self._transition
        self._unsubscribe()
        await self.monitoring.stop()
        await self.autonomy.stop()
        self._xpub_now = None
        for sock in (self._rep, self._xpub):
            if sock is not None:
                sock.close(linger=0)

    def status(self) -> dict[str, Any]:
        """What `daqctl status` shows of the satellite (the STAT reply's "constellation")."""
        chirp_ = self.chirp
        return {
            "name": self.name,
            "group": self.group,
            "ports": {
                "control": self.cmd_port,
                "heartbeat": self.hb_port,
                "monitoring": self.monitoring.port,
            },
            "role": self.role,
            "status": self.status_text,
            "requests": self.requests,
            "heartbeats": self.heartbeats,
            "extrasystoles": self.extrasystoles,
            "heartbeat_subscribers": self.subscribers,
            "monitoring_sent": dict(self.monitoring.sent),
            "remote_services": len(chirp_.registry) if chirp_ else 0,
            "remote_heartbeats": {
                r.name or r.endpoint: r.summary() for r in self.autonomy.remotes.values()
            },
            "autonomy_interrupts": self.autonomy.interrupts,
            "autonomy_marks": self.autonomy.marks,
            "errors": dict(self.counters),
        }

    def data_senders(self) -> dict[str, int]:
        """Sender name -> bound port of every CDTP publisher (a Constellation receiver finds its
        DATA service by the MD5 of that name, as it lists it in `_data.receive_from`)."""
        out: dict[str, int] = {}
        for pub in self.host.publishers.values():
            endpoint = pub.addresses.get("endpoint", "")
            if pub.settings.type != "cdtp" or not endpoint.startswith("tcp://"):
                continue
            sender = getattr(pub, "sender_name", None) or f"daqd.{pub.name}"
            out[sender] = int(endpoint.rsplit(":", 1)[1])
        return out

    async def _follow_publishers(self) -> None:
        """Keep the DATA offers true when a reload (SIGHUP) adds, moves or removes a CDTP
        publisher: DEPART what went, OFFER what came."""
        offered = self.data_senders()
        while True:
            await asyncio.sleep(PUBLISHER_CHECK_S)
            now = self.data_senders()
            if now == offered or self.chirp is None:
                continue
            for sender, port in offered.items():
                if now.get(sender) != port:
                    self.chirp.withdraw(chirp.Service.DATA, chirp.name_uuid(sender))
            for sender, port in now.items():
                if offered.get(sender) != port:
                    self.chirp.offer(chirp.Service.DATA, port, chirp.name_uuid(sender))
            log.info("CHIRP: DATA offers now %s", now or "none")
            offered = now

    def count(self, reason: str) -> None:
        self.counters[reason] = self.counters.get(reason, 0) + 1

    # ----- CHP -------------------------------------------------------------------------------
    async def _count_subscribers(self) -> None:
        assert self._xpub is not None
        while True:
            msg = await self._xpub.recv()
            if msg[:1] == b"\x01":
                self.subscribers += 1
            elif msg[:1] == b"\x00":
                self.subscribers = max(self.subscribers - 1, 0)
            self._beat_now.set()  # a new subscriber learns the state at once

    def interval_ms(self) -> int:
        return chp.interval_ms(self.subscribers, self.max_interval_ms)

    async def _heartbeats(self) -> None:
        """A heartbeat every 80 % of the interval, and at once for a new subscriber."""
        # asyncio.timeout, not wait_for: Python 3.11's wait_for can swallow the task's own
        # cancellation when the event is set at the same moment, and this loop then never ended
        # (stop() waited on it forever: daqd hung at SIGTERM after a controller went away)
        while not self._closing:
            self._beat_now.clear()
            self._send_heartbeat(extrasystole=False)
            try:
                async with asyncio.timeout(self.interval_ms() * 0.8 / 1000):
                    await self._beat_now.wait()
            except TimeoutError:
                pass

    def _on_state(self, state: State) -> None:
        """An extrasystole for every state the host's machine enters, transitional ones too
        (a controller waiting on a transition from INIT to INIT must see `initializing`)."""
        try:
            self._send_heartbeat(extrasystole=True, state=state)
        except Exception as exc:  # never let a heartbeat break a transition
            self.count("chp_send")
            self._limited.warning("chp_send", "CHP: extrasystole not sent: %r", exc)

    def _send_heartbeat(self, extrasystole: bool, state: State | None = None) -> None:
        if self._xpub_now is None:
            return
        flags = chp.ROLE_FLAGS[self.role]
        if extrasystole:
            flags |= chp.Flags.IS_EXTRASYSTOLE
        hb = chp.Heartbeat(
            self.name,
            _timestamp(time.time_ns()),
            (state or self.host.state).value,
            int(flags),
            self.interval_ms(),
            self.status_text if extrasystole else None,
        )
        try:
            self._xpub_now.send_multipart(chp.encode(hb), flags=zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            self.count("chp_send")
            self._limited.warning("chp_send", "CHP: heartbeat not sent: %s", exc)
            return
        self.heartbeats += 1
        if extrasystole:
            self.extrasystoles += 1

    # ----- CSCP ------------------------------------------------------------------------------
    async def _serve_commands(self) -> None:
        assert self._rep is not None
        while True:
            frames = await self._rep.recv_multipart()
            self.requests += 1
            try:
                reply = await self.answer(frames)
            except Exception as exc:  # the satellite keeps serving whatever a command did
                self.count("cscp_internal")
                log.exception("CSCP: internal error: %r", exc)
                reply = self._reply(_T.INVALID, f"Exception: {exc}")
            try:
                out = cscp.encode(reply)
            except (TypeError, ValueError, OverflowError) as exc:
                self.count("cscp_internal")
                out = cscp.encode(self._reply(_T.INVALID, f"Exception: reply not packable: {exc}"))
            await self._rep.send_multipart(out)

    def _reply(
        self, kind: cscp.Type, text: str, payload: Any = None, tags: dict[str, Any] | None = None
    ) -> cscp.Message:
        return cscp.Message(self.name, kind, text, payload, tags or {})

    async def answer(self, frames: list[bytes]) -> cscp.Message:
        """One request's frames -> its reply; never raises for anything the peer sent."""
        try:
            request = cscp.decode(frames)
        except ProtocolError as exc:
            self.count("cscp_malformed")
            self._limited.warning("cscp_malformed", "CSCP: malformed request: %s", exc)
            return self._reply(_T.ERROR, f"Malformed message: {exc}")
        if request.type != _T.REQUEST:
            self.count("cscp_not_request")
            return self._reply(
                _T.INVALID, f"Expected a REQUEST, got {request.type.name} from {request.sender}"
            )
        command = request.text.lower()
        try:
            return await self._command(command, request.payload, request.sender)
        except WrongArgument as exc:
            self.count("cscp_wrong_argument")
            return self._reply(_T.INCOMPLETE, f"Wrong argument: {exc}", str(exc))
        except NotImplementedError as exc:
            return self._reply(_T.NOTIMPLEMENTED, f"{command}: {exc}")

    async def _command(self, command: str, payload: Any, sender: str) -> cscp.Message:
        if command in TRANSITION_COMMANDS:
            return self._begin_transition(command, payload, sender)
        handler = self._handlers().get(command)
        if handler is not None:
            if payload is not None:
                raise WrongArgument(f"{command} takes no payload")
            result: cscp.Message = handler()
            return result
        user = self.user_commands().get(command)
        if user is not None:
            return await self._user_command(command, user, payload)
        if command == "reconfigure":
            raise NotImplementedError(
                "daqd reconfigures from its TOML file (SIGHUP or `daqctl reload`)"
            )
        self.count("cscp_unknown")
        return self._reply(_T.UNKNOWN, f"Unknown command: {command}")

    # standard commands
    def _handlers(self) -> dict[str, Any]:
        """Every command of STANDARD and HIDDEN but the transitions -> its method."""
        return {
            "get_name": self._cmd_get_name,
            "get_state": self._cmd_get_state,
            "get_status": self._cmd_get_status,
            "get_commands": self._cmd_get_commands,
            "_get_commands": self._cmd_get_commands_hidden,
            "get_config": self._cmd_get_config,
            "get_run_id": self._cmd_get_run_id,
            "get_version": self._cmd_get_version,
            "get_cnstln_version": self._cmd_get_cnstln_version,
            "get_role": self._cmd_get_role,
            "shutdown": self._cmd_shutdown,
            "_failure": self._cmd_failure,
            "_get_services": self._cmd_get_services,
            "_get_remotes": self._cmd_get_remotes,
        }

    def _cmd_get_name(self) -> cscp.Message:
        return self._reply(_T.SUCCESS, self.name)

    def _cmd_get_state(self) -> cscp.Message:
        state, since = self.host.state, self.host.machine.since_ns
        iso = dt.datetime.fromtimestamp(since / 1e9, dt.UTC).isoformat()
        tags = {"last_changed": _timestamp(since), "last_changed_iso": iso}
        return self._reply(_T.SUCCESS, state.name, state.value, tags)

    def _cmd_get_status(self) -> cscp.Message:
        return self._reply(_T.SUCCESS, self.status_text)

    def _cmd_get_commands(self) -> cscp.Message:
        cmds = {name: f"{doc}\n{args}" for name, (doc, args) in STANDARD.items()}
        for name, (rec, cmd, fn) in self.user_commands().items():
            cmds[name] = describe_user_command(rec, cmd, fn)
        return self._reply(_T.SUCCESS, f"{len(cmds)} commands known", cmds)

    def _cmd_get_commands_hidden(self) -> cscp.Message:
        cmds = {name: f"{doc}\n{args}" for name, (doc, args) in HIDDEN.items()}
        return self._reply(_T.SUCCESS, f"{len(cmds)} commands known", cmds)

    def _cmd_get_config(self) -> cscp.Message:
        return self._reply(_T.SUCCESS, f"{len(self.config)} configuration keys", self.config)

    def _cmd_get_run_id(self) -> cscp.Message:
        run = self.host.run or self.host.last_run
        return self._reply(_T.SUCCESS, run.run_id if run else "")

    def _cmd_get_version(self) -> cscp.Message:
        return self._reply(_T.SUCCESS, __version__)

    def _cmd_get_cnstln_version(self) -> cscp.Message:
        return self._reply(_T.SUCCESS, CONSTELLATION_VERSION)

    def _cmd_get_role(self) -> cscp.Message:
        return self._reply(_T.SUCCESS, self.role, int(chp.ROLE_FLAGS[self.role]))

    def _cmd_shutdown(self) -> cscp.Message:
        if self.host.state not in SHUTDOWN_STATES:
            return self._reply(
                _T.INVALID,
                f"Command shutdown cannot be called in state {self.host.state.name}",
            )
        self.host.request_stop()
        return self._reply(_T.SUCCESS, f"{self.name} queued for reentry")

    def _cmd_get_services(self) -> cscp.Message:
        offers = self.chirp.offers if self.chirp else {}
        names = {chirp.name_uuid(n): n for n in [self.name, *self.data_senders()]}
        services = {
            service.name
            if host == self.uuid
            else f"{service.name} {names.get(host, host.hex())}": port
            for (host, service), port in offers.items()
        }
        return self._reply(_T.SUCCESS, f"{len(services)} services offered", services)

    def _cmd_get_remotes(self) -> cscp.Message:
        remotes: dict[str, dict[str, str]] = {}
        for offer in (self.chirp.registry if self.chirp else {}).values():
            uri = f"tcp://{offer.address}:{offer.port}"
            remotes.setdefault(str(uuid.UUID(bytes=offer.host)), {})[offer.service.name] = uri
        return self._reply(_T.SUCCESS, f"{len(remotes)} remote hosts", remotes)

    def _cmd_failure(self) -> cscp.Message:
        self.host.machine.fail("failure requested by a Constellation controller")
        self.status_text = "failure requested by a controller"
        return self._reply(_T.SUCCESS, "failure")

    # transitions
    def _begin_transition(self, command: str, payload: Any, sender: str) -> cscp.Message:
        transition = TRANSITION_COMMANDS[command]
        args: dict[str, Any] = {}
        if transition in ("initialize", "reconfigure"):
            if not isinstance(payload, dict):
                raise WrongArgument(f"{transition} takes the configuration as a map")
        elif transition == "start":
            if not isinstance(payload, str):
                raise WrongArgument("start takes the run id as a string")
            if not RUN_ID.match(payload):
                raise WrongArgument(
                    f"run id {payload!r} must be 1 to 80 letters, digits, '_' or '-'"
                )
            args["run_id"] = payload
        elif payload is not None:
            raise WrongArgument(f"{command} takes no payload")
        state = self.host.state
        if self._transition is not None and not self._transition.done():
            return self._reply(
                _T.INVALID,
                f"Transition not allowed: a transition is under way (state {state.name})",
            )
        # reconfigure: ORBIT only, as Constellation has it (daqctl reconfigure also works in RUN)
        sources = {State.ORBIT} if transition == "reconfigure" else TRANSITIONS[transition][0]
        if state not in sources:
            allowed = ", ".join(sorted(s.name for s in sources))
            return self._reply(
                _T.INVALID,
                f"Transition not allowed: {transition} in state {state.name} (allowed from {allowed})",
            )
        if transition in ("initialize", "reconfigure"):
            try:
                if transition == "initialize":  # the file's tables, but for the map's
                    args["config"] = self._take_config(payload, sender)
                else:  # the tables taken before, but for the map's
                    where = f"reconfigure from {sender}"
                    args["config"], self._taking = self._take_tables(payload, where, self._tables)
                args["tables"] = self._taking
            except ConfigError as exc:
                self.count("cscp_invalid_config")
                return self._reply(_T.INVALID, f"Invalid configuration: {exc}", str(exc))
        self._transition = asyncio.create_task(self._run_transition(transition, args))
        return self._reply(_T.SUCCESS, "transitioning", transition)

    def _take_config(self, config: dict[str, Any], sender: str) -> Config:
        """The controller's map: the framework sections taken, and daqd's configuration with the
        map's `receiver` / `publisher` arrays (the file's where absent), validated as a file;
        WrongArgument or ConfigError, and nothing taken, if any of it is wrong."""
        new, self._taking = self._take_tables(config, f"initialize from {sender}", {})
        autonomy = config.get("_autonomy")
        role, max_s = "DYNAMIC", self.settings.max_heartbeat_interval_s
        if isinstance(autonomy, dict):
            wanted = autonomy.get("role", role)
            if not isinstance(wanted, str) or wanted.upper() not in ROLES:
                raise WrongArgument(f"_autonomy.role {wanted!r} is not one of {', '.join(ROLES)}")
            role = wanted.upper()
            interval = autonomy.get("max_heartbeat_interval", max_s)
            if isinstance(interval, bool) or not isinstance(interval, int | float) or interval <= 0:
                raise WrongArgument(
                    f"_autonomy.max_heartbeat_interval {interval!r} is not a positive number"
                )
            max_s = float(interval)
        try:
            conditions, timeout_s = parse_conditions(config)
        except ValueError as exc:
            raise WrongArgument(str(exc)) from None
        self.config = config
        self.role = role
        self.max_interval_ms = int(max_s * 1000)
        self.conditions, self.transition_timeout_s = conditions, timeout_s
        return new

    def _take_tables(
        self, config: dict[str, Any], where: str, base: dict[str, Any]
    ) -> tuple[Config, dict[str, Any]]:
        """daqd's configuration with the `receiver` / `publisher` tables of `config` in place of
        those of `base` (the file's where neither has them), validated as a file (ConfigError);
        and the tables it used, which become the running ones once the transition succeeds."""
        tables = dict(base)
        for key in ("receiver", "publisher"):
            if key in config:
                tables[key] = _entries(key, config[key])
        return replace_tables(self.host.config, tables, where), tables

    async def _run_transition(self, transition: str, args: dict[str, Any], why: str = "") -> None:
        had_run = self.host.run is not None
        names = self.conditions.get(transition)
        if names:  # _conditions: other satellites first
            self.status_text = f"{transition}: waiting for {', '.join(names)}"
            target = TRANSITIONS[transition][2]
            self._waiting_for_others = True
            try:
                await self.autonomy.wait_for(names, target, self.transition_timeout_s)
            except ConditionFailed as exc:
                self.status_text = f"{transition} failed: {exc}"
                self.host.machine.fail(f"{transition}: {exc}")
                return
            finally:
                self._waiting_for_others = False
        try:
            await self.host.transition(transition, args)
        except Exception as exc:
            self.status_text = f"{transition} failed: {exc}"
            log.error("Constellation %s failed: %s", transition, exc)
            return
        if "tables" in args:  # what initialize or reconfigure applied is what runs now
            self._tables = args["tables"]
        prefix = f"interrupted ({why}): " if why else ""
        if had_run and transition != "start" and self.host.last_run is not None:
            run = self.host.last_run
            self.status_text = f"{prefix}run {run.run_id} ended {run.condition.describe()}"
        elif transition == "start" and self.host.run is not None:
            self.status_text = f"run {self.host.run.run_id} running"
        else:
            self.status_text = f"{prefix}{transition} done"

    def interrupt_for(self, reason: str) -> None:
        """Autonomy: another satellite failed; interrupt toward SAFE if in ORBIT or RUN."""
        state = self.host.state
        if state not in (State.ORBIT, State.RUN):
            log.warning("autonomy: %s; nothing to interrupt in %s", reason, state.name)
            return
        if self._transition is not None and not self._transition.done():
            log.warning("autonomy: %s; a transition is under way, not interrupting", reason)
            return
        log.warning("autonomy: %s: interrupting (%s -> SAFE)", reason, state.name)
        self._transition = asyncio.create_task(self._run_transition("interrupt", {}, reason))

    def mark_run(self, reason: str) -> None:
        """Autonomy: a MARK_DEGRADED satellite failed; the current run (if any) ends DEGRADED
        with `reason` (e.g. `constellation.peer_lost:Type.Name`) among its reasons."""
        run = self.host.run
        if run is not None and self.host.mark_run(reason):
            self.status_text = f"run {run.run_id} marked DEGRADED: {reason}"
            self._beat_now.set()

    # user commands: every receiver's cmd_<name>, as <receiver>_<name>
    def user_commands(self) -> dict[str, tuple[str, str, Any]]:
        out: dict[str, tuple[str, str, Any]] = {}
        for rec_name, rec in self.host.receivers.items():
            for cmd, fn in rec.commands().items():
                out[f"{rec_name}_{cmd}".lower()] = (rec_name, cmd, fn)
        return out

    async def _user_command(
        self, command: str, entry: tuple[str, str, Any], payload: Any
    ) -> cscp.Message:
        rec_name, cmd, fn = entry
        params = parameters(fn)
        if payload is None:
            args: list[Any] = []
        elif len(params) == 1 and not isinstance(payload, list):
            args = [payload]
        elif isinstance(payload, list):
            args = payload
        else:
            raise WrongArgument(f"{command} takes a list with one entry per parameter")
        try:
            inspect.signature(fn).bind(*args)
        except TypeError as exc:
            raise WrongArgument(f"{command}: {exc}") from None
        rec = self.host.receivers[rec_name]
        try:
            result = await rec.call_command(cmd, args, {})
        except NotImplementedError:
            raise
        except Exception as exc:
            self.count("cscp_command_failed")
            return self._reply(_T.INVALID, f"Exception: {rec_name}.{cmd}: {exc}")
        if result is not None and not packable(result):
            result = repr(result)
        return self._reply(_T.SUCCESS, f"{rec_name}.{cmd} done", result)


def _entries(table: str, value: Any) -> Any:
    """A controller's `receiver` / `publisher`: a list of tables as in TOML, or a map of name ->
    table (a Constellation configuration holds maps and lists of scalars only, so a controller's
    file gives `[satellites.Daqd.<name>.receiver.<receiver name>]`); as a list of tables."""
    if not isinstance(value, dict):
        return value  # a list, or wrong: replace_tables says what is wrong with it
    out = []
    for name, entry in value.items():
        if isinstance(entry, dict):
            if entry.get("name", name) != name:
                raise WrongArgument(f"{table}.{name}: name {entry['name']!r} is not its key")
            entry = {"name": name, **entry}
        out.append(entry)
    return out


async def start_satellite(host: Host) -> Satellite | None:
    """The daemon's satellite, started, if the configuration has a [constellation] table."""
    settings = host.config.constellation
    if settings is None:
        return None
    satellite = Satellite(host, settings)
    try:
        await satellite.start()
    except Exception:
        await satellite.stop()
        raise
    return satellite
