"""DaqdLogHandler: a `logging.Handler` that sends records to a daqd `log` receiver.

    import logging
    from daqd.loghandler import DaqdLogHandler
    logging.getLogger().addHandler(DaqdLogHandler("camera-server", 10001))

Each record becomes one chec.LogData (severity = the record's level, sender = the logger's name,
message = the formatted record, time = when it was made, in ns, pid, source file and line) in
the length framing (daqd.protocols.logstream). `emit` only formats the record and puts it on a
bounded queue: it never waits for the network. A thread of the handler's own connects, sends,
and on a broken or refused connection connects again (backing off from 0.1 s to 5 s), sending
the record it had in hand first. Before each record it looks whether the receiver has closed
the connection (a receiver that restarted), so as not to write into a dead one. What it cannot send is counted in `dropped` by reason:
`queue_full` (the queue was full: the receiver is away or slower than the logging) and `closed`
(still queued when `close()` gave up waiting, after `close_timeout_s`). `sent` counts records
written into a connection. As with any TCP sender without acknowledgements, what the kernel took
just before a connection breaks can still be lost there: the receiver counts a record cut short.
"""

from __future__ import annotations

import logging
import os
import queue
import select
import socket
import threading
import time

from daqd.protocols.logstream import frame
from daqd.protocols.ssdaq_pb import LogData, encode_log_data

_BACKOFF_FIRST_S = 0.1
_BACKOFF_MAX_S = 5.0
_STOP = b""  # queued by close(): the thread ends when it reaches it


class DaqdLogHandler(logging.Handler):
    """Send log records to a daqd `log` receiver at host:port, without blocking the caller."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        level: int = logging.NOTSET,
        queue_size: int = 10_000,
        system_type: int = 0,
        connect_timeout_s: float = 5.0,
        close_timeout_s: float = 5.0,
    ) -> None:
        super().__init__(level)
        self.address = (host, port)
        self.system_type = system_type
        self.connect_timeout_s = connect_timeout_s
        self.close_timeout_s = close_timeout_s
        self.sent = 0
        self.connects = 0
        self.dropped: dict[str, int] = {}
        self._queue: queue.Queue[bytes] = queue.Queue(queue_size)
        self._sock: socket.socket | None = None
        self._closing = threading.Event()
        self._count_lock = threading.Lock()
        self._thread = threading.Thread(
            target=self._run, name=f"daqd-log-{host}:{port}", daemon=True
        )
        self._thread.start()

    def _drop(self, reason: str, n: int = 1) -> None:
        with self._count_lock:
            self.dropped[reason] = self.dropped.get(reason, 0) + n

    def emit(self, record: logging.LogRecord) -> None:
        try:
            log = LogData(
                system_type=self.system_type,
                severity=record.levelno,
                sender=record.name,
                message=self.format(record),
                time=int(record.created * 1e9),
                pid=record.process or os.getpid(),
                source_file=record.pathname,
                line=record.lineno,
            )
            message = frame(encode_log_data(log))
        except Exception:
            self.handleError(record)
            return
        if self._closing.is_set():
            self._drop("closed")
            return
        try:
            self._queue.put_nowait(message)
        except queue.Full:
            self._drop("queue_full")

    # ----- the sending thread -----------------------------------------------------------------
    def _run(self) -> None:
        backoff = _BACKOFF_FIRST_S
        message: bytes | None = None
        while not self._closing.is_set():
            if message is None:
                message = self._queue.get()
                if message == _STOP:
                    break
            if self._sock is not None and select.select([self._sock], [], [], 0)[0]:
                self._disconnect()  # the receiver sends nothing: readable means it closed
            if self._sock is None:
                try:
                    self._sock = socket.create_connection(self.address, self.connect_timeout_s)
                except OSError:
                    if self._closing.wait(backoff):
                        break
                    backoff = min(backoff * 2, _BACKOFF_MAX_S)
                    continue
                self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self.connects += 1
                backoff = _BACKOFF_FIRST_S
            try:
                self._sock.sendall(message)
            except OSError:
                self._disconnect()
                continue  # the same message again, on a new connection
            self.sent += 1
            message = None
        self._disconnect()
        left = 1 if message not in (None, _STOP) else 0
        while True:  # what close() did not wait for
            try:
                if self._queue.get_nowait() != _STOP:
                    left += 1
            except queue.Empty:
                break
        if left:
            self._drop("closed", left)

    def _disconnect(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def close(self) -> None:
        """Send what is queued (waiting up to close_timeout_s), then stop; what is left then is
        counted as dropped `closed`."""
        if not self._closing.is_set():
            deadline = time.monotonic() + self.close_timeout_s
            try:
                self._queue.put(_STOP, timeout=self.close_timeout_s)
            except queue.Full:
                pass
            self._thread.join(max(0.0, deadline - time.monotonic()))
            self._closing.set()  # stop waiting for a receiver that is not there
            self._thread.join(self.connect_timeout_s + 1.0)
        super().close()
