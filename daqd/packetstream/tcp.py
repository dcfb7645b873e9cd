"""TCP for PacketConnection: `connect` and `start_server` drive a connection straight from the
transport's callbacks (no reader task), which is faster than a (StreamReader, StreamWriter) pair.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from daqd.packetstream.connection import PacketConnection, RequestHandler


class _PacketProtocol(asyncio.Protocol):
    """Drives a PacketConnection straight from transport callbacks (no reader task)."""

    def __init__(
        self,
        conn: PacketConnection,
        on_connect: Callable[[PacketConnection], None] | None = None,
    ) -> None:
        self.conn = conn
        self.on_connect = on_connect

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.conn._attach(transport)  # type: ignore[arg-type]
        if self.on_connect is not None:
            self.on_connect(self.conn)

    def data_received(self, data: bytes) -> None:
        self.conn._feed(data)

    def eof_received(self) -> bool:
        self.conn._feed_eof()
        return True  # keep our sending side open: responses and our EOF still have to go out

    def connection_lost(self, exc: Exception | None) -> None:
        self.conn._connection_lost(exc)

    def pause_writing(self) -> None:
        conn = self.conn
        conn._can_write.clear()
        if not conn._pending:
            # as in the stream read loop: pause the input only when no response is awaited
            conn._pause_input("write")

    def resume_writing(self) -> None:
        self.conn._can_write.set()
        self.conn._resume_input("write")


def _new_connection(
    handler: RequestHandler | None,
    options: dict[str, Any],
    on_connect: Callable[[PacketConnection], None] | None = None,
) -> _PacketProtocol:
    return _PacketProtocol(PacketConnection(None, None, handler, **options), on_connect)


async def connect(
    host: str,
    port: int,
    handler: RequestHandler | None = None,
    **options: Any,
) -> PacketConnection:
    """Open a TCP connection and return a PacketConnection over it (options as for the class)."""
    loop = asyncio.get_running_loop()
    _, protocol = await loop.create_connection(
        lambda: _new_connection(handler, options), host, port
    )
    return protocol.conn


async def start_server(
    host: str,
    port: int,
    handler: RequestHandler | None = None,
    *,
    on_connect: Callable[[PacketConnection], None] | None = None,
    **options: Any,
) -> asyncio.Server:
    """A TCP server: one PacketConnection per client, answering with `handler`.

    `on_connect(conn)` runs before the client's first byte is read (set `conn.handler` or
    `conn.name` there, or keep `conn` to close it later).
    """
    loop = asyncio.get_running_loop()
    return await loop.create_server(
        lambda: _new_connection(handler, options, on_connect), host, port
    )
