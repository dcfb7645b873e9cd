"""The Publisher base class, and the bounded queue through which the host feeds each publisher."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from daqd.logs import LimitedLogger
from daqd.monitor import Counters
from daqd.record import Record
from daqd.runstate import RunInfo

if TYPE_CHECKING:
    from daqd.host import Host

MAX_BATCH = 1024  # records handed to one send() call


class PublisherSettings(BaseModel):
    """Settings every publisher has; a type subclasses this with its own keys."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: str
    name: str = Field(min_length=1)
    queue_size: int = Field(10000, ge=1)
    policy: Literal["block", "drop"] = "block"


class Publisher:
    """Base of every publisher: hands batches of records on, and marks run boundaries."""

    Settings: ClassVar[type[PublisherSettings]] = PublisherSettings

    def __init__(self, settings: PublisherSettings, host: Host) -> None:
        self.settings = settings
        self.host = host
        self.name = settings.name
        self.log = logging.getLogger(f"daqd.publisher.{self.name}")
        self.counters = Counters()
        self.addresses: dict[str, str] = {}

    async def start(self) -> None:
        """Open sockets or files."""

    async def send(self, records: list[Record]) -> None:
        """Send a batch, in order. Raising counts the batch as dropped ("send_error")."""
        raise NotImplementedError

    async def begin_run(self, run: RunInfo) -> None:
        """A run begins; arrives in order with the records."""

    async def end_run(self, run: RunInfo) -> None:
        """A run ended (run.end_ns and run.condition are set); arrives after its last record."""

    async def close(self) -> None:
        """Release everything; the queue has been drained."""


class _Marker:
    __slots__ = ("kind", "run")

    def __init__(self, kind: Literal["begin", "end"], run: RunInfo) -> None:
        self.kind = kind
        self.run = run


