"""The `udp` receiver: one record per datagram, with a large socket buffer and kernel drop counts."""

from __future__ import annotations

import asyncio
from typing import Any

from pydantic import Field

from daqd.hostport import HostPort
from daqd.receiver import DatagramSettings, ReceiverServer
from daqd.record import Record
from daqd.runstate import RunInfo


class UdpSettings(DatagramSettings):
    listen: HostPort
    rcvbuf_bytes: int = Field(8 << 20, gt=0)


class UdpReceiver(ReceiverServer):
    """Binds `listen`; every datagram becomes a record tagged with its sender (`peer`).

    The records of the datagrams one event-loop turn reads are handed on together at the end of
    that turn (one queue operation per publisher, not one per datagram); run boundaries and
    closing hand on what is pending first.
    """

    Settings = UdpSettings
    settings: UdpSettings

    async def setup(self) -> None:
        self._peer_tags: dict[Any, dict[str, Any]] = {}
        self._pending: list[Record] = []
        self._loop = asyncio.get_running_loop()
        await self.setup_udp(
            self.settings.listen,
            self._on_datagram,
            rcvbuf_bytes=self.settings.rcvbuf_bytes,
            coalesce_s=self.settings.coalesce_ms / 1000,
        )

    def _on_datagram(self, data: bytes, addr: tuple[str, int]) -> None:
        # one shared tags dict per sender: tags are never mutated downstream, and this is per packet
        tags = self._peer_tags.get(addr)
        if tags is None:
            if len(self._peer_tags) > 4096:
                self._peer_tags.clear()
            tags = self._peer_tags[addr] = {"peer": f"{addr[0]}:{addr[1]}"}
        pending = self._pending
        if not pending:
            self._loop.call_soon(self._flush)
        pending.append(self.new_record((data,), tags))

    def _flush(self) -> None:
        """Hand on the records of the datagrams read since the last flush."""
        records = self._pending
        if records:
            self._pending = []
            self.publish_many_nowait(records, sum([len(r.payload[0]) for r in records]))

    def hand_over(self) -> None:
        self._flush()

    async def begin_run(self, run: RunInfo) -> None:
        self._flush()  # what arrived before the run goes before its begin marker

    async def end_run(self, run: RunInfo) -> None:
        self._flush()

    async def close(self) -> None:
        self._flush()  # including what the base class drained from the socket while closing
