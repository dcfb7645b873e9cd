"""The `cdtp` publisher: a Constellation-compatible data transmitter (PUSH; BOR, DATA, EOR).

Any Constellation receiver (a C++ or Python receiver satellite, or daqd's `cdtp` receiver)
connects a PULL socket to `endpoint`. A daqd run is one CDTP run: `begin_run` queues the BOR (a
task waits up to bor_timeout_s for a receiver to take it), records go out batched into DATA
messages, `flush_run` sends what is pending, `end_run` sends EOR with the run's final condition.
A record counts as delivered only when the DATA message holding it left (libzmq took it).

Here: the socket, its peers, and the records: batched into DATA messages (a run of plain records
encoded at once) and sent in order. The settings and the runs (BOR, flush timer, EOR) are in
daqd/cdtp_runs.py: CdtpSettings, and CdtpRuns, the base class of CdtpPublisher.
"""

from __future__ import annotations

import asyncio
import itertools
import operator
import time
from collections import deque

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from daqd.cdtp_runs import CdtpRuns, CdtpSettings
from daqd.errors import ProtocolError
from daqd.logs import LimitedLogger
from daqd.protocols import cdtp
from daqd.record import Block, Record
from daqd.runstate import RunCondition, RunInfo

#: Runs of at least this many plain records are encoded at once (cdtp.plain_records); shorter
#: ones cost less record by record
PLAIN_RUN_MIN = 16

_tags = operator.attrgetter("tags")
_payload = operator.attrgetter("payload")
_nbytes = operator.attrgetter("nbytes")
_first = operator.itemgetter(0)


def _plain_blocks(records: list[Record], length: int) -> list[Block] | None:
    """The blocks of `records` if every one is plain (no tags, one block of `length` bytes), else
    None; checked with C-level loops, a property at a time."""
    n = len(records)
    if any(map(_tags, records)):
        return None
    payloads = list(map(_payload, records))
    if list(map(len, payloads)).count(1) != n:
        return None
    blocks: list[Block] = list(map(_first, payloads))
    kinds = set(map(type, blocks))
    if kinds <= {bytes, bytearray}:
        lengths = list(map(len, blocks))
    elif kinds == {memoryview}:
        lengths = list(map(_nbytes, blocks))
    else:
        return None
    return blocks if lengths.count(length) == n else None


