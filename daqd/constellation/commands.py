"""The satellite's CSCP commands: each request on its REP socket answered, the standard commands
with their descriptions, the transitions a controller asks for (initialize and reconfigure take its
map), and a receiver's `cmd_<name>` methods as user commands `<receiver>_<name>`. A malformed
request of any kind gets its reply type and is counted; the satellite keeps serving."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import inspect
import logging
import re
import uuid
from typing import TYPE_CHECKING, Any

import msgpack
import zmq.asyncio

from daqd import __version__
from daqd.config import Config, replace_tables
from daqd.constellation.autonomy import (
    DEFAULT_TRANSITION_TIMEOUT_S,
    ConditionFailed,
    parse_conditions,
)
from daqd.errors import ConfigError, ProtocolError
from daqd.logs import LimitedLogger
from daqd.protocols import chirp, chp, cscp
from daqd.runstate import TRANSITIONS, State

if TYPE_CHECKING:
    from daqd.constellation.satellite import Satellite

log = logging.getLogger("daqd.satellite")

#: The Constellation release whose wire formats the satellite speaks (get_cnstln_version).
CONSTELLATION_VERSION = "1.0.2"
ROLES = tuple(chp.ROLE_FLAGS)
_T = cscp.Type

RUN_ID = re.compile(r"^[\w-]{1,80}$")  # Constellation's ^[\w-]+$, and daqd's length limit

# command -> (description, payload it takes); transitions are listed with the rest
STANDARD: dict[str, tuple[str, str]] = {
    "get_name": ("Return the canonical name of the satellite.", "No arguments."),
    "get_commands": ("Return the commands of the satellite with descriptions.", "No arguments."),
    "get_state": (
        "Return the state (verb), its code (payload) and when it last changed (tags).",
        "No arguments.",
    ),
    "get_status": ("Return a one-line status of the satellite.", "No arguments."),
    "get_config": ("Return the configuration received with initialize.", "No arguments."),
    "get_run_id": ("Return the current run id, or the last one.", "No arguments."),
    "get_version": ("Return the daqd version.", "No arguments."),
    "get_cnstln_version": (
        "Return the Constellation version whose protocols are spoken.",
        "No arguments.",
    ),
    "get_role": (
        "Return the autonomy role (verb) and its heartbeat flags (payload).",
        "No arguments.",
    ),
    "initialize": (
        "Initialize: stop receiving, take the configuration.",
        "Arguments: config (map)",
    ),
    "launch": ("Launch: receivers start receiving.", "No arguments."),
    "land": ("Land: receivers stop receiving.", "No arguments."),
    "start": ("Start a run.", "Arguments: run_id (str, letters, digits, '_' and '-')"),
    "stop": ("Stop the run; its condition is in get_status.", "No arguments."),
    "reconfigure": (
        "Reconfigure in ORBIT: the map's receiver / publisher tables replace the running ones "
        "(those that did not change keep running untouched).",
        "Arguments: partial config (map)",
    ),
    "shutdown": ("Stop daqd (in NEW, INIT, SAFE or ERROR only).", "No arguments."),
}
HIDDEN: dict[str, tuple[str, str]] = {
    "_get_commands": ("Return the hidden commands with descriptions.", "No arguments."),
    "_interrupt": ("Interrupt: end any run and go to SAFE.", "No arguments."),
    "_failure": ("Go to ERROR (initialize leads back to INIT).", "No arguments."),
    "_get_services": ("Return the services offered: name -> port.", "No arguments."),
    "_get_remotes": (
        "Return what the other hosts of the group offer: host UUID -> service -> URI.",
        "No arguments.",
    ),
}
TRANSITION_COMMANDS = {
    "initialize": "initialize",
    "launch": "launch",
    "land": "land",
    "start": "start",
    "stop": "stop",
    "reconfigure": "reconfigure",
    "_interrupt": "interrupt",
}
SHUTDOWN_STATES = frozenset({State.NEW, State.INIT, State.SAFE, State.ERROR})


class WrongArgument(Exception):
    """The payload does not fit the command: INCOMPLETE "Wrong argument: ..."."""


def packable(value: Any) -> bool:
    try:
        msgpack.packb(value, use_bin_type=True)
    except (TypeError, ValueError, OverflowError):
        return False
    return True


def parameters(fn: Any) -> list[str]:
    return [
        p.name
        for p in inspect.signature(fn).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]


def describe_user_command(rec: str, cmd: str, fn: Any) -> str:
    doc = (inspect.getdoc(fn) or f"Command {cmd} of receiver {rec}.").strip().splitlines()[0]
    params = parameters(fn)
    args = f"Arguments: {', '.join(params)}" if params else "No arguments."
    return f"{doc} (receiver {rec}, daqctl cmd {rec} {cmd})\n{args}"


class Commands:
    """CSCP for one satellite: serve() answers the requests on its REP socket; a transition a
    request (or autonomy) asks for runs as a task against the host, one at a time."""

    def __init__(self, satellite: Satellite) -> None:
        self.sat = satellite
        self.host = satellite.host
        self.requests = 0
        self.config: dict[str, Any] = {}  # the map initialize took (get_config)
        # the receiver / publisher tables a controller gave (initialize, reconfigure) and runs now
        self._tables: dict[str, Any] = {}
        self._taking: dict[str, Any] = {}
        self.conditions: dict[str, list[str]] = {}
        self.transition_timeout_s = DEFAULT_TRANSITION_TIMEOUT_S
        self._transition: asyncio.Task[None] | None = None
        self._waiting_for_others = False  # the transition waits on _conditions
        self._limited = LimitedLogger(log)

    async def stop(self) -> None:
        """Let a transition under way end (one still waiting for other satellites has done
        nothing yet: it is cancelled, not to hold the shutdown)."""
        if self._transition is not None and not self._transition.done():
            if self._waiting_for_others:
                self._transition.cancel()
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await self._transition

    async def serve(self, rep: zmq.asyncio.Socket) -> None:
        while True:
            frames = await rep.recv_multipart()
            self.requests += 1
            try:
                reply = await self.answer(frames)
            except Exception as exc:  # the satellite keeps serving whatever a command did
                self.sat.count("cscp_internal")
                log.exception("CSCP: internal error: %r", exc)
                reply = self._reply(_T.INVALID, f"Exception: {exc}")
            try:
                out = cscp.encode(reply)
            except (TypeError, ValueError, OverflowError) as exc:
                self.sat.count("cscp_internal")
                out = cscp.encode(self._reply(_T.INVALID, f"Exception: reply not packable: {exc}"))
            await rep.send_multipart(out)

    def _reply(
        self, kind: cscp.Type, text: str, payload: Any = None, tags: dict[str, Any] | None = None
    ) -> cscp.Message:
        return cscp.Message(self.sat.name, kind, text, payload, tags or {})

    async def answer(self, frames: list[bytes]) -> cscp.Message:
        """One request's frames -> its reply; never raises for anything the peer sent."""
        try:
            request = cscp.decode(frames)
        except ProtocolError as exc:
            self.sat.count("cscp_malformed")
            self._limited.warning("cscp_malformed", "CSCP: malformed request: %s", exc)
            return self._reply(_T.ERROR, f"Malformed message: {exc}")
        if request.type != _T.REQUEST:
            self.sat.count("cscp_not_request")
            return self._reply(
                _T.INVALID, f"Expected a REQUEST, got {request.type.name} from {request.sender}"
            )
        command = request.text.lower()
        try:
            return await self._command(command, request.payload, request.sender)
        except WrongArgument as exc:
            self.sat.count("cscp_wrong_argument")
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
        self.sat.count("cscp_unknown")
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
        return self._reply(_T.SUCCESS, self.sat.name)

    def _cmd_get_state(self) -> cscp.Message:
        state, since = self.host.state, self.host.machine.since_ns
        iso = dt.datetime.fromtimestamp(since / 1e9, dt.UTC).isoformat()
        tags = {"last_changed": msgpack.Timestamp.from_unix_nano(since), "last_changed_iso": iso}
        return self._reply(_T.SUCCESS, state.name, state.value, tags)

    def _cmd_get_status(self) -> cscp.Message:
        return self._reply(_T.SUCCESS, self.sat.status_text)

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
        return self._reply(_T.SUCCESS, self.sat.role, int(chp.ROLE_FLAGS[self.sat.role]))

    def _cmd_shutdown(self) -> cscp.Message:
        if self.host.state not in SHUTDOWN_STATES:
            return self._reply(
                _T.INVALID,
                f"Command shutdown cannot be called in state {self.host.state.name}",
            )
        self.host.request_stop()
        return self._reply(_T.SUCCESS, f"{self.sat.name} queued for reentry")

    def _cmd_get_services(self) -> cscp.Message:
        offers = self.sat.chirp.offers if self.sat.chirp else {}
        names = {chirp.name_uuid(n): n for n in [self.sat.name, *self.sat.data_senders()]}
        services = {
            service.name
            if host == self.sat.uuid
            else f"{service.name} {names.get(host, host.hex())}": port
            for (host, service), port in offers.items()
        }
        return self._reply(_T.SUCCESS, f"{len(services)} services offered", services)

    def _cmd_get_remotes(self) -> cscp.Message:
        remotes: dict[str, dict[str, str]] = {}
        for offer in (self.sat.chirp.registry if self.sat.chirp else {}).values():
            uri = f"tcp://{offer.address}:{offer.port}"
            remotes.setdefault(str(uuid.UUID(bytes=offer.host)), {})[offer.service.name] = uri
        return self._reply(_T.SUCCESS, f"{len(remotes)} remote hosts", remotes)

    def _cmd_failure(self) -> cscp.Message:
        self.host.machine.fail("failure requested by a Constellation controller")
        self.sat.status_text = "failure requested by a controller"
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
                self.sat.count("cscp_invalid_config")
                return self._reply(_T.INVALID, f"Invalid configuration: {exc}", str(exc))
        self._transition = asyncio.create_task(self._run_transition(transition, args))
        return self._reply(_T.SUCCESS, "transitioning", transition)

    def _take_config(self, config: dict[str, Any], sender: str) -> Config:
        """The controller's map: the framework sections taken, and daqd's configuration with the
        map's `receiver` / `publisher` arrays (the file's where absent), validated as a file;
        WrongArgument or ConfigError, and nothing taken, if any of it is wrong."""
        new, self._taking = self._take_tables(config, f"initialize from {sender}", {})
        autonomy = config.get("_autonomy")
        role, max_s = "DYNAMIC", self.sat.settings.max_heartbeat_interval_s
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
        self.sat.role = role
        self.sat.max_interval_ms = int(max_s * 1000)
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
            self.sat.status_text = f"{transition}: waiting for {', '.join(names)}"
            target = TRANSITIONS[transition][2]
            self._waiting_for_others = True
            try:
                await self.sat.autonomy.wait_for(names, target, self.transition_timeout_s)
            except ConditionFailed as exc:
                self.sat.status_text = f"{transition} failed: {exc}"
                self.host.machine.fail(f"{transition}: {exc}")
                return
            finally:
                self._waiting_for_others = False
        try:
            await self.host.transition(transition, args)
        except Exception as exc:
            self.sat.status_text = f"{transition} failed: {exc}"
            log.error("Constellation %s failed: %s", transition, exc)
            return
        if "tables" in args:  # what initialize or reconfigure applied is what runs now
            self._tables = args["tables"]
        prefix = f"interrupted ({why}): " if why else ""
        if had_run and transition != "start" and self.host.last_run is not None:
            run = self.host.last_run
            self.sat.status_text = f"{prefix}run {run.run_id} ended {run.condition.describe()}"
        elif transition == "start" and self.host.run is not None:
            self.sat.status_text = f"run {self.host.run.run_id} running"
        else:
            self.sat.status_text = f"{prefix}{transition} done"

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
            self.sat.count("cscp_command_failed")
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
