"""CMDP for the satellite: daqd's log lines and metrics, published to Constellation listeners.

An XPUB socket (XPUB_VERBOSER, so every subscription is seen) publishes `LOG/<LEVEL>/<COMPONENT>`
for each log line of the `daqd` loggers and `STAT/<METRIC>` once a second, but only what some
subscriber's prefix matches, so nothing is encoded for nobody. A subscription to `LOG?` or `STAT?`
is answered by the list of log components or metrics. Log lines from other threads are handed to
the loop thread (ZeroMQ sockets are not thread-safe); a line that cannot be sent is counted, never
logged (that would loop).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from typing import TYPE_CHECKING, Any

import msgpack
import zmq
import zmq.asyncio

from daqd.protocols import cmdp

if TYPE_CHECKING:
    from daqd.host import Host

METRICS_INTERVAL_S = 1.0
LOG_ROOT = "daqd"  # every daqd logger is below it


def _totals(host: Host) -> dict[str, int]:
    """The totals the metrics report, over every receiver and publisher."""
    rx = [r.counters for r in host.receivers.values()]
    tx = [p.counters for p in host.publishers.values()]
    return {
        "RX_RECORDS": sum(c.records for c in rx),
        "RX_BYTES": sum(c.bytes for c in rx),
        "TX_RECORDS": sum(c.records for c in tx),
        "TX_BYTES": sum(c.bytes for c in tx),
        "DROPPED": sum(c.dropped for c in rx) + sum(c.dropped for c in tx),
    }


def _run_id(host: Host) -> str:
    run = host.run or host.last_run
    return run.run_id if run else ""


# metric -> (unit, description)
METRICS: dict[str, tuple[str, str]] = {
    "STATE": ("", "state code of the run state machine"),
    "RUN_ID": ("", "the current run id, or the last one"),
    "RX_RECORDS": ("records", "records received by all receivers"),
    "RX_BYTES": ("B", "payload bytes received by all receivers"),
    "TX_RECORDS": ("records", "records delivered by all publishers"),
    "TX_BYTES": ("B", "bytes delivered by all publishers"),
    "DROPPED": ("records", "records dropped by receivers and publishers, all reasons"),
}


def metric_values(host: Host) -> dict[str, Any]:
    return {"STATE": host.state.value, "RUN_ID": _run_id(host), **_totals(host)}


def level_name(levelno: int) -> str:
    """A logging level as Constellation names it (ERROR is CRITICAL there)."""
    if levelno >= logging.ERROR:
        return "CRITICAL"
    if levelno >= logging.WARNING:
        return "WARNING"
    if levelno >= logging.INFO:
        return "INFO"
    if levelno >= logging.DEBUG:
        return "DEBUG"
    return "TRACE"


def component(logger_name: str) -> str:
    """`daqd.receiver.ss` -> `RECEIVER.SS`; the `daqd` logger itself -> `DAQD`."""
    rest = logger_name.removeprefix(LOG_ROOT + ".")
    return (rest if rest != LOG_ROOT else "DAQD").upper()


class _Handler(logging.Handler):
    def __init__(self, owner: MonitoringPublisher) -> None:
        super().__init__(logging.NOTSET)
        self.owner = owner

    def emit(self, record: logging.LogRecord) -> None:
        self.owner.on_log(record)


class MonitoringPublisher:
    def __init__(self, host: Host, sender: str, counters: dict[str, int]) -> None:
        self.host = host
        self.sender = sender
        self.counters = counters
        self.port = 0
        self.subscriptions: dict[bytes, int] = {}
        self._prefixes: tuple[bytes, ...] = ()  # read by other threads' log calls: replaced whole
        self.sent: dict[str, int] = {"LOG": 0, "STAT": 0, "NOTIFICATION": 0}
        self._sock: zmq.asyncio.Socket | None = None
        self._now: zmq.Socket[bytes] | None = None
        self._handler = _Handler(self)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._sending = False

    def start(self, port: int = 0) -> None:
        sock = self.host.zmq_context.socket(zmq.XPUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.XPUB_VERBOSER, 1)
        sock.setsockopt(zmq.SNDHWM, 10000)
        sock.bind(f"tcp://*:{port}")
        self._sock = sock
        self._now = zmq.Socket.shadow(sock.underlying)
        self.port = int(sock.getsockopt_string(zmq.LAST_ENDPOINT).rsplit(":", 1)[1])
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        logging.getLogger(LOG_ROOT).addHandler(self._handler)
        self._tasks = [
            asyncio.create_task(self._read_subscriptions(), name="cmdp-subscriptions"),
            asyncio.create_task(self._metrics_forever(), name="cmdp-metrics"),
        ]

    async def stop(self) -> None:
        logging.getLogger(LOG_ROOT).removeHandler(self._handler)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._now = None
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None

    def wants(self, topic: str) -> bool:
        raw = topic.encode()
        return any(raw.startswith(sub) for sub in self._prefixes)

    # ----- subscriptions ---------------------------------------------------------------------
    async def _read_subscriptions(self) -> None:
        assert self._sock is not None
        while True:
            msg = await self._sock.recv()
            if not msg or msg[0] not in (0, 1):
                continue
            topic = msg[1:].upper()
            if msg[0] == 1:
                self.subscriptions[topic] = self.subscriptions.get(topic, 0) + 1
                if topic in (b"LOG?", b"STAT?"):
                    self._notify(topic.decode())
            elif self.subscriptions.get(topic, 0) <= 1:
                self.subscriptions.pop(topic, None)
            else:
                self.subscriptions[topic] -= 1
            self._prefixes = tuple(self.subscriptions)

    def _notify(self, kind: str) -> None:
        if kind == "STAT?":
            topics = {name: desc for name, (_, desc) in METRICS.items()}
        else:
            loggers = logging.Logger.manager.loggerDict
            names = [n for n in loggers if n == LOG_ROOT or n.startswith(LOG_ROOT + ".")]
            topics = {component(n): f"logger {n}" for n in sorted(names)}
        self._send(cmdp.Notification(self.sender, kind, topics), "NOTIFICATION")

    # ----- logs ------------------------------------------------------------------------------
    def on_log(self, record: logging.LogRecord) -> None:
        """From the handler, in any thread."""
        if self._sending:  # a line logged while sending one: never loop
            return
        topic = f"LOG/{level_name(record.levelno)}/{component(record.name)}"
        if not self.wants(topic):
            return
        try:
            text = record.getMessage()
        except Exception:  # a bad format string in someone's log call
            text = str(record.msg)
        if record.exc_info and record.exc_info[1] is not None:
            text += f" ({record.exc_info[1]!r})"
        tags = {
            "filename": record.filename,
            "lineno": record.lineno,
            "funcName": record.funcName,
            "thread": record.thread or 0,
            "threadName": record.threadName or "",
        }
        stamp = msgpack.Timestamp.from_unix_nano(int(record.created * 1e9))
        msg = cmdp.Log(self.sender, topic.split("/")[1], component(record.name), text, tags, stamp)
        if threading.get_ident() == self._loop_thread:
            self._send(msg, "LOG")
        elif self._loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closing
                self._loop.call_soon_threadsafe(self._send, msg, "LOG")

    # ----- metrics ---------------------------------------------------------------------------
    async def _metrics_forever(self) -> None:
        while True:
            await asyncio.sleep(METRICS_INTERVAL_S)
            self.publish_metrics()

    def publish_metrics(self) -> None:
        wanted = [name for name in METRICS if self.wants(f"STAT/{name}")]
        if not wanted:
            return
        now = msgpack.Timestamp.from_unix_nano(time.time_ns())
        values = metric_values(self.host)
        for name in wanted:
            msg = cmdp.Stat(self.sender, name, values[name], METRICS[name][0], {}, now)
            self._send(msg, "STAT")

    def _send(self, msg: cmdp.Message, kind: str) -> None:
        if self._now is None:
            return
        self._sending = True
        try:
            self._now.send_multipart(cmdp.encode(msg), flags=zmq.NOBLOCK)
            self.sent[kind] += 1
        except zmq.ZMQError:
            self.counters["cmdp_send"] = self.counters.get("cmdp_send", 0) + 1
        finally:
            self._sending = False
