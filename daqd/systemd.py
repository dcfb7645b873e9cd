"""systemd notification (sd_notify) without libsystemd: READY, STATUS, WATCHDOG and STOPPING.

The protocol is one datagram of newline-separated `KEY=value` lines sent to the unix socket named
by $NOTIFY_SOCKET; a leading '@' names a socket in the abstract namespace. Without $NOTIFY_SOCKET
(not run by systemd) every call is a no-op that returns False.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping

log = logging.getLogger("daqd.systemd")


def _address(value: str) -> str | bytes | None:
    if value.startswith("@"):
        return b"\0" + value[1:].encode()  # abstract namespace
    if value.startswith("/"):
        return value
    return None  # e.g. vsock: addresses, which a host-local daemon has no use for


class Notifier:
    """Sends sd_notify messages for one process; reads its settings from `env` once."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        self.socket_name = env.get("NOTIFY_SOCKET", "")
        self.address = _address(self.socket_name) if self.socket_name else None
        if self.socket_name and self.address is None:
            log.warning("NOTIFY_SOCKET=%s: unsupported address, not notifying", self.socket_name)
        self.watchdog_usec = 0
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        # The watchdog is ours only if WATCHDOG_PID is unset or names this process.
        if usec.isdigit() and (not pid or pid == str(os.getpid())):
            self.watchdog_usec = int(usec)
        self._sock: socket.socket | None = None

    @property
    def enabled(self) -> bool:
        return self.address is not None

    @property
    def watchdog_interval_s(self) -> float | None:
        """How often to ping: half the watchdog timeout, as systemd recommends; None if off."""
        if not self.watchdog_usec:
            return None
        return self.watchdog_usec / 2e6

    def send(self, *lines: str) -> bool:
        """Send one notification made of `lines`; False if not under systemd or it failed."""
        if self.address is None:
            return False
        if self._sock is None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        data = "\n".join(lines).encode("utf-8", "replace")
        try:
            self._sock.sendto(data, self.address)
        except OSError as exc:
            log.warning("sd_notify to %s failed: %s", self.socket_name, exc)
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        lines = ["READY=1", f"MAINPID={os.getpid()}"]
        if status:
            lines.append(f"STATUS={_one_line(status)}")
        return self.send(*lines)

    def status(self, text: str) -> bool:
        return self.send(f"STATUS={_one_line(text)}")

    def reloading(self) -> bool:
        # systemd ≥ 253 wants the monotonic time with RELOADING=1; older ones ignore it.
        return self.send("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")

    def stopping(self, status: str | None = None) -> bool:
        lines = ["STOPPING=1"]
        if status:
            lines.append(f"STATUS={_one_line(status)}")
        return self.send(*lines)

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    async def run_watchdog(self, healthy: Callable[[], bool] | None = None) -> None:
        """Ping the watchdog every half interval while the loop runs and `healthy()` holds.

        The pings come from a task on the daemon's own event loop, so a blocked loop stops them
        and systemd restarts the daemon; so does a host that reports itself unhealthy.
        """
        interval = self.watchdog_interval_s
        if interval is None or not self.enabled:
            return
        log.info("systemd watchdog: pinging every %.2f s", interval)
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + interval
            await asyncio.sleep(interval)
            late = loop.time() - due
            if late > interval:
                log.warning("event loop stalled for %.2f s", late)
            if healthy is None or healthy():
                self.watchdog()
            else:
                log.warning("not pinging the systemd watchdog: daemon unhealthy")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _one_line(text: str) -> str:
    return " ".join(text.split())


_default: Notifier | None = None


def notifier() -> Notifier:
    """The process-wide notifier, built from the environment on first use."""
    global _default
    if _default is None:
        _default = Notifier()
    return _default
