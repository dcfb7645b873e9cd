"""PacketConnection: cs.packetstream-compatible requests and responses over any asyncio stream.

Either end of a connection may send requests and answer the other's. Packets produced during one
turn of the event loop leave in one write as soon as the loop is idle: no grace sleep. Only
in-flight state is kept, so memory stays flat on a long connection. The stream underneath
(transport, batched output, paused input, the end) is `PacketStream` in stream.py; `connect` and
`start_server` are in tcp.py.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from daqd.errors import ProtocolError
from daqd.logs import LimitedLogger
from daqd.packetstream.stream import PacketStream
from daqd.protocols.packetstream import (
    DEFAULT_MAX_PACKET_BYTES,
    EndOfRequests,
    PacketDecoder,
    Request,
    Response,
    encode_request_header,
    encode_response_header,
)

log = logging.getLogger("daqd.packetstream")
# What a peer can trigger (bad packets, refused requests, failing handlers, lost connections) is
# logged through this, by kind: a flood of bad clients costs a few lines a minute, not one each.
limited = LimitedLogger(log)

HandlerResult = None | int | bytes | bytearray | memoryview | str | tuple[int, Any]
RequestHandler = Callable[[Request], "HandlerResult | Awaitable[HandlerResult]"]

# Channel 0 tags 0 and 1 name the EOF and ERQ packets, so requests there start at 2.
_FIRST_TAG = {0: 2}
_READ_CHUNK_BYTES = 256 << 10
# Requesters wait for the transport to drain once this much is queued for it.
_HIGH_WATER_BYTES = 1 << 20
_MAX_REASON_CHARS = 200


class RequestFailed(Exception):
    """Raise in a handler to answer with a failure whose payload is exactly `reason`."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _short_reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    reason = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    if len(reason) > _MAX_REASON_CHARS:
        reason = reason[: _MAX_REASON_CHARS - 3] + "..."
    return reason


def response_from_result(result: object) -> tuple[bool, int, bytes]:
    """Turn a handler's return value into (ok, flags, payload) as cs.packetstream does.

    None → (0, b""); int → (int, b""); bytes/str → (0, payload); (int, bytes|str) → both.
    Anything else, or negative flags, is a failure with a reason saying what was returned.
    """
    if result is None:
        return True, 0, b""
    if isinstance(result, int):
        if result < 0:
            return False, 0, f"handler returned negative flags {result}".encode()
        return True, int(result), b""
    if isinstance(result, bytes):
        return True, 0, result
    if isinstance(result, bytearray | memoryview):
        return True, 0, bytes(result)
    if isinstance(result, str):
        return True, 0, result.encode("utf-8", "xmlcharrefreplace")
    if isinstance(result, tuple) and len(result) == 2:
        flags, payload = result
        if isinstance(flags, int) and flags >= 0:
            if isinstance(payload, bytes):
                return True, int(flags), payload
            if isinstance(payload, bytearray | memoryview):
                return True, int(flags), bytes(payload)
            if isinstance(payload, str):
                return True, int(flags), payload.encode("utf-8", "xmlcharrefreplace")
    return (
        False,
        0,
        f"handler returned {type(result).__name__}, expected None, int, bytes, str or "
        "(int, bytes)".encode(),
    )


