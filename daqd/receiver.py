"""The ReceiverServer base class: sockets, ct_ tasks, cmd_ commands, publishing, supervision."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import socket
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Annotated, Any, ClassVar

import zmq
import zmq.asyncio
from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from daqd.deadline import Deadline
from daqd.logs import LimitedLogger
from daqd.monitor import Counters
from daqd.record import Block, Record
from daqd.runstate import RunInfo

if TYPE_CHECKING:
    from daqd.host import Host
    from daqd.publisher import PublisherQueue

StreamHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]

# Linux's SO_RCVBUFFORCE, which Python's socket module does not export
_SO_RCVBUFFORCE = 33 if sys.platform.startswith("linux") else None

_time_ns = time.time_ns

RESTART_FIRST_S = 0.5
RESTART_MAX_S = 30.0
RESTART_LIMIT = 5  # failures within RESTART_WINDOW_S after which a receiver is marked failed
RESTART_WINDOW_S = 60.0


def parse_hostport(value: str) -> tuple[str, int]:
    """'host:port' (or '[v6]:port') -> (host, port); raises ValueError with the offending text."""
    host, sep, port = value.rpartition(":")
    ok_host = bool(host) and all(c.isalnum() or c in ".-_:[]*" for c in host)
    if not sep or not ok_host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected 'host:port' with a port 0-65535, got {value!r}")
    return host.strip("[]"), int(port)


def _valid_hostport(value: str) -> str:
    parse_hostport(value)
    return value


# A settings field holding "host:port", checked when the configuration is read.
HostPort = Annotated[str, AfterValidator(_valid_hostport)]


def zmq_bindable(endpoint: str) -> str:
    """A ZeroMQ bind address: our settings say port 0 for 'any free port', ZeroMQ says '*'."""
    return endpoint[:-2] + ":*" if endpoint.endswith(":0") else endpoint


def format_hostport(addr: tuple[Any, ...]) -> str:
    return f"{addr[0]}:{addr[1]}"


class ReceiverSettings(BaseModel):
    """Settings every receiver has; a type subclasses this with its own keys."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: str
    name: str = Field(min_length=1)
    publish_to: list[str] = Field(default_factory=list)
    process: bool = False

    def constellation_keys(self) -> list[str]:
        """Keys set here that need the [constellation] table (config refuses them without)."""
        return []


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


class _DatagramProtocol(asyncio.DatagramProtocol):
    __slots__ = ("callback", "receiver")

    def __init__(
        self, receiver: ReceiverServer, callback: Callable[[bytes, tuple[str, int]], None]
    ) -> None:
        self.receiver = receiver
        self.callback = callback

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            self.callback(data, addr)
        except Exception as exc:  # one bad datagram must never take the receiver down
            self.receiver.counters.error("datagram_handler")
            self.receiver.counters.drop("handler_error")
            self.receiver.limited.warning(
                "datagram", "%s: datagram from %s failed: %r", self.receiver.name, addr, exc
            )

    def error_received(self, exc: Exception) -> None:
        self.receiver.counters.error("socket")
        self.receiver.limited.warning("socket", "%s: socket error: %s", self.receiver.name, exc)


