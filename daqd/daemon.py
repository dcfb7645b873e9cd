"""`daqd serve`: the host, its control socket, its live tap, signals and systemd, in one loop."""

from __future__ import annotations

import asyncio
import ctypes
import gc
import logging
import os
import signal
from collections.abc import Callable
from typing import Any

from daqd.config import Config, load_config
from daqd.constellation import Satellite, start_satellite
from daqd.control import ControlServer
from daqd.endpoints import control_endpoint, ipc_path, probe_ipc, tap_endpoint
from daqd.errors import ConfigError, ControlError
from daqd.host import Host
from daqd.protocols.iccp import Outcome
from daqd.runstate import RunCondition, State
from daqd.systemd import Notifier

log = logging.getLogger("daqd.daemon")


async def serve(config: Config) -> int:
    """Run until SIGTERM/SIGINT or `daqctl shutdown`; return the process exit code."""
    d = config.daemon
    if d.runtime_dir:  # one setting for every socket: control, tap, worker links
        os.environ["RUNTIME_DIRECTORY"] = d.runtime_dir
    refuse_if_running(d.name)
    serve_path = os.path.abspath(config.path)  # what SIGHUP re-reads, whatever reconfigure sent
    host = Host(config)
    await host.start()
    tune_for_throughput()

    web: Any = None  # the web view, with [daemon] http (daqd/web)

    satellite: Satellite | None = None  # with a [constellation] table, once started

    def more_status(result: dict[str, Any]) -> None:
        if satellite is not None:
            result["constellation"] = satellite.status()
        if web is not None:
            result["http"] = web.url

    try:
        server = await open_control(host, more_status)
        if d.http:
            from daqd.web.app import start_web  # aiohttp, prometheus_client: only when asked

            web = await start_web(host)
        satellite = await start_satellite(host)  # only with a [constellation] table
    except Exception:
        await host.stop(RunCondition.ABORTED)
        raise
    loop = asyncio.get_running_loop()
    reloads: set[asyncio.Task[None]] = set()
    notifier = Notifier()

    def reload() -> None:
        task = asyncio.create_task(_reload(host, notifier, serve_path))
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    forced: list[str] = []

    def on_signal(sig: signal.Signals) -> None:
        if not host.stop_requested.is_set():
            log.info(
                "%s received: stopping (a second SIGTERM or SIGINT forces an exit at once)",
                sig.name,
            )
            host.request_stop(RunCondition.INTERRUPTED)
        elif not forced:
            forced.append(sig.name)
            log.warning(
                "second signal (%s): exiting at once; what is not delivered yet is counted as "
                "dropped 'forced_exit'",
                sig.name,
            )
            host.force()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    loop.add_signal_handler(signal.SIGHUP, reload)
    watchdog = asyncio.create_task(notifier.run_watchdog(lambda: host.state != State.ERROR))
    status_task = asyncio.create_task(_status_forever(host, notifier))
    notifier.ready(_summary(host))
    log.info("daemon %s ready in state %s; control %s", d.name, host.state.name, server.endpoints)
    try:
        await host.stop_requested.wait()
    finally:
        loop.remove_signal_handler(signal.SIGHUP)
        notifier.stopping("draining")
        watchdog.cancel()
        status_task.cancel()
        if web is not None:  # before the host stops: no page asks a stopping host
            await web.stop()
        if satellite is not None:  # DEPARTs while the host still answers
            await satellite.stop()
        await host.stop(host.stop_reason)
        await server.close()
        notifier.close()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    if forced:
        log.warning("exited early on a second %s (exit code 1)", forced[0])
        return 1
    return 0


