"""Worker processes: a receiver in its own process, controlled over ICCP, feeding the parent.

Parent side: `WorkerReceiver` stands in for a receiver with `process = true`. It binds a PAIR
(control) and a PULL (records) in the runtime directory, spawns `daqd serve --controller
ENDPOINT`, waits for READY, configures the worker with REQUEST CONF, and publishes what arrives
on the PULL as if it had received it itself. Run boundaries, `daqctl cmd` and STAT go to the
worker as REQUESTs; stopping is STOP → drain → FINISHED.

Component side: `run_component(controller)` is what `daqd serve --controller` runs: it connects,
sends READY, builds a Host with the one receiver from CONF, routes its records to a PUSH towards
the parent, and on STOP stops receiving, drains, and answers FINISHED.

Records travel as multipart messages [msgpack [source, seq, time_ns, tags], *payload blocks]; a
message whose first frame is empty is a marker (end of a run, end of work) that tells the parent
that every record sent before it has arrived.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import signal
import socket
import sys
import uuid
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, TypeVar

import msgpack
import zmq
import zmq.asyncio

import daqd
from daqd.control import runtime_dir
from daqd.errors import ControlError, DaqdError, ProtocolError
from daqd.logs import LimitedLogger
from daqd.protocols import iccp
from daqd.publisher import Publisher, PublisherQueue, PublisherSettings
from daqd.receiver import ReceiverServer, ReceiverSettings
from daqd.record import Record
from daqd.runstate import RunCondition, RunInfo

if TYPE_CHECKING:
    from daqd.host import Host

log = logging.getLogger("daqd.worker")
T = TypeVar("T")

LINK = "parent"  # the worker's one publisher: the PUSH to its parent
_codec = iccp.IccpCodec()


def _mark(kind: str, **fields: Any) -> list[bytes]:
    return [b"", msgpack.packb({"mark": kind, **fields}, use_bin_type=True)]


# ----- parent side ----------------------------------------------------------------------------


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
            if not task.done():
                task.cancel()
        if task.done() and not task.cancelled():
            return task.result()
        if exited is not None and exited.done() and not exited.cancelled():
            raise ControlError(f"worker exited with code {exited.result()} before {waiting_for}")
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
        await self._ctl.send_multipart(_codec.encode(iccp.Request(code, args)))
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


def _is_mark(frames: list[bytes], kind: str) -> bool:
    if frames[0] or len(frames) < 2:
        return False
    try:
        return bool(msgpack.unpackb(frames[1], raw=False).get("mark") == kind)
    except Exception:
        return False


# ----- component side -------------------------------------------------------------------------


class LinkPublisher(Publisher):
    """The worker's publisher: every record goes to the parent's PULL, in order."""

    def __init__(self, host: Host, sock: zmq.asyncio.Socket) -> None:
        super().__init__(PublisherSettings(type="worker-link", name=LINK), host)
        self.sock = sock
        self.addresses = {"endpoint": sock.getsockopt_string(zmq.LAST_ENDPOINT)}

    async def send(self, records: list[Record]) -> None:
        for r in records:
            header = msgpack.packb([r.source, r.seq, r.time_ns, r.tags], use_bin_type=True)
            await self.sock.send_multipart([header, *r.payload], copy=False)

    async def end_run(self, run: RunInfo) -> None:
        await self.sock.send_multipart(_mark("end", id=run.run_id))


class Component:
    """One worker: the ICCP component that serves its parent."""

    def __init__(self, controller: str) -> None:
        self.controller = controller
        self.ctx = zmq.asyncio.Context()
        self.ctl = self.ctx.socket(zmq.PAIR)
        self.ctl.setsockopt(zmq.LINGER, 2000)
        self.data: zmq.asyncio.Socket | None = None
        self.host: Host | None = None
        self.parent = os.getppid()

    async def run(self) -> int:
        self.ctl.connect(self.controller)
        ready = iccp.Ready(
            name=f"worker-{os.getpid()}",
            pid=os.getpid(),
            host=socket.gethostname(),
            version=daqd.__version__,
            endpoints={"control": [self.controller]},
        )
        await self.ctl.send_multipart(_codec.encode(ready))
        serve = asyncio.create_task(self._serve(), name="worker-serve")
        orphan = asyncio.create_task(self._watch_parent(), name="worker-parent")
        await asyncio.wait({serve, orphan}, return_when=asyncio.FIRST_COMPLETED)
        orphan.cancel()
        if serve.done():
            outcome, details = serve.result()
        else:  # no parent left to wait for: end the work as a STOP would
            serve.cancel()
            await asyncio.gather(serve, return_exceptions=True)
            outcome, details = await self._stop()
        code = 0 if outcome is iccp.Outcome.OK else 1
        with contextlib.suppress(zmq.ZMQError):
            await self.ctl.send_multipart(_codec.encode(iccp.Finished(outcome, tuple(details))))
        self.ctl.close(linger=2000)
        if self.data is not None:
            self.data.close(linger=5000)
        self.ctx.term()
        return code

    async def _watch_parent(self) -> None:
        # A PAIR does not say when its peer is gone; being re-parented does.
        while os.getppid() == self.parent:
            await asyncio.sleep(1.0)
        log.error("worker: parent process %d is gone; stopping", self.parent)

    async def _serve(self) -> tuple[iccp.Outcome, list[str]]:
        while True:
            frames = await self.ctl.recv_multipart()
            try:
                message = _codec.decode(frames)
            except ProtocolError as exc:
                await self._reply(iccp.Error(str(exc), "protocol"))
                continue
            if isinstance(message, iccp.Stop):
                return await self._stop()
            if not isinstance(message, iccp.Request):
                text = f"unexpected {type(message).__name__.upper()}: send REQUEST or STOP"
                await self._reply(iccp.Error(text, "protocol"))
                continue
            try:
                result = await self._handle(message.code, dict(message.args))
            except (DaqdError, ValueError) as exc:
                await self._reply(iccp.Error(" ".join(str(exc).split()), "refused"))
            except Exception as exc:
                log.exception("worker: %s failed", message.code)
                await self._reply(iccp.Error(f"internal error: {type(exc).__name__}: {exc}"))
            else:
                await self._reply(iccp.Ok(result))

    async def _reply(self, message: iccp.Message) -> None:
        try:
            frames = _codec.encode(message)
        except ProtocolError as exc:
            frames = _codec.encode(iccp.Error(f"reply not sendable: {exc}"))
        await self.ctl.send_multipart(frames)

    async def _handle(self, code: str, args: dict[str, Any]) -> Any:
        if code == "CONF":
            return await self._configure(args)
        if self.host is None:
            raise ControlError(f"{code.strip()}: not configured yet (send CONF first)")
        if code == "STAT":
            rec = next(iter(self.host.receivers.values()))
            link = self.host.queues[LINK].accounting()
            return {"state": self.host.state.name, "receiver": rec.status(), "link": link}
        if code == "CTRL" and args.get("transition") in ("start", "stop"):
            state = await self.host.transition(str(args["transition"]), args.get("args") or {})
            return {"state": state.name}
        if code in ("CMD ", "CTRL"):
            return await self.host.handle_request(code, args)
        known = "CONF, STAT, CTRL, CMD "
        raise ControlError(f"unknown request code {code!r}; known codes: {known}")

    async def _configure(self, args: dict[str, Any]) -> Any:
        from daqd.config import Config, DaemonSettings, receiver_class

        if self.host is not None:
            raise ControlError("already configured: a worker takes one CONF")
        settings, daemon, data = args.get("receiver"), args.get("daemon"), args.get("data")
        if not isinstance(settings, dict) or not isinstance(data, str):
            raise ControlError('CONF needs {"receiver": {...}, "daemon": {...}, "data": endpoint}')
        seq, run, hwm = args.get("seq") or {}, args.get("run"), args.get("data_hwm", 10000)
        if not isinstance(seq, dict) or not all(
            isinstance(k, str) and isinstance(n, int) and n >= 0 for k, n in seq.items()
        ):
            raise ControlError('CONF "seq" must map source names to the last seq used (>= 0)')
        if run is not None and not (isinstance(run, dict) and isinstance(run.get("run_id"), str)):
            raise ControlError('CONF "run" must be {"run_id": <id>}')
        if not isinstance(hwm, int) or hwm < 1:
            raise ControlError('CONF "data_hwm" must be a positive number of records')
        try:
            cls = receiver_class(str(settings.get("type")))
        except KeyError:
            raise ControlError(f"unknown receiver type {settings.get('type')!r}") from None
        from pydantic import ValidationError

        try:
            rs = cls.Settings.model_validate({**settings, "process": False, "publish_to": [LINK]})
            ds = DaemonSettings.model_validate(daemon or {})
        except ValidationError as exc:
            raise ControlError(f"receiver settings: {exc}") from None
        logging.getLogger().setLevel(ds.log_level)
        host = _worker_host(Config(path="<worker>", text="", daemon=ds, receivers=[rs]), seq)
        self.data = self.ctx.socket(zmq.PUSH)
        self.data.setsockopt(zmq.SNDHWM, hwm)
        self.data.connect(data)
        link = LinkPublisher(host, self.data)
        host.publishers[LINK] = link
        queue = PublisherQueue(link)
        host.queues[LINK] = queue
        queue.start()
        await host.start()  # on failure it closes every queue, ours too
        self.host = host
        rec = host.receivers[rs.name]
        if run is not None:  # restarted while the parent is in a run: be in it too
            await host.begin_run(run["run_id"])
        log.info(
            "worker %d: receiver %s (%s) running%s",
            os.getpid(),
            rs.name,
            rs.type,
            f" in run {run['run_id']}" if run is not None else "",
        )
        return {"addresses": dict(rec.addresses)}

    async def _stop(self) -> tuple[iccp.Outcome, list[str]]:
        host = self.host
        if host is None:
            return iccp.Outcome.OK, ["not configured"]
        rec = next(iter(host.receivers.values()), None)
        await host.stop(RunCondition.INTERRUPTED if host.run is not None else RunCondition.GOOD)
        assert self.data is not None
        await self.data.send_multipart(_mark("finished"))
        link = host.queues[LINK].counters
        details = [f"{link.records} records sent"]
        dropped = sum(link.drops.values())
        if dropped:
            details.append(f"{dropped} records dropped: {link.drops}")
        failed = rec is not None and rec.state == "failed"
        return (iccp.Outcome.ERROR if failed or dropped else iccp.Outcome.OK), details


def _worker_host(config: Any, seq: dict[str, int]) -> Host:
    """The worker's Host; its receiver numbers each source on from `seq` (the parent's last)."""
    from daqd.host import Host

    class WorkerHost(Host):
        def _make_receiver(self, settings: ReceiverSettings) -> ReceiverServer:
            rec = super()._make_receiver(settings)
            for source, last in seq.items():
                rec.adopt_seq(source, last)
            return rec

    return WorkerHost(config)


class _WorkerTag(logging.Filter):
    """Worker log lines share the parent's journal: say whose they are."""

    def __init__(self, tag: str) -> None:
        super().__init__()
        self.tag = tag

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(self.tag):
            record.name = f"{self.tag} {record.name}"
        return True


