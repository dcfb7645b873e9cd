"""TOML settings → validated settings; every error names the file, the table and the key."""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field
from functools import cache
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from daqd import trust
from daqd.errors import ConfigError, ControlError
from daqd.publisher import Publisher, PublisherSettings
from daqd.receiver import ReceiverServer, ReceiverSettings

RECEIVER_GROUP = "daqd.receivers"
PUBLISHER_GROUP = "daqd.publishers"


class DaemonSettings(BaseModel):
    """The [daemon] table."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field("daqd", pattern=r"^[A-Za-z0-9_.-]+$")
    drain_timeout_s: float = Field(10.0, gt=0)
    log_level: str = Field("INFO", pattern=r"^(DEBUG|INFO|WARNING|ERROR)$")
    runtime_dir: str | None = (
        None  # default: $RUNTIME_DIRECTORY, $XDG_RUNTIME_DIR/daqd, /tmp/daqd-<uid>
    )
    control_group: str | None = None  # group allowed on the control socket (mode 0660)
    control_tcp: str | None = None  # e.g. "tcp://0.0.0.0:7700"; needs both CURVE key settings
    curve_server_key_file: str | None = None  # zmq certificate with the server's secret key
    curve_authorized_keys_dir: str | None = None  # public certificates of allowed clients
    max_request_bytes: int = Field(16 << 20, gt=0)


class ConstellationSettings(BaseModel):
    """The [constellation] table: daqd as the Constellation satellite `Daqd.<name>`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    group: str = Field(pattern=r"^[\w.-]+$")  # the Constellation's group name (required)
    name: str | None = Field(None, pattern=r"^[\w-]+$")  # default: [daemon] name
    interface: list[str] | None = None  # interface names or IPv4 addresses; default: all
    cmd_port: int = Field(0, ge=0, le=65535)  # 0: chosen by the system
    hb_port: int = Field(0, ge=0, le=65535)
    max_heartbeat_interval_s: float = Field(30.0, gt=0)
    wait_for_controller: bool = True  # serve waits in INIT for a controller's initialize


@dataclass
class Config:
    path: str
    text: str
    daemon: DaemonSettings
    receivers: list[ReceiverSettings] = field(default_factory=list)
    publishers: list[PublisherSettings] = field(default_factory=list)
    # what `daqd check` prints and `daqd serve` logs: settings that work but should be fixed
    warnings: list[str] = field(default_factory=list)
    constellation: ConstellationSettings | None = None  # [constellation], if given

    def receiver(self, name: str) -> ReceiverSettings:
        return next(r for r in self.receivers if r.name == name)


@cache
def _types(group: str) -> dict[str, Any]:
    return {ep.name: ep for ep in entry_points(group=group)}


def load_type(group: str, name: str) -> Any:
    """The class registered under `name` in an entry-point group (KeyError if unknown)."""
    return _types(group)[name].load()


def receiver_class(name: str) -> type[ReceiverServer]:
    cls: type[ReceiverServer] = load_type(RECEIVER_GROUP, name)
    return cls


def publisher_class(name: str) -> type[Publisher]:
    cls: type[Publisher] = load_type(PUBLISHER_GROUP, name)
    return cls


_SECRET_KEY = re.compile(r"pass|secret|token|credential|curve", re.IGNORECASE)
_URL_USERINFO = re.compile(r"(?<=://)[^/@\s]+@")


def _shown(key: str, value: Any) -> str:
    """The offending value as an error may show it: never a secret, never a URL's password."""
    if _SECRET_KEY.search(key):
        return "(value hidden)"
    if isinstance(value, dict):
        return "a table"
    return _URL_USERINFO.sub("***@", repr(value))


def _describe(err: Any) -> str:
    key = ".".join(str(p) for p in err["loc"]) or "(table)"
    if err["type"] == "extra_forbidden":
        return f'key "{key}": unknown key'
    if err["type"] == "missing":
        return f'key "{key}": required key is missing'
    text = f'key "{key}": {err["msg"]} (got {_shown(key, err.get("input"))})'
    return _URL_USERINFO.sub("***@", text)  # a validator's own message may quote the value


def load_config(path: str | Path) -> Config:
    """Read, validate and check a configuration file: what `daqd serve` and `daqd check` refuse.

    Besides the settings themselves, this checks what the [daemon] table names on this machine
    (`check_daemon`): both commands refuse the same files with the same words.
    """
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read: {exc.strerror or exc}") from None
    config = parse_config(text, str(p), from_file=True)
    config.warnings.extend(check_daemon(config))
    return config