class ReceiverServer:
    """Base of every receiver: owns its sockets, runs its ct_* tasks, serves its cmd_* commands.

    Subclasses override `setup()` to open sockets with the setup_* helpers and call `publish()`.
    """

    Settings: ClassVar[type[ReceiverSettings]] = ReceiverSettings
    restart_first_s: ClassVar[float] = RESTART_FIRST_S

    def __init__(self, settings: ReceiverSettings, host: Host) -> None:
        self.settings = settings
        self.host = host
        self.name = settings.name
        self.log = logging.getLogger(f"daqd.receiver.{self.name}")
        self.limited = LimitedLogger(self.log)
        self.counters = Counters()
        self.addresses: dict[str, str] = {}
        self.state = "new"  # new, running, restarting, failed, stopped
        self.last_error = ""
        self.queues: list[PublisherQueue] = []  # set by the host from publish_to
        self._seq: dict[str, int] = {}
        self._transports: list[asyncio.BaseTransport] = []
        self._udp: list[tuple[socket.socket, Callable[[bytes, tuple[str, int]], None]]] = []
        self._servers: list[asyncio.Server] = []
        self._writers: set[asyncio.StreamWriter] = set()
        self._client_tasks: set[asyncio.Task[None]] = set()
        self._zmq: list[zmq.asyncio.Socket] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._supervisor: asyncio.Task[None] | None = None
        self._failures: deque[float] = deque()

    # ----- what subclasses override ------------------------------------------------------------
    async def setup(self) -> None:
        """Open sockets (setup_udp / setup_stream / setup_zmq). Called at start and on restart."""

    async def begin_run(self, run: RunInfo) -> None:
        """A run begins (before publishers see it)."""

    async def end_run(self, run: RunInfo) -> None:
        """A run ends: publish what is held (publishers see end_run after this returns). A
        receiver that knows the run's data is flawed ORs flags into `run.condition`."""

    async def close(self) -> None:
        """Release the subclass's own resources; sockets from setup_* are closed by the base."""

    async def refresh_counters(self) -> None:
        """Bring counters kept elsewhere (a worker process's) up to date: the host calls it
        right before it takes a run's starting counts."""

    def hand_over(self) -> None:
        """Publish at once what input already read left pending (a receiver that batches the
        datagrams of one loop turn): the shutdown drain calls it after each datagram."""

    # ----- records ---------------------------------------------------------------------------
    def new_record(
        self,
        payload: Sequence[Block] = (),
        tags: dict[str, Any] | None = None,
        *,
        source: str | None = None,
        time_ns: int | None = None,
    ) -> Record:
        """A record with the next gap-free seq of its source (default: this receiver's name)."""
        src = self.name if source is None else source
        seqs = self._seq
        seq = seqs[src] = seqs.get(src, 0) + 1
        return Record(src, seq, _time_ns() if time_ns is None else time_ns, tags or {}, payload)

    def reserve_seq(self, source: str, n: int) -> int:
        """Take the next n gap-free seq numbers of `source` at once and return the first: for
        receivers that build many records in one pass (new_record takes them one by one)."""
        first = self._seq.get(source, 0) + 1
        self._seq[source] = first + n - 1
        return first

    def adopt_seq(self, source: str, seq: int) -> None:
        """Records of `source` were numbered elsewhere (a worker process): go on from `seq`."""
        self._seq[source] = seq

    def publish_nowait(self, record: Record) -> bool:
        """Hand a record to every publisher in publish_to without waiting (UDP callbacks).

        Returns False if any publisher had to drop it (its queue was full); that drop is counted there.
        """
        nbytes = record.nbytes
        self.counters.count(nbytes)
        ok = True
        for q in self.queues:
            ok = q.put_nowait(record, nbytes) and ok
        if self.host.taps_active:
            self.host.tap(self.name, record)
        return ok

    def publish_many_nowait(self, records: Sequence[Record], nbytes: int | None = None) -> None:
        """publish_nowait for a batch (`nbytes`: its payload size, if the caller has it), in
        order, with one queue operation per publisher: a queue without room for all of it takes
        what fits and counts the rest as dropped there."""
        if nbytes is None:
            nbytes = sum([r.nbytes for r in records])
        self.counters.count(nbytes, len(records))
        for q in self.queues:
            q.put_many(records, nbytes)
        if self.host.taps_active:
            for r in records:
                self.host.tap(self.name, r)

    async def publish_many(self, records: Sequence[Record], nbytes: int | None = None) -> None:
        """Hand a batch on in order (`nbytes`: its payload size, if the caller has it): one
        queue operation per publisher where every queue has room for all of it; otherwise record
        by record, as publish()."""
        n = len(records)
        if all(q.size - q.depth >= n for q in self.queues):
            self.publish_many_nowait(records, nbytes)  # room everywhere: nothing waits or drops
            return
        for i, r in enumerate(records):
            try:
                await self.publish(r)
            except asyncio.CancelledError:  # stopping mid-batch: what is left is counted, not lost
                self.counters.drop("cancelled", n - i)
                raise

    async def publish(self, record: Record) -> bool:
        """Hand a record on, waiting while a `block`-policy queue is full (backpressure)."""
        nbytes = record.nbytes
        self.counters.count(nbytes)
        ok = True
        queues = self.queues
        for i, q in enumerate(queues):
            try:
                ok = await q.put(record, nbytes) and ok
            except asyncio.CancelledError:  # stopped while waiting: counted, not lost
                for rest in queues[i:]:
                    rest.refuse("cancelled")
                raise
        if self.host.taps_active:
            self.host.tap(self.name, record)
        return ok

    # ----- sockets ---------------------------------------------------------------------------
    async def setup_udp(
        self,
        listen: str,
        on_datagram: Callable[[bytes, tuple[str, int]], None],
        *,
        rcvbuf_bytes: int = 8 << 20,
        key: str = "listen",
    ) -> asyncio.DatagramTransport:
        """Bind a UDP socket with a large SO_RCVBUF; each datagram calls on_datagram(data, addr)."""
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
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _DatagramProtocol(self, on_datagram), sock=sock
        )
        self._transports.append(transport)
        self._udp.append((sock, on_datagram))
        self.addresses[key] = format_hostport(sock.getsockname())
        self.counters.extra["rcvbuf_bytes"] = granted
        return transport

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

    # ----- commands --------------------------------------------------------------------------
    def commands(self) -> dict[str, Callable[..., Any]]:
        """name -> bound method, for every cmd_<name> method."""
        return {
            n[4:]: getattr(self, n)
            for n in dir(type(self))
            if n.startswith("cmd_") and callable(getattr(self, n))
        }

    async def call_command(self, name: str, args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
        cmds = self.commands()
        if name not in cmds:
            known = ", ".join(sorted(cmds)) or "none"
            raise KeyError(f"receiver {self.name!r} has no command {name!r}; known: {known}")
        result = cmds[name](*args, **kwargs)
        if inspect.isawaitable(result):
            result = await result
        return result

    # ----- life cycle (driven by the host) ---------------------------------------------------
    def refresh_extra(self) -> None:
        """Put the receiver's own figures into `counters.extra`: called before every sample
        and status, so a receiver keeps them in plain attributes on its hot path."""

    def sample(self) -> None:
        """Once a second: refresh rates and the kernel's drop counts."""
        self.refresh_extra()
        self.counters.sample()
        if self._udp or self._kernel_base:
            now = sum(kernel_udp_drops(sock) or 0 for sock, _ in self._udp)
            self.counters.drops["kernel"] = self._kernel_base + now

    # kernel drops of UDP sockets already closed (restarts), so the counter never goes back
    _kernel_base = 0

    _held_udp: list[tuple[socket.socket, Callable[[bytes, tuple[str, int]], None]]] = []

    def stop_input(self) -> None:
        """Stop the loop reading this receiver's UDP sockets, now, keeping what their buffers
        hold for `stop_receiving` to drain: each socket stays open through a dup of its
        descriptor and its transport closes (uvloop's cannot pause reading). The host calls it
        for every receiver before anything awaits at shutdown."""
        if not self._held_udp:
            self._held_udp = [(sock.dup(), on_datagram) for sock, on_datagram in self._udp]
            for sock, _ in self._held_udp:
                _admit_no_more(sock)
        for transport in self._transports:
            transport.close()

    async def _drain_udp(
        self,
        socks: list[tuple[socket.socket, Callable[[bytes, tuple[str, int]], None]]],
        deadline: Deadline | None,
    ) -> None:
        """Deliver what is still in the kernel's buffers before a UDP socket closes: at shutdown
        'stop receiving' means taking no new datagrams, not discarding the ones already here.

        With a deadline (shutdown), a full `block` queue is waited for until it passes; what is
        left then is read and counted as dropped under the deadline's reason, never left
        uncounted in a closing socket. Without one (a restart), the queues' policies apply as is.
        """
        for sock, on_datagram in socks:
            sock.setblocking(False)
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

    async def start(self) -> None:
        """Set up (errors propagate: a daemon that cannot bind must say so) and run the ct_ tasks."""
        await self.setup()
        self._start_tasks()
        self.state = "running"
        self._supervisor = asyncio.create_task(self._supervise(), name=f"supervise-{self.name}")

    def _start_tasks(self) -> None:
        self._tasks = [
            asyncio.create_task(getattr(self, n)(), name=f"{self.name}.{n}")
            for n in dir(type(self))
            if n.startswith("ct_") and inspect.iscoroutinefunction(getattr(self, n))
        ]

    async def _supervise(self) -> None:
        backoff = self.restart_first_s
        while True:
            failed = await self._wait_failure()
            if failed is None:
                return
            self.counters.error("crash")
            self.last_error = repr(failed)
            now = time.monotonic()
            self._failures.append(now)
            while self._failures and now - self._failures[0] > RESTART_WINDOW_S:
                self._failures.popleft()
            await self._teardown()
            if len(self._failures) >= RESTART_LIMIT:
                self.state = "failed"
                self.log.error(
                    "%s failed %d times in %.0f s, last: %r; marked failed (daqctl status shows it)",
                    self.name,
                    len(self._failures),
                    RESTART_WINDOW_S,
                    failed,
                )
                return
            self.state = "restarting"
            self.log.error("%s crashed: %r; restarting in %.1f s", self.name, failed, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, RESTART_MAX_S)
            try:
                await self.setup()
            except Exception as exc:
                self._tasks = [asyncio.create_task(_raise(exc))]
                continue
            self._start_tasks()
            self.state = "running"

    async def _wait_failure(self) -> BaseException | None:
        """Wait until a ct_ task raises; None if they all end cleanly (or there are none)."""
        pending = set(self._tasks)
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if not task.cancelled() and task.exception() is not None:
                    return task.exception()
        return None

    async def stop_receiving(self, deadline: Deadline | None = None) -> None:
        """Close every socket and stop every task: nothing more comes in. What the kernel still
        holds for a UDP socket is delivered, waiting for `block` queues until `deadline`."""
        if self._supervisor is not None:
            self._supervisor.cancel()
            await asyncio.gather(self._supervisor, return_exceptions=True)
            self._supervisor = None
        await self._teardown(deadline)
        if self.state != "failed":
            self.state = "stopped"

    async def _teardown(self, deadline: Deadline | None = None) -> None:
        self.stop_input()
        udp, self._held_udp = self._held_udp, []
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
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
        self._servers, self._transports, self._udp, self._zmq = [], [], [], []
        self._writers.clear()
        self._client_tasks.clear()
        try:
            await self.close()
        except Exception as exc:
            self.log.warning("%s: close failed: %r", self.name, exc)

    def status(self) -> dict[str, Any]:
        self.refresh_extra()
        return {
            "type": self.settings.type,
            "state": self.state,
            "addresses": dict(self.addresses),
            "publish_to": list(self.settings.publish_to),
            **({"last_error": self.last_error} if self.last_error else {}),
            **self.counters.snapshot(),
        }


async def _raise(exc: BaseException) -> None:
    raise exc


def _admit_no_more(sock: socket.socket) -> None:
    """A UDP socket being drained keeps what its buffer holds but admits no new datagram: its
    receive buffer shrinks to the kernel's minimum, so a sender still sending is refused (and
    counted in the socket's drops, read as `kernel`) instead of keeping the drain going."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)
