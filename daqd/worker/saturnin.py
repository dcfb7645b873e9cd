"""`daqd serve --controller ENDPOINT --iccp saturnin CONFIG`: daqd as a Saturnin component."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import uuid
from typing import TYPE_CHECKING, Any

import zmq
import zmq.asyncio

import daqd
from daqd.errors import ControlError, DaqdError, ProtocolError
from daqd.logs import LimitedLogger
from daqd.protocols import iccp
from daqd.runstate import RunCondition

if TYPE_CHECKING:
    from daqd.host import Host

log = logging.getLogger("daqd.worker")


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
        from daqd.control import ControlServer
        from daqd.daemon import tune_for_throughput
        from daqd.endpoints import tap_endpoint
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
