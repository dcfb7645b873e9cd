"""Parent side: `WorkerReceiver`, the stand-in for a receiver with `process = true`."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import sys
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, TypeVar

import msgpack
import zmq
import zmq.asyncio

from daqd.endpoints import runtime_dir
from daqd.errors import ControlError, ProtocolError
from daqd.protocols import iccp
from daqd.receiver import ReceiverServer, ReceiverSettings
from daqd.record import Record
from daqd.runstate import RunInfo

if TYPE_CHECKING:
    from daqd.host import Host
from daqd.worker.link import _codec, _is_mark

log = logging.getLogger("daqd.worker")
T = TypeVar("T")


class WorkerReceiver(ReceiverServer):
    """A receiver whose real work runs in a child process (`process = true`)."""

    start_timeout_s = 10.0  # READY, and the answer to CONF
    request_timeout_s = 5.0
    stop_timeout_extra_s = 10.0  # FINISHED after STOP: this plus the drain timeout
    data_hwm = 10000  # records in flight on the data link, each way (PUSH and PULL)
    stat_interval_s = 1.0  # how often the worker's own counters are fetched (STAT)
    salvage_quiet_s = 0.2  # after a worker died: its records still arriving stop for this long

    def __init__(self, settings: ReceiverSettings, host: Host) -> None:
        super().__init__(settings, host)
        self.proc: asyncio.subprocess.Process | None = None
        self.outcome: str = ""
        self.worker_status: dict[str, Any] = {}
        self._ctx: zmq.asyncio.Context | None = None
        self._ctl: zmq.asyncio.Socket | None = None
        self._data: zmq.asyncio.Socket | None = None
        self._lock = asyncio.Lock()
        self._marks: dict[tuple[str, str], asyncio.Event] = {}
        self._generation = itertools.count(1)
        # the run the worker must be in: a restarted one too, and one started in a run
        self._run: RunInfo | None = host.run
        self._from_worker = 0  # records that arrived from the current worker
        # worker.<reason> counts of the workers before the current one: a new worker counts from 0
        self._worker_base: dict[tuple[str, str], int] = {}
        self._closed = asyncio.Event()  # the current worker is gone and its records accounted
        self._exited: asyncio.Future[int] | None = None  # the current worker's exit code
        self._starting: asyncio.Task[None] | None = None  # the worker's begin of the run

    def worker_argv(self, controller: str) -> list[str]:
        """The command that runs the worker; a test may replace it."""
        return [sys.executable, "-m", "daqd.cli", "serve", "--controller", controller]

    @property
    def stop_timeout_s(self) -> float:
        return self.stop_timeout_extra_s + self.host.config.daemon.drain_timeout_s

    async def setup(self) -> None:
        base = runtime_dir()
        base.mkdir(mode=0o700, parents=True, exist_ok=True)
        stem = f"{base / self.host.name}.{self.name}.{next(self._generation)}"
        # A new worker counts its drops and errors from 0: what its predecessors counted (shown
        # as worker.<reason>, also after a reconfiguration that kept these counters) stays.
        self._worker_base = {
            (kind, reason): n
            for kind, counts in (("drops", self.counters.drops), ("errors", self.counters.errors))
            for reason, n in counts.items()
            if reason.startswith("worker.")
        }
        self.worker_status = {}
        self._from_worker = 0
        self._closed.clear()
        self._ctx = zmq.asyncio.Context()
        self._ctl = self._ctx.socket(zmq.PAIR)
        self._ctl.setsockopt(zmq.LINGER, 0)
        self._data = self._ctx.socket(zmq.PULL)
        self._data.setsockopt(zmq.LINGER, 0)
        self._data.setsockopt(zmq.RCVHWM, self.data_hwm)
        old = os.umask(0o177)  # the sockets are for our own child only
        try:
            self._ctl.bind(f"ipc://{stem}.wctl")
            self._data.bind(f"ipc://{stem}.wdata")
        finally:
            os.umask(old)
        controller = self._ctl.getsockopt_string(zmq.LAST_ENDPOINT)
        data = self._data.getsockopt_string(zmq.LAST_ENDPOINT)
        self.proc = await asyncio.create_subprocess_exec(
            *self.worker_argv(controller), stdin=asyncio.subprocess.DEVNULL
        )
        # one waiter per worker for every request to race (a waiter per request would pile up)
        self._exited = asyncio.ensure_future(self.proc.wait())
        self.outcome = ""
        try:
            async with self._lock:  # no request reaches the worker before its CONF
                await self._handshake(data)
        except BaseException:
            await self._abort()
            raise
        self.log.info("%s: worker pid %d ready", self.name, self.proc.pid)

    async def _handshake(self, data: str) -> None:
        first = await self._receive(self.start_timeout_s, "READY")
        if isinstance(first, iccp.Error):
            raise ControlError(f"worker could not start: {first.message}")
        if not isinstance(first, iccp.Ready):
            raise ControlError(f"worker sent {type(first).__name__.upper()} before READY")
        settings = self.settings.model_dump(mode="json")
        daemon = {
            "name": f"{self.host.name}.{self.name}",
            "drain_timeout_s": self.host.config.daemon.drain_timeout_s,
            "log_level": self.host.config.daemon.log_level,
        }
        args: dict[str, Any] = {
            "receiver": settings,
            "daemon": daemon,
            "data": data,
            "data_hwm": self.data_hwm,
            # A restarted worker numbers on from the last record that reached us (no seq is
            # used twice), and is in the run that is going on, if one is.
            "seq": dict(self._seq),
            **({"run": {"run_id": self._run.run_id}} if self._run is not None else {}),
        }
        result = await self._exchange("CONF", args, self.start_timeout_s)
        if isinstance(result, dict) and isinstance(result.get("addresses"), dict):
            self.addresses.update(result["addresses"])
        self.addresses["worker"] = f"pid {self.proc.pid if self.proc else '?'}"

    async def _unless_exited(self, what: Awaitable[T], timeout_s: float, waiting_for: str) -> T:
        """Await `what`, but not past `timeout_s` (TimeoutError) nor past the worker's death
        (ControlError): a dead worker answers nothing."""
        task = asyncio.ensure_future(what)
        exited = self._exited
        waits: set[asyncio.Future[Any]] = {task} if exited is None else {task, exited}
        try:
            await asyncio.wait(waits, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            timed_out = not task.done()
            if timed_out:
                task.cancel()
        if not timed_out and not task.cancelled():
            return task.result()
        if exited is not None and exited.done() and not exited.cancelled():
            raise ControlError(f"worker exited with code {exited.result()} before {waiting_for}")
        if not timed_out:  # cancelled by the supervisor closing the socket of a dead worker
            raise ControlError(f"the worker's socket closed before {waiting_for}")
        raise TimeoutError(f"no {waiting_for} within {timeout_s:g} s")

    async def _receive(self, timeout_s: float, what: str) -> iccp.Message:
        assert self._ctl is not None
        try:
            frames = await self._unless_exited(self._ctl.recv_multipart(), timeout_s, what)
        except TimeoutError:
            raise ControlError(f"worker sent no {what} within {timeout_s:g} s") from None
        try:
            return _codec.decode(frames)
        except ProtocolError as exc:
            raise ControlError(f"worker: {exc}") from None

    async def _request(
        self, code: str, args: dict[str, Any], timeout_s: float | None = None
    ) -> Any:
        """One REQUEST → OK/ERROR exchange with the worker (one at a time)."""
        async with self._lock:
            return await self._exchange(code, args, timeout_s)

    async def _exchange(self, code: str, args: dict[str, Any], timeout_s: float | None) -> Any:
        if self._ctl is None:
            raise ControlError(f"receiver {self.name!r}: its worker is not running")
        while await self._ctl.poll(0):  # nothing is due: a late reply, or a protocol error
            stale = await self._ctl.recv_multipart()
            with contextlib.suppress(ProtocolError):
                if isinstance(_codec.decode(stale), iccp.Ready):
                    raise ControlError("worker sent READY after READY: protocol error")
            self.counters.error("late_worker_reply")
        # A DEALER with no peer holds a send: a worker that dies now must not hold this one.
        sending = self._ctl.send_multipart(_codec.encode(iccp.Request(code, args)))
        try:
            await self._unless_exited(sending, timeout_s or self.request_timeout_s, code)
        except TimeoutError:
            raise ControlError(f"the worker did not take {code}") from None
        reply = await self._receive(timeout_s or self.request_timeout_s, f"reply to {code}")
        if isinstance(reply, iccp.Ok):
            return reply.result
        if isinstance(reply, iccp.Error):
            raise ControlError(reply.message)
        if isinstance(reply, iccp.Ready):
            raise ControlError("worker sent READY after READY: protocol error")
        raise ControlError(f"worker answered {code} with {type(reply).__name__.upper()}")

    # The supervisor restarts the worker (with backoff) when any of these raises.
    async def ct_data(self) -> None:
        assert self._data is not None
        while True:
            await self._on_data(await self._data.recv_multipart())

    async def ct_process(self) -> None:
        assert self.proc is not None
        code = await self.proc.wait()
        raise RuntimeError(f"worker process {self.proc.pid} exited with code {code}")

    async def ct_worker_status(self) -> None:
        while True:
            await asyncio.sleep(self.stat_interval_s)
            await self.refresh_worker_status()

    async def refresh_worker_status(self) -> bool:
        """Fetch the worker's counters (STAT) and show them here; False if it did not answer."""
        try:
            self._absorb(await self._request("STAT", {}))
        except ControlError:
            return False
        return True

    async def refresh_counters(self) -> None:
        await self.refresh_worker_status()  # counts from before a run stay out of it

    def _absorb(self, status: Any) -> None:
        """Show the worker's own drops and errors here as worker.<reason>, so that status and
        run conditions see them; records its link to us dropped are worker.link.<reason>."""
        if not isinstance(status, dict):
            return
        self.worker_status = status
        receiver = status.get("receiver") or {}
        link = status.get("link") or {}
        for kind, target in (("drops", self.counters.drops), ("errors", self.counters.errors)):
            for prefix, part in (("worker.", receiver), ("worker.link.", link)):
                for reason, n in (part.get(kind) or {}).items():
                    if isinstance(n, int) and n:
                        key = f"{prefix}{reason}"
                        target[key] = self._worker_base.get((kind, key), 0) + n

    async def _on_data(self, frames: list[bytes]) -> None:
        if not frames[0]:
            try:
                mark = msgpack.unpackb(frames[1], raw=False)
                key = (str(mark["mark"]), str(mark.get("id", "")))
            except Exception:
                self.counters.error("bad_worker_data")
                return
            self._marks.setdefault(key, asyncio.Event()).set()
            return
        self._from_worker += 1
        try:
            source, seq, time_ns, tags = msgpack.unpackb(frames[0], raw=False)
            record = Record(str(source), int(seq), int(time_ns), dict(tags), frames[1:])
        except Exception:
            self.counters.error("bad_worker_data")
            self.counters.drop("bad_worker_data")  # a record that cannot be read is lost
            return
        self.adopt_seq(record.source, record.seq)  # the worker numbered it; run totals use it
        await self.publish(record)

    async def _wait_mark(self, kind: str, ident: str, timeout_s: float) -> None:
        event = self._marks.setdefault((kind, ident), asyncio.Event())
        try:
            await self._unless_exited(event.wait(), timeout_s, f"the {kind} marker")
        finally:
            self._marks.pop((kind, ident), None)

    async def begin_run(self, run: RunInfo) -> None:
        """Not awaited: the host puts its begin markers at once, so a record that arrives from
        the worker meanwhile is both counted in the run and filed in it. (The worker's own run
        only makes it mark where its records of the run end.)"""
        self._run = run  # a worker restarted from now on begins in this run
        self._starting = asyncio.create_task(self._start_worker_run(run), name=f"{self.name}.start")

    async def _start_worker_run(self, run: RunInfo) -> None:
        with contextlib.suppress(ControlError):  # one being restarted gets the run in its CONF
            await self._request("CTRL", {"transition": "start", "args": {"run_id": run.run_id}})

    async def end_run(self, run: RunInfo) -> None:
        """Have the worker end its run, wait until everything it published has arrived, and
        take its final counts: the host decides the run's condition once this returns."""
        self._run = None
        starting, self._starting = self._starting, None
        if starting is not None:  # the worker's start goes first
            for outcome in await asyncio.gather(starting, return_exceptions=True):
                if isinstance(outcome, Exception):
                    self.log.warning(
                        "%s: worker did not begin run %s: %r", self.name, run.run_id, outcome
                    )
        if self._ctl is not None and self.proc is not None and self.proc.returncode is None:
            try:
                await self._request("CTRL", {"transition": "stop"}, self.stop_timeout_s)
                await self._wait_mark("end", run.run_id, self.stop_timeout_s)
            except ControlError as exc:
                self.log.warning("%s: worker could not end run %s: %s", self.name, run.run_id, exc)
            except TimeoutError:
                self.log.warning("%s: worker's end-of-run marker did not arrive", self.name)
                raise
            else:
                if not await self.refresh_worker_status():
                    self.log.warning(
                        "%s: no STAT from the worker at the end of run %s", self.name, run.run_id
                    )
                return
        if self.proc is not None and self.proc.returncode is not None and self.state == "running":
            # It died just now: the supervisor is counting the crash, taking what the worker
            # sent and counting what it lost. That belongs to this run: wait for it.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closed.wait(), self.stop_timeout_s + 1.0)

    async def call_command(self, name: str, args: Any, kwargs: dict[str, Any]) -> Any:
        request = {"target": self.name, "name": name, "args": list(args), "kwargs": kwargs}
        return await self._request("CMD ", request, max(self.request_timeout_s, 30.0))

    async def close(self) -> None:
        """STOP → the worker drains → FINISHED; the records it flushes are published here. A
        worker that died (or was killed for not finishing): what it sent is taken, and what it
        had taken in and we never got is counted."""
        if self.proc is None:
            self._close_sockets()
            return
        finished = False
        if self.proc.returncode is None and self._ctl is not None:
            try:
                await self._stop_worker()
                finished = True
            except (ControlError, TimeoutError) as exc:
                self.outcome = "ERROR"
                self.log.error("%s: worker did not finish: %s; killing it", self.name, exc)
                await self._kill()
        if not finished and self.proc.returncode is not None and self._data is not None:
            try:  # bounded: a stalled `block` publisher must not hold the restart or shutdown
                await asyncio.wait_for(self._salvage(), self.stop_timeout_s)
            except TimeoutError:
                self.log.error(
                    "%s: records of the dead worker not taken within %g s",
                    self.name,
                    self.stop_timeout_s,
                )
            self._count_lost()
        await self._kill()
        self._close_sockets()
        self._closed.set()

    async def _salvage(self) -> None:
        """The worker died: publish the records it sent that are still on their way to us."""
        assert self._data is not None
        while await self._data.poll(self.salvage_quiet_s * 1000):
            await self._on_data(await self._data.recv_multipart())

    def _count_lost(self) -> None:
        """The records the dead worker's last STAT says its link had taken in and that never
        arrived were lost with it: count them as dropped "worker_lost" (records taken in after
        that STAT, and datagrams in its socket, cannot be known)."""
        link = self.worker_status.get("link") or {}
        offered, drops = link.get("offered"), link.get("drops") or {}
        if not isinstance(offered, int):
            return
        dropped = sum(n for n in drops.values() if isinstance(n, int))
        lost = offered - dropped - self._from_worker
        if lost > 0:
            self.counters.drop("worker_lost", lost)
            self.log.error(
                "%s: worker died holding at least %d records; counted as dropped (worker_lost)",
                self.name,
                lost,
            )

    async def _stop_worker(self) -> None:
        assert self._ctl is not None and self._data is not None
        await self._ctl.send_multipart(_codec.encode(iccp.Stop()))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.stop_timeout_s
        finished: iccp.Finished | None = None
        data_done = False
        # The tasks that read are cancelled by now: read control and data here until both end.
        while finished is None or not data_done:
            left = deadline - loop.time()
            if left <= 0:
                raise ControlError(f"no FINISHED within {self.stop_timeout_s:g} s of STOP")
            events = dict(await self._poller().poll(left * 1000))
            if self._data in events:
                frames = await self._data.recv_multipart()
                if _is_mark(frames, "finished"):
                    data_done = True
                else:
                    await self._on_data(frames)
            if self._ctl in events:
                message = _codec.decode(await self._ctl.recv_multipart())
                if isinstance(message, iccp.Finished):
                    finished = message
                else:
                    self.counters.error("late_worker_reply")
        self.outcome = finished.outcome.value
        log_at = logging.INFO if finished.outcome is iccp.Outcome.OK else logging.ERROR
        self.log.log(
            log_at,
            "%s: worker finished: %s %s",
            self.name,
            self.outcome,
            "; ".join(finished.details),
        )

    def _poller(self) -> zmq.asyncio.Poller:
        poller = zmq.asyncio.Poller()
        poller.register(self._data, zmq.POLLIN)
        poller.register(self._ctl, zmq.POLLIN)
        return poller

    async def _abort(self) -> None:
        """A worker that failed to start: ask it to stop, kill it if it does not."""
        if self._ctl is not None:
            with contextlib.suppress(zmq.ZMQError):
                await self._ctl.send_multipart(_codec.encode(iccp.Stop()), flags=zmq.NOBLOCK)
        await self._kill()
        self._close_sockets()

    async def _kill(self) -> None:
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        try:
            await asyncio.wait_for(proc.wait(), 2.0)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            self.outcome = self.outcome or "ERROR"

    def _close_sockets(self) -> None:
        for sock in (self._ctl, self._data):
            if sock is not None:
                path = sock.getsockopt_string(zmq.LAST_ENDPOINT)
                sock.close(linger=0)
                if path.startswith("ipc://"):
                    with contextlib.suppress(OSError):
                        os.unlink(path[len("ipc://") :])
        self._ctl = self._data = None
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None

    def status(self) -> dict[str, Any]:
        status = super().status()
        status["worker"] = {
            "pid": self.proc.pid if self.proc else None,
            "running": self.proc is not None and self.proc.returncode is None,
            "outcome": self.outcome or None,
            "state": self.worker_status.get("state"),
        }
        return status
