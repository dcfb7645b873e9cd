"""The `monitor` receiver: SSDAQ's monitoring stream, chec.MonitorData over ZeroMQ PUSH/PULL.

SSDAQ's receivers each PUSH-connect to one PULL (SSDAQ's MonitorReceiver, port 10002) and send a
MonitorData every second: the receiver's name, pid, whether anything arrived, and its rate. This
receiver binds that PULL (`listen`, a ZeroMQ endpoint) and makes each message one record: its
payload the MonitorData as sent (what SSDAQ re-published on PUB 9005 for chec-daq-dash), its tags
the decoded fields (receiver, pid, recv_data, data_rate, time {sec, nsec}, from_tm when set).
The last rate of each sender name is kept in extra["senders"] for `daqctl status`. A message
that does not decode, or has more than one frame, is refused: counted under errors by reason.
What ZeroMQ holds when the receiver stops is published, not lost.

daqd's own receivers can send their rates the same way: `[daemon] monitor_push` (see
daqd/ssdaq_monitor.py).
"""

from __future__ import annotations

from typing import Any

import zmq
import zmq.asyncio
from pydantic import Field, field_validator

from daqd.hostport import zmq_bindable
from daqd.protocols.ssdaq_pb import PbError, decode_monitor_data
from daqd.receiver import ReceiverServer, ReceiverSettings
from daqd.record import Record

_MAX_SENDERS = 256  # names kept in extra["senders"]; the oldest goes first
_CLOSE_DRAIN_MAX = 100_000  # messages taken at close; rcvhwm bounds what ZeroMQ holds anyway


def zmq_endpoint(value: str) -> str:
    scheme, sep, rest = value.partition("://")
    if not sep or scheme not in ("tcp", "ipc", "inproc") or not rest:
        raise ValueError(f"expected a ZeroMQ endpoint such as tcp://0.0.0.0:10002, got {value!r}")
    return value


class MonitorSettings(ReceiverSettings):
    listen: str = "tcp://0.0.0.0:10002"
    rcvhwm: int = Field(10_000, ge=0)
    max_message_bytes: int = Field(1 << 20, gt=0)

    _endpoint = field_validator("listen")(zmq_endpoint)


class MonitorReceiver(ReceiverServer):
    """PULL-binds `listen`; one record per MonitorData."""

    Settings = MonitorSettings
    settings: MonitorSettings

    def __init__(self, settings: MonitorSettings, host: Any) -> None:
        super().__init__(settings, host)
        self.senders: dict[str, float | None] = {}
        self._sock: zmq.asyncio.Socket | None = None
        self.refresh_extra()

    async def setup(self) -> None:
        s = self.settings
        sock = self.host.zmq_context.socket(zmq.PULL)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, s.rcvhwm)
        sock.setsockopt(zmq.MAXMSGSIZE, s.max_message_bytes)
        try:
            sock.bind(zmq_bindable(s.listen))
        except zmq.ZMQError as exc:
            sock.close(linger=0)
            raise ValueError(f"cannot bind {s.listen!r}: {exc}") from exc
        self._sock = sock
        self.addresses["listen"] = sock.getsockopt_string(zmq.LAST_ENDPOINT)

    async def ct_receive(self) -> None:
        assert self._sock is not None
        sock = self._sock
        while True:
            record = self._record(await sock.recv_multipart())
            if record is not None:
                await self.publish(record)

    def _record(self, frames: list[bytes]) -> Record | None:
        """The record of one message, or None (refused, and counted)."""
        if len(frames) != 1:
            self._bad("multipart", f"a message of {len(frames)} frames, expected 1")
            return None
        try:
            mon = decode_monitor_data(frames[0])
        except PbError as exc:
            self._bad(exc.reason, str(exc))
            return None
        if mon.receiver is not None:
            name = mon.receiver.name
            if name not in self.senders and len(self.senders) >= _MAX_SENDERS:
                del self.senders[next(iter(self.senders))]
            self.senders[name] = mon.receiver.data_rate
        return self.new_record((frames[0],), mon.tags())

    def _bad(self, reason: str, message: str) -> None:
        self.counters.error(reason)  # refused input: the run is TAINTED
        self.limited.warning(reason, "%s: bad MonitorData: %s", self.name, message)

    async def close(self) -> None:
        """What ZeroMQ already took off the wire is published before closing, not lost."""
        sock, self._sock = self._sock, None
        if sock is None:
            return
        try:
            sync: zmq.Socket[bytes] = zmq.Socket.shadow(sock.underlying)
            records: list[Record] = []
            while len(records) < _CLOSE_DRAIN_MAX:
                try:
                    record = self._record(sync.recv_multipart(zmq.NOBLOCK))
                except zmq.Again:
                    break
                if record is not None:
                    records.append(record)
            if records:
                self.publish_many_nowait(records)
        finally:
            sock.close(linger=0)

    # ----- status and commands ---------------------------------------------------------------
    def refresh_extra(self) -> None:
        self.counters.extra["senders"] = dict(self.senders)

    def cmd_stats(self) -> dict[str, Any]:
        """The last rate of each sender, and refused messages by reason."""
        self.refresh_extra()
        return {
            **self.counters.extra,
            "errors": dict(self.counters.errors),
            "drops": dict(self.counters.drops),
        }
