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

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from daqd import trust
from daqd.config_errors import Problems, suggest
from daqd.errors import ConfigError, ControlError
from daqd.logs import LOG_LEVELS
from daqd.publisher import Publisher, PublisherSettings
from daqd.receiver import ReceiverServer, ReceiverSettings
from daqd.web.settings import HttpSettings, read_token

RECEIVER_GROUP = "daqd.receivers"
PUBLISHER_GROUP = "daqd.publishers"


class DaemonSettings(HttpSettings):  # http, http_token_file: the web view (daqd/web)
    """The [daemon] table."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field("daqd", pattern=r"^[A-Za-z0-9_.-]+$")
    drain_timeout_s: float = Field(10.0, gt=0)
    log_level: str = "INFO"  # any case; `daqd serve --log-level` takes the same names
    runtime_dir: str | None = (
        None  # default: $RUNTIME_DIRECTORY, $XDG_RUNTIME_DIR/daqd, /tmp/daqd-<uid>
    )
    control_group: str | None = None  # group allowed on the control socket (mode 0660)
    control_tcp: str | None = None  # e.g. "tcp://0.0.0.0:7700"; needs both CURVE key settings
    curve_server_key_file: str | None = None  # zmq certificate with the server's secret key
    curve_authorized_keys_dir: str | None = None  # public certificates of allowed clients
    max_request_bytes: int = Field(16 << 20, gt=0)
    # e.g. "tcp://127.0.0.101:10002": every receiver's rate as SSDAQ MonitorData (ssdaq_monitor)
    monitor_push: str | None = Field(None, pattern=r"^(tcp|ipc)://.+")

    @field_validator("log_level", mode="before")
    @classmethod
    def _level(cls, value: Any) -> Any:
        if isinstance(value, str) and value.upper() in LOG_LEVELS:
            return value.upper()
        raise ValueError(f"must be one of {', '.join(LOG_LEVELS)} (in any case)")


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
    return _from_doc(doc, text, path, {}, trust.CodeTrust(text, path, from_file))


def replace_tables(config: Config, tables: dict[str, Any], where: str) -> Config:
    """`config`'s file with its `receiver` / `publisher` arrays replaced by those in `tables`
    (each as in TOML: a list of maps), validated as the file is; `where` names the source in
    errors (a Constellation controller's `initialize`). Settings that load code are refused in
    the replaced arrays: code comes only from trusted files."""
    doc = tomllib.loads(config.text)
    untrusted = trust.UntrustedCode(where)
    code_for: dict[str, trust.CodeTrust | trust.UntrustedCode] = {}
    for table in ("receiver", "publisher"):
        if table in tables:
            doc[table] = tables[table]
            code_for[table] = untrusted
    new = _from_doc(doc, "", where, code_for, trust.CodeTrust(config.text, config.path, False))
    new.path, new.text = config.path, config.text
    return new


def _from_doc(
    doc: dict[str, Any],
    text: str,
    path: str,
    code_for: dict[str, trust.CodeTrust | trust.UntrustedCode],
    code: trust.CodeTrust,
) -> Config:
    """The configuration in the parsed TOML `doc`; `code_for`: tables whose code settings are
    checked otherwise than by `code`."""
    problems = Problems(path, text)
    for table in sorted(set(doc) - set(_TABLES)):
        problems.add(
            path,
            (table,),
            f"unknown table {table!r}{suggest(table, list(_TABLES))} (expected [daemon], "
            "[[receiver]], [[publisher]])",
        )
    daemon_doc = doc.get("daemon", {})
    daemon: DaemonSettings | None = None
    if not isinstance(daemon_doc, dict):
        problems.add(path, ("daemon",), "[daemon] must be a table")
    else:
        try:
            daemon = DaemonSettings.model_validate(daemon_doc)
        except ValidationError as exc:
            problems.add_validation(f"{path}: [daemon]", ("daemon",), exc, DaemonSettings)
        else:
            _check_daemon_settings(path, daemon, problems)
    found: dict[str, list[Any]] = {}
    for table, group in (("receiver", RECEIVER_GROUP), ("publisher", PUBLISHER_GROUP)):
        entries = doc.get(table, [])
        if not isinstance(entries, list):
            problems.add(path, (table,), f"{table} must be an array of tables: write [[{table}]]")
            entries = []
        found[table] = [
            _entry(path, table, i, e, group, code_for.get(table, code), problems)
            for i, e in enumerate(entries, 1)
        ]
    _check_names(path, doc, problems)
    problems.raise_if_any()
    assert daemon is not None
    config = Config(path, text, daemon, found["receiver"], found["publisher"])
    config.constellation = _constellation(path, doc, daemon, problems)
    if config.constellation is None:
        for i, r in enumerate(config.receivers, 1):
            for key in r.constellation_keys():
                problems.add(
                    f'{path}: [[receiver]] #{i} (name "{r.name}")',
                    ("receiver", i, key),
                    f'key "{key}": needs a [constellation] table (CHIRP runs in the satellite)',
                )
    problems.raise_if_any()
    return config


_TABLES = ("daemon", "receiver", "publisher", "constellation")


def _constellation(
    path: str, doc: dict[str, Any], daemon: DaemonSettings | None, problems: Problems
) -> ConstellationSettings | None:
    """The optional [constellation] table; its name defaults to [daemon] name."""
    table = doc.get("constellation")
    if table is None:
        return None
    where = f"{path}: [constellation]"
    if not isinstance(table, dict):
        problems.add(path, ("constellation",), "[constellation] must be a table")
        return None
    try:
        settings = ConstellationSettings.model_validate(table)
    except ValidationError as exc:
        problems.add_validation(where, ("constellation",), exc, ConstellationSettings)
        return None
    if settings.name is None and daemon is not None and not re.fullmatch(r"[\w-]+", daemon.name):
        problems.add(
            where,
            ("constellation",),
            f"[daemon] name {daemon.name!r} is not a Constellation name (letters, digits, '_', "
            "'-'): set name in [constellation]",
        )
    return settings


def _check_daemon_settings(path: str, d: DaemonSettings, problems: Problems) -> None:
    """[daemon] settings that cannot work together (the control server refuses them too)."""
    if d.control_tcp and not (d.curve_server_key_file and d.curve_authorized_keys_dir):
        missing = [
            k for k in ("curve_server_key_file", "curve_authorized_keys_dir") if not getattr(d, k)
        ]
        problems.add(
            f"{path}: [daemon]",
            ("daemon", "control_tcp"),
            f'key "control_tcp": {d.control_tcp} needs CURVE keys: set '
            f"{' and '.join(missing)} (the daemon's secret certificate, and a directory of the "
            "public certificates of the clients allowed in); the daemon never listens on TCP "
            "without them",
        )


def check_daemon(config: Config) -> list[str]:
    """Check what the [daemon] table names on this machine, as `daqd serve` will use it.

    Raises ConfigError for what serve refuses (a control group that does not exist, a runtime
    directory others could write to, CURVE files that cannot be used); returns warnings for what
    it accepts but should be fixed (a CURVE secret key others can read).
    """
    from daqd import endpoints

    d = config.daemon
    where = f"{config.path}: [daemon]"
    problems = Problems(config.path, config.text)
    warnings: list[str] = []
    if d.control_group is not None:
        try:
            endpoints.group_id(d.control_group)
        except ControlError as exc:
            problems.add(where, ("daemon", "control_group"), f'key "control_group": {exc}')
    runtime = Path(d.runtime_dir) if d.runtime_dir else endpoints.runtime_dir()
    problem = trust.dir_problem(runtime) if os.path.lexists(runtime) else None
    if problem:
        key = "runtime_dir" if d.runtime_dir else "runtime_dir (not set: the default)"
        problems.add(where, ("daemon", "runtime_dir"), f'key "{key}": {problem}')
    if d.control_tcp and d.curve_server_key_file and d.curve_authorized_keys_dir:
        try:
            *_, notes = endpoints.curve_server_keys(d.curve_server_key_file)
        except ControlError as exc:
            problems.add(
                where, ("daemon", "curve_server_key_file"), f'key "curve_server_key_file": {exc}'
            )
            notes = []
        try:
            endpoints.check_curve_clients(d.curve_authorized_keys_dir)
        except ControlError as exc:
            problems.add(
                where,
                ("daemon", "curve_authorized_keys_dir"),
                f'key "curve_authorized_keys_dir": {exc}',
            )
        warnings += [f'{where}: key "curve_server_key_file": {note}' for note in notes]
    if d.http_token_file:
        try:
            read_token(d.http_token_file)
        except ConfigError as exc:
            problems.add(where, ("daemon", "http_token_file"), f'key "http_token_file": {exc}')
    problems.raise_if_any()
    return warnings


def _entry(
    path: str,
    table: str,
    index: int,
    entry: Any,
    group: str,
    code: trust.CodeTrust | trust.UntrustedCode,
    problems: Problems,
) -> Any:
    """One [[receiver]] or [[publisher]]: its settings, or None with its problems added."""
    where = f"{path}: [[{table}]] #{index}"
    base: tuple[Any, ...] = (table, index)
    if not isinstance(entry, dict):
        problems.add(where, base, "must be a table")
        return None
    if isinstance(entry.get("name"), str):
        where += f' (name "{entry["name"]}")'
    type_name = entry.get("type")
    if not isinstance(type_name, str):
        problems.add(where, base, f'key "type": required, one of: {", ".join(_types(group))}')
        return None
    if type_name not in _types(group):
        problems.add(
            where,
            (*base, "type"),
            f'key "type": unknown {table} type {type_name!r} '
            f"(known: {', '.join(sorted(_types(group)))})"
            f"{suggest(type_name, list(_types(group)))}",
        )
        return None
    try:
        cls = load_type(group, type_name)
    except Exception as exc:
        problems.add(where, (*base, "type"), f"{table} type {type_name!r} cannot be loaded: {exc}")
        return None
    # before validation: a validator may import what these settings name
    refused = False
    for key in getattr(cls.Settings, "code_settings", ()):
        try:
            code.check(where, key, entry.get(key))
        except ConfigError as exc:
            problems.add_raised(exc, (*base, key))
            refused = True
    if refused:
        return None
    try:
        settings: BaseModel = cls.Settings.model_validate(entry)
    except ValidationError as exc:
        problems.add_validation(where, base, exc, cls.Settings)
        return None
    return settings


def _check_names(path: str, doc: dict[str, Any], problems: Problems) -> None:
    """Names unique across receivers and publishers; publish_to names publishers.

    Entries whose own settings failed still count by the name they give, so one mistake does
    not hide (or invent) another."""

    def names(table: str) -> list[tuple[int, str]]:
        raw = doc.get(table)
        entries = raw if isinstance(raw, list) else []
        return [
            (i, e["name"])
            for i, e in enumerate(entries, 1)
            if isinstance(e, dict) and isinstance(e.get("name"), str)
        ]

    seen: dict[str, str] = {}
    for table in ("receiver", "publisher"):
        for i, name in names(table):
            if name in seen:
                problems.add(
                    f'{path}: [[{table}]] #{i} (name "{name}")',
                    (table, i, "name"),
                    f'key "name": {name!r} is already the name of a {seen[name]}; '
                    "names must be unique",
                )
            seen[name] = table
    publishers = {name for _, name in names("publisher")}
    receivers = doc.get("receiver")
    for i, r in enumerate(receivers if isinstance(receivers, list) else [], 1):
        targets = r.get("publish_to") if isinstance(r, dict) else None
        for target in targets if isinstance(targets, list) else ():
            if isinstance(target, str) and target not in publishers:
                known = ", ".join(sorted(publishers)) or "none"
                named = f' (name "{r["name"]}")' if isinstance(r.get("name"), str) else ""
                problems.add(
                    f"{path}: [[receiver]] #{i}{named}",
                    ("receiver", i, "publish_to"),
                    f'key "publish_to": no publisher named {target!r} (publishers: {known})'
                    f"{suggest(target, publishers)}",
                )
