"""daqd as a Constellation satellite: CHIRP discovery, CSCP control and CHP heartbeats over the host.

Only with a [constellation] table. The satellite `Daqd.<name>` offers CONTROL (a REP socket serving
every standard CSCP command against the host's run state, the same state machine `daqctl` drives;
commands.py answers the requests) and HEARTBEAT (an XPUB sending CHP heartbeats, and an extrasystole
on every state change) by CHIRP multicast beacons, answers REQUESTs, keeps a registry of what other
hosts of its group offer, and DEPARTs when it stops.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import msgpack
import zmq
import zmq.asyncio

from daqd.config import ConstellationSettings
from daqd.constellation.autonomy import HeartbeatWatcher
from daqd.constellation.commands import Commands
from daqd.constellation.discovery import Discovery, canonical_name
from daqd.constellation.monitoring import MonitoringPublisher
from daqd.logs import LimitedLogger
from daqd.protocols import chirp, chp
from daqd.runstate import State

if TYPE_CHECKING:
    from daqd.host import Host

log = logging.getLogger("daqd.satellite")

PUBLISHER_CHECK_S = 1.0  # how soon DATA offers follow a reload
STOP_TIMEOUT_S = 5.0


def _timestamp(ns: int) -> msgpack.Timestamp:
    return msgpack.Timestamp.from_unix_nano(ns)


class Satellite:
    """The Constellation face of one daemon; start() after the host, stop() before it stops."""

    def __init__(self, host: Host, settings: ConstellationSettings) -> None:
        self.host = host
        self.settings = settings
        self.name = canonical_name(settings, host.name)
        self.group = settings.group
        self.uuid = chirp.name_uuid(self.name)
        self.group_uuid = chirp.name_uuid(self.group)
        self.role = "DYNAMIC"
        self.max_interval_ms = int(settings.max_heartbeat_interval_s * 1000)
        self.status_text = "started"
        # the host's discovery (made with the [constellation] table): its counts are ours
        self.chirp: Discovery | None = host.discovery
        self.counters: dict[str, int] = host.discovery.counters if host.discovery else {}
        self.subscribers = 0
        self.heartbeats = 0
        self.extrasystoles = 0
        self.cmd_port = 0
        self.hb_port = 0
        self.monitoring = MonitoringPublisher(host, self.name, self.counters)
        self.commands = Commands(self)  # CSCP: the requests on the REP socket, the transitions
        self.autonomy = HeartbeatWatcher(
            host, self.counters, self.commands.interrupt_for, self.mark_run
        )
        self._limited = LimitedLogger(log)
        self._rep: zmq.asyncio.Socket | None = None
        self._xpub: zmq.asyncio.Socket | None = None
        self._xpub_now: zmq.Socket[bytes] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._beat_now = asyncio.Event()
        self._closing = False
        self._unlisten: Callable[[], None] = lambda: None
        self._unsubscribe: Callable[[], None] = lambda: None

    # ----- life cycle ------------------------------------------------------------------------
    async def start(self) -> None:
        if self.chirp is None:
            raise RuntimeError("the satellite needs the host's discovery ([constellation] table)")
        ctx = self.host.zmq_context
        rep = ctx.socket(zmq.REP)
        rep.setsockopt(zmq.LINGER, 2000)
        rep.bind(f"tcp://*:{self.settings.cmd_port}")
        self._rep = rep
        self.cmd_port = int(rep.getsockopt_string(zmq.LAST_ENDPOINT).rsplit(":", 1)[1])
        xpub = ctx.socket(zmq.XPUB)
        xpub.setsockopt(zmq.LINGER, 0)
        xpub.setsockopt(zmq.XPUB_VERBOSER, 1)
        xpub.bind(f"tcp://*:{self.settings.hb_port}")
        self._xpub = xpub
        self._xpub_now = zmq.Socket.shadow(xpub.underlying)  # sends at once, from any callback
        self.hb_port = int(xpub.getsockopt_string(zmq.LAST_ENDPOINT).rsplit(":", 1)[1])
        self._unlisten = self.host.machine.add_listener(self._on_state)
        self.autonomy.start()
        self._unsubscribe = self.chirp.subscribe(self.autonomy.on_offer)
        self.monitoring.start()
        if self.settings.wait_for_controller and self.host.state == State.ORBIT:
            await self.host.transition("land", {})  # the controller initializes and launches
        self._tasks = [
            asyncio.create_task(self.commands.serve(rep), name="cscp"),
            asyncio.create_task(self._count_subscribers(), name="chp-subscriptions"),
            asyncio.create_task(self._heartbeats(), name="chp"),
            asyncio.create_task(self._follow_publishers(), name="chirp-data"),
        ]
        self.chirp.offer(chirp.Service.CONTROL, self.cmd_port)
        self.chirp.offer(chirp.Service.HEARTBEAT, self.hb_port)
        self.chirp.offer(chirp.Service.MONITORING, self.monitoring.port)
        for sender, port in self.data_senders().items():  # each CDTP publisher as its own host
            self.chirp.offer(chirp.Service.DATA, port, chirp.name_uuid(sender))
        for service in chirp.Service:  # fill the registry with what the group already offers
            self.chirp.request(service)
        log.info(
            "satellite %s in group %s: control port %d, heartbeat port %d, monitoring port %d, "
            "announced on %s",
            self.name,
            self.group,
            self.cmd_port,
            self.hb_port,
            self.monitoring.port,
            ", ".join(self.chirp.addresses),
        )

    async def stop(self) -> None:
        """DEPART every offered service, then close the sockets."""
        self._closing = True
        if self.chirp is not None:
            self.chirp.depart()
        self._unlisten()  # the state watch ends
        self._unlisten = lambda: None
        for task in self._tasks:
            task.cancel()
        if self._tasks:  # bounded: a task that ignores its cancellation must not hold shutdown
            _, stuck = await asyncio.wait(self._tasks, timeout=STOP_TIMEOUT_S)
            for task in stuck:
                self.count("stop_stuck")
                log.error("satellite: task %s did not end at shutdown", task.get_name())
        await self.commands.stop()
        self._unsubscribe()
        await self.monitoring.stop()
        await self.autonomy.stop()
        self._xpub_now = None
        for sock in (self._rep, self._xpub):
            if sock is not None:
                sock.close(linger=0)

    def status(self) -> dict[str, Any]:
        """What `daqctl status` shows of the satellite (the STAT reply's "constellation")."""
        chirp_ = self.chirp
        return {
            "name": self.name,
            "group": self.group,
            "ports": {
                "control": self.cmd_port,
                "heartbeat": self.hb_port,
                "monitoring": self.monitoring.port,
            },
            "role": self.role,
            "status": self.status_text,
            "requests": self.commands.requests,
            "heartbeats": self.heartbeats,
            "extrasystoles": self.extrasystoles,
            "heartbeat_subscribers": self.subscribers,
            "monitoring_sent": dict(self.monitoring.sent),
            "remote_services": len(chirp_.registry) if chirp_ else 0,
            "remote_heartbeats": {
                r.name or r.endpoint: r.summary() for r in self.autonomy.remotes.values()
            },
            "autonomy_interrupts": self.autonomy.interrupts,
            "autonomy_marks": self.autonomy.marks,
            "errors": dict(self.counters),
        }

    def data_senders(self) -> dict[str, int]:
        """Sender name -> bound port of every CDTP publisher (a Constellation receiver finds its
        DATA service by the MD5 of that name, as it lists it in `_data.receive_from`)."""
        out: dict[str, int] = {}
        for pub in self.host.publishers.values():
            endpoint = pub.addresses.get("endpoint", "")
            if pub.settings.type != "cdtp" or not endpoint.startswith("tcp://"):
                continue
            sender = getattr(pub, "sender_name", None) or f"daqd.{pub.name}"
            out[sender] = int(endpoint.rsplit(":", 1)[1])
        return out

    async def _follow_publishers(self) -> None:
        """Keep the DATA offers true when a reload (SIGHUP) adds, moves or removes a CDTP
        publisher: DEPART what went, OFFER what came."""
        offered = self.data_senders()
        while True:
            await asyncio.sleep(PUBLISHER_CHECK_S)
            now = self.data_senders()
            if now == offered or self.chirp is None:
                continue
            for sender, port in offered.items():
                if now.get(sender) != port:
                    self.chirp.withdraw(chirp.Service.DATA, chirp.name_uuid(sender))
            for sender, port in now.items():
                if offered.get(sender) != port:
                    self.chirp.offer(chirp.Service.DATA, port, chirp.name_uuid(sender))
            log.info("CHIRP: DATA offers now %s", now or "none")
            offered = now

    def count(self, reason: str) -> None:
        self.counters[reason] = self.counters.get(reason, 0) + 1

    # ----- CHP -------------------------------------------------------------------------------
    async def _count_subscribers(self) -> None:
        assert self._xpub is not None
        while True:
            msg = await self._xpub.recv()
            if msg[:1] == b"\x01":
                self.subscribers += 1
            elif msg[:1] == b"\x00":
                self.subscribers = max(self.subscribers - 1, 0)
            self._beat_now.set()  # a new subscriber learns the state at once

    def interval_ms(self) -> int:
        return chp.interval_ms(self.subscribers, self.max_interval_ms)

    async def _heartbeats(self) -> None:
        """A heartbeat every 80 % of the interval, and at once for a new subscriber."""
        # asyncio.timeout, not wait_for: Python 3.11's wait_for can swallow the task's own
        # cancellation when the event is set at the same moment, and this loop then never ended
        # (stop() waited on it forever: daqd hung at SIGTERM after a controller went away)
        while not self._closing:
            self._beat_now.clear()
            self._send_heartbeat(extrasystole=False)
            try:
                async with asyncio.timeout(self.interval_ms() * 0.8 / 1000):
                    await self._beat_now.wait()
            except TimeoutError:
                pass

    def _on_state(self, state: State) -> None:
        """An extrasystole for every state the host's machine enters, transitional ones too
        (a controller waiting on a transition from INIT to INIT must see `initializing`)."""
        try:
            self._send_heartbeat(extrasystole=True, state=state)
        except Exception as exc:  # never let a heartbeat break a transition
            self.count("chp_send")
            self._limited.warning("chp_send", "CHP: extrasystole not sent: %r", exc)

    def _send_heartbeat(self, extrasystole: bool, state: State | None = None) -> None:
        if self._xpub_now is None:
            return
        flags = chp.ROLE_FLAGS[self.role]
        if extrasystole:
            flags |= chp.Flags.IS_EXTRASYSTOLE
        hb = chp.Heartbeat(
            self.name,
            _timestamp(time.time_ns()),
            (state or self.host.state).value,
            int(flags),
            self.interval_ms(),
            self.status_text if extrasystole else None,
        )
        try:
            self._xpub_now.send_multipart(chp.encode(hb), flags=zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            self.count("chp_send")
            self._limited.warning("chp_send", "CHP: heartbeat not sent: %s", exc)
            return
        self.heartbeats += 1
        if extrasystole:
            self.extrasystoles += 1

    # ----- autonomy (its other callback, Commands.interrupt_for, runs a transition) ----------
    def mark_run(self, reason: str) -> None:
        """Autonomy: a MARK_DEGRADED satellite failed; the current run (if any) ends DEGRADED
        with `reason` (e.g. `constellation.peer_lost:Type.Name`) among its reasons."""
        run = self.host.run
        if run is not None and self.host.mark_run(reason):
            self.status_text = f"run {run.run_id} marked DEGRADED: {reason}"
            self._beat_now.set()


async def start_satellite(host: Host) -> Satellite | None:
    """The daemon's satellite, started, if the configuration has a [constellation] table."""
    settings = host.config.constellation
    if settings is None:
        return None
    satellite = Satellite(host, settings)
    try:
        await satellite.start()
    except Exception:
        await satellite.stop()
        raise
    return satellite
