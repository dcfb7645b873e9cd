"""The cdtp publisher's runs (publishers/cdtp.py): its settings, and CdtpRuns, the run side of
CdtpPublisher. `begin_run` queues the BOR (a task waits up to bor_timeout_s for a receiver to
take it), the flush timer sends a partial batch while the run goes on, `flush_run` sends what is
pending and `end_run` sends the EOR with the run's final condition. The records side (DATA
messages and their sending) is CdtpPublisher's, in publishers/cdtp.py."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

import msgpack
import zmq
import zmq.asyncio
from pydantic import Field, field_validator

from daqd import __version__
from daqd.protocols import cdtp
from daqd.publisher import Publisher, PublisherSettings
from daqd.runstate import RunCondition, RunInfo

# Constellation's receiver refuses (and dies on) messages over msgpack's 100 MiB buffer.
CONSTELLATION_LIMIT_BYTES = 100 << 20


class CdtpSettings(PublisherSettings):
    endpoint: str  # bound: e.g. "tcp://*:23999" or "tcp://127.0.0.1:0" (port 0: a free port)
    sender_name: str | None = None  # canonical "Type.Name" receivers key on; default "daqd.<name>"
    payload_threshold_kib: int = Field(128, ge=0)  # block payload per DATA message (0: each record)
    flush_interval_s: float = Field(0.1, gt=0)  # a partial batch, or tag-only records, leave after
    bor_timeout_s: float = Field(10.0, gt=0)  # wait this long for a receiver to take the BOR
    data_timeout_s: float = Field(10.0, gt=0)  # a stalled socket this long aborts the run
    eor_timeout_s: float = Field(10.0, gt=0)
    max_message_bytes: int = Field(cdtp.MAX_MESSAGE_BYTES, ge=4096, le=CONSTELLATION_LIMIT_BYTES)
    # messages the socket holds; Constellation keeps ZeroMQ's 1000, which with 128 KiB batches
    # is 128 MiB in flight and measurably slower (fresh buffers cost page faults), so fewer here
    sndhwm: int = Field(64, ge=1)
    license: str = "ODC-By-1.0"
    bor_tags: dict[str, Any] = Field(default_factory=dict)  # user tags of the BOR
    eor_tags: dict[str, Any] = Field(default_factory=dict)  # user tags of the EOR
    configuration: dict[str, Any] = Field(default_factory=dict)  # sent in the BOR with `_data`
    source_tags: bool = False  # add daqd_source / daqd_seq / daqd_time_ns to every record's tags

    @field_validator("endpoint")
    @classmethod
    def _tcp_endpoint(cls, value: str) -> str:
        if not value.startswith("tcp://") or ":" not in value[6:]:
            raise ValueError(f"expected tcp://HOST:PORT to bind, got {value!r}")
        return value

    @field_validator("bor_tags", "eor_tags", "configuration")
    @classmethod
    def _packable(cls, value: dict[str, Any]) -> dict[str, Any]:
        try:
            msgpack.packb(value, datetime=True)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"must be msgpack-able: {exc}") from None
        return value


class CdtpRuns(Publisher):
    """The runs of a CDTP transmitter: BOR, flush timer, EOR, and the state status shows. The
    socket and the run state are set up by CdtpPublisher.start (publishers/cdtp.py)."""

    settings: CdtpSettings
    sender_name: str
    encoder: cdtp.Encoder
    sock: zmq.asyncio.Socket
    _sync: zmq.Socket[bytes]
    _run: RunInfo | None
    _state: str  # idle, waiting, running, no_receiver, aborted
    _flags: RunCondition  # the CDTP run's own condition (a data timeout aborts it)
    _seq: int  # the run's last CDTP seq
    _count: int  # records pending in the DATA message being built
    _last_flush: float
    _flusher: asyncio.Task[None] | None
    _bor_task: asyncio.Task[None] | None  # a BOR waiting for a receiver

    if TYPE_CHECKING:  # the records side, CdtpPublisher's

        def _emit(self) -> None: ...

        def _discard(self) -> None: ...

        async def _outbox_sent(self) -> None: ...

    def _configuration(self) -> dict[str, Any]:
        s = self.settings
        data = {
            "bor_timeout": s.bor_timeout_s,
            "data_timeout": s.data_timeout_s,
            "eor_timeout": s.eor_timeout_s,
            "payload_threshold": s.payload_threshold_kib,
            "queue_size": s.queue_size,
            "license": s.license,
            "disable_transmission": False,
        }
        return {**s.configuration, "_data": {**data, **s.configuration.get("_data", {})}}

    async def begin_run(self, run: RunInfo) -> None:
        """Queue the BOR and return at once: where no receiver takes it right away, a task waits
        for one up to bor_timeout_s (records meanwhile wait in the queue: send() waits for it)."""
        if self._run is not None:  # a begin without an end: close the old run first
            await self.flush_run(self._run)
            await self.end_run(self._run)
        self._run = run
        self._seq = 0
        self._flags = RunCondition.GOOD
        self._discard()
        [frame] = self.encoder.encode(
            cdtp.BeginOfRun(self.sender_name, dict(self.settings.bor_tags), self._configuration())
        )
        try:
            self._sync.send(frame, zmq.NOBLOCK, copy=True)
        except zmq.Again:
            self._set_state("waiting")
            self._bor_task = asyncio.create_task(
                self._send_bor(run, frame, time.monotonic() + self.settings.bor_timeout_s),
                name=f"{self.name}.bor",
            )
            self.log.info(
                "%s: run %s: BOR waits for a CDTP receiver on %s (bor_timeout_s=%s)",
                self.name,
                run.run_id,
                self.addresses["endpoint"],
                self.settings.bor_timeout_s,
            )
            return
        self._bor_taken(run)

    def _bor_taken(self, run: RunInfo) -> None:
        self._set_state("running")
        self._last_flush = time.monotonic()
        self._flusher = asyncio.create_task(self._flush_timer(), name=f"{self.name}.flush")
        self.log.info("%s: run %s: BOR sent on %s", self.name, run.run_id, self.addresses)

    async def _send_bor(self, run: RunInfo, frame: bytes, deadline: float) -> None:
        """Wait for a receiver to take the BOR, until `deadline` (monotonic)."""
        if await self._send_frame(frame, deadline - time.monotonic()):
            self._bor_taken(run)
            return
        self._set_state("no_receiver")
        self.counters.error("bor_timeout")
        self.log.error(
            "%s: run %s: no CDTP receiver took the BOR on %s within bor_timeout_s=%s; "
            "this run's records are dropped (counted as drops 'no_receiver')",
            self.name,
            run.run_id,
            self.addresses["endpoint"],
            self.settings.bor_timeout_s,
        )

    async def _bor_settled(self) -> None:
        """Return once the BOR of this run was taken, or bor_timeout_s has passed."""
        task = self._bor_task
        if task is not None:
            await asyncio.shield(task)
            self._bor_task = None

    async def _stop_flush_timer(self) -> None:
        """Stop the flush timer (its flushes never wait: see _emit)."""
        task, self._flusher = self._flusher, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def flush_run(self, run: RunInfo) -> None:
        """The run's last record was handed over: wait for the BOR (up to bor_timeout_s from
        the run's begin), then send what is pending; what cannot leave is counted as dropped."""
        await self._bor_settled()
        await self._stop_flush_timer()
        self._emit()
        await self._outbox_sent()
        if self._count:  # not in a run that can take them (aborted): never delivered
            self.counters.drop(self._state, self._count)
            self._discard()

    async def end_run(self, run: RunInfo) -> None:
        """Send the EOR with the run's final condition; count errors["eor_timeout"] (and flag
        the run DEGRADED) if no receiver takes it within eor_timeout_s."""
        await self._bor_settled()
        await self._stop_flush_timer()
        await self._outbox_sent()
        state = self._state
        self._run = None
        if state in ("running", "aborted"):
            # the CDTP run's own flags (ABORTED|TAINTED after a data timeout) go to the EOR too
            condition = RunCondition(int(run.condition)) | self._flags
            metadata: dict[str, Any] = {
                "version": f"daqd {__version__}",
                "run_id": run.run_id,
                "time_start": msgpack.Timestamp.from_unix_nano(run.start_ns),
                "time_end": msgpack.Timestamp.from_unix_nano(run.end_ns or time.time_ns()),
                "license": self.settings.license,
                "condition_code": int(condition),
                "condition": condition.describe(),
                "data_records": self._seq,
                "records": dict(run.records),
            }
            [frame] = self.encoder.encode(
                cdtp.EndOfRun(self.sender_name, dict(self.settings.eor_tags), metadata)
            )
            if await self._send_frame(frame, self.settings.eor_timeout_s):
                self.log.info(
                    "%s: run %s: EOR sent, %d records, %s",
                    self.name,
                    run.run_id,
                    self._seq,
                    condition.describe(),
                )
            else:
                self.counters.error("eor_timeout")  # the host flags the run DEGRADED
                self.log.error(
                    "%s: run %s: the EOR could not be sent within eor_timeout_s=%s",
                    self.name,
                    run.run_id,
                    self.settings.eor_timeout_s,
                )
        self._set_state("idle")

    def _set_state(self, state: str) -> None:
        self._state = state
        self.counters.extra["state"] = state
        self.counters.extra["seq"] = self._seq

    async def _flush_timer(self) -> None:
        interval = self.settings.flush_interval_s
        while True:
            await asyncio.sleep(interval)
            if self._count and time.monotonic() - self._last_flush >= interval:
                self._emit()

    async def _send_frame(self, frame: bytes, timeout_s: float) -> bool:
        """Send without waiting if the socket has room; else wait up to timeout_s. False: timed out."""
        try:
            self._sync.send(frame, zmq.NOBLOCK, copy=True)
            return True
        except zmq.Again:
            pass
        try:
            await asyncio.wait_for(self.sock.send(frame, copy=True), timeout_s)
        except TimeoutError:
            return False
        return True
