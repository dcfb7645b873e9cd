"""The `cdtp` receiver: pulls CDTP2 data from Constellation transmitters (satellites or daqd).

One PULL socket connects to each endpoint in `senders`. Each sender (keyed by the canonical name in
its messages, as Constellation does) has its own run state: NOT_CONNECTED, BOR_RECEIVED or
EOR_RECEIVED, the last sequence number and the records missed. Every DATA record becomes a daqd
Record with source = the sender's name, the sender's tags (plus `seq_tag`: its CDTP sequence
number) and its blocks as payload, memoryviews of the received message. A bad message from one
sender is counted and taints that sender's run; it never stops the receiver or the other senders.
"""

from __future__ import annotations

import asyncio
import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import zmq
import zmq.asyncio
from pydantic import Field, field_validator
from zmq.utils.monitor import parse_monitor_message

from daqd.errors import ProtocolError
from daqd.protocols import cdtp
from daqd.receiver import ReceiverServer, ReceiverSettings, parse_hostport
from daqd.record import Record
from daqd.runstate import RunCondition, RunInfo

if TYPE_CHECKING:
    from daqd.host import Host

RELINK_AFTER_S = 1.0  # a link silent this long after a disconnect was given up by ZeroMQ
DRAIN_BATCH = 16  # messages taken per wake-up before letting other tasks run
CLOSE_DRAIN_S = 2.0  # at most this long handling what is waiting in a socket when closing


class SenderState(enum.Enum):
    NOT_CONNECTED = "NOT_CONNECTED"
    BOR_RECEIVED = "BOR_RECEIVED"
    EOR_RECEIVED = "EOR_RECEIVED"


@dataclass
class Sender:
    """What the receiver knows about one transmitter's current (or last) run."""

    name: str
    state: SenderState = SenderState.NOT_CONNECTED
    seq: int = 0  # last sequence number received in this run
    missed: int = 0
    records: int = 0
    bytes: int = 0
    flags: RunCondition = RunCondition.GOOD  # what we saw go wrong during the run
    condition: RunCondition | None = None  # the run's final condition, once it ended
    ended_ns: int = 0  # when that run ended here (EOR or substitute)
    endpoint: str = ""
    runs: int = 0
    user_tags: dict[str, Any] = field(default_factory=dict)  # of the BOR
    eor_tags: dict[str, Any] = field(default_factory=dict)  # user tags of the EOR
    configuration: dict[str, Any] = field(default_factory=dict)
    run_metadata: dict[str, Any] = field(default_factory=dict)
    abort_at: float | None = None  # monotonic deadline after the sender vanished mid-run
    back: bool = False  # reconnected since it vanished: its next message cancels abort_at
    first_data_ns: int = 0  # arrival of the run's first and last DATA message
    last_data_ns: int = 0

    def snapshot(self) -> dict[str, Any]:
        return {
            "state": self.state.value,
            "seq": self.seq,
            "missed": self.missed,
            "records": self.records,
            "bytes": self.bytes,
            "endpoint": self.endpoint,
            "runs": self.runs,
            "condition_code": None if self.condition is None else int(self.condition),
            "condition": None if self.condition is None else self.condition.describe(),
            "run_id": self.run_metadata.get("run_id"),
        }


def _endpoint(value: str) -> str:
    if value.startswith("tcp://"):
        return value
    parse_hostport(value)
    return f"tcp://{value}"


class CdtpReceiverSettings(ReceiverSettings):
    senders: list[str] = Field(min_length=1)  # transmitter endpoints: "host:port" or "tcp://..."
    receive_from: list[str] | None = None  # canonical names; messages from others are refused
    eor_timeout_s: float = Field(10.0, gt=0)  # wait for EORs at end of run / after a sender left
    max_message_bytes: int = Field(cdtp.MAX_MESSAGE_BYTES, ge=4096, le=(1 << 31) - 1)
    rcvhwm: int = Field(1000, ge=0)
    seq_tag: str = "cdtp_seq"  # tag holding the CDTP sequence number; "" keeps tags untouched

    @field_validator("senders")
    @classmethod
    def _check_senders(cls, value: list[str]) -> list[str]:
        return [_endpoint(v) for v in value]