class PacketConnection(PacketStream):
    """One packet stream connection: requests both ways over one byte stream.

    Built on a (StreamReader, StreamWriter) pair for any stream (TCP, unix socket, pipe), or by
    `connect()` / `start_server()`, which drive it straight from the transport (faster).
    `handler(request)` answers the peer's requests; it may be a plain function or return an
    awaitable (run as tasks, at most `max_handlers` at once — further requests wait unread, so
    the peer feels backpressure). Without a handler, requests get a failure.
    """

    def __init__(
        self,
        reader: asyncio.StreamReader | None,
        writer: asyncio.StreamWriter | None,
        handler: RequestHandler | None = None,
        *,
        name: str | None = None,
        max_handlers: int = 64,
        max_packet_bytes: int = DEFAULT_MAX_PACKET_BYTES,
        close_timeout_s: float = 10.0,
        on_error: Callable[[str], None] | None = None,
    ) -> None:
        if max_handlers < 1:
            raise ValueError("max_handlers must be >= 1")
        super().__init__(reader, writer, name=name, on_error=on_error)
        self.handler = handler
        self.max_handlers = max_handlers
        self.close_timeout_s = close_timeout_s
        self._decoder = PacketDecoder(max_packet_bytes)
        self._next_tag: dict[int, int] = {}
        self._eof_after_backlog = False
        self._peer_erq = False
        self._closing = False
        self._finisher: asyncio.Task[None] | None = None
        self.requests_sent = 0
        self.responses_received = 0
        self.requests_served = 0
        self.failures_sent = 0

    # ---- life cycle ----

    def start(self) -> None:
        """Start reading a stream pair; idempotent. `request()` and `serve()` call it."""
        if self._read_task is None and self._reader is not None:
            self._read_task = self._loop.create_task(self._read_loop(), name=f"ps-{self.name}")

    async def serve(self) -> None:
        """Run until the connection has ended (the server side's whole job)."""
        self.start()
        await self._closed.wait()

    async def __aenter__(self) -> PacketConnection:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    async def wait_closed(self) -> None:
        await self._closed.wait()

    @property
    def in_flight(self) -> tuple[int, int]:
        """(our requests awaiting responses, peer requests being handled)."""
        return len(self._pending), len(self._serving)

    async def close(self) -> None:
        """Close handshake: send ERQ, finish local handlers, flush, send EOF, await the peer's end.

        Requests still unanswered when the peer ends (or after `close_timeout_s`) fail with
        ConnectionError.
        """
        self.start()
        if self._closing or self._closed.is_set():
            await self._closed.wait()
            return
        self._closing = True
        self._send_control_erq()
        await self._finish_handlers()
        self._send_eof()
        try:
            await asyncio.wait_for(self._closed.wait(), self.close_timeout_s)
        except TimeoutError:
            self._count_error("close_timeout")
            limited.warning(
                "close_timeout",
                "%s: peer did not end the connection within %.1f s of our EOF; closing",
                self.name,
                self.close_timeout_s,
            )
            self._end("connection closed (peer did not answer our EOF in time)", abort=True)

    def abort(self, reason: str = "connection aborted") -> None:
        """End at once without the handshake: pending requests fail, handlers are cancelled."""
        self._end(reason, abort=True)

    # ---- requests ----

    async def request(
        self,
        rq_type: int,
        payload: bytes | bytearray | memoryview = b"",
        flags: int = 0,
        channel: int = 0,
    ) -> Response:
        """Send a request and wait for its response (ok or failure, with flags and payload).

        Raises ConnectionError if the connection ends before the response arrives.
        """
        if self._end_reason is not None:
            raise ConnectionError(f"{self.name}: {self._end_reason}")
        if self._closing:
            raise ConnectionError(f"{self.name}: connection is closing, no new requests")
        if self._read_task is None:
            self.start()
        tag = self._next_tag.get(channel)
        if tag is None:
            tag = _FIRST_TAG.get(channel, 0)
        self._next_tag[channel] = tag + 1
        header = encode_request_header(tag, rq_type, flags, channel, len(payload))
        key = (channel, tag)
        fut: asyncio.Future[Response] = self._loop.create_future()
        self._pending[key] = fut
        out = self._out
        out.append(header)
        if payload:
            out.append(payload)
        self._out_bytes += len(header) + len(payload)
        if len(self._pending) == 1 and self._transport is not None:
            # the only request in flight: nothing to batch it with, so it leaves at once
            self._flush()
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)
        self.requests_sent += 1
        if "write" in self._pause_reasons:
            # the response will come on the input: never leave it paused while we wait for one
            self._resume_input("write")
        try:
            transport = self._transport
            if self._out_bytes > _HIGH_WATER_BYTES or (
                transport is not None and transport.get_write_buffer_size() > _HIGH_WATER_BYTES
            ):
                self._flush()
                await self._drain()
            return await fut
        finally:
            self._pending.pop(key, None)

    # ---- responses ----

    def _respond(self, channel: int, tag: int, ok: bool, flags: int, payload: bytes) -> None:
        if self._sent_eof:
            # the connection is past the point where we can answer
            self._count_error("response_after_eof")
            return
        self._queue(encode_response_header(tag, ok, flags, channel, len(payload)), payload)
        if ok:
            self.requests_served += 1
        else:
            self.failures_sent += 1

    def _reject(self, channel: int, tag: int, reason: str, counter: str) -> None:
        self._count_error(counter)
        limited.info(
            counter,
            "%s: rejecting request %d on channel %d: %s",
            self.name,
            tag,
            channel,
            reason,
        )
        self._respond(channel, tag, False, 0, reason.encode())

    # ---- input ----

    async def _read_loop(self) -> None:
        """Stream mode: read chunks and feed them; honour pauses; wait for output to drain."""
        reader = self._reader
        writer = self._writer
        assert reader is not None and writer is not None
        transport = self._transport
        assert transport is not None
        try:
            while not self._input_done:
                if self._pause_reasons:
                    await self._input_resumed.wait()
                    continue
                data = await reader.read(_READ_CHUNK_BYTES)
                if not data:
                    self._feed_eof()
                    break
                self._feed(data)
                if not self._pending and transport.get_write_buffer_size() > _HIGH_WATER_BYTES:
                    # our answers pile up unread: stop taking requests until they drain (but
                    # never while we wait for responses ourselves: both sides would stall)
                    await writer.drain()
        except (ConnectionError, OSError) as exc:
            self._connection_lost(exc)
        except asyncio.CancelledError:
            self._end("connection closed", abort=True)
            raise

    def _feed(self, data: bytes) -> None:
        """Decode received bytes and act on every complete message."""
        if self._input_done:
            return
        try:
            messages = self._decoder.feed(data)
        except ProtocolError as exc:
            self._protocol_error(exc)
            return
        if self._backlog:
            self._backlog.extend(messages)
            return
        for i, msg in enumerate(messages):
            kind = type(msg)
            if kind is Response:
                self._on_response(msg)  # type: ignore[arg-type]
            elif kind is Request:
                if len(self._tasks) >= self.max_handlers:
                    self._backlog.extend(messages[i:])
                    self._pause_input("handlers")
                    break
                self._on_request(msg)  # type: ignore[arg-type]
            elif kind is EndOfRequests:
                self._peer_erq = True
            else:
                self._peer_ended()
                break
        if self._out and self._flush_scheduled:
            # everything this chunk asked for is queued: write it now, not a loop turn later
            self._flush()

    def _feed_eof(self) -> None:
        """The peer closed its sending side (TCP FIN, end of pipe)."""
        if self._input_done:
            return
        try:
            self._decoder.feed_eof()
        except ProtocolError as exc:
            self._protocol_error(exc)
            return
        if self._backlog:
            self._eof_after_backlog = True
        else:
            self._peer_ended()

    def _run_backlog(self) -> None:
        backlog = self._backlog
        while backlog and not self._input_done:
            msg = backlog[0]
            kind = type(msg)
            if kind is Request and len(self._tasks) >= self.max_handlers:
                return
            backlog.popleft()
            if kind is Response:
                self._on_response(msg)  # type: ignore[arg-type]
            elif kind is Request:
                self._on_request(msg)  # type: ignore[arg-type]
            elif kind is EndOfRequests:
                self._peer_erq = True
            else:
                self._peer_ended()
        backlog.clear()
        if self._eof_after_backlog:
            self._peer_ended()
        self._resume_input("handlers")

    def _on_response(self, rsp: Response) -> None:
        fut = self._pending.pop((rsp.channel, rsp.tag), None)
        if fut is None:
            self._count_error("unknown_response")
            limited.warning(
                "unknown_response",
                "%s: response to unknown request %d on channel %d",
                self.name,
                rsp.tag,
                rsp.channel,
            )
            return
        self.responses_received += 1
        if not fut.done():
            fut.set_result(rsp)

    def _on_request(self, rq: Request) -> None:
        channel = rq.channel
        tag = rq.tag
        if self._sent_eof:
            self._count_error("request_after_eof")
            return
        key = (channel, tag)
        if key in self._serving:
            self._reject(
                channel, tag, f"channel {channel}: tag {tag} already in flight", "duplicate_tag"
            )
            return
        if self._peer_erq:
            self._reject(channel, tag, "requests no longer allowed (peer sent ERQ)", "after_erq")
            return
        handler = self.handler
        if handler is None:
            self._reject(channel, tag, "no request handler", "no_handler")
            return
        try:
            result = handler(rq)
        except Exception as exc:
            self._handler_failed(rq, exc)
            return
        if inspect.isawaitable(result):
            self._serving.add(key)
            task = self._loop.create_task(self._run_handler(rq, result))
            self._tasks.add(task)
            task.add_done_callback(self._handler_done)
            return
        ok, flags, payload = response_from_result(result)
        if not ok:
            self._count_error("handler_result")
        self._respond(channel, tag, ok, flags, payload)

    async def _run_handler(self, rq: Request, awaitable: Awaitable[HandlerResult]) -> None:
        try:
            result = await awaitable
        except Exception as exc:
            self._serving.discard((rq.channel, rq.tag))
            self._handler_failed(rq, exc)
            return
        self._serving.discard((rq.channel, rq.tag))
        ok, flags, payload = response_from_result(result)
        if not ok:
            self._count_error("handler_result")
        self._respond(rq.channel, rq.tag, ok, flags, payload)

    def _handler_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if self._backlog and len(self._tasks) < self.max_handlers:
            self._run_backlog()

    def _handler_failed(self, rq: Request, exc: Exception) -> None:
        if isinstance(exc, RequestFailed):
            self._respond(rq.channel, rq.tag, False, 0, exc.reason.encode())
            return
        self._count_error("handler")
        reason = _short_reason(exc)
        limited.warning(
            "handler",
            "%s: handler for rq_type %d (tag %d) failed: %s",
            self.name,
            rq.rq_type,
            rq.tag,
            reason,
        )
        log.debug("handler traceback", exc_info=exc)
        self._respond(rq.channel, rq.tag, False, 0, reason.encode())

    async def _finish_handlers(self) -> None:
        """Let running handlers answer, unless no answer can be sent or they take too long."""
        deadline = self._loop.time() + self.close_timeout_s
        while self._tasks:
            remaining = deadline - self._loop.time()
            transport = self._transport
            gone = transport is None or transport.is_closing()
            if gone or remaining <= 0:
                if not gone:
                    self._count_error("close_timeout")
                    limited.warning(
                        "close_timeout",
                        "%s: %d handlers still running after %.1f s; cancelling them",
                        self.name,
                        len(self._tasks),
                        self.close_timeout_s,
                    )
                for task in list(self._tasks):
                    task.cancel()
                await asyncio.wait(list(self._tasks))
                return
            await asyncio.wait(list(self._tasks), timeout=min(remaining, 0.5))

    # ---- ending ----

    def _peer_ended(self) -> None:
        """The peer sends nothing more: answer what runs, send EOF, close."""
        if self._input_done:
            return
        self._input_done = True
        self._backlog.clear()
        # our requests can never be answered now, and new ones are refused
        if self._end_reason is None:
            self._end_reason = "peer ended the connection"
        self._fail_pending("peer ended the connection before responding")
        self._finisher = self._loop.create_task(self._finish_after_peer())

    async def _finish_after_peer(self) -> None:
        await self._finish_handlers()
        self._send_eof()
        self._end("connection ended by peer", abort=False)

    def _protocol_error(self, exc: ProtocolError) -> None:
        self._count_error("protocol")
        limited.warning(
            "protocol", "%s: protocol error, closing the connection: %s", self.name, exc
        )
        self._end(f"protocol error from peer: {exc}", abort=False)

    def _connection_lost(self, exc: BaseException | None) -> None:
        if self._closed.is_set():
            return
        if exc is not None:
            self._count_error("connection")
            limited.info("connection", "%s: connection lost: %s", self.name, exc)
            self._end(f"connection lost: {exc}", abort=True)
        else:
            self._end("connection closed", abort=True)
