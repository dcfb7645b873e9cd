"""The `timestamp` receiver: a timing board's TriggerBunches from its ZeroMQ PUB (SSDAQ's 6666).

A SUB socket connects to `connect` and subscribes to everything; ZeroMQ reconnects by itself when
the board goes away and comes back (counted in extra `connects` / `disconnects`); a link ZeroMQ
gives up on (after a message over max_message_bytes) is connected again (errors `link_dropped`).
Each message is one protobuf `CTA.ACTL.CDTS.TriggerBunch`; every TriggerMessage in it becomes one record whose
payload is that TriggerMessage's bytes alone (what SSDAQ re-published on its PUB 9003). With
`format = "record"` the record is tagged with the decoded fields, with `format = "ssdaq"` only
with `format`. A message that does not decode is refused: counted under errors by reason.

`bunch_counter` is expected to count up by one per bunch: a jump forward means bunches the board
sent never arrived (a PUB drops what a slow or disconnected subscriber misses), counted as drops
`bunch_gap` (one per missing bunch); a step back means the board restarted its count (extra
`bunch_counter_resets`). `check_bunch_counter = false` turns this off.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Literal, cast

import zmq
import zmq.asyncio
from pydantic import Field, field_validator

from daqd.protocols.ssdaq_pb import PbError, TriggerBunch, decode_trigger_bunch
from daqd.receiver import ReceiverServer, ReceiverSettings
from daqd.record import Record
from daqd.sockets import link_events

_BATCH = 256  # messages taken off the socket before other tasks get a turn
_CLOSE_DRAIN_S = 2.0


class TimestampSettings(ReceiverSettings):
    connect: str = "tcp://192.168.101.102:6666"
    format: Literal["record", "ssdaq"] = "record"
    rcvhwm: int = Field(100_000, ge=0)
    max_message_bytes: int = Field(16 << 20, gt=0)
    check_bunch_counter: bool = True

    @field_validator("connect")
    @classmethod
    def _endpoint(cls, value: str) -> str:
        scheme, sep, rest = value.partition("://")
        if not sep or scheme not in ("tcp", "ipc", "inproc", "pgm", "epgm") or not rest:
            raise ValueError(f"expected a ZeroMQ endpoint such as tcp://host:6666, got {value!r}")
        return value


class TimestampReceiver(ReceiverServer):
    """SUB-connects to a timing board; one record per TriggerMessage."""

    Settings = TimestampSettings
    settings: TimestampSettings

    def __init__(self, settings: TimestampSettings, host: Any) -> None:
        super().__init__(settings, host)
        self.bunches = 0
        self.triggers = 0
        self.empty_bunches = 0
        self.last_bunch: int | None = None
        self.bunch_counter_resets = 0
        self.connects = 0
        self.disconnects = 0
        self.connected = False
        self._sock: zmq.asyncio.Socket | None = None
        self._monitor: zmq.asyncio.Socket | None = None
        self._ssdaq_tags: dict[str, Any] = {"format": "ssdaq"}
        self.refresh_extra()

    async def setup(self) -> None:
        s = self.settings
        sock = self.host.zmq_context.socket(zmq.SUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, s.rcvhwm)
        sock.setsockopt(zmq.MAXMSGSIZE, s.max_message_bytes)
        sock.setsockopt(zmq.SUBSCRIBE, b"")
        self._monitor = sock.get_monitor_socket(
            zmq.EVENT_CONNECTED
            | zmq.EVENT_DISCONNECTED
            | zmq.EVENT_CONNECT_RETRIED
            | zmq.EVENT_CONNECT_DELAYED
        )
        self._sock = sock
        try:
            sock.connect(s.connect)
        except zmq.ZMQError as exc:
            await self.close()
            raise ValueError(f"cannot connect to {s.connect!r}: {exc}") from exc
        self.addresses["connect"] = s.connect

    async def ct_receive(self) -> None:
        """Take messages as they come, waiting on ZeroMQ's descriptor (cheaper than pyzmq's
        asyncio poll per wake-up)."""
        assert self._sock is not None
        sync: zmq.Socket[bytes] = zmq.Socket.shadow(self._sock.underlying)
        ready = asyncio.Event()
        fd = sync.fileno()
        loop = asyncio.get_running_loop()
        loop.add_reader(fd, ready.set)
        try:
            while True:
                records: list[Record] = []
                for _ in range(_BATCH):
                    try:
                        frames = sync.recv_multipart(zmq.NOBLOCK, copy=True)
                    except zmq.Again:
                        break
                    self._handle(frames, records)
                else:
                    if records:
                        await self.publish_many(records)
                    await asyncio.sleep(0)
                    continue
                if records:
                    await self.publish_many(records)
                ready.clear()
                if not cast(int, sync.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
                    await ready.wait()
        finally:
            loop.remove_reader(fd)

    async def ct_watch(self) -> None:
        """Follow the connection; a link ZeroMQ gave up on (a message over max_message_bytes)
        is connected again, and counted (errors `link_dropped`)."""
        assert self._monitor is not None and self._sock is not None
        endpoint = self.settings.connect

        def given_up() -> None:
            self.counters.error("link_dropped")
            self.limited.warning(
                "link_dropped",
                "%s: ZeroMQ dropped the link to %s and does not retry (a message over "
                "max_message_bytes?): connecting again",
                self.name,
                endpoint,
            )

        async for event in link_events(self._sock, self._monitor, endpoint, given_up):
            if event == zmq.EVENT_CONNECTED:
                self.connects += 1
                self.connected = True
                self.log.info("%s: connected to %s", self.name, endpoint)
            elif event == zmq.EVENT_DISCONNECTED:
                self.disconnects += 1
                self.connected = False
                self.limited.warning(
                    "disconnected",
                    "%s: %s went away; ZeroMQ reconnects when it is back",
                    self.name,
                    endpoint,
                )

    def _handle(self, frames: list[bytes], records: list[Record]) -> None:
        if len(frames) != 1:
            self._bad("multipart", f"a message of {len(frames)} frames, expected 1")
            return
        data = frames[0]
        try:
            bunch = decode_trigger_bunch(data)
        except PbError as exc:
            self._bad(exc.reason, str(exc))
            return
        except Exception as exc:  # a codec bug must cost one message, never the receiver
            self._bad("decode_failure", repr(exc))
            return
        self.bunches += 1
        self._check_counter(bunch)
        if not bunch.triggers:
            self.empty_bunches += 1
            return
        now = time.time_ns()
        self.triggers += len(bunch.triggers)
        ssdaq = self.settings.format == "ssdaq"
        for msg in bunch.triggers:
            tags: dict[str, Any]
            if ssdaq:
                tags = self._ssdaq_tags
            else:
                tags = msg.tags()
                if bunch.bunch_counter is not None:
                    tags["bunch_counter"] = bunch.bunch_counter
                if bunch.telescope is not None:
                    tags["bunch_telescope"] = bunch.telescope
                if bunch.arrival_time is not None:
                    tags["arrival_time"] = bunch.arrival_time.as_dict()
            records.append(self.new_record((msg.raw,), tags, time_ns=now))

    def _check_counter(self, bunch: TriggerBunch) -> None:
        counter = bunch.bunch_counter
        if not self.settings.check_bunch_counter or counter is None:
            return
        last = self.last_bunch
        self.last_bunch = counter
        if last is None or counter == last + 1:
            return
        if counter > last + 1:
            missing = counter - last - 1
            self.counters.drop("bunch_gap", missing)
            self.limited.warning(
                "bunch_gap",
                "%s: bunch_counter jumped from %d to %d: %d bunches never arrived",
                self.name,
                last,
                counter,
                missing,
            )
        else:
            self.bunch_counter_resets += 1
            self.limited.info(
                "bunch_reset",
                "%s: bunch_counter went back from %d to %d: the board restarted its count",
                self.name,
                last,
                counter,
            )

    def _bad(self, reason: str, message: str) -> None:
        self.counters.error(reason)  # refused input: the run is TAINTED
        self.limited.warning(reason, "%s: bad TriggerBunch: %s", self.name, message)

    async def close(self) -> None:
        sock, monitor = self._sock, self._monitor
        self._sock = self._monitor = None
        if sock is None:
            return
        try:
            # what ZeroMQ already took off the wire is handled before closing, not lost
            sync: zmq.Socket[bytes] = zmq.Socket.shadow(sock.underlying)
            deadline = time.monotonic() + _CLOSE_DRAIN_S
            records: list[Record] = []
            while time.monotonic() < deadline:
                try:
                    frames = sync.recv_multipart(zmq.NOBLOCK, copy=True)
                except zmq.Again:
                    break
                self._handle(frames, records)
            if records:
                self.publish_many_nowait(records)
        finally:
            try:
                sock.disable_monitor()
            except zmq.ZMQError:
                pass
            if monitor is not None:
                monitor.close(linger=0)
            sock.close(linger=0)
            self.connected = False

    # ----- status and commands ---------------------------------------------------------------
    def refresh_extra(self) -> None:
        extra = self.counters.extra
        extra["bunches"] = self.bunches
        extra["triggers"] = self.triggers
        extra["empty_bunches"] = self.empty_bunches
        extra["last_bunch_counter"] = self.last_bunch
        extra["bunch_counter_resets"] = self.bunch_counter_resets
        extra["connected"] = self.connected
        extra["connects"] = self.connects
        extra["disconnects"] = self.disconnects

    def cmd_stats(self) -> dict[str, Any]:
        """Bunches, triggers, the connection, and refused messages by reason."""
        self.refresh_extra()
        return {
            **self.counters.extra,
            "errors": dict(self.counters.errors),
            "drops": dict(self.counters.drops),
        }
