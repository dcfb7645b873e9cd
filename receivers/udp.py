"""The `udp` receiver: one record per datagram, with a large socket buffer and kernel drop counts."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from daqd.receiver import HostPort, ReceiverServer, ReceiverSettings


class UdpSettings(ReceiverSettings):
    listen: HostPort
    rcvbuf_bytes: int = Field(8 << 20, gt=0)


class UdpReceiver(ReceiverServer):
    """Binds `listen`; every datagram becomes a record tagged with its sender (`peer`)."""

    Settings = UdpSettings
    settings: UdpSettings

    async def setup(self) -> None:
        self._peer_tags: dict[Any, dict[str, Any]] = {}
        await self.setup_udp(
            self.settings.listen, self._on_datagram, rcvbuf_bytes=self.settings.rcvbuf_bytes
        )

    def _on_datagram(self, data: bytes, addr: tuple[str, int]) -> None:
        # one shared tags dict per sender: tags are never mutated downstream, and this is per packet
        tags = self._peer_tags.get(addr)
        if tags is None:
            if len(self._peer_tags) > 4096:
                self._peer_tags.clear()
            tags = self._peer_tags[addr] = {"peer": f"{addr[0]}:{addr[1]}"}
        self.publish_nowait(self.new_record((data,), tags))
