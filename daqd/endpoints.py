"""Where daqd's control socket and live tap live, and who may reach them.

The runtime directory and the ipc:// endpoints in it; the checks that keep them private (the
directory's owner and mode, the socket files' mode and group); the CURVE keys and the ZAP
authenticator that guard the control socket on TCP. Kept light on purpose: `daqctl` imports this
module, so nothing here may pull in pydantic, numpy, asyncio or the host.
"""

from __future__ import annotations

import grp
import os
import socket
import stat
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import zmq

from daqd import trust
from daqd.errors import ControlError

if TYPE_CHECKING:
    import zmq.asyncio


def runtime_dir() -> Path:
    """Where control sockets live: systemd's RuntimeDirectory, else XDG's, else /tmp/daqd-<uid>."""
    systemd_dirs = os.environ.get("RUNTIME_DIRECTORY", "")
    if systemd_dirs:
        # systemd joins several RuntimeDirectory= entries with ':'; ours is the first.
        return Path(systemd_dirs.split(":")[0])
    xdg = os.environ.get("XDG_RUNTIME_DIR", "")
    if xdg:
        return Path(xdg) / "daqd"
    return Path(f"/tmp/daqd-{os.getuid()}")


def control_endpoint(name: str) -> str:
    """The ipc:// address of the control socket of daemon `name`."""
    return f"ipc://{runtime_dir() / name}.ctl"


def tap_endpoint(name: str) -> str:
    """The ipc:// address of the live data tap of daemon `name`."""
    return f"ipc://{runtime_dir() / name}.tap"


def ipc_path(endpoint: str) -> Path | None:
    """The file behind an ipc:// endpoint, or None for other transports and abstract sockets."""
    if not endpoint.startswith("ipc://"):
        return None
    path = endpoint[len("ipc://") :]
    if path.startswith("@"):
        return None
    return Path(path)


def probe_ipc(path: Path) -> None:
    """Raise ControlError saying why nobody answers at `path`; return if something listens there."""
    if not path.exists():
        raise ControlError(f"no daemon running: control socket {path} does not exist")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except PermissionError:
        raise ControlError(
            f"permission denied on {path}: run as the daemon's user or a member of its group"
        ) from None
    except ConnectionRefusedError:
        raise ControlError(f"no daemon running: {path} is a stale socket (daemon exited)") from None
    except OSError as exc:
        raise ControlError(f"cannot reach {path}: {exc.strerror}") from None
    finally:
        probe.close()


def group_id(group: str) -> int:
    """The gid of `group`; ControlError if there is no such group."""
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ControlError(f"control socket group {group!r} does not exist") from None


def check_runtime_dir(path: Path) -> None:
    """Refuse a runtime directory another user could write to (they could move our sockets away
    or put theirs in their place): it must belong to the daemon's user, writable by nobody else.
    The same check for $RUNTIME_DIRECTORY, $XDG_RUNTIME_DIR/daqd and `runtime_dir` in the config."""
    problem = trust.dir_problem(path)
    if problem:
        raise ControlError(f"{problem}; refusing to put control sockets there")


def ensure_private_dir(path: Path, gid: int) -> None:
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise ControlError(f"cannot create runtime directory {path}: {exc.strerror}") from None
    check_runtime_dir(path)
    if gid >= 0:
        # Members of the control group must be able to reach the socket inside.
        try:
            os.chown(path, -1, gid)
        except OSError as exc:
            raise ControlError(
                f"cannot give runtime directory {path} to group {gid}: {exc.strerror}"
            ) from None
        os.chmod(path, stat.S_IMODE(path.stat().st_mode) | 0o010)


def secure_ipc_path(path: Path | str, group: str | None) -> None:
    """Give a socket file the access of the control socket: 0600, or 0660 with group `group`.

    The control socket and the live tap (`daqctl tap`) both use it, so whoever may control the
    daemon may also watch its data."""
    if group is None:
        os.chmod(path, 0o600)
        return
    gid = group_id(group)
    try:
        os.chown(path, -1, gid)
    except OSError as exc:
        raise ControlError(f"cannot give {path} to group {group!r}: {exc.strerror}") from None
    os.chmod(path, 0o660)


def bind_ipc(sock: zmq.Socket[Any], endpoint: str, group: str | None) -> None:
    """Bind `sock` to `endpoint`; an ipc socket file is private from the moment it exists (umask)
    and then follows `group` as `secure_ipc_path` says. Other transports are bound as they are."""
    path = ipc_path(endpoint)
    if path is None:
        sock.bind(endpoint)
        return
    old = os.umask(0o117 if group is not None else 0o177)
    try:
        sock.bind(endpoint)
    finally:
        os.umask(old)
    secure_ipc_path(path, group)


def check_curve_clients(clients_dir: str | os.PathLike[str]) -> None:
    """Refuse (ControlError) a directory of authorised client keys that others could write to:
    whoever can add a key there lets themselves in (sshd's StrictModes for authorized_keys)."""
    clients = Path(clients_dir)
    if not clients.is_dir():
        raise ControlError(f"curve_clients_dir {clients} is not a directory")
    problem = trust.stat_problem(
        clients, clients.stat(), "the directory of authorised keys", sticky_ok=False
    )
    for entry in sorted(clients.iterdir()) if problem is None else []:
        problem = trust.stat_problem(entry, entry.stat(), "authorised key file")
        if problem:
            break
    if problem:
        raise ControlError(f"{problem}: others could authorise themselves; refusing to use it")


def curve_server_keys(
    secret_key_file: str | os.PathLike[str],
) -> tuple[bytes, bytes, list[str]]:
    """The server's CURVE (public, secret) keys and warnings about the file; ControlError if it
    cannot be used. `daqd check` and `daqd serve` both ask this."""
    import zmq.auth

    secret_file = Path(secret_key_file)
    try:
        public, secret = zmq.auth.load_certificate(secret_file)
    except (OSError, ValueError) as exc:
        raise ControlError(f"cannot read CURVE certificate {secret_file}: {exc}") from None
    if not secret:
        raise ControlError(f"CURVE certificate {secret_file} holds no secret key")
    warnings: list[str] = []
    mode = stat.S_IMODE(secret_file.stat().st_mode)
    if mode & 0o044:
        who = "every user" if mode & 0o004 else "its group"
        warnings.append(
            f"the CURVE secret key {secret_file} is readable by {who} (mode {mode:04o}): "
            "whoever reads it can pose as this daemon; make it readable by its owner only "
            f"(chmod 600 {secret_file})"
        )
    return public, secret, warnings


def curve_authenticator(ctx: zmq.asyncio.Context, on_reject: Callable[[str, str], None]) -> Any:
    """pyzmq's asyncio ZAP authenticator, telling `on_reject(peer address, reason)` whom it
    turned away."""
    from zmq.auth.asyncio import AsyncioAuthenticator

    class CountingAuthenticator(AsyncioAuthenticator):
        peer = ""

        async def handle_zap_message(self, msg: list[bytes]) -> None:
            self.peer = msg[3].decode("utf-8", "replace") if len(msg) > 3 else ""
            await super().handle_zap_message(msg)

        def _send_zap_reply(
            self,
            request_id: bytes,
            status_code: bytes,
            status_text: bytes,
            user_id: str = "anonymous",
        ) -> None:
            if status_code != b"200":
                on_reject(self.peer, status_text.decode("utf-8", "replace"))
            super()._send_zap_reply(request_id, status_code, status_text, user_id)

    return CountingAuthenticator(ctx)


def socket_mode(path: Path) -> int:
    """Permission bits of a socket file (for status and tests)."""
    return stat.S_IMODE(path.stat().st_mode)
