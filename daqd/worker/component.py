"""Component side: what `daqd serve --controller ENDPOINT` runs (the worker process)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
from typing import TYPE_CHECKING, Any

import msgpack
import zmq
import zmq.asyncio

import daqd
from daqd.errors import ControlError, DaqdError, ProtocolError
from daqd.protocols import iccp
from daqd.publisher import Publisher, PublisherQueue, PublisherSettings
from daqd.receiver import ReceiverServer, ReceiverSettings
from daqd.record import Record
from daqd.runstate import RunCondition, RunInfo

if TYPE_CHECKING:
    from daqd.host import Host
from daqd.worker.link import LINK, _codec, _mark

log = logging.getLogger("daqd.worker")


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
