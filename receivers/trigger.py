"""The `trigger` receiver: CHEC-S backplane trigger packets over UDP (SSDAQ's port 8307).

Every datagram is decoded and checked (daqd.protocols.trigger). A valid packet becomes one record
whose payload is the packet unchanged; `format = "record"` tags it with what the packet says
(type, TACK, phase, counters, triggered SPs), `format = "ssdaq"` only with `format`, for SSDAQ's
PUB consumers. A bad packet is refused: counted under errors by reason, logged rate-limited, not
published. A readable packet whose patterns name SPs its union lacks is published and counted
(errors `union_mismatch`). The records of the datagrams one event-loop turn reads are handed on
together.
"""

from __future__ import annotations

import asyncio
from typing import Any, Literal

from pydantic import Field

from daqd.hostport import HostPort
from daqd.protocols.trigger import TYPE_NAMES, TriggerError, decode
from daqd.receiver import DatagramSettings, ReceiverServer
from daqd.record import Record
from daqd.runstate import RunInfo

_MAX_PEERS = 4096


class TriggerSettings(DatagramSettings):
    listen: HostPort = "0.0.0.0:8307"
    rcvbuf_bytes: int = Field(8 << 20, gt=0)
    format: Literal["record", "ssdaq"] = "record"


class TriggerReceiver(ReceiverServer):
    """Binds `listen`; one record per valid trigger packet."""

    Settings = TriggerSettings
    settings: TriggerSettings

    def __init__(self, settings: TriggerSettings, host: Any) -> None:
        super().__init__(settings, host)
        self.per_type = dict.fromkeys(TYPE_NAMES.values(), 0)
        self.busy = 0
        self.beyond_field = 0  # packets whose window did not fit the u8 length field
        self.last_tack: int | None = None
        self._pending: list[Record] = []
        self._pending_bytes = 0
        self._peers: dict[Any, str] = {}
        self._ssdaq_tags: dict[str, Any] = {"format": "ssdaq"}
        self._relay = settings.format == "ssdaq"
        self.refresh_extra()

    async def setup(self) -> None:
        self._loop = asyncio.get_running_loop()
        await self.setup_udp(
            self.settings.listen,
            self._on_datagram,
            rcvbuf_bytes=self.settings.rcvbuf_bytes,
            coalesce_s=self.settings.coalesce_ms / 1000,
        )

    def _on_datagram(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            packet = decode(data)
        except TriggerError as exc:
            self.counters.error(exc.reason)  # refused input: the run is TAINTED
            self.limited.warning(
                exc.reason, "%s: bad trigger packet from %s:%d: %s", self.name, *addr[:2], exc
            )
            return
        self.per_type[TYPE_NAMES[packet.packet_type]] += 1
        if packet.busy:
            self.busy += 1
        self.last_tack = packet.tack
        if packet.window_beyond_field:
            self.beyond_field += 1
        mismatch = packet.mismatch
        if mismatch:  # readable but self-contradictory: kept, and counted (the run is TAINTED)
            self.counters.error("union_mismatch")
            self.limited.warning(
                "union_mismatch",
                "%s: trigger packet from %s:%d (TACK %d) has pattern bits for SPs not in its union",
                self.name,
                *addr[:2],
                packet.tack,
            )
        if self._relay:
            tags = self._ssdaq_tags
        else:
            tags = packet.tags()
            if mismatch:
                tags["union_mismatch"] = True
            peer = self._peers.get(addr)
            if peer is None:
                if len(self._peers) >= _MAX_PEERS:
                    self._peers.clear()
                peer = self._peers[addr] = f"{addr[0]}:{addr[1]}"
            tags["peer"] = peer
        pending = self._pending
        if not pending:
            self._loop.call_soon(self._flush)
        pending.append(self.new_record((data,), tags))
        self._pending_bytes += len(data)

    def _flush(self) -> None:
        """Hand on the records of the packets read since the last flush."""
        records = self._pending
        if records:
            self._pending = []
            nbytes, self._pending_bytes = self._pending_bytes, 0
            self.publish_many_nowait(records, nbytes)

    def hand_over(self) -> None:
        self._flush()

    async def begin_run(self, run: RunInfo) -> None:
        self._flush()  # what arrived before the run goes before its begin marker

    async def end_run(self, run: RunInfo) -> None:
        self._flush()

    async def close(self) -> None:
        self._flush()

    # ----- status and commands ---------------------------------------------------------------
    def refresh_extra(self) -> None:
        extra = self.counters.extra
        extra["packets"] = dict(self.per_type)
        extra["busy"] = self.busy
        extra["window_beyond_field"] = self.beyond_field
        extra["last_tack"] = self.last_tack

    def cmd_stats(self) -> dict[str, Any]:
        """Packets per type, busy packets, the last TACK, and the refused packets by reason."""
        self.refresh_extra()
        return {
            "packets": dict(self.per_type),
            "busy": self.busy,
            "window_beyond_field": self.beyond_field,
            "last_tack": self.last_tack,
            "errors": dict(self.counters.errors),
            "drops": dict(self.counters.drops),
        }
