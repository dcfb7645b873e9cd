"""`[daemon] monitor_push`: daqd's receivers' rates as SSDAQ's chec.MonitorData, once a second.

SSDAQ's receivers each PUSH-connect to one monitor PULL (tcp://127.0.0.101:10002, hard-coded)
and send a MonitorData every second, which SSDAQ's MonitorReceiver re-publishes for
chec-daq-dash. With `monitor_push = "tcp://host:port"`, daqd sends the same for each of its
receivers, from the host's once-a-second sampling: name = the receiver's name, pid = daqd's,
recv_data = whether it published anything since the last message, data_rate = records it
published per second over that interval; time = now (UTC, sec and nsec). As in SSDAQ, the first
tick only starts the clock. What counts is records published (SSDAQ counted datagrams or messages
per receiver; for most receivers one record is one of those).

A PUSH socket holds messages while nobody takes them, up to SNDHWM (60: a minute of one
receiver); one that does not fit then is not sent and counted in `dropped` (status:
`monitor_push`), never waited for: the host's loop must not stall on a monitor.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable
from typing import Any

import zmq
import zmq.asyncio

from daqd.logs import LimitedLogger
from daqd.protocols.ssdaq_pb import MonitorData, ReceiverRate, encode_monitor_data
from daqd.receiver import ReceiverServer

SNDHWM = 60
log = logging.getLogger("daqd.ssdaq_monitor")


class MonitorPush:
    """A PUSH socket connected to `endpoint`; `tick()` sends one MonitorData per receiver."""

    def __init__(self, context: zmq.asyncio.Context, endpoint: str) -> None:
        self.endpoint = endpoint
        self.sent = 0
        self.dropped = 0
        self.pid = os.getpid()
        self._limited = LimitedLogger(log)
        self._last: dict[str, tuple[float, int]] = {}  # receiver -> (monotonic time, records)
        self._owner = context.socket(zmq.PUSH)  # closed with the context, if not before
        self._owner.setsockopt(zmq.LINGER, 0)
        self._owner.setsockopt(zmq.SNDHWM, SNDHWM)
        self._owner.connect(endpoint)
        # sent through a plain socket over the same one: a non-blocking send either goes or not
        self._sock: zmq.Socket[bytes] = zmq.Socket.shadow(self._owner.underlying)

    def tick(self, receivers: Iterable[ReceiverServer]) -> None:
        now = time.monotonic()
        wall = time.time_ns()
        sec, nsec = divmod(wall, 10**9)
        last = self._last
        for rec in receivers:
            records = rec.counters.records
            before = last.get(rec.name)
            last[rec.name] = (now, records)
            if before is None or now <= before[0]:
                continue
            delta = records - before[1]
            rate = ReceiverRate(
                name=rec.name,
                pid=self.pid,
                recv_data=delta > 0,
                data_rate=delta / (now - before[0]),
            )
            message = encode_monitor_data(MonitorData(sec=sec, nsec=nsec, receiver=rate))
            try:
                self._sock.send(message, zmq.NOBLOCK)
            except zmq.Again:
                self.dropped += 1
                self._limited.warning(
                    "monitor_push",
                    "monitor_push: %s takes no MonitorData (%d not sent so far)",
                    self.endpoint,
                    self.dropped,
                )
            else:
                self.sent += 1

    def status(self) -> dict[str, Any]:
        return {"endpoint": self.endpoint, "sent": self.sent, "dropped": self.dropped}

    def close(self) -> None:
        self._owner.close(linger=0)