def parse_config(text: str, path: str = "<config>", *, from_file: bool = False) -> Config:
    """Validate configuration `text`; `path` names it in errors and places relative handler files.

    Settings that load code (a type's `code_settings`) are checked before anything is imported:
    each file they name must pass `daqd.trust.file_problem`. So must the configuration itself when
    it was read from a file (`from_file`, as `load_config` does) or when it arrived over the
    control socket: then it must be the content of the file at `path`, word for word.
    """
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    unknown = sorted(set(doc) - {"daemon", "receiver", "publisher", "constellation"})
    if unknown:
        raise ConfigError(
            f"{path}: unknown table {unknown[0]!r}; expected [daemon], [[receiver]], [[publisher]]"
        )
    daemon_doc = doc.get("daemon", {})
    if not isinstance(daemon_doc, dict):
        raise ConfigError(f"{path}: [daemon] must be a table")
    try:
        daemon = DaemonSettings.model_validate(daemon_doc)
    except ValidationError as exc:
        raise ConfigError(f"{path}: [daemon]: {_describe(exc.errors()[0])}") from None
    _check_daemon_settings(path, daemon)
    code = _CodeTrust(text, path, from_file)
    receivers = [
        _entry(path, "receiver", i, e, RECEIVER_GROUP, code)
        for i, e in enumerate(_array(path, doc, "receiver"), 1)
    ]
    publishers = [
        _entry(path, "publisher", i, e, PUBLISHER_GROUP, code)
        for i, e in enumerate(_array(path, doc, "publisher"), 1)
    ]
    config = Config(path, text, daemon, receivers, publishers)  # type: ignore[arg-type]
    _check_names(config)
    config.constellation = _constellation(path, doc, daemon)
    return config


def _constellation(
    path: str, doc: dict[str, Any], daemon: DaemonSettings
) -> ConstellationSettings | None:
    """The optional [constellation] table; its name defaults to [daemon] name."""
    table = doc.get("constellation")
    if table is None:
        return None
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: [constellation] must be a table")
    try:
        settings = ConstellationSettings.model_validate(table)
    except ValidationError as exc:
        raise ConfigError(f"{path}: [constellation]: {_describe(exc.errors()[0])}") from None
    if settings.name is None and not re.fullmatch(r"[\w-]+", daemon.name):
        raise ConfigError(
            f"{path}: [constellation]: [daemon] name {daemon.name!r} is not a Constellation name "
            "(letters, digits, '_', '-'): set name in [constellation]"
        )
    return settings


def _array(path: str, doc: dict[str, Any], table: str) -> list[Any]:
    entries = doc.get(table, [])
    if not isinstance(entries, list):
        raise ConfigError(f"{path}: {table} must be an array of tables: write [[{table}]]")
    return entries


def _check_daemon_settings(path: str, d: DaemonSettings) -> None:
    """[daemon] settings that cannot work together (the control server refuses them too)."""
    if d.control_tcp and not (d.curve_server_key_file and d.curve_authorized_keys_dir):
        missing = [
            k for k in ("curve_server_key_file", "curve_authorized_keys_dir") if not getattr(d, k)
        ]
        raise ConfigError(
            f'{path}: [daemon]: key "control_tcp": {d.control_tcp} needs CURVE keys: set '
            f"{' and '.join(missing)} (the daemon's secret certificate, and a directory of the "
            "public certificates of the clients allowed in); the daemon never listens on TCP "
            "without them"
        )


def check_daemon(config: Config) -> list[str]:
    """Check what the [daemon] table names on this machine, as `daqd serve` will use it.

    Raises ConfigError for what serve refuses (a control group that does not exist, a runtime
    directory others could write to, CURVE files that cannot be used); returns warnings for what
    it accepts but should be fixed (a CURVE secret key others can read).
    """
    from daqd import control

    d = config.daemon
    where = f"{config.path}: [daemon]"
    warnings: list[str] = []
    try:
        if d.control_group is not None:
            control.group_id(d.control_group)
    except ControlError as exc:
        raise ConfigError(f'{where}: key "control_group": {exc}') from None
    runtime = Path(d.runtime_dir) if d.runtime_dir else control.runtime_dir()
    problem = trust.dir_problem(runtime) if os.path.lexists(runtime) else None
    if problem:
        key = "runtime_dir" if d.runtime_dir else "runtime_dir (not set: the default)"
        raise ConfigError(f'{where}: key "{key}": {problem}')
    if d.control_tcp and d.curve_server_key_file and d.curve_authorized_keys_dir:
        try:
            *_, notes = control.curve_server_keys(d.curve_server_key_file)
        except ControlError as exc:
            raise ConfigError(f'{where}: key "curve_server_key_file": {exc}') from None
        try:
            control.check_curve_clients(d.curve_authorized_keys_dir)
        except ControlError as exc:
            raise ConfigError(f'{where}: key "curve_authorized_keys_dir": {exc}') from None
        warnings += [f'{where}: key "curve_server_key_file": {note}' for note in notes]
    return warnings


