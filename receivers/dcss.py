"""The `dcss` receiver: a DCSS hardware server (DHS) that runs operation and device handlers.

It dials DCSS, answers the v1 handshake at once, then speaks the configured protocol level. It
never stops reading (DCSS blocks all its hardware clients while one does not read), runs each
`async def` operation as its own eagerly started task (a plain `def` one at once), and reconnects after any error, EOF, reset or framing fault with a
capped backoff. A new connection starts clean: the outgoing queue and every operation of the old
connection are dropped (DCSS has already failed them). Every message received is published as a
record (tags: command, device, handle; payload: the message text, then its binary part if any).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, JsonValue

from daqd.dhs import (
    Dhs,
    EncoderSettings,
    IonChamberSettings,
    MotorSettings,
    ShutterSettings,
    StringSettings,
    collect_handlers,
    load_handler_module,
)
from daqd.errors import ProtocolError
from daqd.hostport import parse_hostport
from daqd.protocols import dcss as d
from daqd.receiver import ReceiverServer, ReceiverSettings
from daqd.trust import code_base

# A connection that lasted this long after its handshake resets the reconnect backoff.
STABLE_S = 10.0


class DcssSettings(ReceiverSettings):
    # settings that name code to import: daqd.config checks who may have written it, first
    code_settings: ClassVar[tuple[str, ...]] = ("handlers",)

    connect: str  # DCSS's hardware port, conventionally host:14242
    dhs_name: str = Field(min_length=1, max_length=79, pattern=r"^\S+$")
    protocol_level: Literal[1, 2] = 2  # as in the DHS's database entry (`localhost 2`)
    # handler modules: "pkg.mod", or "file.py" (relative: next to the config file)
    handlers: list[str] = Field(default_factory=list)
    simulate_devices: bool = True  # built-in simulated devices for what no handler claims
    # free-form settings for the handlers, read-only as `op.settings` (strings, numbers, bools,
    # arrays, tables: what survives msgpack/JSON, so dates must be written as strings)
    handler_settings: dict[str, JsonValue] = Field(default_factory=dict)
    motors: dict[str, MotorSettings] = Field(default_factory=dict)
    shutters: dict[str, ShutterSettings] = Field(default_factory=dict)
    ion_chambers: dict[str, IonChamberSettings] = Field(default_factory=dict)
    encoders: dict[str, EncoderSettings] = Field(default_factory=dict)
    strings: dict[str, StringSettings] = Field(default_factory=dict)
    reconnect_first_s: float = Field(0.2, gt=0)
    reconnect_max_s: float = Field(10.0, gt=0)
    # DCSS closes a second connection of a known name after 3 s without a word: back off longer
    # when a connection closes before DCSS sent anything after the handshake.
    rejected_backoff_s: float = Field(5.0, ge=0)
    handshake_timeout_s: float = Field(10.0, gt=0)  # wait for stoc_send_client_type
    max_text_bytes: int = Field(d.DEFAULT_MAX_TEXT_BYTES, gt=0)
    max_binary_bytes: int = Field(d.DEFAULT_MAX_BINARY_BYTES, ge=0)
    max_pending_bytes: int = Field(16 << 20, gt=0)  # unsent output beyond this: reconnect
    read_chunk_bytes: int = Field(256 << 10, gt=0)


class DcssReceiver(ReceiverServer):
    """A DHS for SSRL's DCSS. See daqd.dhs for the handler API."""

    Settings = DcssSettings
    settings: DcssSettings

    def __init__(self, settings: DcssSettings, host: Any) -> None:
        super().__init__(settings, host)
        parse_hostport(settings.connect)
        # a relative handler file is found next to the config file (systemd runs us from /)
        config_path = str(getattr(getattr(host, "config", None), "path", "") or "")
        base = code_base(config_path)
        modules = [
            load_handler_module(
                str(base / spec) if spec.endswith(".py") and not Path(spec).is_absolute() else spec
            )
            for spec in settings.handlers
        ]
        operations, device_classes = collect_handlers(modules)
        device_settings: dict[str, dict[str, Any]] = {}
        for table in (
            settings.motors,
            settings.shutters,
            settings.ion_chambers,
            settings.encoders,
            settings.strings,
        ):
            for name, values in table.items():
                device_settings[name] = values.model_dump(exclude_unset=True)
        self.dhs = Dhs(
            settings.dhs_name,
            operations=operations,
            device_classes=device_classes,
            device_settings=device_settings,
            simulate_devices=settings.simulate_devices,
            handler_settings=settings.handler_settings,
            log=self.log,
        )
        self.online = asyncio.Event()  # set while a handshake-complete connection is up
        self.connections = 0  # handshakes completed
        self.last_disconnect = ""
        self.codec: d.DcssCodec | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._transport: asyncio.WriteTransport | None = None  # the writer's, while connected
        self._loop: asyncio.AbstractEventLoop | None = None
        self._out: list[bytes] = []
        self._flush_scheduled = False
        self._dispatching = False  # while received messages are being dispatched
        self._more_to_dispatch = False  # ... and the one being handled is not the last of them
        self._handshake_at: float | None = None
        self._heard = False
        self.counters.extra["dhs"] = self.dhs.stats
        self.counters.extra["online"] = False

    # ---- the connection loop
    async def ct_connection(self) -> None:
        s = self.settings
        backoff = s.reconnect_first_s
        while True:
            try:
                reader, writer = await self.connect_stream(s.connect)
            except OSError as exc:
                self.counters.error("connect")
                self.limited.warning(
                    "connect", "%s: cannot reach DCSS at %s: %s", self.name, s.connect, exc
                )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, s.reconnect_max_s)
                continue
            self._handshake_at = None
            self._heard = False
            try:
                await self._converse(reader, writer)
                reason = "DCSS closed the connection"
            except ProtocolError as exc:
                self.counters.error("protocol")
                reason = f"protocol error: {exc}"
            except TimeoutError:  # before OSError, of which it is a subclass
                self.counters.error("handshake_timeout")
                reason = f"no stoc_send_client_type within {s.handshake_timeout_s} s"
            except OSError as exc:
                self.counters.error("connection")
                reason = f"connection error: {exc!r}"
            finally:
                self._disconnected(writer)
            self.last_disconnect = reason
            handshake_at = self._handshake_at
            if handshake_at is not None and not self._heard:
                # DCSS's way of refusing a name (unknown, wrong host, or already connected)
                delay = max(backoff, s.rejected_backoff_s)
                self.counters.error("rejected")
                backoff = min(max(backoff * 2, s.rejected_backoff_s), s.reconnect_max_s)
            elif handshake_at is not None and time.monotonic() - handshake_at >= STABLE_S:
                delay = backoff = s.reconnect_first_s
            else:
                delay = backoff
                backoff = min(backoff * 2, s.reconnect_max_s)
            self.log.warning(
                "%s: %s; reconnecting in %.2f s", self.name, d.mask_private(reason), delay
            )
            await asyncio.sleep(delay)

    async def _converse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One connection: handshake, then read and dispatch until it ends (sets _handshake_at
        once handshaken and _heard once a message arrived after the handshake)."""
        s = self.settings
        codec = d.DcssCodec(
            s.protocol_level, max_text_bytes=s.max_text_bytes, max_binary_bytes=s.max_binary_bytes
        )
        self.codec = codec
        pending: list[d.Message] = []
        async with asyncio.timeout(s.handshake_timeout_s):
            while not pending:
                data = await reader.read(s.read_chunk_bytes)
                if not data:
                    return
                pending = codec.feed(data)
        first = pending.pop(0)
        if not isinstance(first, d.StocSendClientType):
            raise ProtocolError(f"expected stoc_send_client_type first, got {first.verb!r}")
        self._publish(first)
        # The handshake reply is the first thing sent on a connection, always v1, at once.
        writer.write(codec.encode(d.HtosClientIsHardware(s.dhs_name)))
        self._handshake_at = time.monotonic()
        self._writer = writer
        self._transport = writer.transport
        self._loop = asyncio.get_running_loop()
        self.connections += 1
        self.dhs.connected(self._send)
        self.online.set()
        self.counters.extra["online"] = True
        self.log.info(
            "%s: connected to DCSS %s as %s (protocol level %d)",
            self.name,
            s.connect,
            s.dhs_name,
            s.protocol_level,
        )
        # From here on bytes are handled in the transport's data callback: one event-loop turn
        # less per message than a reader task. No await since the last read, so the stream
        # reader holds no unread bytes; it may only have seen the end of the stream.
        protocol = _DcssProtocol(self, codec)
        writer.transport.set_protocol(protocol)
        lost = reader.exception()
        if lost is not None:
            raise lost
        if reader.at_eof():
            protocol.closed.set_result(None)
        self._dispatch(pending, codec)
        await protocol.closed

    def _dispatch(self, messages: list[d.Message], codec: d.DcssCodec) -> None:
        """Publish and handle the messages `codec` decoded. What handlers send meanwhile goes out
        in one write: at the end, or when the last message's operation completes (operations
        start eagerly, so a quick one is answered in it)."""
        if not messages:
            return
        self._heard = True
        if codec.bad_bytes:
            self.counters.error("bad_bytes", codec.bad_bytes)
            self.limited.warning(
                "bad_bytes", "%s: %d bytes from DCSS were not UTF-8", self.name, codec.bad_bytes
            )
            codec.bad_bytes = 0
        handle = self.dhs.handle
        counters = self.counters
        publish = self._publish if self.queues or self.host.taps_active else None
        last = messages[-1]
        self._dispatching = self._more_to_dispatch = True
        try:
            for m in messages:
                if m is last:
                    self._more_to_dispatch = False
                if publish is not None:
                    publish(m)
                else:  # nobody to hand a record to: count the message, build nothing
                    counters.records += 1
                    counters.bytes += len(m.raw) + len(m.binary)
                if isinstance(m, d.Malformed):
                    counters.error("malformed")
                try:
                    handle(m)
                except Exception as exc:  # one message must never stop the reader
                    counters.error("dispatch")
                    self.limited.warning(
                        "dispatch", "%s: handling %s failed: %r", self.name, m.verb, exc
                    )
        finally:
            self._dispatching = self._more_to_dispatch = False
            self._flush()

    def _publish(self, m: d.Message) -> None:
        if not self.queues and not self.host.taps_active:
            # nobody to hand a record to: count the message, build nothing
            counters = self.counters
            counters.records += 1
            counters.bytes += len(m.raw) + len(m.binary)
            return
        payload = [m.raw, m.binary] if m.binary else [m.raw]
        tags = {"command": m.verb, "device": m.device, "handle": getattr(m, "handle", None)}
        self.publish_nowait(self.new_record(payload, tags))

    # ---- sending: coalesced into one write per dispatched read or event-loop turn
    def _send(self, text: str, now: bool) -> None:
        """Frame one text into the outgoing queue (a text that cannot be framed or sent is
        counted). If `now` (an operation's completion) the queue is written at once, unless more
        messages of the read under way are still to be handled; otherwise at the end of that
        dispatch, or of this event-loop turn."""
        codec = self.codec
        if self._transport is None or codec is None:
            self.counters.drop("not_connected")
            return
        try:
            self._out.append(codec.encode_text(text))
        except ProtocolError as exc:
            self.counters.error("encode")
            self.limited.warning("encode", "%s: not sent: %s", self.name, exc)
            return
        if now and not self._more_to_dispatch:
            self._flush()
        elif not self._dispatching and not self._flush_scheduled and self._loop is not None:
            self._flush_scheduled = True
            self._loop.call_soon(self._scheduled_flush)

    def _scheduled_flush(self) -> None:
        self._flush_scheduled = False
        self._flush()

    def _abort(self) -> None:
        if self._writer is not None:
            self._writer.transport.abort()

    def _flush(self) -> None:
        """Write the outgoing queue. It is dropped with its connection (`_disconnected`), so what
        is queued always belongs to the connection that is up."""
        transport = self._transport
        if not self._out or transport is None:
            return
        out = self._out
        self._out = []
        transport.write(out[0] if len(out) == 1 else b"".join(out))
        if transport.get_write_buffer_size() > self.settings.max_pending_bytes:
            self.counters.error("write_stalled")
            self.log.error(
                "%s: DCSS is not reading (%d bytes unsent); dropping the connection",
                self.name,
                transport.get_write_buffer_size(),
            )
            transport.abort()

    def _disconnected(self, writer: asyncio.StreamWriter) -> None:
        if self._writer is writer:
            self._writer = None
            self._transport = None
        if self._out:
            self.counters.drop("unsent_on_disconnect", len(self._out))
            self._out = []
        self.dhs.disconnected()
        self.online.clear()
        self.counters.extra["online"] = False
        writer.close()

    async def close(self) -> None:
        if self._writer is not None:
            self._disconnected(self._writer)
        self.dhs.disconnected()

    # ---- commands (daqctl cmd NAME ...)
    def cmd_operations(self) -> list[dict[str, Any]]:
        """The active operations: name, handle, arguments (session ids masked)."""
        return [
            {"name": op.name, "handle": op.handle, "args": d.mask_private(op.args_raw)}
            for op in self.dhs.operations.values()
        ]

    def cmd_devices(self) -> dict[str, dict[str, Any]]:
        """Every device DCSS registered here, with its kind and state."""
        out: dict[str, dict[str, Any]] = {}
        for name, dev in self.dhs.devices.items():
            info: dict[str, Any] = {"class": type(dev).__name__, "registered": dev.registered}
            for key in ("position", "state", "contents", "moving"):
                if hasattr(dev, key):
                    info[key] = getattr(dev, key)
            out[name] = info
        return out

    def cmd_reconnect(self) -> str:
        """Drop the connection to DCSS now (it is made again with the usual backoff)."""
        if self._writer is None:
            return "not connected"
        self._writer.transport.abort()
        return "connection dropped"


class _DcssProtocol(asyncio.Protocol):
    """The connection's bytes after the handshake: decoded and dispatched as they arrive.

    It never pauses reading (DCSS must never block on us); `closed` ends with the reason."""

    def __init__(self, receiver: DcssReceiver, codec: d.DcssCodec) -> None:
        self.receiver = receiver
        self.codec = codec
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.closed.done():
            return
        try:
            self.receiver._dispatch(self.codec.feed(data), self.codec)
        except ProtocolError as exc:
            self.closed.set_exception(exc)
            self.receiver._abort()

    def eof_received(self) -> bool:
        if not self.closed.done():
            self.closed.set_result(None)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.closed.done():
            return
        if exc is None:
            self.closed.set_result(None)
        else:
            self.closed.set_exception(exc)

    def pause_writing(self) -> None:
        pass  # the send path watches the write buffer itself (max_pending_bytes)

    def resume_writing(self) -> None:
        pass
