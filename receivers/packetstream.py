"""The `packetstream` receiver: a cs.packetstream-compatible TCP server; each request is a record.

The response tells the sender whether its record was accepted: OK (empty, or what a configured
handler returns) once every publisher took it, failure "busy" when a `block` publisher stayed full
for `accept_timeout_s`, failure "dropped" when a `drop` publisher was full.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import Field, field_validator

from daqd.deadline import Deadline
from daqd.hostport import HostPort, format_hostport, parse_hostport
from daqd.packetstream import PacketConnection, RequestFailed, start_server
from daqd.protocols.packetstream import DEFAULT_MAX_PACKET_BYTES, Request
from daqd.receiver import ReceiverServer, ReceiverSettings

if TYPE_CHECKING:
    from daqd.host import Host

BUSY = "busy"
DROPPED = "dropped (a drop-policy publisher queue is full)"


def load_handler(path: str) -> Callable[[Request], Any]:
    """Import `package.module:function` and check that it can be called."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"expected 'package.module:function', got {path!r}")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"cannot import {module_name!r}: {exc}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"{path!r} is not callable")
    return obj


class PacketStreamSettings(ReceiverSettings):
    # settings that name code to import: daqd.config checks who may have written it, first
    code_settings: ClassVar[tuple[str, ...]] = ("handler",)

    listen: HostPort
    max_packet_bytes: int = Field(DEFAULT_MAX_PACKET_BYTES, gt=0)
    # async work per connection at once; more requests wait unread (TCP backpressure)
    max_handlers: int = Field(64, ge=1)
    accept_timeout_s: float = Field(5.0, ge=0)
    close_timeout_s: float = Field(5.0, gt=0)
    # "package.module:function" called with each accepted Request; its result is the response
    handler: str = ""

    @field_validator("handler")
    @classmethod
    def _importable(cls, v: str) -> str:
        if v:
            load_handler(v)
        return v


class PacketStreamReceiver(ReceiverServer):
    """Serves cs.packetstream clients; every request becomes a record, answered per record.

    Records carry tags rq_type, flags, channel and peer, and the request payload as one block.
    Requests are accepted in arrival order: once one waits for publisher space, later ones (from
    any connection) queue behind it, so seq order is arrival order and seq stays gap-free.
    """

    Settings = PacketStreamSettings
    settings: PacketStreamSettings

    def __init__(self, settings: PacketStreamSettings, host: Host) -> None:
        super().__init__(settings, host)
        self._server: asyncio.Server | None = None
        self._conns: set[PacketConnection] = set()
        self._watchers: set[asyncio.Task[None]] = set()
        self._order = asyncio.Lock()
        self._answer: Callable[[Request], Any] | None = None
        self.counters.extra["clients"] = 0

    async def setup(self) -> None:
        s = self.settings
        self._answer = load_handler(s.handler) if s.handler else None
        host, port = parse_hostport(s.listen)
        # driven straight from the transport (no reader task per client): see daqd.packetstream
        self._server = await start_server(
            host,
            port,
            None,
            on_connect=self._on_connect,
            max_handlers=s.max_handlers,
            max_packet_bytes=s.max_packet_bytes,
            close_timeout_s=s.close_timeout_s,
            on_error=self.counters.error,
        )
        self.addresses["listen"] = format_hostport(self._server.sockets[0].getsockname())

    def _on_connect(self, conn: PacketConnection) -> None:
        peer = conn.name

        def handle(rq: Request) -> Any:
            return self._on_request(rq, peer)

        conn.handler = handle
        conn.name = f"{self.name} {peer}"
        self._conns.add(conn)
        self.counters.extra["clients"] = len(self._conns)
        self.log.debug("%s: client %s connected", self.name, peer)  # DEBUG: one per client
        task = asyncio.get_running_loop().create_task(self._watch(conn, peer))
        self._watchers.add(task)
        task.add_done_callback(self._watchers.discard)

    async def _watch(self, conn: PacketConnection, peer: str) -> None:
        try:
            await conn.wait_closed()
        finally:
            self._conns.discard(conn)
            self.counters.extra["clients"] = len(self._conns)
            self.log.debug("%s: client %s gone", self.name, peer)

    def _can_accept_now(self) -> bool:
        return all(not q.block or q.depth < q.size for q in self.queues)

    def _on_request(self, rq: Request, peer: str) -> Any:
        """The connection's handler: a plain result when the record is taken at once."""
        tags = {"rq_type": rq.rq_type, "flags": rq.flags, "channel": rq.channel, "peer": peer}
        if not self._order.locked() and self._can_accept_now():
            return self._respond(rq, self.publish_nowait(self.new_record((rq.payload,), tags)))
        return self._accept_later(rq, tags, time.time_ns())

    async def _accept_later(self, rq: Request, tags: dict[str, Any], time_ns: int) -> Any:
        try:
            async with asyncio.timeout(self.settings.accept_timeout_s):
                async with self._order:
                    while not self._can_accept_now():
                        for q in self.queues:
                            if q.block and q.depth >= q.size:
                                await q.drained()
                    # the record (and its seq) is made only once it can be taken: no seq gaps
                    record = self.new_record((rq.payload,), tags, time_ns=time_ns)
                    accepted = self.publish_nowait(record)
        except TimeoutError:
            self.counters.drop("busy")
            raise RequestFailed(BUSY) from None
        result = self._respond(rq, accepted)
        if inspect.isawaitable(result):
            return await result
        return result

    def _respond(self, rq: Request, accepted: bool) -> Any:
        if not accepted:
            raise RequestFailed(DROPPED)
        if self._answer is None:
            return None
        return self._answer(rq)

    async def stop_receiving(self, deadline: Deadline | None = None) -> None:
        """Stop accepting, say goodbye to every client with the close handshake, then close."""
        if self._server is not None:
            self._server.close()
        conns = list(self._conns)
        if conns:
            await asyncio.gather(*(c.close() for c in conns), return_exceptions=True)
        await super().stop_receiving(deadline)

    async def close(self) -> None:
        """Release the server and any client left (after a crash, without the handshake)."""
        if self._server is not None:
            self._server.close()
        for conn in list(self._conns):
            conn.abort("receiver closed")
        if self._watchers:
            await asyncio.gather(*self._watchers, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    def cmd_clients(self) -> list[dict[str, Any]]:
        """Connected clients with their in-flight requests and totals."""
        return [
            {
                "name": c.name,
                "in_flight": c.in_flight[1],
                "answered": c.requests_served,
                "failed": c.failures_sent,
            }
            for c in self._conns
        ]