class PublisherQueue:
    """A publisher's bounded queue and the task that drains it into `send()` batches.

    Run markers travel through the same queue, so a run file holds exactly the records that came
    before its end marker. Markers never count against the size and are never dropped.
    """

    def __init__(self, publisher: Publisher) -> None:
        self.publisher = publisher
        self.size = publisher.settings.queue_size
        self.block = publisher.settings.policy == "block"
        self.counters = publisher.counters
        self.limited = LimitedLogger(publisher.log)
        self._items: deque[Record | _Marker] = deque()
        self._records = 0
        # the drain task waits (or is about to) for items on _waiter; a put then wakes it
        self._sleeping = True
        self._waiter: asyncio.Future[None] | None = None
        self._space = asyncio.Event()
        self._space.set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None
        self._closing = ""  # why records are refused once closing: "shutdown", "reconfigure"
        self._inflight = 0  # records handed to send() that it has not returned from
        self._markers = 0  # run markers in the queue
        self._bytes = 0  # payload bytes of the queued records, tallied as they come in

    @property
    def depth(self) -> int:
        return self._records

    def put_nowait(self, record: Record, nbytes: int | None = None) -> bool:
        """Queue a record if there is room (`nbytes`: its payload size, if the caller has it)."""
        if self._closing:
            self.counters.drop(self._closing)
            return False
        if self._records >= self.size:
            self.counters.drop("queue_full")
            return False
        self._items.append(record)
        self._records += 1
        self._bytes += record.nbytes if nbytes is None else nbytes
        if self._sleeping:
            self._wake()
        return True

    def put_many(self, records: Sequence[Record], nbytes: int | None = None) -> None:
        """Queue a batch in order (`nbytes`: its payload size, if the caller has it). Without
        room for all of it, what fits is queued and the rest counted as dropped "queue_full"."""
        if self._closing:
            self.counters.drop(self._closing, len(records))
            return
        room = self.size - self._records
        if room < len(records):
            self.counters.drop("queue_full", len(records) - max(room, 0))
            if room <= 0:
                return
            records, nbytes = records[:room], None
        self._items.extend(records)
        self._records += len(records)
        self._bytes += sum(r.nbytes for r in records) if nbytes is None else nbytes
        if self._sleeping:
            self._wake()

    async def put(self, record: Record, nbytes: int | None = None) -> bool:
        if not self.block:
            return self.put_nowait(record, nbytes)
        while self._records >= self.size and not self._closing:
            self._space.clear()
            await self._space.wait()
        return self.put_nowait(record, nbytes)

    def put_marker(self, kind: Literal["begin", "end"], run: RunInfo) -> None:
        self._items.append(_Marker(kind, run))
        self._markers += 1
        self._wake()

    def _wake(self) -> None:
        """Items arrived: wake the drain task if it waits for them (a bare future is cheaper
        than an asyncio.Event, and this runs once per batch)."""
        self._sleeping = False
        self._idle.clear()
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def _take_batch(self) -> tuple[list[Record], int]:
        """The next records up to a run marker (at most MAX_BATCH), and their payload bytes."""
        items = self._items
        batch: list[Record]
        if not self._markers and len(items) <= MAX_BATCH:
            batch = list(items)  # type: ignore[arg-type]  # no marker: all records
            items.clear()
            nbytes, self._bytes = self._bytes, 0
        else:
            batch = []
            while items and len(batch) < MAX_BATCH and not isinstance(items[0], _Marker):
                batch.append(items.popleft())  # type: ignore[arg-type]
            nbytes = sum(r.nbytes for r in batch)
            self._bytes -= nbytes
        self._records -= len(batch)
        if not self._space.is_set():
            self._space.set()
        return batch, nbytes

    def _failed(self, batch: list[Record], exc: Exception) -> None:
        self.counters.error("send")
        self.counters.drop("send_error", len(batch))
        self.limited.warning(
            "send", "%s: send of %d records failed: %r", self.publisher.name, len(batch), exc
        )

    def _account(self, batch: list[Record], nbytes: int, dropped_before: int) -> None:
        """Count what was sent: the batch less what send() itself counted as dropped (high-water
        mark, outside a run); and show it to a live tap."""
        dropped = sum(self.counters.drops.values()) - dropped_before
        sent = len(batch) - dropped
        if sent > 0:
            self.counters.count(nbytes if not dropped else nbytes * sent // len(batch), sent)
        host = self.publisher.host
        if host.taps_active:
            for r in batch:
                host.tap(self.publisher.name, r)

    def start(self) -> None:
        self._task = asyncio.create_task(self._drain_forever(), name=f"queue-{self.publisher.name}")

    async def _drain_forever(self) -> None:
        items = self._items
        pub = self.publisher
        loop = asyncio.get_running_loop()
        while True:
            if not items:
                self._sleeping = True
                self._idle.set()
                self._waiter = loop.create_future()
                await self._waiter
                continue
            head = items[0]
            if isinstance(head, _Marker):
                items.popleft()
                self._markers -= 1
                await self._run_marker(head)
                continue
            batch, nbytes = self._take_batch()
            dropped_before = sum(self.counters.drops.values())
            self._inflight = len(batch)
            try:
                await pub.send(batch)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._failed(batch, exc)
                continue
            finally:
                self._inflight = 0
            self._account(batch, nbytes, dropped_before)

    async def _run_marker(self, marker: _Marker) -> None:
        pub = self.publisher
        try:
            if marker.kind == "begin":
                await pub.begin_run(marker.run)
            else:
                await pub.end_run(marker.run)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.counters.error(f"{marker.kind}_run")
            pub.log.error("%s: %s_run failed: %r", pub.name, marker.kind, exc)

    async def drained(self) -> None:
        """Wait until everything queued so far has been handed to the publisher."""
        while self._items or not self._idle.is_set():
            await self._idle.wait()
            await asyncio.sleep(0)

    async def close(self, timeout_s: float, reason: str = "shutdown") -> None:
        """Drain within timeout_s, then close. What could not be sent is counted as dropped
        `reason`, including a batch cut off in the middle of its send()."""
        self._closing = reason
        self._space.set()
        try:
            await asyncio.wait_for(self.drained(), timeout_s)
        except TimeoutError:
            left = self._records + self._inflight
            self.counters.drop(reason, left)
            self.publisher.log.error(
                "%s: %d records not sent within drain_timeout_s=%s; counted as dropped %r",
                self.publisher.name,
                left,
                timeout_s,
                reason,
            )
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        try:
            await self.publisher.close()
        except Exception as exc:
            self.publisher.log.error("%s: close failed: %r", self.publisher.name, exc)

    def status(self) -> dict[str, Any]:
        pub = self.publisher
        return {
            "type": pub.settings.type,
            "policy": pub.settings.policy,
            "queue": self._records,
            "queue_size": self.size,
            "addresses": dict(pub.addresses),
            **self.counters.snapshot(),
        }
