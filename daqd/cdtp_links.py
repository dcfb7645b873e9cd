"""The `cdtp` receiver's links: one ZeroMQ PULL socket per transmitter endpoint, and its tasks.

A link is made for each endpoint in `senders`, and (`discover`) for each DATA service CHIRP offers
in the group, of the canonical names in `receive_from` if given; a DEPART (or a move) retires the
link: its tasks stop, what its socket holds is handled, and it is closed. Each link runs two
tasks: `pull` hands every message to the receiver's handler, and `watch` follows the connection
(a transmitter that vanishes or comes back, a link ZeroMQ gave up on). What that means for the
senders' runs is the receiver's to decide: it is told through `up`, `down` and `retired`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, cast

import zmq
import zmq.asyncio

from daqd.errors import ConfigError
from daqd.protocols import chirp
from daqd.sockets import link_events

if TYPE_CHECKING:
    from daqd.constellation.discovery import Offer
    from daqd.receiver import ReceiverServer

DRAIN_BATCH = 16  # messages taken per wake-up before letting other tasks run
CLOSE_DRAIN_S = 2.0  # at most this long handling what is waiting in a socket when closing

#: The receiver's handler of one received message (its first frame): (endpoint, socket, frame)
Handler = Callable[[str, "zmq.Socket[bytes]", zmq.Frame], Awaitable[None]]


@dataclass
class Link:
    """One PULL socket, connected to one transmitter endpoint, and its receive tasks."""

    endpoint: str
    sock: zmq.asyncio.Socket
    monitor: zmq.asyncio.Socket
    offered_by: bytes | None = None  # the host UUID of the DATA offer it was found by
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


class CdtpLinks:
    """The links of one cdtp receiver `rx` (its name, logs, counters, addresses and host)."""

    def __init__(
        self,
        rx: ReceiverServer,
        *,
        rcvhwm: int,
        max_message_bytes: int,
        handle: Handler,
        up: Callable[[str], None],
        down: Callable[[str], None],
        retired: Callable[[str], None],
    ) -> None:
        self.rx = rx
        self.rcvhwm = rcvhwm
        self.max_message_bytes = max_message_bytes
        self.handle = handle  # every received message
        self.up = up  # an endpoint's connection is (again) made
        self.down = down  # an endpoint's connection was lost
        self.retired = retired  # a discovered endpoint's link closed: it departed or moved
        self.by_endpoint: dict[str, Link] = {}  # endpoint -> its socket
        self.lost: set[str] = set()  # endpoints disconnected and not connected again since
        self._group: asyncio.TaskGroup | None = None  # run's, running the links' tasks
        self._retiring: set[asyncio.Task[None]] = set()  # links closing after a DEPART
        self._unsubscribe: Callable[[], None] = lambda: None  # from the host's discovery
        self._wanted: dict[bytes, str] | None = None  # receive_from by CHIRP host UUID

    def open(self, senders: list[str], discover: bool, receive_from: list[str] | None) -> None:
        """Connect to every endpoint in `senders`, and (`discover`) to DATA offers from now on."""
        rx = self.rx
        self.lost.clear()
        for i, endpoint in enumerate(senders):
            self._connect(endpoint)
            rx.addresses[f"sender{i}" if len(senders) > 1 else "sender"] = endpoint
        if discover:
            discovery = rx.host.discovery
            if discovery is None:  # config refuses discover without [constellation]
                raise ConfigError(f"receiver {rx.name}: discover = true needs [constellation]")
            names = receive_from
            self._wanted = {chirp.name_uuid(n): n for n in names} if names else None
            self._unsubscribe = discovery.subscribe(self._on_offer)

    def _connect(self, endpoint: str, offered_by: bytes | None = None) -> None:
        sock = self.rx.host.zmq_context.socket(zmq.PULL)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, self.rcvhwm)
        # libzmq drops a connection that announces a bigger message before reading it
        sock.setsockopt(zmq.MAXMSGSIZE, self.max_message_bytes)
        monitor = sock.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_SUCCEEDED
            | zmq.EVENT_DISCONNECTED
            | zmq.EVENT_CONNECTED
            | zmq.EVENT_CONNECT_DELAYED
            | zmq.EVENT_CONNECT_RETRIED
        )
        sock.connect(endpoint)
        link = self.by_endpoint[endpoint] = Link(endpoint, sock, monitor, offered_by)
        if self._group is not None:
            self._run(link)

    def _run(self, link: Link) -> None:
        assert self._group is not None
        name = self.rx.name
        link.tasks = [
            self._group.create_task(self._pull(link.endpoint, link.sock), name=f"{name}.pull"),
            self._group.create_task(
                self._watch(link.endpoint, link.sock, link.monitor), name=f"{name}.watch"
            ),
        ]

    def _on_offer(self, new: Offer | None, old: Offer | None) -> None:
        """Discovery's listener: connect to DATA offers as they come, close what departed."""
        rx = self.rx
        extra = rx.counters.extra
        if old is not None and old.service == chirp.Service.DATA:
            link = self.by_endpoint.get(f"tcp://{old.address}:{old.port}")
            if link is not None and link.offered_by == old.host:
                self._retire(link, "departed" if new is None else "moved")
        if new is None or new.service != chirp.Service.DATA:
            return
        name = new.host.hex()
        if self._wanted is not None:
            if new.host not in self._wanted:  # another sender of the group: not ours
                extra["offers_not_wanted"] = extra.get("offers_not_wanted", 0) + 1
                return
            name = self._wanted[new.host]
        endpoint = f"tcp://{new.address}:{new.port}"
        if endpoint in self.by_endpoint:
            return  # also in `senders`, or offered again
        self._connect(endpoint, new.host)
        rx.addresses[f"discovered {name}"] = endpoint
        extra["offers_taken"] = extra.get("offers_taken", 0) + 1
        rx.log.info("%s: connecting to DATA of %s at %s (CHIRP)", rx.name, name, endpoint)

    def _retire(self, link: Link, why: str) -> None:
        """A discovered sender departed (or moved): stop its link, handle what its socket holds,
        close it, and tell the receiver (`retired`)."""
        del self.by_endpoint[link.endpoint]
        addresses = self.rx.addresses
        for key, endpoint in list(addresses.items()):
            if endpoint == link.endpoint and key.startswith("discovered "):
                del addresses[key]
        for task in link.tasks:
            task.cancel()
        task = asyncio.create_task(self._close_link(link, why), name=f"{self.rx.name}.retire")
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _close_link(self, link: Link, why: str) -> None:
        await asyncio.gather(*link.tasks, return_exceptions=True)
        try:
            await self.drain(link.endpoint, link.sock)
        finally:
            self._close_sockets(link)
        rx = self.rx
        rx.log.info("%s: sender at %s %s (CHIRP): link closed", rx.name, link.endpoint, why)
        self.retired(link.endpoint)

    @staticmethod
    def _close_sockets(link: Link) -> None:
        try:
            link.sock.disable_monitor()
        except zmq.ZMQError:
            pass
        link.monitor.close(linger=0)
        link.sock.close(linger=0)

    async def close(self) -> None:
        """Stop taking offers, handle what every socket holds, and close them all."""
        self._unsubscribe()
        self._unsubscribe = lambda: None
        links, self.by_endpoint = list(self.by_endpoint.values()), {}
        try:
            await asyncio.gather(*self._retiring, return_exceptions=True)
            for link in links:
                # what ZeroMQ already took off the wire is ours (the sender counts it as sent):
                # handle it as usual before closing, so that nothing is lost uncounted
                await self.drain(link.endpoint, link.sock)
        finally:
            for link in links:
                self._close_sockets(link)

    async def drain(self, endpoint: str, sock: zmq.asyncio.Socket) -> None:
        """Handle every message waiting in `sock` without waiting for more; a sender that keeps
        the socket full is cut off after CLOSE_DRAIN_S (what it sends after that is lost on its
        side, as when it sends to a receiver that is gone)."""
        sync: zmq.Socket[bytes] = zmq.Socket.shadow(sock.underlying)
        deadline = time.monotonic() + CLOSE_DRAIN_S
        taken = 0
        while time.monotonic() < deadline:
            for _ in range(DRAIN_BATCH):
                try:
                    frame = sync.recv(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    deadline = 0.0
                    break
                taken += 1
                await self.handle(endpoint, sync, frame)
        if taken:
            rx = self.rx
            rx.log.info(
                "%s: %d messages waiting from %s handled before closing", rx.name, taken, endpoint
            )

    async def run(self) -> None:
        """Run every link's receive tasks, and those of links discovered later; one failing
        task cancels the others (and the receiver is restarted)."""
        try:
            async with asyncio.TaskGroup() as group:
                self._group = group
                for link in self.by_endpoint.values():
                    self._run(link)
                await asyncio.Event().wait()  # links come and go with the offers
        finally:
            self._group = None

    async def _pull(self, endpoint: str, sock: zmq.asyncio.Socket) -> None:
        """Take messages as they come. Waits on ZeroMQ's file descriptor directly: pyzmq's
        asyncio poll costs tens of microseconds per wake-up, which a receiver that keeps up with
        its sender pays once per message."""
        sync: zmq.Socket[bytes] = zmq.Socket.shadow(sock.underlying)
        ready = asyncio.Event()
        fd = sync.fileno()  # this socket's only reader: its asyncio side is never awaited on
        loop = asyncio.get_running_loop()
        loop.add_reader(fd, ready.set)
        try:
            while True:
                for _ in range(DRAIN_BATCH):
                    try:
                        frame = sync.recv(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    await self.handle(endpoint, sync, frame)
                else:  # maybe more waiting: let other tasks run first
                    await asyncio.sleep(0)
                    continue
                # the descriptor only signals changes: wait for one, unless a message came in
                # between the last receive and now (reading EVENTS takes that signal)
                ready.clear()
                if not cast(int, sync.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
                    await ready.wait()
        finally:
            loop.remove_reader(fd)

    async def _watch(
        self, endpoint: str, sock: zmq.asyncio.Socket, monitor: zmq.asyncio.Socket
    ) -> None:
        """Notice a transmitter that vanishes (`down`) and one that is back (`up`); a link
        ZeroMQ gave up on (a message over max_message_bytes) is connected again, and counted."""
        rx = self.rx

        def given_up() -> None:
            rx.counters.error("link_dropped")
            rx.limited.warning(
                f"link_dropped:{endpoint}",
                "%s: ZeroMQ dropped the link to %s and gave up (a message over "
                "max_message_bytes=%d?); connecting again",
                rx.name,
                endpoint,
                self.max_message_bytes,
            )

        async for event in link_events(sock, monitor, endpoint, given_up):
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.lost.discard(endpoint)
                self.up(endpoint)
            elif event == zmq.EVENT_DISCONNECTED:
                rx.counters.extra["disconnects"] = rx.counters.extra.get("disconnects", 0) + 1
                # a BOR still queued behind this event starts a run that is already gone: the
                # receiver's BOR checks `lost`
                self.lost.add(endpoint)
                self.down(endpoint)
