"""The receivers' sockets: ReceiverSockets, the part of ReceiverServer (daqd/receiver.py) that
opens and closes them. UDP with a large SO_RCVBUF and the kernel's drop count, the datagram
protocol, the drain of a UDP socket at shutdown; TCP servers and clients; ZeroMQ sockets."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from daqd.deadline import Deadline
from daqd.hostport import format_hostport, parse_hostport, zmq_bindable
from daqd.logs import LimitedLogger
from daqd.monitor import Counters

if TYPE_CHECKING:
    from daqd.host import Host
    from daqd.publisher import PublisherQueue

StreamHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
OnDatagram = Callable[[bytes, tuple[str, int]], None]

# Linux's SO_RCVBUFFORCE, which Python's socket module does not export
_SO_RCVBUFFORCE = 33 if sys.platform.startswith("linux") else None


def kernel_udp_drops(sock: socket.socket) -> int | None:
    """The kernel's drop count for this UDP socket (/proc/net/udp 'drops' column), if Linux says."""
    try:
        inode = str(__import__("os").fstat(sock.fileno()).st_ino)
        family = "udp6" if sock.family == socket.AF_INET6 else "udp"
        with open(f"/proc/net/{family}") as f:
            next(f)
            for line in f:
                fields = line.split()
                if len(fields) >= 13 and fields[9] == inode:
                    return int(fields[-1])
    except (OSError, ValueError, StopIteration):
        return None
    return None


#: Datagrams one wake-up reads at most before other callbacks get their turn
READ_BATCH = 256


class DatagramReader:
    """Reads one UDP socket from the event loop and hands each datagram to `callback`.

    Woken by the socket, it reads every datagram queued (up to READ_BATCH), then, with
    `coalesce_s` > 0, stops watching the socket for that long: what arrives meanwhile waits in the
    kernel's buffer and is read in the next batch. At high rates that is one wake-up per batch
    instead of one per datagram, at most `coalesce_s` of extra latency; a datagram that comes
    after a quiet spell is read at once. (uvloop's datagram transport can neither pause reading
    nor batch beyond what one poll finds.) stop() stops reading and leaves the socket open, with
    what its buffer holds, for the drain at shutdown."""

    __slots__ = ("_fd", "_loop", "_reading", "_timer", "callback", "coalesce_s", "receiver", "sock")

    def __init__(
        self,
        receiver: ReceiverSockets,
        sock: socket.socket,
        callback: OnDatagram,
        coalesce_s: float,
    ) -> None:
        self.receiver = receiver
        self.sock = sock
        self.callback = callback
        self.coalesce_s = coalesce_s
        self._loop = asyncio.get_running_loop()
        self._fd = sock.fileno()
        self._reading = False
        self._timer: asyncio.TimerHandle | None = None

    def start(self) -> None:
        if not self._reading:
            self._reading = True
            self._loop.add_reader(self._fd, self._readable)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._reading:
            self._reading = False
            self._loop.remove_reader(self._fd)

    def _resume(self) -> None:
        self._timer = None
        self.start()

    def _readable(self) -> None:
        recv = self.sock.recvfrom
        callback = self.callback
        for _ in range(READ_BATCH):
            try:
                data, addr = recv(65536)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:  # an ICMP error queued on the socket, and the like
                self._failed("socket", "socket error", exc)
                break
            try:
                callback(data, addr)
            except Exception as exc:  # one bad datagram must never take the receiver down
                self.receiver.counters.drop("handler_error")
                self._failed("datagram_handler", f"datagram from {addr} failed", exc)
        else:
            return  # more may be queued: read on at the next loop turn
        if self.coalesce_s > 0 and self._reading:
            self._reading = False
            self._loop.remove_reader(self._fd)
            self._timer = self._loop.call_later(self.coalesce_s, self._resume)

    def _failed(self, reason: str, what: str, exc: Exception) -> None:
        rx = self.receiver
        rx.counters.error(reason)
        rx.limited.warning(reason, "%s: %s: %r", rx.name, what, exc)


