"""Receiver `saturnin`: run a Saturnin (Firebird Butler) micro-service as a child process, control
it over ICCP in Saturnin's bytes, and take what it sends on the endpoints it announced as records.

The receiver binds a PAIR (ipc, in the runtime dir, owner only) and starts the service: with
`service`, daqd's launcher (daqd/worker/saturnin_launch.py, run by `python`, which needs saturnin
but not daqd) builds it from its descriptor and Saturnin configuration file and relays its control
channel over inproc, working around saturnin 0.10.0's warm_up that fails on any ipc or tcp
controller; with `command`, that command, "{controller}" replaced by the address. The service
connects and sends READY (PeerIdentification + endpoints) or ERROR. With `conf`, a REQUEST CONF
(the specified [code, ConfigProto] form) follows and must be answered OK. For each channel in
`take`, a PULL (or SUB) is connected to the addresses READY gave for it, and every multipart
message that arrives is one record (its frames are the payload, tag `channel`). Saturnin's data
pipe protocol (FBDP) is not spoken: its frames are taken as they are.

Supervision is the receivers' own: the process exiting, an ERROR or a FINISHED it was not asked
for, or no READY within `start_timeout_s` restarts the service with backoff (errors.crash). On
land/stop: STOP, then the records still arriving, then FINISHED within `stop_timeout_s` (a
service that sends ERROR and exits, as saturnin's does when its loop fails, ends as ERROR); past
it the service is killed (outcome ERROR). `daqctl status` shows the service's pid, peer and last
outcome.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import sys
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import zmq
import zmq.asyncio
from pydantic import Field, model_validator

import daqd.worker
from daqd.control import runtime_dir
from daqd.errors import ControlError, ProtocolError
from daqd.protocols import iccp
from daqd.receiver import ReceiverServer, ReceiverSettings

if TYPE_CHECKING:
    from daqd.host import Host

# run by the service's Python; it imports saturnin, never daqd (see its docstring for why)
LAUNCHER = Path(daqd.worker.__file__).resolve().with_name("saturnin_launch.py")
LAST_WORDS_S = 2.0  # after the service exited, how long its last message may take to arrive


class SaturninSettings(ReceiverSettings):
    # what to run: a Saturnin service (through daqd's launcher, run by `python`), or a command
    service: str | None = None  # "module:DESCRIPTOR", or an installed service's name or uid
    service_config: str | None = None  # the service's Saturnin configuration file (INI)
    section: str | None = None  # its section there (default: the service's configuration name)
    python: str = sys.executable  # a Python that has saturnin installed (daqd it needs not)
    command: list[str] | None = None  # "{controller}" in it becomes the control address
    env: dict[str, str] = Field(default_factory=dict)  # added to the service's environment
    take: list[str] = Field(default_factory=list)  # READY endpoint channels to read records from
    socket: Literal["pull", "sub"] = "pull"
    conf: dict[str, str | bool | int | float] | None = None  # options sent in CONF after READY
    start_timeout_s: float = Field(10.0, gt=0)  # READY, and the answer to CONF
    stop_timeout_s: float = Field(10.0, gt=0)  # FINISHED after STOP
    max_message_bytes: int = Field(16 << 20, gt=0)  # ICCP frames over this are refused unread

    @model_validator(mode="after")
    def _one_way_to_start(self) -> SaturninSettings:
        if (self.service is None) == (self.command is None):
            raise ValueError("give either service (a Saturnin service) or command, not both")
        if self.command is not None and not self.command:
            raise ValueError("command must not be empty")
        if self.service is None and (self.service_config or self.section):
            raise ValueError("service_config and section go with service")
        return self

    def argv(self, controller: str) -> list[str]:
        """The service's command line, for a controller at `controller`."""
        if self.command is not None:
            return [a.replace("{controller}", controller) for a in self.command]
        argv = [self.python, str(LAUNCHER), "--controller", controller, "--service"]
        argv.append(str(self.service))
        if self.service_config is not None:
            argv += ["--config", self.service_config]
        if self.section is not None:
            argv += ["--section", self.section]
        return argv