class CdtpReceiver(ReceiverServer):
    """PULL from every transmitter in `senders`; one state machine per sender name."""

    Settings = CdtpReceiverSettings
    settings: CdtpReceiverSettings

    def __init__(self, settings: CdtpReceiverSettings, host: Host) -> None:
        super().__init__(settings, host)
        self.senders: dict[str, Sender] = {n: Sender(n) for n in settings.receive_from or ()}
        self._allowed = frozenset(settings.receive_from) if settings.receive_from else None
        self._changed = asyncio.Event()  # set whenever a sender's run ends
        self._sockets: list[tuple[str, zmq.asyncio.Socket, zmq.asyncio.Socket]] = []
        self._pullers: list[asyncio.Task[None]] = []  # the receive loops, one per socket
        self._closing = False  # handling what was left in the sockets: never wait for room
        self._down: set[str] = set()  # endpoints disconnected and not connected again since

    # ----- sockets ---------------------------------------------------------------------------
    async def setup(self) -> None:
        s = self.settings
        self._closing = False
        self._down.clear()
        for i, endpoint in enumerate(s.senders):
            sock = self.host.zmq_context.socket(zmq.PULL)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.RCVHWM, s.rcvhwm)
            # libzmq drops a connection that announces a bigger message before reading it
            sock.setsockopt(zmq.MAXMSGSIZE, s.max_message_bytes)
            monitor = sock.get_monitor_socket(
                zmq.EVENT_HANDSHAKE_SUCCEEDED
                | zmq.EVENT_DISCONNECTED
                | zmq.EVENT_CONNECTED
                | zmq.EVENT_CONNECT_DELAYED
                | zmq.EVENT_CONNECT_RETRIED
            )
            sock.connect(endpoint)
            self._sockets.append((endpoint, sock, monitor))
            self.addresses[f"sender{i}" if len(s.senders) > 1 else "sender"] = endpoint

    async def close(self) -> None:
        sockets, self._sockets = self._sockets, []
        self._closing = True
        try:
            for endpoint, sock, _ in sockets:
                # what ZeroMQ already took off the wire is ours (the sender counts it as sent):
                # handle it as usual before closing, so that nothing is lost uncounted
                await self._drain(endpoint, sock)
        finally:
            for _, sock, monitor in sockets:
                try:
                    sock.disable_monitor()
                except zmq.ZMQError:
                    pass
                monitor.close(linger=0)
                sock.close(linger=0)

    async def _drain(self, endpoint: str, sock: zmq.asyncio.Socket) -> None:
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
                await self._handle(endpoint, sync, frame)
        if taken:
            self.log.info(
                "%s: %d messages waiting from %s handled before closing", self.name, taken, endpoint
            )

    async def ct_receive(self) -> None:
        # one failing loop cancels the others, and the base class restarts the receiver
        async with asyncio.TaskGroup() as group:
            self._pullers = []
            for endpoint, sock, monitor in self._sockets:
                pull = group.create_task(self._pull(endpoint, sock), name=f"{self.name}.pull")
                self._pullers.append(pull)
                group.create_task(self._watch(endpoint, sock, monitor), name=f"{self.name}.watch")

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
                    await self._handle(endpoint, sync, frame)
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

    async def _handle(self, endpoint: str, sync: zmq.Socket[bytes], frame: zmq.Frame) -> None:
        """One received message (its first frame): decoded and handled, or counted as bad."""
        if frame.more:
            parts = 1
            while frame.more:
                frame = sync.recv(copy=False)
                parts += 1
            self._bad(endpoint, f"expected 1 frame, got {parts}")
            return
        try:
            message = cdtp.decode_frame_plain(frame.buffer, max_message_bytes=self._limit)
        except ProtocolError as exc:
            self._bad(endpoint, str(exc))
            return
        try:
            if type(message) is cdtp.PlainData:
                await self._plain(endpoint, message, len(frame))
            elif type(message) is cdtp.Data:
                await self._data(endpoint, message, len(frame))
            elif type(message) is cdtp.BeginOfRun:
                self._bor(endpoint, message)
            else:
                assert isinstance(message, cdtp.EndOfRun)
                self._eor(endpoint, message)
        except ProtocolError as exc:
            self._bad(endpoint, str(exc), getattr(message, "sender", None))

    @property
    def _limit(self) -> int:
        return self.settings.max_message_bytes

    async def _watch(
        self, endpoint: str, sock: zmq.asyncio.Socket, monitor: zmq.asyncio.Socket
    ) -> None:
        """Notice a transmitter that vanishes mid-run: its run ends ABORTED after eor_timeout_s.

        Also revive a link ZeroMQ gave up on: after a protocol error (above all a message over
        max_message_bytes) libzmq closes the connection and never retries it, where a peer that
        went away is retried at once (CONNECT_DELAYED/RETRIED follow the DISCONNECTED).
        """
        silent_after_disconnect = False
        while True:
            try:
                frames = await asyncio.wait_for(
                    monitor.recv_multipart(), RELINK_AFTER_S if silent_after_disconnect else None
                )
            except TimeoutError:
                silent_after_disconnect = False
                self.counters.error("link_dropped")
                self.log.warning(
                    "%s: ZeroMQ dropped the link to %s and gave up (a message over "
                    "max_message_bytes=%d?); connecting again",
                    self.name,
                    endpoint,
                    self.settings.max_message_bytes,
                )
                try:
                    sock.disconnect(endpoint)
                except zmq.ZMQError:
                    pass
                sock.connect(endpoint)
                continue
            event = parse_monitor_message(frames)
            silent_after_disconnect = event["event"] == zmq.EVENT_DISCONNECTED
            if event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._down.discard(endpoint)
                for sender in self.senders.values():
                    if sender.endpoint == endpoint and sender.abort_at is not None:
                        sender.back = True
                continue
            if event["event"] != zmq.EVENT_DISCONNECTED:
                continue
            self.counters.extra["disconnects"] = self.counters.extra.get("disconnects", 0) + 1
            # a BOR still queued behind this event starts a run that is already gone (_bor)
            self._down.add(endpoint)
            for sender in self.senders.values():
                if sender.endpoint == endpoint and sender.state is SenderState.BOR_RECEIVED:
                    # messages already queued may still be handled after this event: only a
                    # message after a reconnection shows the sender is back
                    sender.abort_at = time.monotonic() + self.settings.eor_timeout_s
                    sender.back = False
                    self.log.info(
                        "%s: %s (%s) disconnected before its EOR was handled; its run ends "
                        "ABORTED unless an EOR or new data follows within eor_timeout_s=%s",
                        self.name,
                        sender.name,
                        endpoint,
                        self.settings.eor_timeout_s,
                    )

    async def ct_abort_vanished(self) -> None:
        """Substitute an ABORTED EOR for senders that left mid-run and did not come back."""
        while True:
            await asyncio.sleep(min(0.1, self.settings.eor_timeout_s / 4))
            now = time.monotonic()
            for sender in list(self.senders.values()):
                if sender.abort_at is not None and now >= sender.abort_at:
                    sender.abort_at = None
                    if sender.state is SenderState.BOR_RECEIVED:
                        self._substitute_eor(sender, "it disconnected and did not come back")

    # ----- messages --------------------------------------------------------------------------
    def _bad(self, endpoint: str, why: str, name: str | None = None) -> None:
        """A message we cannot use: counted, logged (rate-limited), and the sender's run tainted."""
        self.counters.error("protocol")
        for sender in self.senders.values():
            if (sender.name == name or (name is None and sender.endpoint == endpoint)) and (
                sender.state is SenderState.BOR_RECEIVED
            ):
                sender.flags |= RunCondition.TAINTED
        self.limited.warning(
            f"protocol:{endpoint}", "%s: bad CDTP message from %s: %s", self.name, endpoint, why
        )

    def _sender(self, name: str, kind: str) -> Sender:
        if self._allowed is not None and name not in self._allowed:
            raise ProtocolError(
                f"{kind} from {name!r}, which is not in receive_from "
                f"({', '.join(sorted(self._allowed))})"
            )
        sender = self.senders.get(name)
        if sender is None:
            sender = self.senders[name] = Sender(name)
        return sender

    async def _data(self, endpoint: str, message: cdtp.Data, nbytes: int) -> None:
        sender = self._sender(message.sender, "DATA")
        records = message.records
        if sender.state is not SenderState.BOR_RECEIVED:
            self.counters.drop("no_bor", len(records))
            raise ProtocolError(
                f"DATA from {sender.name} without a BOR ({sender.state.value}); "
                f"{len(records)} records dropped"
            )
        sender.endpoint = endpoint
        if sender.back:
            sender.abort_at = None
            sender.back = False
        now = time.time_ns()
        name = sender.name
        seq_tag = self.settings.seq_tag
        new_record = self.new_record
        out = []
        last = sender.seq
        for seq, tags, blocks in records:
            if seq != last + 1:
                self._sequence_break(sender, seq, last)
            last = seq
            if seq_tag:
                tags[seq_tag] = seq
            out.append(new_record(blocks, tags, source=name, time_ns=now))
        # one hand-over per message: most of the receiver's cost was per-record queueing
        await self._hand_on(out)
        sender.seq = last
        sender.records += len(records)
        sender.bytes += nbytes
        if not sender.first_data_ns:
            sender.first_data_ns = now
        sender.last_data_ns = now

    async def _plain(self, endpoint: str, message: cdtp.PlainData, nbytes: int) -> None:
        """The usual DATA message, as a table: records built in one pass, with no per-record
        checks left to do. Anything unusual (no BOR yet, a gap, a sender coming back) goes the
        record-by-record way of _data."""
        seqs = message.seqs
        sender = self.senders.get(message.sender)
        if (
            sender is None
            or sender.state is not SenderState.BOR_RECEIVED
            or not message.consecutive
            or seqs[0] != sender.seq + 1
            or sender.back
        ):
            await self._data(endpoint, message.data(), nbytes)
            return
        sender.endpoint = endpoint
        now = time.time_ns()
        name = sender.name
        n = len(seqs)
        view, length = message.frame, message.length
        # daqd's own gap-free seq of this source, counted as new_record counts it (one call per
        # record of that was a good part of the receiver's time)
        first = self.reserve_seq(name, n)
        seq_tag = self.settings.seq_tag
        if seq_tag:
            out = [
                Record(name, k, now, {seq_tag: seq}, (view[at : at + length],))
                for k, seq, at in zip(range(first, first + n), seqs, message.starts, strict=True)
            ]
        else:
            out = [
                Record(name, k, now, {}, (view[at : at + length],))
                for k, at in zip(range(first, first + n), message.starts, strict=True)
            ]
        await self._hand_on(out, n * length)
        sender.seq = seqs[-1]
        sender.records += n
        sender.bytes += nbytes
        if not sender.first_data_ns:
            sender.first_data_ns = now
        sender.last_data_ns = now

    async def _hand_on(self, records: list[Record], nbytes: int | None = None) -> None:
        """publish_many; but while closing, records that do not fit in every publisher's queue
        right now are counted as dropped 'shutdown' instead of waiting for room, so that a
        stalled publisher cannot hold up stopping. `nbytes`: the records' payload bytes where the
        message gave them at once (a plain table), which saves publish_many adding them up."""
        n = len(records)
        if self._closing and not all(q.size - q.depth >= n for q in self.queues):
            self.counters.drop("shutdown", n)
            self.limited.warning(
                "shutdown",
                "%s: stopping, and a publisher's queue is full: %d records dropped",
                self.name,
                n,
            )
            return
        await self.publish_many(records, nbytes)

    def _sequence_break(self, sender: Sender, seq: int, last: int) -> None:
        name = sender.name
        if seq > last + 1:
            gap = seq - last - 1
            sender.missed += gap
            self.counters.drop("missed", gap)
            self.limited.warning(
                f"missed:{name}",
                "%s: %d records missed from %s (seq %d after %d)",
                self.name,
                gap,
                name,
                seq,
                last,
            )
        else:
            sender.flags |= RunCondition.TAINTED
            self.counters.error("sequence")
            self.limited.warning(
                f"sequence:{name}",
                "%s: %s sent seq %d after %d (duplicate or out of order)",
                self.name,
                name,
                seq,
                last,
            )

    def _bor(self, endpoint: str, message: cdtp.BeginOfRun) -> None:
        sender = self._sender(message.sender, "BOR")
        if sender.state is SenderState.BOR_RECEIVED:
            sender.flags |= RunCondition.TAINTED
            self._substitute_eor(sender, "a new BOR arrived before its EOR")
            self.counters.error("protocol")
        sender.state = SenderState.BOR_RECEIVED
        sender.seq = sender.missed = sender.records = sender.bytes = 0
        sender.first_data_ns = sender.last_data_ns = 0
        sender.flags = RunCondition.GOOD
        sender.condition = None
        sender.endpoint = endpoint
        # a run whose sender disconnected before its BOR was handled ends ABORTED unless it
        # comes back in time, as one that disconnects later does (_watch)
        if endpoint in self._down:
            sender.abort_at = time.monotonic() + self.settings.eor_timeout_s
        else:
            sender.abort_at = None
        sender.back = False
        sender.runs += 1
        sender.user_tags = message.user_tags
        sender.eor_tags = {}
        sender.configuration = message.configuration
        sender.run_metadata = {}
        self.log.info("%s: BOR from %s (%s)", self.name, sender.name, endpoint)

    def _eor(self, endpoint: str, message: cdtp.EndOfRun) -> None:
        sender = self._sender(message.sender, "EOR")
        if sender.state is not SenderState.BOR_RECEIVED:
            raise ProtocolError(f"EOR from {sender.name} without a BOR ({sender.state.value})")
        metadata = dict(message.run_metadata)
        code = metadata.get("condition_code", 0)
        if type(code) is not int or not 0 <= code < 1 << 32:
            sender.flags |= RunCondition.TAINTED
            self.counters.error("protocol")
            self.log.warning("%s: EOR from %s has condition_code %r", self.name, sender.name, code)
            code = 0
        condition = RunCondition(code) | sender.flags
        if sender.missed:
            condition |= RunCondition.INCOMPLETE
        announced = metadata.get("data_records")
        if announced is not None and announced != sender.seq:
            condition |= RunCondition.INCOMPLETE
            self.log.warning(
                "%s: %s says its last record was %r, the last received was %d",
                self.name,
                sender.name,
                announced,
                sender.seq,
            )
        self._end_sender_run(sender, message.user_tags, metadata, condition)

    def _substitute_eor(self, sender: Sender, why: str) -> None:
        condition = RunCondition.ABORTED | sender.flags
        if sender.missed:
            condition |= RunCondition.INCOMPLETE
        self.counters.error("eor_missing")
        self.log.error(
            "%s: run of %s ends ABORTED without an EOR: %s (last seq %d, %d missed)",
            self.name,
            sender.name,
            why,
            sender.seq,
            sender.missed,
        )
        self._end_sender_run(sender, {}, {"substitute": True}, condition)

    def _end_sender_run(
        self,
        sender: Sender,
        user_tags: dict[str, Any],
        metadata: dict[str, Any],
        condition: RunCondition,
    ) -> None:
        metadata["condition_code"] = int(condition)
        metadata["condition"] = condition.describe()
        sender.state = SenderState.EOR_RECEIVED
        sender.condition = condition
        sender.ended_ns = time.time_ns()
        sender.abort_at = None
        sender.run_metadata = metadata
        sender.eor_tags = user_tags
        self.log.info(
            "%s: EOR from %s: %s, %d records, %d missed",
            self.name,
            sender.name,
            condition.describe(),
            sender.records,
            sender.missed,
        )
        self._changed.set()

    # ----- runs and status -------------------------------------------------------------------
    async def end_run(self, run: RunInfo) -> None:
        """Wait up to eor_timeout_s for every sender's EOR, then end the rest ABORTED."""
        for sender in self.senders.values():
            if sender.state is SenderState.NOT_CONNECTED:
                self.log.warning("%s: %s never sent a BOR", self.name, sender.name)
        # once the sockets are closed (the daemon is stopping) nothing more can arrive
        wait_s = self.settings.eor_timeout_s if self._sockets else 0.0
        deadline = time.monotonic() + wait_s
        while True:
            waiting = [s for s in self.senders.values() if s.state is SenderState.BOR_RECEIVED]
            left = deadline - time.monotonic()
            if not waiting or left <= 0:
                break
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), left)
            except TimeoutError:
                pass
        for sender in waiting:
            why = "the receiver stopped before its EOR"
            if wait_s:
                why = f"no EOR within eor_timeout_s={self.settings.eor_timeout_s}"
            self._substitute_eor(sender, why)
        # the daqd run holds the senders' data: a sender's flawed run makes ours flawed too (an
        # aborted sender means records are missing here, not that this run was aborted)
        for sender in self.senders.values():
            flags = sender.condition
            if flags and sender.ended_ns >= run.start_ns:
                if flags & RunCondition.ABORTED:
                    flags = (flags & ~RunCondition.ABORTED) | RunCondition.INCOMPLETE
                run.condition |= flags

    def sender_status(self) -> dict[str, dict[str, Any]]:
        return {name: sender.snapshot() for name, sender in self.senders.items()}

    def cmd_senders(self) -> dict[str, dict[str, Any]]:
        """Each sender's run state, last seq, missed records and last run condition."""
        return self.sender_status()

    def sample(self) -> None:
        super().sample()
        self.counters.extra["senders"] = self.sender_status()

    def status(self) -> dict[str, Any]:
        self.counters.extra["senders"] = self.sender_status()
        return super().status()
