"""TOML settings → validated settings; every error names the file, the table and the key."""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from functools import cache
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from daqd.errors import ConfigError
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


@dataclass
class Config:
    path: str
    text: str
    daemon: DaemonSettings
    receivers: list[ReceiverSettings] = field(default_factory=list)
    publishers: list[PublisherSettings] = field(default_factory=list)

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
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read: {exc.strerror or exc}") from None
    return parse_config(text, str(p))


def parse_config(text: str, path: str = "<config>") -> Config:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    unknown = sorted(set(doc) - {"daemon", "receiver", "publisher"})
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
    receivers = [
        _entry(path, "receiver", i, e, RECEIVER_GROUP)
        for i, e in enumerate(_array(path, doc, "receiver"), 1)
    ]
    publishers = [
        _entry(path, "publisher", i, e, PUBLISHER_GROUP)
        for i, e in enumerate(_array(path, doc, "publisher"), 1)
    ]
    config = Config(path, text, daemon, receivers, publishers)  # type: ignore[arg-type]
    _check_names(config)
    return config


def _array(path: str, doc: dict[str, Any], table: str) -> list[Any]:
    entries = doc.get(table, [])
    if not isinstance(entries, list):
        raise ConfigError(f"{path}: {table} must be an array of tables: write [[{table}]]")
    return entries


def _entry(path: str, table: str, index: int, entry: Any, group: str) -> BaseModel:
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