class SaturninReceiver(ReceiverServer):
    Settings = SaturninSettings
    settle_s = 0.2  # after FINISHED: records still arriving stop for this long

    def __init__(self, settings: ReceiverSettings, host: Host) -> None:
        super().__init__(settings, host)
        assert isinstance(settings, SaturninSettings)
        self.s = settings
        self.codec = iccp.IccpCodec(settings.max_message_bytes, encoding="saturnin")
        self.proc: asyncio.subprocess.Process | None = None
        self.peer: dict[str, Any] = {}
        self.outcome = ""
        self.details: list[str] = []
        self._ctx: zmq.asyncio.Context | None = None
        self._ctl: zmq.asyncio.Socket | None = None
        self._data: list[tuple[str, zmq.asyncio.Socket]] = []
        self._generation = itertools.count(1)

    # ----- start ----------------------------------------------------------------------------
    async def setup(self) -> None:
        base = runtime_dir()
        base.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._ctx = zmq.asyncio.Context()
        self._ctl = self._ctx.socket(zmq.PAIR)
        self._ctl.setsockopt(zmq.LINGER, 0)
        self._ctl.setsockopt(zmq.MAXMSGSIZE, self.s.max_message_bytes * 2)
        old = os.umask(0o177)  # the control socket is for our own child only
        try:
            self._ctl.bind(
                f"ipc://{base / self.host.name}.{self.name}.{next(self._generation)}.sat"
            )
        finally:
            os.umask(old)
        argv = self.s.argv(self._ctl.getsockopt_string(zmq.LAST_ENDPOINT))
        self.peer, self.outcome, self.details = {}, "", []
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, env={**os.environ, **self.s.env}
            )
        except OSError as exc:
            self._close_sockets()
            raise ControlError(f"cannot start {argv[0]!r}: {exc}") from None
        try:
            await self._handshake()
        except BaseException:
            with contextlib.suppress(zmq.ZMQError, ProtocolError):  # a live one may still stop
                await self._ctl.send_multipart(self.codec.encode(iccp.Stop()), flags=zmq.NOBLOCK)
            await self._kill()
            self._close_sockets()
            raise
        self.addresses["service"] = f"pid {self.proc.pid}"
        self.log.info("%s: saturnin service pid %d ready: %s", self.name, self.proc.pid, self.peer)

    async def _handshake(self) -> None:
        first = await self._receive(self.s.start_timeout_s, "READY")
        if isinstance(first, iccp.Error):
            text = first.message.strip()
            if "\n" in text:
                self.log.error("%s: the service could not start:\n%s", self.name, text)
            raise ControlError(f"saturnin service could not start: {_last_line(text)}")
        if not isinstance(first, iccp.Ready):
            raise ControlError(f"saturnin service sent {type(first).__name__.upper()} before READY")
        self.peer = {
            "uid": str(uuid.UUID(bytes=first.uid)),
            "pid": first.pid,
            "host": first.host,
            "name": first.name,
            "endpoints": {k: list(v) for k, v in first.endpoints.items()},
        }
        if self.s.conf is not None:
            await self._send(iccp.Request("CONF", dict(self.s.conf)))
            reply = await self._receive(self.s.start_timeout_s, "the answer to CONF")
            if isinstance(reply, iccp.Error):
                raise ControlError(f"saturnin service refused CONF: {_last_line(reply.message)}")
            if not isinstance(reply, iccp.Ok):
                kind = type(reply).__name__.upper()
                raise ControlError(f"saturnin service answered CONF with {kind}")
        assert self._ctx is not None
        for channel in self.s.take:
            addresses = first.endpoints.get(channel)
            if not addresses:
                known = ", ".join(sorted(first.endpoints)) or "none"
                raise ControlError(
                    f"saturnin service announced no endpoint {channel!r} (it has: {known})"
                )
            sock = self._ctx.socket(zmq.SUB if self.s.socket == "sub" else zmq.PULL)
            sock.setsockopt(zmq.LINGER, 0)
            if self.s.socket == "sub":
                sock.setsockopt(zmq.SUBSCRIBE, b"")
            for i, address in enumerate(addresses):
                sock.connect(address)
                self.addresses[f"{channel}{i or ''}"] = address
            self._data.append((channel, sock))

    async def _send(self, message: iccp.Message) -> None:
        assert self._ctl is not None
        await self._ctl.send_multipart(self.codec.encode(message))

    async def _receive(self, timeout_s: float, what: str) -> iccp.Message:
        """The next control message, within `timeout_s` and while the service lives."""
        assert self._ctl is not None and self.proc is not None
        recv = asyncio.ensure_future(self._ctl.recv_multipart())
        exited = asyncio.ensure_future(self.proc.wait())
        try:
            await asyncio.wait(
                {recv, exited}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED
            )
            if not recv.done() and self.proc.returncode is not None:
                # it exited: what it sent just before (its ERROR) may still be on its way
                await asyncio.wait({recv}, timeout=LAST_WORDS_S)
        finally:
            exited.cancel()
            if not recv.done():
                recv.cancel()
        if not recv.done() or recv.cancelled():
            if self.proc.returncode is not None:
                raise ControlError(
                    f"saturnin service exited with code {self.proc.returncode} before {what}"
                )
            raise ControlError(f"saturnin service sent no {what} within {timeout_s:g} s")
        try:
            return self.codec.decode(recv.result())
        except ProtocolError as exc:
            self.counters.error("iccp_malformed")
            raise ControlError(f"saturnin service: {exc}") from None

    # ----- running (the supervisor restarts the service when one of these raises) -------------
    async def ct_process(self) -> None:
        assert self.proc is not None
        code = await self.proc.wait()
        raise RuntimeError(f"saturnin service pid {self.proc.pid} exited with code {code}")

    async def ct_control(self) -> None:
        assert self._ctl is not None
        while True:
            frames = await self._ctl.recv_multipart()
            try:
                message = self.codec.decode(frames)
            except ProtocolError as exc:
                self.counters.error("iccp_malformed")
                self.limited.warning("iccp", "%s: refused a control message: %s", self.name, exc)
                continue
            if isinstance(message, iccp.Error):
                self.outcome, self.details = "ERROR", [_last_line(message.message)]
                raise RuntimeError(f"saturnin service reported ERROR: {self.details[0]}")
            if isinstance(message, iccp.Finished):
                self._finished(message)
                raise RuntimeError(f"saturnin service finished on its own: {self.outcome}")
            # a READY after READY, or an OK nobody asked for: a protocol error, counted
            self.counters.error("iccp_unexpected")
            self.limited.warning(
                "iccp", "%s: unexpected %s", self.name, type(message).__name__.upper()
            )

    async def ct_data(self) -> None:
        if not self._data:
            return
        poller = zmq.asyncio.Poller()
        channels = {}
        for channel, sock in self._data:
            poller.register(sock, zmq.POLLIN)
            channels[sock] = channel
        while True:
            for sock, _ in await poller.poll():
                await self._take(channels[sock], await sock.recv_multipart())

    async def _take(self, channel: str, frames: list[bytes]) -> None:
        await self.publish(self.new_record(frames, {"channel": channel}))

    # ----- stop -----------------------------------------------------------------------------
    async def close(self) -> None:
        """STOP → records still coming → FINISHED; killed if it does not finish in time."""
        if self.proc is not None and self.proc.returncode is None and self._ctl is not None:
            try:
                await self._stop_service()
            except ControlError as exc:
                self.outcome = "ERROR"
                self.details = [str(exc)]
                self.log.error("%s: %s; killing the service", self.name, exc)
                await self._kill(grace_s=0)
        elif self.proc is not None and not self.outcome:
            self.outcome = "ERROR"
            self.details = [f"exited with code {self.proc.returncode} without FINISHED"]
        await self._kill()
        self._close_sockets()

    async def _stop_service(self) -> None:
        assert self._ctl is not None and self.proc is not None
        await self._send(iccp.Stop())
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.s.stop_timeout_s
        poller = zmq.asyncio.Poller()
        poller.register(self._ctl, zmq.POLLIN)
        for _, sock in self._data:
            poller.register(sock, zmq.POLLIN)
        channels = {sock: channel for channel, sock in self._data}
        finished = False
        while not finished:
            left = deadline - loop.time()
            if left <= 0:
                raise ControlError(f"no FINISHED within {self.s.stop_timeout_s:g} s of STOP")
            events = dict(await poller.poll(min(left, 0.1) * 1000))
            if not events and self.proc.returncode is not None:
                # gone with nothing left to read: saturnin sends ERROR and exits when its loop
                # fails (no FINISHED follows); a crash sends nothing
                if self.outcome != "ERROR":
                    code = self.proc.returncode
                    self.outcome, self.details = "ERROR", [f"exited with code {code} after STOP"]
                break
            for sock in channels:
                if sock in events:
                    await self._take(channels[sock], await sock.recv_multipart())
            if self._ctl in events:
                try:
                    message = self.codec.decode(await self._ctl.recv_multipart())
                except ProtocolError as exc:
                    self.counters.error("iccp_malformed")
                    self.limited.warning(
                        "iccp", "%s: refused a control message: %s", self.name, exc
                    )
                    continue
                if isinstance(message, iccp.Finished):
                    self._finished(message)
                    finished = True
                elif isinstance(message, iccp.Error):
                    self.outcome, self.details = "ERROR", [_last_line(message.message)]
                else:
                    self.counters.error("iccp_unexpected")
        # what it sent before FINISHED may still be on its way on other connections
        while self._data and loop.time() < deadline:
            events = dict(await poller.poll(self.settle_s * 1000))
            if not any(sock in events for sock in channels):
                break
            for sock in channels:
                if sock in events:
                    await self._take(channels[sock], await sock.recv_multipart())
        log_at = logging.INFO if self.outcome == "OK" else logging.ERROR
        self.log.log(
            log_at, "%s: saturnin service finished: %s %s", self.name, self.outcome, self.details
        )

    def _finished(self, message: iccp.Finished) -> None:
        self.outcome = message.outcome.value
        self.details = list(message.details)

    async def _kill(self, grace_s: float = 5.0) -> None:
        """Wait up to `grace_s` for the service to exit, then kill it."""
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        try:
            await asyncio.wait_for(proc.wait(), grace_s)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            self.outcome = self.outcome or "ERROR"

    def _close_sockets(self) -> None:
        socks = [s for _, s in self._data] + ([self._ctl] if self._ctl is not None else [])
        for sock in socks:
            path = sock.getsockopt_string(zmq.LAST_ENDPOINT) if sock is self._ctl else ""
            sock.close(linger=0)
            if path.startswith("ipc://"):
                with contextlib.suppress(OSError):
                    os.unlink(path[len("ipc://") :])
        self._ctl, self._data = None, []
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None

    def status(self) -> dict[str, Any]:
        status = super().status()
        status["service"] = {
            "pid": self.proc.pid if self.proc else None,
            "running": self.proc is not None and self.proc.returncode is None,
            "peer": self.peer,
            "outcome": self.outcome or None,
            "details": self.details,
        }
        return status


def _last_line(text: str) -> str:
    """A one-line summary of an ERROR text (saturnin sends a whole traceback)."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "(no text)"
