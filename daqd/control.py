"""The control socket's server: ICCP REQUEST and STOP on a ZeroMQ ROUTER (ipc, and TCP with CURVE).

Where the sockets live and how they are secured is in daqd.endpoints; the client `daqctl` uses is
in daqd.control_client. The server runs on asyncio, imported when it starts.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import zmq

from daqd import trust
from daqd.endpoints import (
    bind_ipc,
    check_curve_clients,
    control_endpoint,
    curve_authenticator,
    curve_server_keys,
    ensure_private_dir,
    group_id,
    ipc_path,
    probe_ipc,
)
from daqd.errors import ControlError, ProtocolError
from daqd.protocols import iccp

if TYPE_CHECKING:
    import asyncio

    import zmq.asyncio

    from daqd.logs import LimitedLogger

log = logging.getLogger("daqd.control")

Handler = Callable[[str, dict[str, Any]], Awaitable[Any]]
# Called on STOP: ends the daemon's work and returns (outcome, details) for the FINISHED reply.
StopHandler = Callable[[], Awaitable[tuple[iccp.Outcome, Sequence[str]]]]

# On TCP, ZeroMQ cuts a connection whose frame exceeds this factor of the limit (before CURVE has
# authenticated anyone, nothing else bounds what a peer makes us buffer); bodies between the limit
# and the cut-off are read and answered with ERROR, so a client learns why it was refused, and a
# cut connection is counted ("connections_cut"). The ipc socket has no cut-off: whoever reaches it
# passed the file's permissions (and may stop the daemon anyway), and every request, of any size,
# is answered.
_TRANSPORT_FACTOR = 2
# Log lines that input can cause are rate-limited per kind, so a flood costs a few lines a minute.
_LOG_INTERVAL_S = 15.0


def _one_line(text: str) -> str:
    return " ".join(text.split()) or "error"


class ControlServer:
    """Serves ICCP REQUEST and STOP on a ROUTER bound to an ipc path and, with CURVE, on TCP.

    Each request runs in its own task, so a slow one (a reconfigure, a run stop that drains) does
    not hold up `daqctl status` from another client. Anything malformed gets an ERROR reply and is
    counted in `counters`; the server keeps serving. Log lines that clients can cause are
    rate-limited; what happens per connection is logged at DEBUG.
    """

    def __init__(
        self,
        handler: Handler,
        *,
        name: str | None = None,
        endpoint: str | None = None,
        group: str | None = None,
        tcp: str | None = None,
        curve_secret_key_file: str | os.PathLike[str] | None = None,
        curve_clients_dir: str | os.PathLike[str] | None = None,
        max_request_bytes: int = iccp.DEFAULT_MAX_BODY_BYTES,
        codes: Sequence[str] = iccp.REQUEST_CODES,
        on_stop: StopHandler | None = None,
        max_inflight: int = 64,
    ) -> None:
        from daqd.logs import LimitedLogger

        if endpoint is None:
            if name is None:
                raise ControlError("ControlServer needs a daemon name or an endpoint")
            endpoint = control_endpoint(name)
        if tcp and not (curve_secret_key_file and curve_clients_dir):
            raise ControlError(
                f"control TCP endpoint {tcp} needs CURVE keys: set curve_secret_key_file "
                "(the daemon's secret certificate) and curve_clients_dir (authorised client "
                "public certificates); refusing to listen on TCP without them"
            )
        self.handler = handler
        self.endpoint = endpoint
        self.group = group
        self.tcp = tcp
        self.curve_secret_key_file = curve_secret_key_file
        self.curve_clients_dir = curve_clients_dir
        self.codes = tuple(codes)
        self.on_stop = on_stop
        self.max_inflight = max_inflight
        self.codec = iccp.IccpCodec(max_request_bytes)
        self.max_request_bytes = max_request_bytes
        self.transport_limit = max(max_request_bytes * _TRANSPORT_FACTOR, max_request_bytes + 4096)
        self.endpoints: list[str] = []
        # Every message received is answered and counted once: as a request (then as ok, refused,
        # internal_errors, unknown_codes or busy), or as bad_messages or oversize.
        self.counters: dict[str, int] = {
            "messages": 0,
            "requests": 0,
            "ok": 0,
            "refused": 0,
            "internal_errors": 0,
            "bad_messages": 0,
            "oversize": 0,
            "unknown_codes": 0,
            "busy": 0,
            # TCP connections ZeroMQ closed before a whole request arrived (a frame over
            # transport_limit, or a client gone mid-request): nothing could be answered
            "connections_cut": 0,
            "curve_rejected": 0,  # TCP clients whose CURVE key is not among the authorised
            "handshakes_failed": 0,  # TCP connections closed in the handshake (wrong keys, ...)
        }
        self.limited: LimitedLogger = LimitedLogger(log, _LOG_INTERVAL_S)
        self._ctx: zmq.asyncio.Context | None = None
        self._sockets: list[zmq.asyncio.Socket] = []
        self._monitors: dict[zmq.asyncio.Socket, zmq.asyncio.Socket] = {}
        self._readers: list[asyncio.Task[None]] = []
        self._inflight: set[asyncio.Task[None]] = set()
        self._auth: Any = None
        self._ipc_file: Path | None = None

    async def start(self) -> None:
        import asyncio

        import zmq.asyncio

        self._ctx = zmq.asyncio.Context()
        try:
            self._bind_ipc_or_other()
            if self.tcp:
                self._bind_tcp()
        except BaseException:
            await self.close()
            raise
        for sock in self._sockets:
            serve = self._serve(sock, self._monitors.get(sock))
            self._readers.append(asyncio.create_task(serve, name="control-server"))
        log.info("control socket listening on %s", ", ".join(self.endpoints))

    def _new_router(self, limit: int) -> zmq.asyncio.Socket:
        assert self._ctx is not None
        sock = self._ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 1000)
        sock.setsockopt(zmq.MAXMSGSIZE, limit)
        self._sockets.append(sock)
        return sock

    def _bind_ipc_or_other(self) -> None:
        path = ipc_path(self.endpoint)
        gid = group_id(self.group) if self.group is not None else -1
        if path is not None:
            ensure_private_dir(path.parent, gid)
            if path.exists() or path.is_symlink():
                try:
                    probe_ipc(path)
                except ControlError:
                    path.unlink(missing_ok=True)  # stale: its daemon is gone
                else:
                    raise ControlError(
                        f"a daemon already answers on {path}; stop it or choose another name"
                    )
        # ipc peers passed the file's permissions: no cut-off (see _TRANSPORT_FACTOR)
        limit = -1 if self.endpoint.startswith("ipc://") else self.transport_limit
        sock = self._new_router(limit)
        try:
            bind_ipc(sock, self.endpoint, self.group)
        except zmq.ZMQError as exc:
            raise ControlError(f"cannot bind control socket {self.endpoint}: {exc}") from None
        if path is not None:
            self._ipc_file = path
        if limit >= 0:
            self._monitors[sock] = sock.get_monitor_socket()
        self.endpoints.append(sock.getsockopt_string(zmq.LAST_ENDPOINT))

    def _bind_tcp(self) -> None:
        assert self._ctx is not None and self.tcp is not None
        assert self.curve_secret_key_file is not None and self.curve_clients_dir is not None
        public, secret, warnings = curve_server_keys(self.curve_secret_key_file)
        check_curve_clients(self.curve_clients_dir)
        for warning in warnings:
            log.warning("control: %s", warning)
        self._auth = curve_authenticator(self._ctx, self._curve_rejected)
        self._auth.start()
        self._auth.configure_curve(domain="*", location=str(self.curve_clients_dir))
        sock = self._new_router(self.transport_limit)
        sock.curve_server = True
        sock.curve_publickey = public
        sock.curve_secretkey = secret
        try:
            sock.bind(self.tcp)
        except zmq.ZMQError as exc:
            raise ControlError(f"cannot bind control TCP endpoint {self.tcp}: {exc}") from None
        self._monitors[sock] = sock.get_monitor_socket()
        self.endpoints.append(sock.getsockopt_string(zmq.LAST_ENDPOINT))

    def _curve_rejected(self, peer: str, reason: str) -> None:
        self.counters["curve_rejected"] += 1
        self.limited.warning(
            "curve_rejected",
            "control: CURVE client from %s rejected: %s (%d rejected so far)",
            peer or "an unknown address",
            reason,
            self.counters["curve_rejected"],
        )

    async def close(self) -> None:
        """Stop serving; replies already being prepared get up to a second to go out."""
        import asyncio

        for reader in self._readers:
            reader.cancel()
        if self._inflight:
            await asyncio.wait(set(self._inflight), timeout=1.0)
        for task in list(self._inflight):
            task.cancel()
        for task in [*self._readers, *self._inflight]:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._readers.clear()
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        for sock, monitor in self._monitors.items():
            with contextlib.suppress(zmq.ZMQError):
                sock.disable_monitor()
            monitor.close(linger=0)
        self._monitors.clear()
        for sock in self._sockets:
            sock.close()
        self._sockets.clear()
        self.limited.report()
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None
        if self._ipc_file is not None:
            self._ipc_file.unlink(missing_ok=True)
            self._ipc_file = None

    async def _serve(
        self, sock: zmq.asyncio.Socket, monitor: zmq.asyncio.Socket | None = None
    ) -> None:
        if monitor is None:
            while True:
                self._receive(sock, await sock.recv_multipart())
        await _Connections(self, sock, monitor).run()

    def _receive(self, sock: zmq.asyncio.Socket, frames: list[bytes]) -> None:
        self.counters["messages"] += 1
        try:
            self._dispatch(sock, frames)
        except Exception as exc:  # a bug here must not end the control socket
            self.counters["internal_errors"] += 1
            self.limited.error("internal", "control: failed to dispatch a message: %r", exc)
            log.debug("control: failed to dispatch a message", exc_info=True)

    def _dispatch(self, sock: zmq.asyncio.Socket, frames: list[bytes]) -> None:
        envelope, body = frames[:1], frames[1:]
        if body and body[0] == b"":  # a REQ client puts an empty delimiter before the message
            envelope, body = frames[:2], frames[2:]
        try:
            message = self.codec.decode(body)
        except ProtocolError as exc:
            key = "oversize" if "over the limit" in str(exc) else "bad_messages"
            self.counters[key] += 1
            self.limited.warning(key, "control: %s", exc)
            self._reply(sock, envelope, iccp.Error(_one_line(str(exc)), "protocol"))
            return
        if isinstance(message, iccp.Request):
            self.counters["requests"] += 1
            if message.code not in self.codes:
                self.counters["unknown_codes"] += 1
                known = ", ".join(repr(c) for c in self.codes)
                text = f"unknown request code {message.code!r}; known codes: {known}"
                self.limited.warning("unknown_codes", "control: %s", text)
                self._reply(sock, envelope, iccp.Error(text, "protocol"))
                return
            self._spawn(sock, envelope, self._run_request(message))
        elif isinstance(message, iccp.Stop):
            self.counters["requests"] += 1
            if self.on_stop is None:
                self.counters["refused"] += 1
                self._reply(sock, envelope, iccp.Error("this component cannot be stopped remotely"))
                return
            self._spawn(sock, envelope, self._run_stop())
        else:
            self.counters["bad_messages"] += 1
            name = type(message).__name__.upper()
            text = f"unexpected {name} on a control socket: send REQUEST or STOP"
            self.limited.warning("bad_messages", "control: %s", text)
            self._reply(sock, envelope, iccp.Error(text, "protocol"))

    def _spawn(
        self,
        sock: zmq.asyncio.Socket,
        envelope: list[bytes],
        work: Awaitable[iccp.Message],
    ) -> None:
        import asyncio

        if len(self._inflight) >= self.max_inflight:
            self.counters["busy"] += 1
            if asyncio.iscoroutine(work):
                work.close()
            text = f"busy: {self.max_inflight} requests in progress, try again"
            self.limited.warning("busy", "control: %s", text)
            self._reply(sock, envelope, iccp.Error(text, "busy"))
            return

        async def answer() -> None:
            self._reply(sock, envelope, await work)

        task = asyncio.create_task(answer(), name="control-request")
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)

    async def _run_request(self, request: iccp.Request) -> iccp.Message:
        # what this request does (a reconfigure) knows its text came over the control socket
        trust.CONTROL_REQUEST.set(True)
        try:
            result = await self.handler(request.code, dict(request.args))
        except ControlError as exc:
            self.counters["refused"] += 1
            self.limited.info("refused", "control: %s refused: %s", request.code.strip(), exc)
            return iccp.Error(_one_line(str(exc)), "refused")
        except Exception as exc:
            self.counters["internal_errors"] += 1
            self.limited.error("internal", "control: %s failed: %r", request.code.strip(), exc)
            log.debug("control: %s failed", request.code.strip(), exc_info=True)
            return iccp.Error(_one_line(f"internal error: {type(exc).__name__}: {exc}"), "internal")
        self.counters["ok"] += 1
        return iccp.Ok(result)

    async def _run_stop(self) -> iccp.Message:
        assert self.on_stop is not None
        try:
            outcome, details = await self.on_stop()
        except Exception as exc:
            log.exception("control: stop failed")
            return iccp.Finished(iccp.Outcome.ERROR, (f"{type(exc).__name__}: {exc}",))
        self.counters["ok"] += 1
        return iccp.Finished(outcome, tuple(details))

    def _reply(
        self, sock: zmq.asyncio.Socket, envelope: list[bytes], message: iccp.Message
    ) -> None:
        try:
            frames = self.codec.encode(message)
        except ProtocolError as exc:
            self.counters["internal_errors"] += 1
            frames = self.codec.encode(iccp.Error(_one_line(f"reply not sendable: {exc}")))
        try:
            # ROUTER never blocks: a reply to a client that has gone away is dropped by ZeroMQ.
            sock.send_multipart([*envelope, *frames], flags=zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            if exc.errno != errno.EAGAIN:
                self.limited.warning("reply", "control: reply not sent: %s", exc)


class _Connections:
    """Serves a ROUTER that has a transport cut-off, and counts the connections ZeroMQ cut.

    ZeroMQ closes a connection whose frame is over MAXMSGSIZE and tells nobody. Its monitor says
    when a connection was accepted and when it was closed (by file descriptor), and each message
    says which descriptor it came from (SRCFD). A connection closed without a whole message, and
    not for a failed handshake, is counted as cut. Messages are always read before the monitor's
    events, so a request that arrived just before its connection closed is seen first.
    """

    def __init__(
        self, server: ControlServer, sock: zmq.asyncio.Socket, monitor: zmq.asyncio.Socket
    ) -> None:
        self.server = server
        self.sock = sock
        self.monitor = monitor
        self.sent: dict[int, bool] = {}  # fd -> a whole message came from it
        self.failed_handshake = False

    async def run(self) -> None:
        import zmq.asyncio

        poller = zmq.asyncio.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self.monitor, zmq.POLLIN)
        while True:
            await poller.poll()
            await self._read_messages()
            while True:
                try:
                    frames = await self.monitor.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                await self._on_event(frames)

    async def _read_messages(self) -> None:
        while True:
            try:
                frames = await self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            fd = frames[-1].get(zmq.SRCFD)
            if isinstance(fd, int) and fd in self.sent:
                self.sent[fd] = True
            self.server._receive(self.sock, [f.bytes for f in frames])

    async def _on_event(self, frames: list[bytes]) -> None:
        from zmq.utils.monitor import parse_monitor_message

        event = parse_monitor_message(frames)
        kind, value = event["event"], event["value"]
        if kind == zmq.EVENT_ACCEPTED:
            self.sent[value] = False
            log.debug("control: connection accepted on %s (fd %d)", event["endpoint"], value)
        elif kind in (
            zmq.EVENT_HANDSHAKE_FAILED_AUTH,
            zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
            zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL,
        ):
            # ZeroMQ reports the failure, then the closing of that same connection
            self.failed_handshake = True
            log.debug("control: handshake failed on %s (event %s)", event["endpoint"], kind)
        elif kind == zmq.EVENT_DISCONNECTED:
            await self._read_messages()  # whatever that connection delivered before it closed
            sent = self.sent.pop(value, None)
            if self.failed_handshake:
                self.failed_handshake = False
                self.server.counters["handshakes_failed"] += 1
            elif sent is False:
                server = self.server
                server.counters["connections_cut"] += 1
                server.limited.warning(
                    "connections_cut",
                    "control: a connection to %s closed before a whole request arrived (a frame "
                    "over the limit of %d bytes, or the client went away): nothing was answered "
                    "(%d such connections so far)",
                    event["endpoint"],
                    server.transport_limit,
                    server.counters["connections_cut"],
                )
            log.debug("control: connection closed on %s (fd %d)", event["endpoint"], value)
