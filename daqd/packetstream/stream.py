"""The stream under a PacketConnection: the transport, batched output, paused input, the end.

`PacketStream` is the base class of `PacketConnection` (connection.py), which adds the protocol:
requests both ways, dispatching what arrives, running handlers. The stream holds the state those
share: what is in flight (our requests awaiting responses, the peer's being handled, messages
waiting for a handler slot), because ending the connection fails or cancels all of it. Packets
queued during one turn of the event loop leave in one write when the loop is idle; a write that
fails ends the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable

from daqd.protocols.packetstream import EOF, ERQ, Message, Response, encode

# Above this, queued output is written as separate buffers instead of being joined first.
_JOIN_LIMIT_BYTES = 64 << 10
_EOF_PACKET = encode(EOF)
_ERQ_PACKET = encode(ERQ)


class PacketStream:
    """The byte stream of one packet connection, from a (StreamReader, StreamWriter) pair or
    attached to a transport later (`_attach`, by connect/start_server). Only the base of
    `PacketConnection`: it sends and receives no packets of its own; use PacketConnection."""

    def __init__(
        self,
        reader: asyncio.StreamReader | None,
        writer: asyncio.StreamWriter | None,
        *,
        name: str | None,
        on_error: Callable[[str], None] | None,
    ) -> None:
        if (reader is None) != (writer is None):
            raise ValueError("give both reader and writer (or neither, for connect/start_server)")
        self._reader = reader
        self._writer = writer
        self.name = name or "?"
        self._on_error = on_error
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.WriteTransport | None = None
        # our requests awaiting a response: (channel, tag) -> future
        self._pending: dict[tuple[int, int], asyncio.Future[Response]] = {}
        # the peer's requests being handled by tasks
        self._serving: set[tuple[int, int]] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        # decoded messages waiting for a handler slot; input is paused meanwhile
        self._backlog: deque[Message] = deque()
        self._pause_reasons: set[str] = set()
        self._input_resumed = asyncio.Event()
        self._input_resumed.set()
        self._can_write = asyncio.Event()
        self._can_write.set()
        self._out: list[bytes | bytearray | memoryview] = []
        self._out_bytes = 0
        self._flush_scheduled = False
        self._read_task: asyncio.Task[None] | None = None
        self._input_done = False  # peer's EOF (packet or FIN) seen, or the stream failed
        self._closed = asyncio.Event()
        self._end_reason: str | None = None  # why the connection can no longer carry requests
        self._sent_erq = False
        self._sent_eof = False
        self.errors: dict[str, int] = {}
        if writer is not None:
            self._attach(writer.transport)

    def _attach(self, transport: asyncio.WriteTransport) -> None:
        self._transport = transport
        if self.name == "?":
            peer = transport.get_extra_info("peername")
            if isinstance(peer, tuple) and len(peer) >= 2:
                self.name = f"{peer[0]}:{peer[1]}"
            elif isinstance(peer, str) and peer:
                self.name = peer

    @property
    def transport(self) -> asyncio.WriteTransport:
        """The transport underneath (for its extra info: peername, sockname, socket)."""
        assert self._transport is not None, "not connected yet"
        return self._transport

    async def _drain(self) -> None:
        if self._writer is not None:
            await self._writer.drain()
        else:
            await self._can_write.wait()

    # ---- output ----

    def _queue(self, data: bytes, payload: bytes | bytearray | memoryview = b"") -> None:
        self._out.append(data)
        if payload:
            self._out.append(payload)
        self._out_bytes += len(data) + len(payload)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        """Hand everything queued to the transport in one write: runs when the loop is idle."""
        self._flush_scheduled = False
        out = self._out
        if not out:
            return
        self._out = []
        size = self._out_bytes
        self._out_bytes = 0
        transport = self._transport
        if transport is None or transport.is_closing():
            self._count_error("unsent_after_close", len(out))
            return
        try:
            if len(out) == 1:
                transport.write(out[0])
            elif size <= _JOIN_LIMIT_BYTES:
                transport.write(b"".join(out))
            else:
                transport.writelines(out)
        except (ConnectionError, OSError, RuntimeError) as exc:
            self._count_error("write_failed")
            self._end(f"write failed: {exc}", abort=True)

    def _send_control_erq(self) -> None:
        if not self._sent_erq and not self._sent_eof and self._end_reason is None:
            self._sent_erq = True
            self._queue(_ERQ_PACKET)

    def _send_eof(self) -> None:
        """Send EOF, flush, and half-close where the stream allows it: we send nothing more."""
        if self._sent_eof:
            return
        self._sent_eof = True
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        self._queue(_EOF_PACKET)
        self._flush()
        if transport.can_write_eof():
            with contextlib.suppress(OSError, RuntimeError):
                transport.write_eof()

    # ---- pausing input ----

    def _pause_input(self, reason: str) -> None:
        if not self._pause_reasons:
            self._input_resumed.clear()
            if self._reader is None and self._transport is not None:
                self._transport.pause_reading()  # type: ignore[attr-defined]
        self._pause_reasons.add(reason)

    def _resume_input(self, reason: str) -> None:
        if reason not in self._pause_reasons:
            return
        self._pause_reasons.discard(reason)
        if not self._pause_reasons and not self._input_done:
            self._input_resumed.set()
            transport = self._transport
            if self._reader is None and transport is not None and not transport.is_closing():
                transport.resume_reading()  # type: ignore[attr-defined]

    # ---- the end ----

    def _fail_pending(self, reason: str) -> None:
        if not self._pending:
            return
        pending = list(self._pending.values())
        self._pending.clear()
        for fut in pending:
            if not fut.done():
                fut.set_exception(ConnectionError(f"{self.name}: {reason}"))

    def _end(self, reason: str, *, abort: bool) -> None:
        """The connection is over: fail what waits on it, stop handlers, release the stream."""
        if self._closed.is_set():
            return
        if self._end_reason is None:
            self._end_reason = reason
        self._input_done = True
        self._backlog.clear()
        self._input_resumed.set()
        self._fail_pending(reason)
        for task in list(self._tasks):
            task.cancel()
        self._serving.clear()
        transport = self._transport
        if abort:
            self._out.clear()
            self._out_bytes = 0
            if transport is not None and not transport.is_closing():
                transport.abort()
        else:
            self._flush()
            if transport is not None:
                transport.close()
        if self._read_task is not None and self._read_task is not asyncio.current_task():
            self._read_task.cancel()
        self._closed.set()

    def _count_error(self, reason: str, n: int = 1) -> None:
        self.errors[reason] = self.errors.get(reason, 0) + n
        if self._on_error is not None:
            self._on_error(reason)
