"""The `cdtp` receiver: pulls CDTP2 data from Constellation transmitters (satellites or daqd).

One PULL socket connects to each endpoint in `senders`, and (`discover = true`, with the
[constellation] table) to each DATA service CHIRP finds in the group, of the canonical names in
`receive_from` if given, as it is offered; a DEPART closes it after handling what it holds (a
sender that departs mid-run ends ABORTED unless its EOR or an offer comes back in time). The
sockets, their tasks and the discovery are daqd/cdtp_links.py's. Each sender (keyed by the
canonical name in its messages, as Constellation does) has its own run state
(daqd/cdtp_senders.py): NOT_CONNECTED, BOR_RECEIVED or EOR_RECEIVED, the last sequence number and
the records missed. Every DATA record becomes a daqd Record with source = the sender's name, the
sender's tags (plus `seq_tag`: its CDTP sequence number) and its blocks as payload, memoryviews of
the received message. A bad message from one
sender is counted under a named reason (which flags the daqd run by the host's rule table) and
taints that sender's run; it never stops the receiver or the other senders.

State is bounded: at most `max_senders` names are tracked besides those in `receive_from`; a
sender not in a run is forgotten after `sender_idle_s`, or at once when a new one needs its place.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

import zmq
from pydantic import Field, field_validator, model_validator

from daqd.cdtp_links import CdtpLinks
from daqd.cdtp_senders import Refused, RunAccount, Sender, SenderState, SenderTable
from daqd.errors import ProtocolError
from daqd.hostport import parse_hostport
from daqd.protocols import cdtp
from daqd.receiver import ReceiverServer, ReceiverSettings
from daqd.record import Record
from daqd.runstate import RunCondition, RunInfo

if TYPE_CHECKING:
    from daqd.host import Host


def _endpoint(value: str) -> str:
    if value.startswith("tcp://"):
        return value
    parse_hostport(value)
    return f"tcp://{value}"


class CdtpReceiverSettings(ReceiverSettings):
    senders: list[str] = []  # transmitter endpoints: "host:port" or "tcp://..."
    discover: bool = False  # also every DATA offer of the [constellation] group, found by CHIRP
    receive_from: list[str] | None = None  # canonical names; messages from others are refused
    eor_timeout_s: float = Field(10.0, gt=0)  # wait for EORs at end of run / after a sender left
    max_message_bytes: int = Field(cdtp.MAX_MESSAGE_BYTES, ge=4096, le=(1 << 31) - 1)
    rcvhwm: int = Field(1000, ge=0)
    seq_tag: str = "cdtp_seq"  # tag holding the CDTP sequence number; "" keeps tags untouched
    max_senders: int = Field(64, ge=1)  # names tracked besides receive_from's
    sender_idle_s: float = Field(600.0, gt=0)  # a sender not in a run is forgotten after this

    @field_validator("senders")
    @classmethod
    def _check_senders(cls, value: list[str]) -> list[str]:
        return [_endpoint(v) for v in value]

    @model_validator(mode="after")
    def _some_sender(self) -> CdtpReceiverSettings:
        if not self.senders and not self.discover:
            raise ValueError("no senders: give senders (endpoints), or discover = true")
        if self.discover and self.process:
            raise ValueError("discover takes CHIRP from the daemon: not with process = true")
        return self

    def constellation_keys(self) -> list[str]:
        return ["discover"] if self.discover else []


class CdtpReceiver(ReceiverServer):
    """PULL from every transmitter in `senders`; one state machine per sender name."""

    Settings = CdtpReceiverSettings
    settings: CdtpReceiverSettings

    def __init__(self, settings: CdtpReceiverSettings, host: Host) -> None:
        super().__init__(settings, host)
        self.table = SenderTable(settings.receive_from, settings.max_senders, self._evicted)
        self.senders = self.table.senders  # name -> its run state (the table's)
        # this daqd run: what the sender runs that ended in it add up to, and what to report
        self.account = RunAccount()
        self.last_report: dict[str, Any] | None = None  # the last daqd run's (see _report)
        self._changed = asyncio.Event()  # set whenever a sender's run ends
        self.links = CdtpLinks(
            self,
            rcvhwm=settings.rcvhwm,
            max_message_bytes=settings.max_message_bytes,
            handle=self._handle,
            up=self._link_up,
            down=self._link_down,
            retired=self._link_retired,
        )
        self._open = False  # between setup and close: more can arrive
        self._closing = False  # handling what was left in the sockets: never wait for room

    # ----- links (daqd/cdtp_links.py) ---------------------------------------------------------
    async def setup(self) -> None:
        s = self.settings
        self._closing = False
        self._open = True
        self.links.open(s.senders, s.discover, s.receive_from)

    async def close(self) -> None:
        self._closing = True
        self._open = False
        await self.links.close()

    async def ct_receive(self) -> None:
        """Run every link's receive tasks, and those of links discovered later; one failing
        task cancels the others, and the base class restarts the receiver."""
        await self.links.run()

    def _evicted(self, sender: Sender) -> None:
        """The table forgot a sender (idle, or making room): counted in this receiver's
        counters, which a rebuild with the same name carries on."""
        extra = self.counters.extra
        extra["senders_evicted"] = extra.get("senders_evicted", 0) + 1

    def _link_up(self, endpoint: str) -> None:
        """A connection is made: senders of it that vanished mid-run are back."""
        for sender in self.senders.values():
            if sender.endpoint == endpoint and sender.abort_at is not None:
                sender.back = True

    def _link_down(self, endpoint: str) -> None:
        """A transmitter vanished mid-run: its run ends ABORTED after eor_timeout_s unless it
        comes back."""
        for sender in self.senders.values():
            if sender.endpoint == endpoint and sender.state is SenderState.BOR_RECEIVED:
                # messages already queued may still be handled after this event: only a
                # message after a reconnection shows the sender is back
                sender.abort_at = time.monotonic() + self.settings.eor_timeout_s
                sender.back = False
                self.log.debug(
                    "%s: %s (%s) disconnected before its EOR was handled; its run ends "
                    "ABORTED unless an EOR or new data follows within eor_timeout_s=%s",
                    self.name,
                    sender.name,
                    endpoint,
                    self.settings.eor_timeout_s,
                )

    def _link_retired(self, endpoint: str) -> None:
        """A discovered sender departed (or moved) and its link is closed: a sender of it still
        in a run ends ABORTED unless it comes back in time."""
        for sender in self.senders.values():
            if sender.endpoint == endpoint and sender.state is SenderState.BOR_RECEIVED:
                sender.abort_at = time.monotonic() + self.settings.eor_timeout_s
                sender.back = False

    async def _handle(self, endpoint: str, sync: zmq.Socket[bytes], frame: zmq.Frame) -> None:
        """One received message (its first frame): decoded and handled, or counted as bad."""
        if frame.more:
            parts = 1
            while frame.more:
                frame = sync.recv(copy=False)
                parts += 1
            self._bad(endpoint, "malformed", f"expected 1 frame, got {parts}")
            return
        try:
            message = cdtp.decode_frame_plain(frame.buffer, max_message_bytes=self._limit)
        except cdtp.WrongProtocol as exc:
            self._bad(endpoint, "protocol", str(exc))
            return
        except ProtocolError as exc:
            self._bad(endpoint, "malformed", str(exc))
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
        except Refused as exc:
            self._bad(endpoint, exc.reason, str(exc), message.sender)
        except ProtocolError as exc:
            self._bad(endpoint, "malformed", str(exc), message.sender)

    @property
    def _limit(self) -> int:
        return self.settings.max_message_bytes

    async def ct_abort_vanished(self) -> None:
        """Substitute an ABORTED EOR for senders that left mid-run and did not come back; once
        a second, forget senders idle for longer than sender_idle_s."""
        next_sweep = time.monotonic() + 1.0
        while True:
            await asyncio.sleep(min(0.1, self.settings.eor_timeout_s / 4))
            now = time.monotonic()
            for sender in list(self.senders.values()):
                if sender.abort_at is not None and now >= sender.abort_at:
                    sender.abort_at = None
                    if sender.state is SenderState.BOR_RECEIVED:
                        self._substitute_eor(sender, "it disconnected and did not come back")
            if now >= next_sweep:
                next_sweep = now + 1.0
                idle_since = now - self.settings.sender_idle_s
                for sender in list(self.senders.values()):
                    if self.table.evictable(sender) and sender.active < idle_since:
                        self.table.evict(sender)

    # ----- messages --------------------------------------------------------------------------
    def _bad(self, endpoint: str, reason: str, why: str, name: str | None = None) -> None:
        """A message we cannot use: counted as errors[reason], logged (rate-limited), and the
        sender's open run tainted."""
        self.counters.error(reason)
        for sender in self.senders.values():
            if (sender.name == name or (name is None and sender.endpoint == endpoint)) and (
                sender.state is SenderState.BOR_RECEIVED
            ):
                sender.flags |= RunCondition.TAINTED
        self.limited.warning(
            f"{reason}:{endpoint}",
            "%s: bad CDTP message from %s (%s): %s",
            self.name,
            endpoint,
            reason,
            why,
        )

    def _refuse_without_bor(self, name: str, kind: str, state: str) -> Refused:
        """DATA or EOR from a sender not in a run: remembered for this daqd run's report (a
        few names), never as sender state."""
        self.account.no_bor(name)
        return Refused(
            f"{kind.lower()}_without_bor", f"{kind} from {name!r} without a BOR ({state})"
        )

    async def _data(self, endpoint: str, message: cdtp.Data, nbytes: int) -> None:
        sender = self.table.known(message.sender, "DATA")
        records = message.records
        if (
            sender is None
            and self.table.full()
            and not any(map(self.table.evictable, self.senders.values()))
        ):
            self.counters.drop("too_many_senders", len(records))
            raise Refused(
                "too_many_senders",
                f"DATA from {message.sender!r}, not tracked: max_senders="
                f"{self.settings.max_senders} senders are all in a run; "
                f"{len(records)} records dropped",
            )
        if sender is None or sender.state is not SenderState.BOR_RECEIVED:
            self.counters.drop("no_bor", len(records))
            state = "unknown" if sender is None else sender.state.value
            raise self._refuse_without_bor(message.sender, "DATA", state)
        sender.endpoint = endpoint
        sender.active = time.monotonic()
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
        sender.active = time.monotonic()
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
                "missed",
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
                "sequence",
                "%s: %s sent seq %d after %d (duplicate or out of order)",
                self.name,
                name,
                seq,
                last,
            )

    def _bor(self, endpoint: str, message: cdtp.BeginOfRun) -> None:
        sender = self.table.track(message.sender)
        if sender.state is SenderState.BOR_RECEIVED:
            # its open run ends here, as it stands (ABORTED, TAINTED: it never sent an EOR)
            sender.flags |= RunCondition.TAINTED
            self.counters.error("bor_twice")
            self.limited.warning(
                "bor_twice",
                "%s: a second BOR from %s (%s) before its EOR; its open run ends ABORTED",
                self.name,
                sender.name,
                endpoint,
            )
            self._substitute_eor(sender, "a new BOR arrived before its EOR")
        sender.state = SenderState.BOR_RECEIVED
        sender.seq = sender.missed = sender.records = sender.bytes = 0
        sender.first_data_ns = sender.last_data_ns = 0
        sender.flags = RunCondition.GOOD
        sender.condition = None
        sender.endpoint = endpoint
        sender.active = time.monotonic()
        # a run whose sender disconnected before its BOR was handled ends ABORTED unless it
        # comes back in time, as one that disconnects later does (_link_down)
        if endpoint in self.links.lost:
            sender.abort_at = time.monotonic() + self.settings.eor_timeout_s
        else:
            sender.abort_at = None
        sender.back = False
        sender.runs += 1
        sender.user_tags = message.user_tags
        sender.eor_tags = {}
        sender.configuration = message.configuration
        sender.run_metadata = {}
        self.log.debug("%s: BOR from %s (%s)", self.name, sender.name, endpoint)

    def _eor(self, endpoint: str, message: cdtp.EndOfRun) -> None:
        sender = self.table.known(message.sender, "EOR")
        if sender is None or sender.state is not SenderState.BOR_RECEIVED:
            state = "unknown" if sender is None else sender.state.value
            raise self._refuse_without_bor(message.sender, "EOR", state)
        sender.active = time.monotonic()
        metadata = dict(message.run_metadata)
        code = metadata.get("condition_code", 0)
        if type(code) is not int or not 0 <= code < 1 << 32:
            sender.flags |= RunCondition.TAINTED
            self.counters.error("condition_code")
            self.limited.warning(
                "condition_code",
                "%s: EOR from %s has condition_code %r",
                self.name,
                sender.name,
                code,
            )
            code = 0
        condition = RunCondition(code) | sender.flags
        if sender.missed:
            condition |= RunCondition.INCOMPLETE
        announced = metadata.get("data_records")
        if announced is not None and announced != sender.seq:
            condition |= RunCondition.INCOMPLETE
            if type(announced) is int and announced > sender.seq:
                # the records it sent after the last that came here (a run whose link gave out)
                # were missed, as those of a gap are
                gap = announced - sender.seq
                sender.missed += gap
                self.counters.drop("missed", gap)
            self.limited.warning(
                "data_records",
                "%s: %s says its last record was %r, the last received was %d",
                self.name,
                sender.name,
                announced,
                sender.seq,
            )
        self._end_sender_run(sender, message.user_tags, metadata, condition)

    def _substitute_eor(self, sender: Sender, why: str) -> None:
        """End a sender's run that got no EOR: ABORTED; the EOR counts as input lost."""
        condition = RunCondition.ABORTED | sender.flags
        if sender.missed:
            condition |= RunCondition.INCOMPLETE
        self.counters.drop("eor_missing")
        self.limited.warning(
            "eor_missing",
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
        self.log.debug(
            "%s: EOR from %s: %s, %d records, %d missed",
            self.name,
            sender.name,
            condition.describe(),
            sender.records,
            sender.missed,
        )
        self.account.sender_run_ended(sender, metadata, condition)
        self._changed.set()

    # ----- runs and status -------------------------------------------------------------------
    async def begin_run(self, run: RunInfo) -> None:
        self.account.begin()

    async def end_run(self, run: RunInfo) -> None:
        """Wait up to eor_timeout_s for every sender's EOR, then end the rest ABORTED; the
        sender runs that ended in this daqd run flag it, and are reported."""
        # once the sockets are closed (the daemon is stopping) nothing more can arrive
        wait_s = self.settings.eor_timeout_s if self._open else 0.0
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
        self.account.inherit(run, self.name)
        self._report(run)

    def _report(self, run: RunInfo) -> None:
        """One line per daqd run (RunAccount.report), and status's last_run."""
        parts, report = self.account.report(run, self.senders.values())
        level = logging.WARNING if len(parts) > 1 else logging.INFO
        self.log.log(level, "%s: run %s: %s", self.name, run.run_id, "; ".join(parts))
        self.last_report = report

    def cmd_senders(self) -> dict[str, dict[str, Any]]:
        """Each sender's run state, last seq, missed records and last run condition."""
        return self.table.status()

    def refresh_extra(self) -> None:
        extra = self.counters.extra
        extra["senders"] = self.table.status()
        extra["senders_tracked"] = len(self.senders)
        extra.setdefault("senders_evicted", 0)
        if self.last_report is not None:
            extra["last_run"] = self.last_report