async def open_control(
    host: Host, more_status: Callable[[dict[str, Any]], None] | None = None
) -> ControlServer:
    """Open the control socket and the live tap of `host`, as `[daemon]` configures them (daqd
    serve and daqd demo). STAT adds the control socket's own counts and what `more_status` adds;
    ICCP STOP (`daqctl shutdown`) requests the host's stop. The caller closes the server."""
    d = host.config.daemon

    async def handle_request(code: str, args: dict[str, Any]) -> Any:
        result = await host.handle_request(code, args)
        if code == "STAT":  # the control socket's own counts: refused, malformed, oversize, ...
            result["control"] = dict(server.counters)
            if more_status is not None:
                more_status(result)
        return result

    server = ControlServer(
        handle_request,
        name=d.name,
        group=d.control_group,
        tcp=d.control_tcp,
        curve_secret_key_file=d.curve_server_key_file,
        curve_clients_dir=d.curve_authorized_keys_dir,
        max_request_bytes=d.max_request_bytes,
        on_stop=lambda: _stop_from_control(host),
    )
    await server.start()
    try:
        host.open_tap(tap_endpoint(d.name))
    except Exception:
        await server.close()
        raise
    return server


def tune_for_throughput() -> None:
    """Process settings for a daemon that moves many small objects (also used by benchmarks).

    Records are not cyclic: the cycle collector's frequent young-generation passes only cost
    per-record time, so freeze what start-up made and collect young objects far less often. And
    glibc returns the top of the heap to the kernel as soon as it is free, only to ask for it again
    for the next batch: keep 16 MiB of it (M_TOP_PAD), which measured ~20% less CPU per record in
    the CDTP transmitter.
    """
    gc.freeze()
    gc.set_threshold(50_000, 50, 100)
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(_M_TOP_PAD, 16 << 20)
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


_M_TOP_PAD = -2  # glibc malloc.h


def refuse_if_running(name: str) -> None:
    """Before anything starts: a daemon of the same name already answering here is an error
    (ControlServer checks again when it binds, for a daemon that started in between)."""
    path = ipc_path(control_endpoint(name))
    if path is None or not (path.exists() or path.is_symlink()):
        return
    try:
        probe_ipc(path)
    except ControlError:
        return  # stale: its daemon is gone; the control server replaces the file
    raise ControlError(
        f"a daemon named {name!r} already answers on {path} (daqctl --name {name} status shows "
        "it); stop it or choose another [daemon] name; nothing was started"
    )


async def _reload(host: Host, notifier: Notifier, path: str) -> None:
    """SIGHUP: reconfigure from the file `daqd serve` was started with (not the last file
    `daqctl reconfigure` sent: systemctl reload means the unit's file); a bad file changes
    nothing and is logged."""
    notifier.reloading()
    try:
        text = load_config(path).text
        changed = await host.reconfigure(text, path)
        log.info("SIGHUP: reloaded %s: %s", path, ", ".join(changed) or "nothing changed")
    except ConfigError as exc:
        log.error("SIGHUP: %s; keeping the running configuration", exc)
    except Exception as exc:  # a reload must never fail silently in a task nobody awaits
        log.exception("SIGHUP: reload of %s failed: %r", path, exc)
    finally:
        notifier.ready(_summary(host))


def _summary(host: Host) -> str:
    run = f"run {host.run.run_id}" if host.run else "no run"
    records = sum(r.counters.records for r in host.receivers.values())
    return f"{host.state.name}, {run}, {records} records received"


async def _status_forever(host: Host, notifier: Notifier) -> None:
    """Keep systemctl status's STATUS= line current."""
    if not notifier.enabled:
        return
    while True:
        await asyncio.sleep(5.0)
        notifier.status(_summary(host))


async def _stop_from_control(host: Host) -> tuple[Outcome, list[str]]:
    """ICCP STOP (`daqctl shutdown`): stop like SIGTERM, answer FINISHED once drained."""
    host.request_stop(RunCondition.INTERRUPTED)
    await host.stopped.wait()
    run = host.last_run
    details = [f"last run {run.run_id}: {run.condition.describe()}"] if run else []
    return Outcome.OK, details
