"""The ReceiverServer base class: ct_ tasks, cmd_ commands, publishing, supervision; its sockets
are ReceiverSockets' (daqd/sockets.py)."""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from daqd.deadline import Deadline
from daqd.logs import LimitedLogger
from daqd.monitor import Counters
from daqd.record import Block, Record
from daqd.runstate import RunInfo
from daqd.sockets import ReceiverSockets

if TYPE_CHECKING:
    from daqd.host import Host
    from daqd.publisher import PublisherQueue

_time_ns = time.time_ns

RESTART_FIRST_S = 0.5
RESTART_MAX_S = 30.0
RESTART_LIMIT = 5  # failures within RESTART_WINDOW_S after which a receiver is marked failed
RESTART_WINDOW_S = 60.0


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


class DatagramSettings(ReceiverSettings):
    """Settings of a receiver that reads a UDP socket (setup_udp)."""

    # after reading what the socket holds, wait this long before reading again: the datagrams
    # that come meanwhile are handled as one batch (see daqd.sockets.DatagramReader)
    coalesce_ms: float = Field(1.0, ge=0, le=100)


class ReceiverServer(ReceiverSockets):
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
        super().__init__()  # the sockets' lists
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
        self._sample_kernel_drops()

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
        await self._teardown_sockets(udp, deadline)
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
