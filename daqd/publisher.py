"""The Publisher base class, and the bounded queue through which the host feeds each publisher."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from daqd.deadline import Deadline
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
    """Base of every publisher: hands batches of records on, and marks run boundaries.

    Delivered means the destination has the record. By default the queue counts a batch as
    delivered when `send()` returns (less what send() counted as drops); a publisher that still
    holds records after send() returns sets `confirms_delivery` and calls `delivered()` when they
    really left (or counts them as drops).
    """

    Settings: ClassVar[type[PublisherSettings]] = PublisherSettings
    confirms_delivery: ClassVar[bool] = False
    # records of the batch in send() already handled (sent, or counted as dropped): a send()
    # that waits part-way keeps it current, so a send cut short at shutdown counts exactly
    progress = 0

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

    def delivered(self, n: int, nbytes: int) -> None:
        """`n` held records (`nbytes` of payload) reached the destination (confirms_delivery)."""
        self.counters.count(nbytes, n)

    async def begin_run(self, run: RunInfo) -> None:
        """A run begins; arrives in order with the records. Raising refuses the run: `daqctl
        start` fails with the message. Must not wait for a peer."""

    async def flush_run(self, run: RunInfo) -> None:
        """The run's last record has been handed over: deliver whatever of it is still held.
        The run's accounting is taken when this returns, and its condition decided from it."""

    async def end_run(self, run: RunInfo) -> None:
        """A run ended: run.condition, run.accounting and run.reasons are final."""

    async def close(self) -> None:
        """Release everything; the queue has been drained."""


class _Marker:
    """A run boundary travelling through the queue in order with the records.

    `done` resolves when the publisher has handled it: for "begin", with the exception that
    refused the run (or None); for "end", once end_run has returned. `ledger` resolves for "end"
    when the run's records are accounted for; the host then decides the condition and sets
    `decided`.
    """

    __slots__ = ("decided", "done", "kind", "ledger", "put", "put0", "run")

    def __init__(
        self, kind: Literal["begin", "end"], run: RunInfo, put: _Tally, put0: _Tally
    ) -> None:
        loop = asyncio.get_running_loop()
        self.kind = kind
        self.run = run
        self.put = put  # the put side's totals when the marker was queued
        self.put0 = put0  # ... and when the run's begin marker was (for an end marker)
        self.done: asyncio.Future[BaseException | None] = loop.create_future()
        self.ledger: asyncio.Future[dict[str, Any]] = loop.create_future()
        self.decided = asyncio.Event()


class _Tally:
    """Totals at one moment: records offered or delivered, drops and errors by reason."""

    __slots__ = ("drops", "errors", "records")

    def __init__(self, records: int, drops: dict[str, int], errors: dict[str, int]) -> None:
        self.records = records
        self.drops = drops
        self.errors = errors


def _minus(now: dict[str, int], then: dict[str, int]) -> dict[str, int]:
    return {k: n - then.get(k, 0) for k, n in now.items() if n - then.get(k, 0)}


