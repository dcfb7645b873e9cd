"""The `log` receiver: log records as SSDAQ's chec.LogData over TCP (SSDAQ's port 10001).

A TCP server for many senders. Each connection is read in one of two framings, told by its first
byte (daqd.protocols.logstream): SSDAQ's, serialized LogData back to back with no framing (what
SSDAQ's ChecSocketLogHandler writes), or daqd's, a 4-byte big-endian length before each message
(what daqd.loghandler.DaqdLogHandler writes). Each LogData becomes one record: its payload is the
serialized LogData as sent (what SSDAQ re-published on its PUB 9001), its tags the decoded
fields (severity by name and `level` by number, sender, time in ns, message, pid, system_type,
source_file, line, and the optional ones present), the sender's address (`peer`) and the
connection's `framing`.

A message that does not decode is refused: counted under errors by reason (truncated,
missing_field, out_of_range, bad_wire_type, bad_field, bad_varint, too_long), logged
rate-limited. A length over `max_record_bytes` also closes that connection (its stream cannot be
trusted any further). A message half-read when the receiver stops is counted as dropped
(`stopped_mid_message`). Records below `level` are not published and are counted in
extra["filtered"]["below_level"]: a filter the configuration asked for, not a loss.
"""

from __future__ import annotations

import asyncio
from typing import Any

from pydantic import Field, field_validator

from daqd.hostport import HostPort
from daqd.protocols.logstream import MAX_RECORD_LIMIT, LogStream, Message
from daqd.protocols.ssdaq_pb import SEVERITIES
from daqd.receiver import ReceiverServer, ReceiverSettings

_READ_BYTES = 1 << 16
LEVEL_NAMES = {name: level for level, name in SEVERITIES.items()} | {"CRITICAL": 50}


class LogSettings(ReceiverSettings):
    listen: HostPort = "0.0.0.0:10001"
    level: int = 0  # a name (DEBUG, INFO, WARNING, ERROR, FATAL or CRITICAL, any case) or number
    max_record_bytes: int = Field(1 << 20, gt=0, le=MAX_RECORD_LIMIT)
    max_connections: int = Field(256, ge=1)

    @field_validator("level", mode="before")
    @classmethod
    def _level(cls, value: Any) -> Any:
        if isinstance(value, str):
            if value.upper() in LEVEL_NAMES:
                return LEVEL_NAMES[value.upper()]
            raise ValueError(f"must be a number or one of {', '.join(LEVEL_NAMES)} (any case)")
        return value


class LogReceiver(ReceiverServer):
    """Listens on `listen`; one record per LogData from any sender."""

    Settings = LogSettings
    settings: LogSettings

    def __init__(self, settings: LogSettings, host: Any) -> None:
        super().__init__(settings, host)
        self.clients = 0
        self.connections = {"ssdaq": 0, "length": 0}
        self.messages = {"ssdaq": 0, "length": 0}
        self.below_level = 0
        self.bytes_in = 0
        self.refresh_extra()

    async def setup(self) -> None:
        s = self.settings
        await self.setup_stream(self._client, listen=s.listen, max_connections=s.max_connections)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        host, port = writer.get_extra_info("peername")[:2]
        peer = f"{host}:{port}"
        stream = LogStream(self.settings.max_record_bytes)
        self.clients += 1
        try:
            while True:
                try:
                    data = await reader.read(_READ_BYTES)
                except ConnectionError:  # reset by the peer: what it sent ends here, as at EOF
                    data = b""
                if not data:
                    await self._publish(stream.close(), stream, peer)
                    return
                self.bytes_in += len(data)
                first = stream.framing is None
                messages = stream.feed(data)
                if first and stream.framing is not None:
                    self.connections[stream.framing] += 1
                await self._publish(messages, stream, peer)
                if stream.broken:
                    self.limited.warning(
                        "log_broken", "%s: closing the connection from %s", self.name, peer
                    )
                    return
        except asyncio.CancelledError:  # the receiver stops: a message half-read is lost here
            if stream.pending:
                self.counters.drop("stopped_mid_message")
            raise
        finally:
            self.clients -= 1

    async def _publish(self, messages: list[Message], stream: LogStream, peer: str) -> None:
        framing = stream.framing or "ssdaq"
        for i, m in enumerate(messages):
            if m.log is None:
                assert m.error is not None
                reason = m.error.reason
                self.counters.error(reason)  # refused input: the run is TAINTED
                self.limited.warning(
                    reason,
                    "%s: bad LogData from %s (%s framing, %d bytes): %s",
                    self.name,
                    peer,
                    framing,
                    len(m.raw),
                    m.error,
                )
                continue
            self.messages[framing] += 1
            if m.log.severity < self.settings.level:
                self.below_level += 1
                continue
            tags = m.log.tags()
            tags["peer"] = peer
            tags["framing"] = framing
            try:
                await self.publish(self.new_record((m.raw,), tags))
            except asyncio.CancelledError:  # stopped while a `block` queue was full
                rest = sum(1 for later in messages[i + 1 :] if later.log is not None)
                if rest:
                    self.counters.drop("cancelled", rest)
                raise

    # ----- status and commands ---------------------------------------------------------------
    def refresh_extra(self) -> None:
        extra = self.counters.extra
        extra["clients"] = self.clients
        extra["bytes_in"] = self.bytes_in
        extra["connections"] = dict(self.connections)
        extra["messages"] = dict(self.messages)
        extra["filtered"] = {"below_level": self.below_level}

    def cmd_stats(self) -> dict[str, Any]:
        """Connected senders, bytes read, LogData by framing, filtered ones, refused ones by reason."""
        self.refresh_extra()
        return {
            **self.counters.extra,
            "errors": dict(self.counters.errors),
            "drops": dict(self.counters.drops),
        }