async def run_component(controller: str) -> int:
    """`daqd serve --controller ENDPOINT`: serve the parent until STOP; return the exit code."""
    loop = asyncio.get_running_loop()

    # The parent decides when a worker stops (STOP); a Ctrl-C or a SIGTERM meant for the
    # daemon's whole process group must not cut the worker's drain short.
    tag = _WorkerTag(f"worker[{os.getpid()}]")
    for handler in logging.getLogger().handlers:
        handler.addFilter(tag)

    def ignore(sig: int) -> None:
        log.info("worker %d: ignoring signal %d; the parent stops workers", os.getpid(), sig)

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, ignore, sig)
    return await Component(controller).run()


# ----- daqd as a Saturnin component -----------------------------------------------------------


class SaturninComponent:
    """`daqd serve --controller ENDPOINT --iccp saturnin CONFIG`: the daemon of CONFIG, run as a
    component of a Saturnin (Firebird Butler) controller, speaking Saturnin's ICCP bytes.

    It connects a PAIR to the controller, starts the daemon (its control socket and tap too), and
    sends READY (a fresh uid, pid, host; name and version in the supplement) with the ZeroMQ
    endpoints it bound, or ERROR (one line) if it could not start. CONF (a ConfigProto) may carry
    `config` (daqd TOML text, applied as `daqctl`'s CONF would), `agent` and `logging_id`. STOP,
    like SIGTERM, stops receiving, drains, and answers FINISHED(OK) with the last run's condition,
    or FINISHED(ERROR) with details when the drain failed. Malformed messages get ERROR and are
    counted; the component keeps serving.
    """

    options = ("config", "agent", "logging_id")

    def __init__(self, controller: str, config: Any) -> None:
        self.controller = controller
        self.config = config
        self.codec = iccp.IccpCodec(config.daemon.max_request_bytes, encoding="saturnin")
        self.ctx = zmq.asyncio.Context()
        self.ctl = self.ctx.socket(zmq.PAIR)
        self.ctl.setsockopt(zmq.LINGER, 2000)
        self.uid = uuid.uuid4().bytes
        self.counters: dict[str, int] = {}
        self.agent: str | None = None
        self.logging_id: str | None = None
        self._bad = LimitedLogger(log)

    async def run(self) -> int:
        from daqd.control import ControlServer, tap_endpoint
        from daqd.daemon import tune_for_throughput
        from daqd.host import Host

        d = self.config.daemon
        if d.runtime_dir:
            os.environ["RUNTIME_DIRECTORY"] = d.runtime_dir
        self.ctl.connect(self.controller)
        host = Host(self.config)
        server: ControlServer | None = None
        # SIGTERM/SIGINT from now on stop the daemon as STOP does (also one that comes before
        # READY has left: it is answered by READY, then FINISHED)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, host.request_stop, RunCondition.INTERRUPTED)
        try:
            await host.start()
            server = ControlServer(
                host.handle_request,
                name=d.name,
                group=d.control_group,
                tcp=d.control_tcp,
                curve_secret_key_file=d.curve_server_key_file,
                curve_clients_dir=d.curve_authorized_keys_dir,
                max_request_bytes=d.max_request_bytes,
                on_stop=lambda: self._stop_from_daqctl(host),
            )
            await server.start()
            host.open_tap(tap_endpoint(d.name))
        except Exception as exc:
            log.error("saturnin component: could not start: %s", exc)
            await self._send(iccp.Error(f"daqd {d.name} could not start: {_one_line(exc)}"))
            if not host.stopped.is_set():
                await host.stop(RunCondition.ABORTED)
            if server is not None:
                await server.close()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            self._close()
            return 1
        tune_for_throughput()
        await self._send(self._ready(host, server.endpoints))
        log.info("saturnin component %s: READY sent to %s", d.name, self.controller)
        serve = asyncio.create_task(self._serve(host), name="saturnin-serve")
        stopping = asyncio.create_task(host.stop_requested.wait(), name="saturnin-stop")
        try:
            await asyncio.wait({serve, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            serve.cancel()
            stopping.cancel()
            await asyncio.gather(serve, stopping, return_exceptions=True)
        outcome, details = await self._finish(host)
        await server.close()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await self._send(iccp.Finished(outcome, tuple(details)))
        log.info("saturnin component %s: FINISHED %s %s", d.name, outcome.value, details)
        self._close()
        return 0 if outcome is iccp.Outcome.OK else 1

    def _ready(self, host: Host, control: list[str]) -> iccp.Ready:
        """Every ZeroMQ endpoint bound goes in `endpoints` (channel: control, tap,
        receiver.NAME.KEY, publisher.NAME.KEY); other addresses (UDP, TCP listeners, files),
        which a Saturnin controller would refuse there, go in the supplement's `addresses`."""
        endpoints: dict[str, list[str]] = {"control": list(control)}
        if host.tap_endpoint:
            endpoints["tap"] = [host.tap_endpoint]
        others: dict[str, str] = {}
        parts: list[tuple[str, dict[str, Any]]] = [
            ("receiver", dict(host.receivers)),
            ("publisher", dict(host.publishers)),
        ]
        for kind, components in parts:
            for name, comp in components.items():
                for k, address in comp.addresses.items():
                    channel = f"{kind}.{name}.{k}"
                    if iccp.saturnin_address(str(address)):
                        endpoints[channel] = [str(address)]
                    else:
                        others[channel] = str(address)
        return iccp.Ready(
            name=self.config.daemon.name,
            pid=os.getpid(),
            host=socket.gethostname(),
            version=daqd.__version__,
            endpoints=endpoints,
            uid=self.uid,
            supplement={"addresses": others} if others else {},
        )

    async def _send(self, message: iccp.Message) -> None:
        with contextlib.suppress(zmq.ZMQError):
            await self.ctl.send_multipart(self.codec.encode(message))

    def _count(self, reason: str) -> None:
        self.counters[reason] = self.counters.get(reason, 0) + 1

    async def _serve(self, host: Host) -> None:
        while True:
            frames = await self.ctl.recv_multipart()
            try:
                message = self.codec.decode(frames)
            except ProtocolError as exc:
                self._count("malformed")
                self._bad.warning("malformed", "saturnin component: refused a message: %s", exc)
                await self._send(iccp.Error(f"invalid message: {exc}"))
                continue
            if isinstance(message, iccp.Stop):
                host.request_stop(RunCondition.INTERRUPTED)
                return
            if not isinstance(message, iccp.Request):
                self._count("unexpected")
                name = type(message).__name__.upper()
                self._bad.warning(
                    "unexpected", "saturnin component: unexpected %s from the controller", name
                )
                await self._send(iccp.Error(f"unexpected {name}: a controller sends CONF or STOP"))
                continue
            try:
                await self._configure(host, dict(message.args))
            except (DaqdError, ValueError) as exc:
                self._count("refused")
                await self._send(iccp.Error(f"CONF refused: {_one_line(exc)}"))
            except Exception as exc:
                log.exception("saturnin component: CONF failed")
                await self._send(iccp.Error(f"CONF failed: {type(exc).__name__}: {exc}"))
            else:
                await self._send(iccp.Ok())

    async def _configure(self, host: Host, options: dict[str, Any]) -> None:
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            known = ", ".join(self.options)
            raise ControlError(f"unknown option(s) {', '.join(unknown)}; daqd takes {known}")
        text, agent, logging_id = (options.get(k) for k in self.options)
        if text is not None and not isinstance(text, str):
            raise ControlError("option config must be TOML text (as_string)")
        if agent is not None and not (isinstance(agent, bytes) and len(agent) == 16):
            raise ControlError("option agent must be a UUID (16 bytes, as_bytes)")
        if logging_id is not None and not isinstance(logging_id, str):
            raise ControlError("option logging_id must be text (as_string)")
        if text is not None:  # validated first: on any error nothing changes
            changed = await host.handle_request("CONF", {"config": text})
            log.info("saturnin component: CONF applied: %s", changed)
        if agent is not None:
            self.agent = str(uuid.UUID(bytes=agent))
        if logging_id is not None:
            self.logging_id = logging_id
        log.info(
            "saturnin component: configured (agent %s, logging_id %s)",
            self.agent,
            self.logging_id,
        )

    async def _stop_from_daqctl(self, host: Host) -> tuple[iccp.Outcome, list[str]]:
        host.request_stop(RunCondition.INTERRUPTED)
        await host.stopped.wait()
        return iccp.Outcome.OK, []

    async def _finish(self, host: Host) -> tuple[iccp.Outcome, list[str]]:
        """Stop receiving, drain, close; the outcome and its details, one line per frame."""
        try:
            await host.stop(host.stop_reason)
        except Exception as exc:
            log.exception("saturnin component: stopping failed")
            return iccp.Outcome.ERROR, [f"stopping failed: {type(exc).__name__}: {exc}"]
        details = []
        run = host.last_run
        if run is not None:
            details.append(f"last run {run.run_id}: {run.condition.describe()}")
            details.extend(run.reasons)
        failed = [n for n, r in host.receivers.items() if r.state == "failed"]
        details.append(
            f"{sum(r.counters.records for r in host.receivers.values())} records received"
        )
        if self.counters:
            counts = ", ".join(f"{n} {reason}" for reason, n in sorted(self.counters.items()))
            details.append(f"control messages refused: {counts}")
        if failed:
            details.append(f"failed receivers: {', '.join(failed)}")
            return iccp.Outcome.ERROR, details
        return iccp.Outcome.OK, details

    def _close(self) -> None:
        self.ctl.close(linger=2000)
        self.ctx.term()


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


async def run_saturnin_component(controller: str, config: Any) -> int:
    """`daqd serve --controller ENDPOINT --iccp saturnin CONFIG`; return the exit code."""
    return await SaturninComponent(controller, config).run()