class _CodeTrust:
    """Whether one configuration text may name code to load; decided once, when first needed."""

    def __init__(self, text: str, path: str, from_file: bool) -> None:
        self.text = text
        self.path = path
        self.from_file = from_file
        self._problem: str | None = None
        self._decided = False

    def problem(self) -> str | None:
        if not self._decided:
            self._problem = self._decide()
            self._decided = True
        return self._problem

    def _decide(self) -> str | None:
        over_control = trust.CONTROL_REQUEST.get()
        if not (self.from_file or over_control):
            return None  # handed over by Python code, which runs as the daemon's user anyway
        problem = trust.file_problem(self.path, "configuration file")
        if problem:
            return problem
        if over_control:
            try:
                on_disk = Path(self.path).read_text()
            except (OSError, UnicodeDecodeError) as exc:
                return f"configuration file {self.path} cannot be read: {exc}"
            if on_disk != self.text:
                return (
                    f"the configuration sent is not the content of {self.path}: text alone may "
                    "not load code (send the file itself: daqctl reconfigure FILE)"
                )
        return None

    def check(self, where: str, key: str, value: Any) -> None:
        """Refuse `value` of code setting `key` unless the text and every file it names pass."""
        specs = [value] if isinstance(value, str) else value if isinstance(value, list) else []
        specs = [s for s in specs if isinstance(s, str) and s]
        if not specs:
            return  # nothing to load (or not strings: the settings' validation says so)
        rule = (
            f"code runs as the daemon's user {trust.user_name(os.geteuid())}, so it is loaded "
            f"only from files owned by {trust.trusted_owners()} that nobody else can write, "
            "in directories nobody else can write"
        )
        problem = self.problem()
        if problem:
            raise ConfigError(
                f'{where}: key "{key}": refusing to load code: {problem} ({rule}; the same goes '
                "for the configuration that names it)"
            )
        base = trust.code_base(self.path)
        for spec in specs:
            problem = trust.code_problem(spec, base)
            if problem:
                raise ConfigError(
                    f'{where}: key "{key}": refusing to load {spec!r}: {problem} ({rule})'
                )


def _entry(
    path: str, table: str, index: int, entry: Any, group: str, code: _CodeTrust
) -> BaseModel:
    where = f"{path}: [[{table}]] #{index}"
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: must be a table")
    if isinstance(entry.get("name"), str):
        where += f' (name "{entry["name"]}")'
    type_name = entry.get("type")
    if not isinstance(type_name, str):
        raise ConfigError(f'{where}: key "type": required, one of: {", ".join(_types(group))}')
    if type_name not in _types(group):
        raise ConfigError(
            f'{where}: key "type": unknown {table} type {type_name!r}; '
            f"known: {', '.join(sorted(_types(group)))}"
        )
    try:
        cls = load_type(group, type_name)
    except Exception as exc:
        raise ConfigError(f"{where}: {table} type {type_name!r} cannot be loaded: {exc}") from None
    # before validation: a validator may import what these settings name
    for key in getattr(cls.Settings, "code_settings", ()):
        code.check(where, key, entry.get(key))
    try:
        settings: BaseModel = cls.Settings.model_validate(entry)
    except ValidationError as exc:
        raise ConfigError(f"{where}: {_describe(exc.errors()[0])}") from None
    return settings


def _check_names(config: Config) -> None:
    seen: dict[str, str] = {}
    tables: list[tuple[str, list[Any]]] = [
        ("receiver", config.receivers),
        ("publisher", config.publishers),
    ]
    for table, entries in tables:
        for i, e in enumerate(entries, 1):
            if e.name in seen:
                raise ConfigError(
                    f'{config.path}: [[{table}]] #{i}: key "name": {e.name!r} is already the name '
                    f"of a {seen[e.name]}; names must be unique"
                )
            seen[e.name] = table
    publishers = {p.name for p in config.publishers}
    for i, r in enumerate(config.receivers, 1):
        for target in r.publish_to:
            if target not in publishers:
                raise ConfigError(
                    f'{config.path}: [[receiver]] #{i} (name "{r.name}"): key "publish_to": '
                    f"no publisher named {target!r}; publishers: {', '.join(sorted(publishers)) or 'none'}"
                )