class ReceiverSockets:
    """The sockets of a receiver, opened by its setup() with the setup_* helpers and closed by
    the base when it stops or restarts. ReceiverServer builds on this class; what it uses of the
    receiver (name, log, counters, queues, ...) is set by ReceiverServer.__init__."""

    name: str
    host: Host
    log: logging.Logger
    limited: LimitedLogger
    counters: Counters
    addresses: dict[str, str]
    queues: list[PublisherQueue]

    if TYPE_CHECKING:  # ReceiverServer's hook, which a receiver may override

        def hand_over(self) -> None: ...

    def __init__(self) -> None:
        self._udp: list[DatagramReader] = []
        self._servers: list[asyncio.Server] = []
        self._writers: set[asyncio.StreamWriter] = set()
        self._client_tasks: set[asyncio.Task[None]] = set()
        self._zmq: list[zmq.asyncio.Socket] = []

    # ----- opening ---------------------------------------------------------------------------
    async def setup_udp(
        self,
        listen: str,
        on_datagram: OnDatagram,
        *,
        rcvbuf_bytes: int = 8 << 20,
        coalesce_s: float = 0.0,
        key: str = "listen",
    ) -> socket.socket:
        """Bind a UDP socket with a large SO_RCVBUF; each datagram calls on_datagram(data, addr),
        read in batches `coalesce_s` apart at most (see DatagramReader). Returns the socket (for
        sendto; the base closes it)."""
        host, port = parse_hostport(listen)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            try:  # with CAP_NET_ADMIN Linux lets us past net.core.rmem_max; else we are capped
                if _SO_RCVBUFFORCE is None:
                    raise OSError
                sock.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, rcvbuf_bytes)
            except OSError:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf_bytes)
            sock.bind((host, port))
        except OSError:
            sock.close()
            raise
        sock.setblocking(False)
        granted = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        # Linux reports twice the usable size and caps the request at net.core.rmem_max.
        level = logging.INFO if granted >= rcvbuf_bytes else logging.WARNING
        self.log.log(
            level,
            "UDP %s: SO_RCVBUF asked %d bytes, kernel granted %d%s",
            format_hostport(sock.getsockname()),
            rcvbuf_bytes,
            granted,
            "" if granted >= rcvbuf_bytes else " (raise net.core.rmem_max for more headroom)",
        )
        reader = DatagramReader(self, sock, on_datagram, coalesce_s)
        reader.start()
        self._udp.append(reader)
        self.addresses[key] = format_hostport(sock.getsockname())
        self.counters.extra["rcvbuf_bytes"] = granted
        return sock

    async def setup_stream(
        self,
        handler: StreamHandler,
        *,
        listen: str | None = None,
        connect: str | None = None,
        key: str | None = None,
        limit: int = 1 << 16,
        max_connections: int = 256,
    ) -> None:
        """A TCP server (`listen`: handler per client) or one client connection (`connect`).

        A handler that raises is counted and logged and closes only its own connection. A server
        holds at most `max_connections` clients: one more is closed at once, counted as error
        "too_many_connections" (what a client holds is bounded by the peer, not by us).
        """
        if (listen is None) == (connect is None):
            raise ValueError("setup_stream needs exactly one of listen= or connect=")
        if listen is not None:
            host, port = parse_hostport(listen)

            def accept(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> Awaitable[None]:
                if len(self._client_tasks) >= max_connections:
                    return self._refuse_client(w, max_connections)
                return self._run_client(handler, r, w)

            server = await asyncio.start_server(accept, host, port, limit=limit)
            self._servers.append(server)
            self.addresses[key or "listen"] = format_hostport(server.sockets[0].getsockname())
        else:
            assert connect is not None
            reader, writer = await self.connect_stream(connect, key=key or "connect")
            task = asyncio.create_task(self._run_client(handler, reader, writer))
            self._client_tasks.add(task)
            task.add_done_callback(self._client_tasks.discard)

    async def _refuse_client(self, writer: asyncio.StreamWriter, most: int) -> None:
        self.counters.error("too_many_connections")
        self.limited.warning(
            "too_many_connections",
            "%s: refused a connection from %s: %d clients already (max_connections)",
            self.name,
            writer.get_extra_info("peername"),
            most,
        )
        writer.close()

    async def connect_stream(
        self, connect: str, *, key: str = "connect"
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Dial `host:port` with TCP keepalive on; the writer is closed with the receiver."""
        host, port = parse_hostport(connect)
        reader, writer = await asyncio.open_connection(host, port)
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        # a receiver that reconnects in a loop leaves closed writers behind: forget those here
        self._writers = {w for w in self._writers if not w.is_closing()}
        self._writers.add(writer)
        self.addresses[key] = connect
        return reader, writer

    async def _run_client(
        self, handler: StreamHandler, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self._writers.add(writer)
        task = asyncio.current_task()
        if task is not None:
            self._client_tasks.add(task)
        peer = writer.get_extra_info("peername")
        try:
            await handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError) as exc:
            self.log.debug("connection %s ended: %s", peer, exc or type(exc).__name__)
        except asyncio.CancelledError:
            # Only the receiver's stop cancels a client, and nothing awaits the task for its
            # outcome: end it normally, because Python 3.11's start_server callback calls
            # exception() on a cancelled task and logs that as an ERROR with a traceback.
            return
        except Exception as exc:
            self.counters.error("connection")
            self.limited.warning("conn", "%s: connection %s failed: %r", self.name, peer, exc)
        finally:
            self._writers.discard(writer)
            if task is not None:
                self._client_tasks.discard(task)
            writer.close()

    def setup_zmq(
        self, socket_type: int, endpoint: str, *, bind: bool, key: str = "endpoint"
    ) -> zmq.asyncio.Socket:
        """A ZeroMQ socket bound or connected on `endpoint` (port 0 binds a free port)."""
        sock = self.host.zmq_context.socket(socket_type)
        sock.setsockopt(zmq.LINGER, 0)
        if bind:
            sock.bind(zmq_bindable(endpoint))
            self.addresses[key] = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        else:
            sock.connect(endpoint)
            self.addresses[key] = endpoint
        self._zmq.append(sock)
        return sock

    # ----- UDP at shutdown and restart -------------------------------------------------------
    def _sample_kernel_drops(self) -> None:
        if self._udp or self._kernel_base:
            now = sum(kernel_udp_drops(reader.sock) or 0 for reader in self._udp)
            self.counters.drops["kernel"] = self._kernel_base + now

    # kernel drops of UDP sockets already closed (restarts), so the counter never goes back
    _kernel_base = 0

    _held_udp: list[DatagramReader] = []

    def stop_input(self) -> None:
        """Stop the loop reading this receiver's UDP sockets, now, keeping what their buffers
        hold for `stop_receiving` to drain. The host calls it for every receiver before anything
        awaits at shutdown."""
        if not self._held_udp:
            self._held_udp = list(self._udp)
            for reader in self._held_udp:
                reader.stop()
                _admit_no_more(reader.sock)

    async def _drain_udp(self, readers: list[DatagramReader], deadline: Deadline | None) -> None:
        """Deliver what is still in the kernel's buffers before a UDP socket closes: at shutdown
        'stop receiving' means taking no new datagrams, not discarding the ones already here.

        With a deadline (shutdown), a full `block` queue is waited for until it passes; what is
        left then is read and counted as dropped under the deadline's reason, never left
        uncounted in a closing socket. Without one (a restart), the queues' policies apply as is.
        """
        for reader in readers:
            sock, on_datagram = reader.sock, reader.callback
            _admit_no_more(sock)  # what a live sender sends from now on is the kernel's drop
            for _ in range(1 << 20):
                if deadline is not None and not deadline.expired:
                    for q in self.queues:
                        if q.full and not await q.wait_room(deadline):
                            break
                try:
                    data, addr = sock.recvfrom(65536)
                except OSError:  # BlockingIOError: empty
                    break
                if deadline is not None and deadline.expired and any(q.full for q in self.queues):
                    self.counters.drop(deadline.reason)
                    continue
                try:
                    on_datagram(data, addr)
                    self.hand_over()  # one at a time, so the room just waited for is enough
                except Exception as exc:
                    self.counters.error("datagram_handler")
                    self.counters.drop("handler_error")
                    self.limited.warning(
                        "drain", "%s: datagram from %s failed: %r", self.name, addr, exc
                    )
            self._kernel_base += kernel_udp_drops(sock) or 0
            sock.close()
        if self._udp:
            self.counters.drops["kernel"] = self._kernel_base

    async def _teardown_sockets(self, udp: list[DatagramReader], deadline: Deadline | None) -> None:
        """Close every socket, after draining what the kernel holds for the UDP ones (`udp`)."""
        for server in self._servers:
            server.close()
        await self._drain_udp(udp, deadline)
        for writer in list(self._writers):
            writer.close()
        for task in list(self._client_tasks):
            task.cancel()
        await asyncio.gather(*self._client_tasks, return_exceptions=True)
        for server in self._servers:
            await server.wait_closed()
        for zsock in self._zmq:
            zsock.close(linger=0)
        self._servers, self._udp, self._zmq = [], [], []
        self._writers.clear()
        self._client_tasks.clear()


def _admit_no_more(sock: socket.socket) -> None:
    """A UDP socket being drained keeps what its buffer holds but admits no new datagram: its
    receive buffer shrinks to the kernel's minimum, so a sender still sending is refused (and
    counted in the socket's drops, read as `kernel`) instead of keeping the drain going."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)


RELINK_AFTER_S = 1.0  # a link silent this long after a disconnect was given up by ZeroMQ


async def link_events(
    sock: zmq.asyncio.Socket,
    monitor: zmq.asyncio.Socket,
    endpoint: str,
    given_up: Callable[[], None],
) -> AsyncIterator[int]:
    """The events `monitor` reports for `sock`'s connection to `endpoint`, as they come; its
    mask must hold connection events only (CONNECTED, HANDSHAKE_SUCCEEDED, CONNECT_DELAYED,
    CONNECT_RETRIED, DISCONNECTED). ZeroMQ reconnects by itself to a peer that went away (a
    CONNECT_RETRIED or _DELAYED follows the DISCONNECTED), but never after a protocol error such
    as a message over MAXMSGSIZE: a link still silent RELINK_AFTER_S after a DISCONNECTED is
    connected again here, after `given_up()` (which counts and says it)."""
    silent_after_disconnect = False
    while True:
        try:
            frames = await asyncio.wait_for(
                monitor.recv_multipart(), RELINK_AFTER_S if silent_after_disconnect else None
            )
        except TimeoutError:
            silent_after_disconnect = False
            given_up()
            with contextlib.suppress(zmq.ZMQError):
                sock.disconnect(endpoint)
            sock.connect(endpoint)
            continue
        event: int = parse_monitor_message(frames)["event"]
        silent_after_disconnect = event == zmq.EVENT_DISCONNECTED
        yield event
