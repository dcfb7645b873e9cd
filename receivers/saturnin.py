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
message that arrives is one record (its frames are the payload, tag `channel`). With `fbdp`, a
DEALER connects to the data pipe READY announced (Saturnin's data services: "pipe") and speaks
FBDP as the client of its OUTPUT (protocols/fbdp.py): OPEN, READY for each batch the service
offers, ACK-REPLY where asked; each DATA is one record (payload: its data frame; tag `channel`,
and `type_data` when not 0). Malformed FBDP and the service's moves out of turn are counted as
errors.fbdp_<reason>, a CLOSE with an error code as errors.fbdp_close_<code>. A service that
FINISHes OK by itself after its pipe closed OK (Saturnin's stop_on_close) has done its work: it
is not restarted. Stopping CLOSEs the pipe (OK) before STOP: saturnin would CLOSE it as ERROR.

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
from collections.abc import Awaitable, Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import zmq
import zmq.asyncio
from pydantic import BaseModel, ConfigDict, Field, model_validator

import daqd.worker
from daqd.endpoints import runtime_dir
from daqd.errors import ControlError, ProtocolError
from daqd.protocols import fbdp, iccp
from daqd.receiver import ReceiverServer, ReceiverSettings

if TYPE_CHECKING:
    from daqd.host import Host

# run by the service's Python; it imports saturnin, never daqd (see its docstring for why)
LAUNCHER = Path(daqd.worker.__file__).resolve().with_name("saturnin_launch.py")
LAST_WORDS_S = 2.0  # after the service exited, how long its last message may take to arrive


class FbdpSettings(BaseModel):
    """A data pipe of the service's to read with FBDP, as the client of its OUTPUT socket."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    channel: str = "pipe"  # the READY endpoint (Saturnin's data services announce "pipe")
    pipe: str = Field(min_length=1)  # the data pipe's identification (the service's `pipe`)
    format: str = Field(min_length=1)  # the data format asked for in OPEN (a MIME type)
    batch: int = Field(fbdp.DEFAULT_BATCH, ge=1, le=0xFFFF)  # DATA taken per READY at most
    parameters: dict[str, str | bool | int | float] = Field(default_factory=dict)  # in OPEN


class SaturninSettings(ReceiverSettings):
    # what to run: a Saturnin service (through daqd's launcher, run by `python`), or a command
    service: str | None = None  # "module:DESCRIPTOR", or an installed service's name or uid
    service_config: str | None = None  # the service's Saturnin configuration file (INI)
    section: str | None = None  # its section there (default: the service's configuration name)
    python: str = sys.executable  # a Python that has saturnin installed (daqd it needs not)
    command: list[str] | None = None  # "{controller}" in it becomes the control address
    env: dict[str, str] = Field(default_factory=dict)  # added to the service's environment
    take: list[str] = Field(default_factory=list)  # READY endpoint channels to read records from
    fbdp: FbdpSettings | None = None  # a data pipe to read with FBDP: each DATA is a record
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
        # every socket records come from, and what takes a message from it
        self._inputs: dict[zmq.asyncio.Socket, Callable[[list[bytes]], Awaitable[None]]] = {}
        self._pipe: fbdp.PipeClient | None = None
        self._pipe_sock: zmq.asyncio.Socket | None = None
        self._pipe_ended = asyncio.Event()  # the service's CLOSE came
        self._done = asyncio.Event()  # the service ended its work by itself: no restart
        self.pipe: dict[str, Any] = {}
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
        self.peer, self.outcome, self.details, self.pipe = {}, "", [], {}
        self._pipe_ended.clear()
        self._done.clear()
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
            self._inputs[sock] = partial(self._take, channel)
        if self.s.fbdp is not None:
            await self._open_pipe(self.s.fbdp, first.endpoints)

    async def _open_pipe(self, s: FbdpSettings, endpoints: Mapping[str, Sequence[str]]) -> None:
        """Connect to the data pipe READY announced and send OPEN (one pipe, its first address)."""
        assert self._ctx is not None
        addresses = endpoints.get(s.channel)
        if not addresses:
            known = ", ".join(sorted(endpoints)) or "none"
            raise ControlError(
                f"saturnin service announced no data pipe endpoint {s.channel!r} (it has: {known})"
            )
        self._pipe = fbdp.PipeClient(s.pipe, s.format, s.batch, s.parameters)
        sock = self._pipe_sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)  # no MAXMSGSIZE: ZeroMQ would drop the peer unsaid
        sock.connect(addresses[0])
        self.addresses[s.channel] = addresses[0]
        self._inputs[sock] = self._take_pipe
        self.pipe = {"pipe": s.pipe, "format": s.format, "state": "open", "data": 0}
        await sock.send_multipart(self._pipe.open())

    async def _send(self, message: iccp.Message) -> None:
        """Send, never wait: a PAIR whose peer is gone would block for ever (the service may
        have ended by itself just before)."""
        assert self._ctl is not None
        try:
            await self._ctl.send_multipart(self.codec.encode(message), flags=zmq.NOBLOCK)
        except zmq.Again:
            name = type(message).__name__.upper()
            raise ControlError(
                f"cannot send {name}: the service's control channel is gone"
            ) from None

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
        if code == 0:
            with contextlib.suppress(TimeoutError):  # its FINISHED may still be on its way
                await asyncio.wait_for(self._done.wait(), LAST_WORDS_S)
        if self._done.is_set() and code == 0:
            return  # it ended its work by itself (its data pipe closed OK, then FINISHED OK)
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
                if self._pipe is not None:  # the CLOSE before it may come later: other socket
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._pipe_ended.wait(), LAST_WORDS_S)
                closed = self._pipe.closed if self._pipe is not None else None
                if self.outcome == "OK" and closed is not None and closed.code is fbdp.ErrorCode.OK:
                    # a data service that stops when its pipe is done (Saturnin's stop_on_close)
                    self.log.info("%s: saturnin service finished its data pipe: OK", self.name)
                    self._done.set()
                    return
                raise RuntimeError(f"saturnin service finished on its own: {self.outcome}")
            # a READY after READY, or an OK nobody asked for: a protocol error, counted
            self.counters.error("iccp_unexpected")
            self.limited.warning(
                "iccp", "%s: unexpected %s", self.name, type(message).__name__.upper()
            )

    async def ct_data(self) -> None:
        poller = zmq.asyncio.Poller()
        polled = set(self._inputs)
        for sock in polled:
            poller.register(sock, zmq.POLLIN)
        while polled:
            for sock, _ in await poller.poll():
                await self._inputs[sock](await sock.recv_multipart())
                if sock is self._pipe_sock and self._pipe_ended.is_set():
                    poller.unregister(sock)  # nothing more may come on a closed pipe
                    polled.discard(sock)

    async def _take(self, channel: str, frames: list[bytes]) -> None:
        await self.publish(self.new_record(frames, {"channel": channel}))

    async def _take_pipe(self, frames: list[bytes]) -> None:
        """One FBDP message from the data pipe: DATA is a record, the rest is the protocol."""
        assert self._pipe is not None and self._pipe_sock is not None and self.s.fbdp is not None
        try:
            message = fbdp.decode(frames)
        except fbdp.FbdpError as exc:
            self.counters.error(f"fbdp_{exc.reason}")
            self.limited.warning("fbdp", "%s: refused a data pipe message: %s", self.name, exc)
            return
        step = self._pipe.receive(message)
        if step.violation is not None:
            self.counters.error(f"fbdp_{step.violation}")
            self.limited.warning(
                "fbdp", "%s: data pipe: %s (%s)", self.name, step.violation, type(message).__name__
            )
        for reply in step.replies:
            with contextlib.suppress(zmq.Again):  # a service gone reads nothing
                await self._pipe_sock.send_multipart(reply, flags=zmq.NOBLOCK)
        if step.data is not None:
            payload = [] if step.data.payload is None else [step.data.payload]
            tags: dict[str, Any] = {"channel": self.s.fbdp.channel}
            if step.data.type_data:
                tags["type_data"] = step.data.type_data
            self.pipe["data"] += 1
            await self.publish(self.new_record(payload, tags))
        if step.closed is not None and not self._pipe_ended.is_set():
            self._pipe_closed(step.closed)

    def _pipe_closed(self, close: fbdp.Close) -> None:
        errors = [e.description for e in close.errors]
        # a CLOSE that crossed daqd's own (landing) does not make it the service's doing
        state = "closed by daqd" if self._pipe is not None and self._pipe.closing else "closed"
        self.pipe.update(state=state, code=close.code.name, errors=errors)
        self._pipe_ended.set()
        if close.code is fbdp.ErrorCode.OK or self._pipe is None or self._pipe.closing:
            self.log.info("%s: data pipe closed by the service: %s", self.name, close.code.name)
            return
        self.counters.error(f"fbdp_close_{close.code.name.lower()}")
        self.log.error(
            "%s: the service closed the data pipe: %s %s", self.name, close.code.name, errors
        )

    # ----- stop -----------------------------------------------------------------------------
    async def close(self) -> None:
        """(CLOSE the data pipe) STOP → records still coming → FINISHED; killed if it does not
        finish in time."""
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
        if self._pipe is not None and self._pipe_sock is not None and self._pipe.closed is None:
            # a client ends its pipe before the service goes (else saturnin CLOSEs it as ERROR)
            with contextlib.suppress(zmq.Again):
                await self._pipe_sock.send_multipart(self._pipe.close(), flags=zmq.NOBLOCK)
            self.pipe["state"] = "closed by daqd"
        with contextlib.suppress(ControlError):  # gone already: its FINISHED or exit tells
            await self._send(iccp.Stop())
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.s.stop_timeout_s
        poller = zmq.asyncio.Poller()
        poller.register(self._ctl, zmq.POLLIN)
        for sock in self._inputs:
            poller.register(sock, zmq.POLLIN)
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
            for sock, take in self._inputs.items():
                if sock in events:
                    await take(await sock.recv_multipart())
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
        while self._inputs and loop.time() < deadline:
            events = dict(await poller.poll(self.settle_s * 1000))
            if not any(sock in events for sock in self._inputs):
                break
            for sock, take in self._inputs.items():
                if sock in events:
                    await take(await sock.recv_multipart())
        log_at = logging.INFO if self.outcome == "OK" else logging.ERROR
        self.log.log(
            log_at, "%s: saturnin service finished: %s %s", self.name, self.outcome, self.details
        )

    def _finished(self, message: iccp.Finished) -> None:
        self.outcome = message.outcome.value
        # one line each, as ICCP says; saturnin sends a traceback in chunks of several lines
        self.details = [ln.strip() for d in message.details for ln in d.splitlines() if ln.strip()]

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
        socks = [*self._inputs, *([self._ctl] if self._ctl is not None else [])]
        for sock in socks:
            path = sock.getsockopt_string(zmq.LAST_ENDPOINT) if sock is self._ctl else ""
            sock.close(linger=0)
            if path.startswith("ipc://"):
                with contextlib.suppress(OSError):
                    os.unlink(path[len("ipc://") :])
        self._ctl, self._inputs, self._pipe, self._pipe_sock = None, {}, None, None
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
        if self.s.fbdp is not None:
            status["pipe"] = dict(self.pipe)
        return status


def _last_line(text: str) -> str:
    """A one-line summary of an ERROR text (saturnin sends a whole traceback)."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "(no text)"
