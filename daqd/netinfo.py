"""Who holds an address daqd could not bind: /proc/net/{tcp,udp}[6] inode -> /proc/PID/fd owner.

Used only when a start fails, so it may read /proc at leisure. Linux only; elsewhere (or when
/proc says nothing) the explanation is just the address.
"""

from __future__ import annotations

import errno
import os
import pwd
import re
from pathlib import Path
from typing import Any

_CANNOT_START = re.compile(r"^(receiver|publisher) '([^']+)' cannot start: ")
_ADDRESS_KEYS = ("listen", "endpoint", "bind", "address")
_TCP_LISTEN = "0A"


def _os_error(exc: BaseException) -> OSError | None:
    """The OSError (or zmq error, which carries an errno) behind `exc`, if any."""
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            return None
        if isinstance(seen, OSError):
            return seen
        code = getattr(seen, "errno", None)
        if isinstance(code, int) and code in (errno.EADDRINUSE, errno.EACCES, errno.EADDRNOTAVAIL):
            return OSError(code, os.strerror(code))
        seen = seen.__cause__ or seen.__context__
    return None


def _address(settings: Any) -> tuple[str, str, int] | None:
    """(text, transport, port) of what a component binds, from its settings."""
    fields = settings.model_dump() if hasattr(settings, "model_dump") else {}
    for key in _ADDRESS_KEYS:
        value = fields.get(key)
        if not isinstance(value, str) or not value:
            continue
        transport = "udp" if getattr(settings, "type", "") in ("udp", "slowsignal") else "tcp"
        scheme, sep, rest = value.partition("://")
        if sep:
            if scheme not in ("tcp", "udp"):
                return None
            transport, value_part = scheme, rest
        else:
            value_part = value
        port = value_part.rpartition(":")[2]
        try:
            return value, transport, int(port)
        except ValueError:
            return None
    return None


def holders(transport: str, port: int) -> list[str]:
    """Descriptions of the processes holding local `port` (tcp: listening first), from /proc."""
    rows: list[tuple[bool, int, int]] = []  # (listening, uid, inode)
    for table in (transport, transport + "6"):
        try:
            lines = Path(f"/proc/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if len(f) < 10:
                continue
            try:
                local_port = int(f[1].rsplit(":", 1)[1], 16)
                uid, inode = int(f[7]), int(f[9])
            except (IndexError, ValueError):
                continue
            if local_port == port and inode:
                rows.append((transport == "udp" or f[3] == _TCP_LISTEN, uid, inode))
    if any(listening for listening, _, _ in rows):
        rows = [r for r in rows if r[0]]
    found = _owners({inode for _, _, inode in rows})
    out: list[str] = []
    for _, uid, inode in rows:
        owner = found.get(inode)
        text = owner or f"a process of user {_user(uid)} (socket inode {inode}, not visible here)"
        if text not in out:
            out.append(text)
    return out


def _owners(inodes: set[int]) -> dict[int, str]:
    """inode -> "pid N (command line)" for the sockets among `inodes` this user may see."""
    if not inodes:
        return {}
    wanted = {f"socket:[{i}]": i for i in inodes}
    found: dict[int, str] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            fds = list((proc / "fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(fd)
            except OSError:
                continue
            if link in wanted and wanted[link] not in found:
                found[wanted[link]] = f"pid {proc.name} ({_command(proc)})"
        if len(found) == len(wanted):
            break
    return found


def _command(proc: Path) -> str:
    try:
        argv = (proc / "cmdline").read_bytes().rstrip(b"\0").split(b"\0")
        text = " ".join(a.decode(errors="replace") for a in argv)
    except OSError:
        text = ""
    if not text:
        try:
            text = (proc / "comm").read_text().strip()
        except OSError:
            text = "?"
    return text if len(text) <= 120 else text[:117] + "..."


def _user(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def explain_bind_error(exc: BaseException, config: Any) -> str:
    """The message of a failed start, with the address and, for a busy one, who holds it."""
    text = str(exc)
    m = _CANNOT_START.match(text)
    os_error = _os_error(exc)
    if m is None or os_error is None or config is None:
        return text
    kind, name = m.groups()
    entries = config.receivers if kind == "receiver" else config.publishers
    settings = next((e for e in entries if e.name == name), None)
    where = _address(settings) if settings is not None else None
    if where is None:
        return text
    value, transport, port = where
    code = os_error.errno
    reason = os.strerror(code).lower() if code else str(os_error)
    line = f"{kind} {name!r} cannot start: cannot bind {value} ({transport}): {reason}"
    if os_error.errno == errno.EADDRINUSE:
        held = holders(transport, port)
        if held:
            line += "; held by " + ", ".join(held)
    elif os_error.errno == errno.EACCES and port < 1024:
        line += "; ports below 1024 need root or CAP_NET_BIND_SERVICE"
    return line
