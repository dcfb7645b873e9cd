"""The web view's [daemon] keys, checked without importing the web server itself."""

from __future__ import annotations

import ipaddress
from pathlib import Path

from pydantic import BaseModel, field_validator, model_validator

from daqd.errors import ConfigError


def parse_http(value: str) -> tuple[str, int]:
    """`host:port` (or `[v6]:port`) -> (host, port); port 0 lets the kernel choose."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"{value!r} is not HOST:PORT (e.g. 127.0.0.1:8080)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if int(port) > 65535:
        raise ValueError(f"port {port} is out of range (0-65535)")
    return host, int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name or a wildcard: reachable from elsewhere


def read_token(path: str) -> str:
    """The run-control token: the file's first line, at least 16 characters."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the http token file {path}: {exc}") from None
    lines = text.strip().splitlines()
    token = lines[0].strip() if lines else ""
    if len(token) < 16:
        raise ConfigError(
            f"http token file {path}: the token (first line) must have at least 16 characters"
        )
    return token


class HttpSettings(BaseModel):
    """[daemon] http / http_token_file (DaemonSettings inherits them)."""

    # "host:port" of the web view and /metrics; off unless set; port 0: the kernel chooses
    http: str | None = None
    # a file holding the token for run control from the page; required off loopback
    http_token_file: str | None = None
    # where the camera picture draws modules 0..31: [row, column] on a 6x6 grid, one per module;
    # default: CHEC-S's grid without its corners, numbered row by row from the top left
    http_camera_modules: list[tuple[int, int]] | None = None

    @field_validator("http_camera_modules")
    @classmethod
    def _modules(cls, value: list[tuple[int, int]] | None) -> list[tuple[int, int]] | None:
        if value is None:
            return value
        if len(value) != 32:
            raise ValueError(f"needs 32 [row, column] pairs, one per module (got {len(value)})")
        outside = [list(p) for p in value if not (0 <= p[0] < 6 and 0 <= p[1] < 6)]
        if outside:
            raise ValueError(f"rows and columns are 0..5: {outside} lie outside the 6x6 grid")
        twice = sorted({tuple(p) for p in value if value.count(p) > 1})
        if twice:
            raise ValueError(f"two modules at the same place: {[list(p) for p in twice]}")
        return value

    @field_validator("http")
    @classmethod
    def _address(cls, value: str | None) -> str | None:
        if value is not None:
            parse_http(value)
        return value

    @model_validator(mode="after")
    def _token_off_loopback(self) -> HttpSettings:
        if self.http is not None and self.http_token_file is None:
            host, _ = parse_http(self.http)
            if not is_loopback(host):
                raise ValueError(
                    f'key "http": {self.http} is reachable from other hosts: set '
                    "http_token_file (run control then needs its token), or listen on a "
                    "loopback address such as 127.0.0.1"
                )
        return self