class CdtpPublisher(CdtpRuns):
    """PUSH bound on `endpoint`; batches records into DATA messages by `payload_threshold_kib`.

    One receiver per transmitter: ZeroMQ's PUSH would split a run between two receivers, so a
    second connected receiver is reported loudly (log, errors["second_receiver"], status).
    Records that arrive outside a run are counted as drops "outside_run" (CDTP needs a BOR first).
    """

    Settings = CdtpSettings
    settings: CdtpSettings
    confirms_delivery = True  # records wait in a DATA message being built after send() returns

    async def start(self) -> None:
        s = self.settings
        self.sender_name = s.sender_name or f"daqd.{self.name}"
        self.encoder = cdtp.Encoder(self.sender_name)
        self.limited = LimitedLogger(self.log)
        sock = self.host.zmq_context.socket(zmq.PUSH)
        sock.setsockopt(zmq.LINGER, int(s.eor_timeout_s * 1000))
        sock.setsockopt(zmq.SNDHWM, s.sndhwm)
        sock.setsockopt(zmq.IMMEDIATE, 1)
        endpoint = s.endpoint[:-2] + ":*" if s.endpoint.endswith(":0") else s.endpoint
        try:
            sock.bind(endpoint)
        except zmq.ZMQError:
            sock.close(linger=0)
            raise
        self.sock: zmq.asyncio.Socket = sock
        self._sync: zmq.Socket[bytes] = zmq.Socket.shadow(sock.underlying)
        self.addresses["endpoint"] = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._monitor = sock.get_monitor_socket(zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED)
        self._monitor_task = asyncio.create_task(self._watch_peers(), name=f"{self.name}.peers")
        self._peers = 0
        self._run: RunInfo | None = None
        self._state = "idle"  # idle, running, no_receiver, aborted
        self._flags = RunCondition.GOOD
        self._seq = 0
        self._parts: list[Block] = []
        self._count = 0
        self._payload = 0
        self._size = 0
        self._last_flush = time.monotonic()
        self._flusher: asyncio.Task[None] | None = None
        # DATA messages waiting for room in the socket, in order: (frame, records, payload)
        self._outbox: deque[tuple[Block, int, int]] = deque()
        self._outbox_task: asyncio.Task[None] | None = None  # sends them, one at a time
        self._bor_task: asyncio.Task[None] | None = None  # a BOR waiting for a receiver
        self._closed = False
        self._threshold = s.payload_threshold_kib * 1024
        # the longest message header: protocol, sender name, type and the records' array header
        self._spare = len(self.encoder.header_bytes(cdtp.MessageType.DATA, 0xFFFF + 1))
        self._lead = 0  # bytes left free for the header at the start of _parts[0] (a run)
        self._room = s.max_message_bytes - self._spare
        self.counters.extra.update(
            sender_name=self.sender_name, state="idle", receivers_connected=0, messages=0
        )

    # ----- peers -----------------------------------------------------------------------------
    async def _watch_peers(self) -> None:
        while True:
            try:
                event = parse_monitor_message(await self._monitor.recv_multipart())
            except zmq.ZMQError:
                return
            if event["event"] == zmq.EVENT_ACCEPTED:
                self._peers += 1
                if self._peers > 1:
                    self.counters.error("second_receiver")
                    self.limited.warning(
                        "second_receiver",
                        "%s: %d CDTP receivers are connected to %s; PUSH splits every run between "
                        "them, so each sees an incomplete run. Connect exactly one receiver.",
                        self.name,
                        self._peers,
                        self.addresses["endpoint"],
                    )
            elif event["event"] == zmq.EVENT_DISCONNECTED:
                self._peers = max(0, self._peers - 1)
            self.counters.extra["receivers_connected"] = self._peers

    # ----- records ---------------------------------------------------------------------------
    async def send(self, records: list[Record]) -> None:
        """Take the batch into DATA messages. Records taken (`progress`) are this publisher's
        to count, delivered or dropped; a send() cut short at shutdown leaves the rest to the
        queue. While a message waits for room, the next is built only once it left: building
        the whole batch ahead into fresh memory cost twice the CPU per 64 KiB record."""
        if self._bor_task is not None:  # records wait here (and in the queue) for the BOR
            await self._bor_settled()
        if self._outbox:  # the receiver is slow: the batch waits here, and in the queue
            await self._outbox_sent()
        i, n = 0, len(records)
        while True:
            if self._state != "running":
                if i < n:
                    reason = "outside_run" if self._state == "idle" else self._state
                    self.counters.drop(reason, n - i)
                return
            i = self.progress = self._take(records, i)
            if i < n or (self._count and self._payload >= self._threshold):
                self._emit()
                if self._outbox and i < n:
                    await self._outbox_sent()
            else:
                return

    def _take(self, records: list[Record], i: int) -> int:
        """Encode records[i:] into the pending batch until they run out or the batch is due (its
        payload reached the threshold, or the next record does not fit); return where it
        stopped. Never waits: the hot path, with the batch state in locals."""
        n = len(records)
        room = self._room
        threshold = self._threshold
        source_tags = self.settings.source_tags
        parts = self._parts
        append = parts.append
        plain_head, plain_tail = cdtp.plain_record_head, cdtp.plain_record_tail
        seq_head, seq32_head = cdtp.record_seq_head, cdtp.seq32_record_head
        tags_bytes = self.encoder.tags_bytes
        tail, one_block, tail_length = b"", b"", -1  # by block length: plain_tail, its block part
        seq, count, total, payload_sum = self._seq, self._count, self._size, self._payload
        runs = not source_tags  # until a run turns out not to be plain
        while i < n and (payload_sum < threshold or not count):
            if runs:
                # the usual records (no tags, one block, all of one length) a run at a time,
                # checked and encoded with C-level loops: as many as the batch takes, with seqs
                # of one width
                record = records[i]
                blocks = record.payload
                if not record.tags and len(blocks) == 1 and seq < 0xFFFFFFFF:
                    block = blocks[0]
                    length = block.nbytes if type(block) is memoryview else len(block)
                else:
                    length = 0
                if length:
                    first = seq + 1
                    size = len(plain_head(first, length)) + length
                    k = min(
                        n - i,
                        cdtp.seq_width_end(first) - seq,
                        (room - total) // size,
                        (threshold - payload_sum + length - 1) // length,  # up to the threshold
                    )
                    if k >= PLAIN_RUN_MIN:
                        run = _plain_blocks(records[i : i + k], length)
                        if run is not None:
                            if parts:
                                append(cdtp.plain_records(first, run, length))
                            else:  # the message starts here: leave room for its header
                                append(cdtp.plain_records(first, run, length, self._spare))
                                self._lead = self._spare
                            seq += k
                            count += k
                            total += k * size
                            payload_sum += k * length
                            i += k
                            continue
                        runs = False
            if not source_tags:
                # the usual records (one block; no tags, or tags such as the cdtp receiver's
                # seq_tag) in a tight loop; anything else, tags that cannot be encoded, and what
                # ends a batch, are left to the record-by-record code below
                for record in itertools.islice(records, i, None):
                    blocks = record.payload
                    if len(blocks) != 1:
                        break
                    block = blocks[0]
                    length = block.nbytes if type(block) is memoryview else len(block)
                    if length != tail_length:
                        tail, tail_length = plain_tail(length), length
                        one_block = tail[1:]
                    tags = record.tags
                    if tags:
                        try:
                            rest = tags_bytes(tags) + one_block
                        except ProtocolError:
                            break
                    else:
                        rest = tail
                    next_seq = seq + 1
                    if 0xFFFF < next_seq <= 0xFFFFFFFF:
                        head = seq32_head(next_seq) + rest
                    elif next_seq <= 0xFFFF:
                        head = seq_head(next_seq) + rest
                    else:
                        break
                    size = len(head) + length
                    if total + size > room:
                        break
                    append(head)
                    append(block)
                    seq = next_seq
                    count += 1
                    total += size
                    payload_sum += length
                    i += 1
                    if payload_sum >= threshold:
                        break
                if i >= n or payload_sum >= threshold:
                    break
            record = records[i]
            tags = record.tags
            if source_tags:
                tags = {
                    **tags,
                    "daqd_source": record.source,
                    "daqd_seq": record.seq,
                    "daqd_time_ns": record.time_ns,
                }
            next_seq = seq + 1
            more: list[Block] = []
            try:
                size, length = self.encoder.record_parts(next_seq, tags, record.payload, more)
            except ProtocolError as exc:
                seq = self._seq = next_seq
                self._refuse(record, f"its tags cannot be encoded: {exc}")
                i += 1
                continue
            if size > room:
                seq = self._seq = next_seq
                self._refuse(
                    record,
                    f"it needs {size} bytes, over max_message_bytes="
                    f"{self.settings.max_message_bytes} with the header",
                )
                i += 1
                continue
            if total + size > room:
                break  # it goes first in the next message
            parts.extend(more)
            seq = next_seq
            count += 1
            total += size
            payload_sum += length
            i += 1
        self._seq, self._count, self._size, self._payload = seq, count, total, payload_sum
        return i

    def _refuse(self, record: Record, why: str) -> None:
        self.counters.drop("refused")  # a drop, not a publisher error: the receiver is fine
        self._flags |= RunCondition.INCOMPLETE
        self.limited.warning(
            "refused",
            "%s: record %s#%d (CDTP seq %d) refused: %s",
            self.name,
            record.source,
            record.seq,
            self._seq,
            why,
        )

    def _discard(self) -> None:
        self._parts = []
        self._count = self._payload = self._size = self._lead = 0

    def _frame(self) -> Block:
        """The pending records as one DATA frame: the header written into the room left for it
        where a run of records starts the message and is all of it, else all parts joined."""
        header = self.encoder.header_bytes(cdtp.MessageType.DATA, self._count)
        parts, lead = self._parts, self._lead
        if not lead:
            return b"".join((header, *parts))
        run = parts[0]
        assert isinstance(run, bytearray)
        if len(parts) == 1:
            start = lead - len(header)
            run[start:lead] = header
            return memoryview(run)[start:]
        parts[0] = memoryview(run)[lead:]
        return b"".join((header, *parts))

    def _emit(self) -> None:
        """The pending records as one DATA message (never an empty one): sent at once if the
        socket has room and no message waits before it, else put in the outbox, which a task
        sends in order as room comes. Never waits."""
        if not self._count or self._state != "running":
            return
        count, payload = self._count, self._payload
        frame = self._frame()
        self._discard()
        self._last_flush = time.monotonic()
        outbox = self._outbox
        if not outbox:
            try:
                self._sync.send(frame, zmq.NOBLOCK, copy=True)
            except zmq.Again:
                pass
            else:
                self._sent(count, payload)
                return
        outbox.append((frame, count, payload))
        if self._outbox_task is None:
            self._outbox_task = asyncio.create_task(self._send_outbox(), name=f"{self.name}.out")

    def _sent(self, count: int, payload: int) -> None:
        """A DATA message left (libzmq took it): its records are delivered."""
        self.delivered(count, payload)
        self.counters.extra["messages"] += 1
        self.counters.extra["seq"] = self._seq

    async def _outbox_sent(self) -> None:
        """Return once every DATA message in the outbox left, or was counted as dropped."""
        task = self._outbox_task
        if task is not None:
            await asyncio.shield(task)

    def _drop_outbox(self, reason: str) -> int:
        count = sum(c for _, c, _ in self._outbox)
        self._outbox.clear()
        if count:
            self.counters.drop(reason, count)
        return count

    async def _send_outbox(self) -> None:
        """Send the waiting DATA messages in order; one that waits for data_timeout_s aborts
        the run. Cancelled (close, at the shutdown deadline): what waits is counted as dropped."""
        outbox = self._outbox
        try:
            while outbox:
                frame, count, payload = outbox[0]
                try:
                    await asyncio.wait_for(
                        self.sock.send(frame, copy=True), self.settings.data_timeout_s
                    )
                except TimeoutError:
                    self._abort()
                    return
                outbox.popleft()
                self._sent(count, payload)
        except asyncio.CancelledError:
            deadline = self.host.deadline
            self._drop_outbox(deadline.reason if deadline else "shutdown")
            raise
        finally:
            self._outbox_task = None

    def _abort(self) -> None:
        """The receiver took nothing for data_timeout_s: the run is ABORTED, what waits and the
        rest of the run are dropped."""
        self._flags |= RunCondition.ABORTED | RunCondition.TAINTED
        self._set_state("aborted")
        self.counters.error("data_timeout")
        count = self._drop_outbox("aborted")
        run_id = self._run.run_id if self._run else "?"
        self.log.error(
            "%s: run %s ABORTED: the CDTP receiver took nothing for data_timeout_s=%s; "
            "%d waiting records and the rest of the run are dropped (drops 'aborted')",
            self.name,
            run_id,
            self.settings.data_timeout_s,
            count,
        )

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        task, self._bor_task = self._bor_task, None
        if task is not None:  # closing: a BOR still waiting will not be taken now
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            if self._state == "waiting":
                self._set_state("no_receiver")
        await self._stop_flush_timer()
        # what is pending leaves as one last DATA message, after those waiting for room (or,
        # if the receiver takes nothing for data_timeout_s, is counted as dropped); at shutdown
        # only within what is left of the daemon's deadline
        self._emit()
        task = self._outbox_task
        if task is not None:
            deadline = self.host.deadline
            if deadline is None:  # reconfigure: no shutdown deadline
                await asyncio.shield(task)
            elif not (await deadline.wait(asyncio.shield(task)))[0]:
                task.cancel()  # what waits is counted as dropped under deadline.reason
                await asyncio.gather(task, return_exceptions=True)
        if self._count:  # not in a run that can take them (aborted, no receiver)
            self.counters.drop("shutdown", self._count)
            self._discard()
        self._monitor_task.cancel()
        await asyncio.gather(self._monitor_task, return_exceptions=True)
        self.sock.disable_monitor()
        self._monitor.close(linger=0)
        # what is queued in the socket (the last DATA, the EOR) still leaves, within
        # eor_timeout_s (at shutdown, within what is left of the deadline)
        linger_s = self.settings.eor_timeout_s
        deadline = self.host.deadline
        if deadline is not None:
            linger_s = min(linger_s, deadline.remaining())
        self.sock.close(linger=int(linger_s * 1000))