class PublisherQueue:
    """A publisher's bounded queue and the task that drains it into `send()` batches.

    Run markers travel through the same queue, so a run file holds exactly the records that came
    before its end marker. Markers never count against the size and are never dropped.

    Accounting: `offered` counts every record handed to the queue; each is then delivered (the
    publisher's counters.records) or dropped by reason. Drops at the put side (queue full,
    closing) are also kept in `put_drops`, so that a run's ledger can take the put side at its
    markers' put times and the drain side at their drain times: both exact.
    """

    def __init__(self, publisher: Publisher) -> None:
        self.publisher = publisher
        self.size = publisher.settings.queue_size
        self.block = publisher.settings.policy == "block"
        self.counters = publisher.counters
        self.limited = LimitedLogger(publisher.log)
        self.offered = 0
        self.put_drops: dict[str, int] = {}
        self._put_dropped = 0  # their sum
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
        self._inflight_bytes = 0
        self._dropped_before = 0  # the publisher's drops when that send() began
        self._markers = 0  # run markers in the queue
        self._bytes = 0  # payload bytes of the queued records, tallied as they come in
        self._put_base = _Tally(0, {}, {})  # put side at the current run's begin marker
        self._drain_base = _Tally(0, {}, {})  # drain side when that marker was handled

    @property
    def depth(self) -> int:
        return self._records

    @property
    def full(self) -> bool:
        return self._records >= self.size

    def _drop(self, reason: str, n: int) -> None:
        self.counters.drop(reason, n)
        self.put_drops[reason] = self.put_drops.get(reason, 0) + n
        self._put_dropped += n

    def refuse(self, reason: str, n: int = 1) -> None:
        """`n` records meant for this queue never reached it (the receiver stopped first)."""
        self.offered += n
        self._drop(reason, n)

    def put_nowait(self, record: Record, nbytes: int | None = None) -> bool:
        """Queue a record if there is room (`nbytes`: its payload size, if the caller has it)."""
        self.offered += 1
        if self._closing:
            self._drop(self._closing, 1)
            return False
        if self._records >= self.size:
            self._drop("queue_full", 1)
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
        n = len(records)
        self.offered += n
        if self._closing:
            self._drop(self._closing, n)
            return
        room = self.size - self._records
        if room < n:
            self._drop("queue_full", n - max(room, 0))
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

    async def wait_room(self, deadline: Deadline) -> bool:
        """For a `block` queue: wait until it has room, at most until the deadline. True if
        there is room (or the policy is drop: then the put decides)."""
        if not self.block or self._records < self.size:
            return True

        async def room() -> None:
            while self._records >= self.size:
                self._space.clear()
                await self._space.wait()

        ok, _ = await deadline.wait(room())
        return ok

    def put_marker(self, kind: Literal["begin", "end"], run: RunInfo) -> _Marker:
        now = _Tally(self.offered, dict(self.put_drops), {})
        marker = _Marker(kind, run, now, self._put_base)
        if kind == "begin":
            self._put_base = now
        self._items.append(marker)
        self._markers += 1
        self._wake()
        return marker

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

    def _send_drops(self) -> int:
        """Drops counted by the publisher itself (not at the put side, which goes on while a
        send() waits)."""
        return self.counters.dropped - self._put_dropped

    def _account(self, batch: list[Record], nbytes: int, dropped_before: int) -> None:
        """Count what was sent: the batch less what send() itself counted as dropped (high-water
        mark, outside a run); and show it to a live tap."""
        if not self.publisher.confirms_delivery:
            dropped = self._send_drops() - dropped_before
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
            dropped_before = self._send_drops()
            self._inflight, self._inflight_bytes = len(batch), nbytes
            self._dropped_before = dropped_before
            pub.progress = 0
            try:
                await pub.send(batch)
            except asyncio.CancelledError:
                raise  # abandon() accounts for the batch cut short
            except Exception as exc:
                self._inflight = 0
                self._failed(batch, exc)
                continue
            self._inflight = 0
            self._account(batch, nbytes, dropped_before)

    def _drain_side(self) -> _Tally:
        """The drain side's totals now: delivered, and drops other than the put side's."""
        c = self.counters
        return _Tally(c.records, _minus(c.drops, self.put_drops), dict(c.errors))

    def ledger(self, marker: _Marker) -> dict[str, Any]:
        """This publisher's account of the run that `marker` (its end) closes."""
        now = self._drain_side()
        base, put0 = self._drain_base, marker.put0
        drops = _minus(now.drops, base.drops)
        for reason, n in _minus(marker.put.drops, put0.drops).items():
            drops[reason] = drops.get(reason, 0) + n
        return {
            "offered": marker.put.records - put0.records,
            "delivered": now.records - base.records,
            "drops": drops,
            "errors": _minus(now.errors, base.errors),
        }

    async def _run_marker(self, marker: _Marker) -> None:
        pub = self.publisher
        step = f"{marker.kind}_run"
        failure: BaseException | None = None
        try:
            if marker.kind == "begin":
                self._drain_base = self._drain_side()
                await pub.begin_run(marker.run)
            else:
                try:
                    step = "flush_run"
                    await pub.flush_run(marker.run)
                finally:
                    if not marker.ledger.done():
                        marker.ledger.set_result(self.ledger(marker))
                await marker.decided.wait()
                step = "end_run"
                await pub.end_run(marker.run)
        except asyncio.CancelledError:
            raise  # abandoned: the host settles the marker (end_orphan)
        except Exception as exc:
            failure = exc
            self.counters.error(step)
            pub.log.error("%s: %s failed: %r", pub.name, step, exc)
        if not marker.done.done():
            marker.done.set_result(failure)

    async def end_orphan(self, marker: _Marker, timeout_s: float) -> None:
        """An end marker the drain task never finished (abandoned at shutdown): end the run
        on the publisher directly, so its file still gets its end marker where it can."""
        if marker.done.done():
            return
        try:
            await asyncio.wait_for(self.publisher.end_run(marker.run), timeout_s)
        except Exception as exc:
            self.counters.error("end_run")
            self.publisher.log.error("%s: end_run failed: %r", self.publisher.name, exc)
        if not marker.done.done():
            marker.done.set_result(None)

    async def drained(self) -> None:
        """Wait until everything queued so far has been handed to the publisher."""
        while self._items or not self._idle.is_set():
            await self._idle.wait()
            await asyncio.sleep(0)

    async def abandon(self, reason: str) -> None:
        """The deadline passed: stop draining; what is queued or in flight is counted as
        dropped `reason`, and run markers still queued are settled without waiting."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        inflight, pub = self._inflight, self.publisher
        if inflight:
            # the batch cut short: what send() handled before it was cut (sent, counted as
            # dropped by send() itself, or taken by a publisher that confirms delivery itself)
            # is not dropped again; the rest is
            handled = min(pub.progress, inflight)
            if not pub.confirms_delivery:
                sent = handled - (self._send_drops() - self._dropped_before)
                if sent > 0:
                    self.counters.count(self._inflight_bytes * sent // inflight, sent)
            inflight -= handled
        left = self._records + inflight
        if left:
            self.counters.drop(reason, left)
            self.publisher.log.error(
                "%s: %d records not delivered within drain_timeout_s; counted as dropped %r",
                self.publisher.name,
                left,
                reason,
            )
        self._records = self._inflight = 0
        for item in self._items:
            if isinstance(item, _Marker) and item.kind == "end" and not item.ledger.done():
                item.ledger.set_result(self.ledger(item))
        self._items.clear()
        self._markers = 0

    async def close(self, deadline: Deadline, reason: str = "shutdown") -> None:
        """Drain until the deadline, then close. What could not be sent is counted as dropped
        (deadline.reason), including a batch cut off in the middle of its send()."""
        self._closing = reason
        self._space.set()
        ok, _ = await deadline.wait(self.drained())
        if not ok:
            await self.abandon(deadline.reason)
        elif self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        try:
            await self.publisher.close()
        except Exception as exc:
            self.publisher.log.error("%s: close failed: %r", self.publisher.name, exc)

    def accounting(self) -> dict[str, Any]:
        """Totals since start: offered = delivered + dropped + queued + in flight."""
        c = self.counters
        return {
            "offered": self.offered,
            "delivered": c.records,
            "drops": dict(c.drops),
            "queued": self._records + self._inflight,
        }

    def status(self) -> dict[str, Any]:
        pub = self.publisher
        return {
            "type": pub.settings.type,
            "policy": pub.settings.policy,
            "queue": self._records,
            "queue_size": self.size,
            "offered": self.offered,
            "addresses": dict(pub.addresses),
            **self.counters.snapshot(),
        }
