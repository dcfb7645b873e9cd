"""The `tcp` receiver: a server for many clients, framed by length prefix, by line, or raw chunks."""

from __future__ import annotations

import asyncio
import struct
from typing import Literal

from pydantic import Field

from daqd.hostport import HostPort
from daqd.receiver import ReceiverServer, ReceiverSettings

_LEN32 = struct.Struct(">I")


class TcpSettings(ReceiverSettings):
    listen: HostPort
    framing: Literal["length32", "line", "raw"] = "length32"
    max_message_bytes: int = Field(16 << 20, gt=0)
    raw_chunk_bytes: int = Field(64 << 10, gt=0)
    max_connections: int = Field(256, ge=1)


class TcpReceiver(ReceiverServer):
    """Each framed message from any client becomes a record tagged with the client (`peer`).

    Publishing waits where a `block` publisher is full, so the clients feel TCP backpressure.
    A client that breaks the framing is counted, logged and disconnected; the others go on.
    """

    Settings = TcpSettings
    settings: TcpSettings

    async def setup(self) -> None:
        # readuntil() refuses lines longer than the stream's limit: make that our maximum (the
        # other framings read exact sizes and keep the default, smaller buffering per client)
        s = self.settings
        limit = s.max_message_bytes + 1 if s.framing == "line" else 1 << 16
        await self.setup_stream(
            self._client, listen=s.listen, limit=limit, max_connections=s.max_connections
        )

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        host, port = writer.get_extra_info("peername")[:2]
        tags = {"peer": f"{host}:{port}"}
        self.counters.extra["clients"] = self.counters.extra.get("clients", 0) + 1
        framing = self.settings.framing
        limit = self.settings.max_message_bytes
        try:
            if framing == "length32":
                await self._length32(reader, tags, limit)
            elif framing == "line":
                await self._lines(reader, tags, limit)
            else:
                await self._raw(reader, tags)
        finally:
            self.counters.extra["clients"] -= 1

    async def _length32(
        self, reader: asyncio.StreamReader, tags: dict[str, str], limit: int
    ) -> None:
        while True:
            try:
                head = await reader.readexactly(4)
            except asyncio.IncompleteReadError as exc:
                if exc.partial:
                    self._bad(tags, "truncated", "connection closed inside a length prefix")
                return
            (n,) = _LEN32.unpack(head)
            if n > limit:
                self._bad(tags, "too_long", f"message of {n} bytes > max_message_bytes={limit}")
                return
            try:
                body = await reader.readexactly(n)
            except asyncio.IncompleteReadError as exc:
                self._bad(tags, "truncated", f"closed after {len(exc.partial)} of {n} bytes")
                return
            await self.publish(self.new_record((body,), tags))

    async def _lines(self, reader: asyncio.StreamReader, tags: dict[str, str], limit: int) -> None:
        while True:
            try:
                line = await reader.readuntil(b"\n")
            except asyncio.IncompleteReadError as exc:
                if exc.partial:  # a last line without newline is still a line
                    await self.publish(self.new_record((exc.partial,), tags))
                return
            except asyncio.LimitOverrunError:
                self._bad(tags, "too_long", f"line longer than max_message_bytes={limit}")
                return
            await self.publish(self.new_record((line.rstrip(b"\r\n"),), tags))

    async def _raw(self, reader: asyncio.StreamReader, tags: dict[str, str]) -> None:
        size = self.settings.raw_chunk_bytes
        while chunk := await reader.read(size):
            await self.publish(self.new_record((chunk,), tags))

    def _bad(self, tags: dict[str, str], reason: str, what: str) -> None:
        self.counters.error(reason)
        self.limited.warning(
            reason, "%s: client %s: %s; disconnecting it", self.name, tags["peer"], what
        )
