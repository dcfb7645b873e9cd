"""Addresses in settings: "host:port" (checked when the configuration is read) and ZeroMQ endpoints."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator


def parse_hostport(value: str) -> tuple[str, int]:
    """'host:port' (or '[v6]:port') -> (host, port); raises ValueError with the offending text."""
    host, sep, port = value.rpartition(":")
    ok_host = bool(host) and all(c.isalnum() or c in ".-_:[]*" for c in host)
    if not sep or not ok_host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected 'host:port' with a port 0-65535, got {value!r}")
    return host.strip("[]"), int(port)


def _valid_hostport(value: str) -> str:
    parse_hostport(value)
    return value


# A settings field holding "host:port", checked when the configuration is read.
HostPort = Annotated[str, AfterValidator(_valid_hostport)]


def zmq_bindable(endpoint: str) -> str:
    """A ZeroMQ bind address: our settings say port 0 for 'any free port', ZeroMQ says '*'."""
    return endpoint[:-2] + ":*" if endpoint.endswith(":0") else endpoint


def format_hostport(addr: tuple[Any, ...]) -> str:
    return f"{addr[0]}:{addr[1]}"
