"""A DCSS simulator: the server side of the DHS protocol, for tests, demos and benchmarks.

It behaves as SSRL's DCSS does towards a hardware server (docs/protocols/dcss.md): on connect
it sends the v1 `stoc_send_client_type` and closes a DHS that does not answer within 1 s, takes the
protocol level from its own DHS table, closes an unknown name at once and a duplicate name after
3 s, sends one `stoh_register_*` per device of that DHS (DCSS's own text forms), answers
`htos_send_configuration` with the 16-field `stoh_configure_real_motor`, forwards operations and
moves, stores what the DHS reports, fails a disconnected DHS's operations as `no_hw_host_<dhs>`,
and records every message the DHS sends. Faults: close with FIN or RST, raw bytes, bad headers.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import click

from daqd.errors import ProtocolError
from daqd.protocols import dcss as d

log = logging.getLogger("daqd.sim.dcss")

DEVICE_KINDS = (
    "real_motor",
    "pseudo_motor",
    "shutter",
    "ion_chamber",
    "operation",
    "encoder",
    "string",
    "object",
)


@dataclass
class SimDevice:
    """One database entry (section 7): a device of one DHS, with the values DCSS keeps for it."""

    kind: str
    name: str
    hardware_name: str = ""
    dhs: str = ""  # owner; empty: the simulator's first DHS
    position: float = 0.0
    upper_limit: float = 100.0
    lower_limit: float = -100.0
    scale_factor: float = 1000.0
    speed: float = 2000.0
    acceleration: float = 0.1
    backlash: float = 0.0
    lower_limit_on: bool = True
    upper_limit_on: bool = True
    locked: bool = False
    backlash_on: bool = False
    reverse_on: bool = False
    state: str = "closed"  # shutter
    contents: str = ""  # string
    counts: dict[str, float] = field(default_factory=dict)  # ion chamber readings
    dependencies: tuple[str, ...] = ()
    operation_args: str = ""  # what the exercise mode starts this operation with
    active: bool = False  # a move is in progress (DCSS's view)

    def __post_init__(self) -> None:
        if self.kind not in DEVICE_KINDS:
            raise ValueError(f"device kind must be one of {DEVICE_KINDS}, got {self.kind!r}")
        self.hardware_name = self.hardware_name or self.name

    def register_text(self) -> str:
        """The registration line exactly as DCSS writes it (some end in a newline)."""
        if self.kind in ("real_motor", "pseudo_motor"):
            return f"stoh_register_{self.kind} {self.name} {self.hardware_name}"
        if self.kind == "ion_chamber":
            return f"stoh_register_ion_chamber {self.name} {self.hardware_name} 0 timer1 clock\n"
        if self.kind == "shutter":
            return f"stoh_register_shutter {self.name} {self.state} {self.hardware_name}\n"
        return f"stoh_register_{self.kind} {self.name} {self.hardware_name}\n"

    def configure_text(self, host: str) -> str:
        """DCSS's `stoh_configure_*` for this device (numbers with %lf / %d as DCSS prints them)."""
        b = int
        if self.kind == "real_motor":
            return (
                f"stoh_configure_real_motor {self.name} {host} {self.hardware_name} "
                f"{self.position:f} {self.upper_limit:f} {self.lower_limit:f} "
                f"{self.scale_factor:f} {self.speed:f} {self.acceleration:f} {self.backlash:f} "
                f"{b(self.lower_limit_on)} {b(self.upper_limit_on)} {b(self.locked)} "
                f"{b(self.backlash_on)} {b(self.reverse_on)} normal"
            )
        if self.kind == "pseudo_motor":
            return (
                f"stoh_configure_pseudo_motor {self.name} {host} {self.hardware_name} "
                f"{self.position:f} {self.upper_limit:f} {self.lower_limit:f} "
                f"{b(self.lower_limit_on)} {b(self.upper_limit_on)} {b(self.locked)} normal"
            )
        if self.kind == "shutter":
            return f"stoh_configure_shutter {self.name} {host} {self.hardware_name} {self.state}"
        if self.kind == "encoder":
            return f"stoh_configure_encoder {self.name} {host} {self.position:f} {self.position:f}"
        if self.kind == "string":
            return f"stoh_configure_string {self.name} {host} {self.contents}".rstrip()
        return f"stoh_configure_{self.kind} {self.name} {host} {self.hardware_name}"


class SimOperation:
    """An operation DCSS forwarded: the updates and the completion the DHS sent for it."""

    __slots__ = ("args", "completion", "done", "handle", "link", "name", "on_done", "updates")

    def __init__(self, link: DhsLink, name: str, handle: str, args: str | bytes) -> None:
        self.link = link
        self.name = name
        self.handle = handle
        self.args = args
        self.updates: list[str] = []
        self.completion: d.HtosOperationCompleted | None = None
        self.done: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.on_done: Callable[[SimOperation], None] | None = None

    @property
    def status(self) -> str | None:
        return self.done.result() if self.done.done() else None

    def _finish(self, status: str) -> None:
        if not self.done.done():
            self.done.set_result(status)
        if self.on_done is not None:
            self.on_done(self)


class DhsLink:
    """One DHS connection as DCSS sees it; tests drive the DHS through it."""

    def __init__(
        self,
        sim: DcssSimulator,
        link_id: int,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        self.sim = sim
        self.id = link_id
        self.reader = reader
        self.writer = writer
        self.dhs_name = ""
        self.level = 2
        self.codec = d.DcssCodec(2, handshake=False)
        self.handshake_reply = b""
        self.received: list[d.Message] = []  # everything after the handshake, in order
        self.operations: dict[str, SimOperation] = {}  # by handle
        self.closed = asyncio.Event()
        self.close_reason = ""
        self._waiters: list[asyncio.Future[None]] = []

    # ---- sending (the way DCSS forwards)
    def send_text(self, text: str | bytes, binary: bytes = b"") -> None:
        if self.writer.is_closing():
            return
        self.writer.write(self.codec.encode_text(text, binary))

    def send_raw(self, data: bytes) -> None:
        """Bytes as they are: broken headers and other faults."""
        self.writer.write(data)

    def start_operation(
        self,
        name: str,
        args: str | bytes = "",
        on_done: Callable[[SimOperation], None] | None = None,
    ) -> SimOperation:
        """Forward `stoh_start_operation NAME HANDLE ARGS`; bytes args go out as they are."""
        handle = f"{self.sim.client_number}.{next(self.sim.handles)}"
        op = SimOperation(self, name, handle, args)
        op.on_done = on_done
        self.operations[handle] = op
        head = f"stoh_start_operation {name} {handle}"
        if isinstance(args, bytes):
            self.send_text(head.encode() + b" " + args if args else head.encode())
        else:
            self.send_text(f"{head} {args}".rstrip())
        return op

    def stop_operation(self, name: str) -> None:
        self.send_text(f"stoh_stop_operation {name}")

    def move_motor(self, motor: str, destination: float) -> None:
        self.sim.devices[motor].active = True
        self.send_text(f"stoh_start_motor_move {motor} {destination:f}")

    def set_motor_position(self, motor: str, position: float) -> None:
        self.send_text(f"stoh_set_motor_position {motor} {position:f}")

    def abort_motor(self, motor: str) -> None:
        self.send_text(f"stoh_abort_motor_move {motor}")

    def abort_all(self, mode: str = "soft") -> None:
        self.send_text(f"stoh_abort_all {mode}")

    def configure_device(self, name: str, **values: Any) -> None:
        """A GUI `gtos_configure_device`: update the database and send `stoh_configure_*`."""
        dev = self.sim.devices[name]
        for key, value in values.items():
            if not hasattr(dev, key):
                raise AttributeError(f"device field {key!r} does not exist")
            setattr(dev, key, value)
        self.send_text(dev.configure_text(self.sim.host_name))

    def set_shutter(self, shutter: str, state: str) -> None:
        self.send_text(f"stoh_set_shutter_state {shutter} {state}")

    def read_ion_chambers(self, time_s: float, *channels: str) -> None:
        self.send_text(f"stoh_read_ion_chambers {time_s:f} 0 {' '.join(channels)}")

    def drop(self, how: str = "fin") -> None:
        """Close the connection: `fin` (orderly close) or `rst` (SO_LINGER 0: a reset)."""
        if how == "rst":
            sock = self.writer.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.writer.transport.abort()
        elif how == "fin":
            self.writer.close()
        else:
            raise ValueError(f"drop how must be 'fin' or 'rst', got {how!r}")

    # ---- waiting (tests)
    async def wait_for(
        self, predicate: Callable[[d.Message], bool], timeout: float = 10.0, start: int = 0
    ) -> d.Message:
        """The first received message from index `start` on that satisfies `predicate`."""
        deadline = time.monotonic() + timeout
        i = start
        while True:
            while i < len(self.received):
                if predicate(self.received[i]):
                    return self.received[i]
                i += 1
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(
                    f"DCSS sim: no matching message within {timeout} s; got "
                    f"{[m.to_text()[:60] for m in self.received[-10:]]}"
                )
            fut = asyncio.get_running_loop().create_future()
            self._waiters.append(fut)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(fut, remaining)

    def texts(self) -> list[str]:
        return [m.to_text() for m in self.received]

    # ---- reading the DHS
    def _on_message(self, m: d.Message) -> None:
        if self.sim.record_messages:
            self.received.append(m)
        devices = self.sim.devices
        if isinstance(m, d.HtosOperationUpdate):
            op = self.operations.get(m.handle)
            if op is not None:
                op.updates.append(m.args)
        elif isinstance(m, d.HtosOperationCompleted):
            op = self.operations.pop(m.handle, None)
            if op is not None:
                op.completion = m
                op._finish(m.status)
            else:
                self.sim.stray_completions.append((self.id, m))
        elif isinstance(m, d.HtosSendConfiguration):
            dev = devices.get(m.device_name)
            if dev is not None:
                self.send_text(dev.configure_text(self.sim.host_name))
        elif isinstance(m, (d.HtosConfigureRealMotor, d.HtosConfigurePseudoMotor)):
            dev = devices.get(m.motor)
            if dev is not None:
                for f in d.base._wire_fields(type(m))[1:]:
                    setattr(dev, f.name, getattr(m, f.name))
        elif isinstance(m, (d.HtosMotorMoveStarted, d.HtosUpdateMotorPosition)):
            if m.motor in devices:
                devices[m.motor].position = m.position
        elif isinstance(m, d.HtosMotorMoveCompleted):
            if m.motor in devices:
                devices[m.motor].position = m.position
                devices[m.motor].active = False
        elif isinstance(m, d.HtosReportShutterState):
            if m.shutter in devices and m.result in ("", "normal"):
                devices[m.shutter].state = m.state
        elif isinstance(m, d.HtosReportIonChambers):
            for channel, counts in m.readings:
                if channel in devices:
                    devices[channel].counts[channel] = counts
        elif isinstance(m, (d.HtosGetEncoderCompleted, d.HtosSetEncoderCompleted)):
            if m.encoder in devices:
                devices[m.encoder].position = m.position
        elif isinstance(m, d.HtosSetStringCompleted) and m.name in devices and m.status == "normal":
            devices[m.name].contents = m.contents
        if self._waiters:
            waiters, self._waiters = self._waiters, []
            for fut in waiters:
                if not fut.done():
                    fut.set_result(None)


class DcssSimulator:
    """A DCSS hardware port. `dhs` maps each known DHS name to its protocol level (1 or 2)."""

    def __init__(
        self,
        dhs: dict[str, int] | None = None,
        devices: list[SimDevice] | None = None,
        *,
        listen: str = "127.0.0.1:0",
        handshake_timeout_s: float = 1.0,
        duplicate_close_s: float = 3.0,
        client_number: int = 1,
        host_name: str = "localhost",
        record_messages: bool = True,
    ) -> None:
        self.dhs_levels = dict(dhs or {"dhs": 2})
        for name, level in self.dhs_levels.items():
            if level not in (1, 2):
                raise ValueError(f"DHS {name}: protocol level must be 1 or 2, not {level}")
        first = next(iter(self.dhs_levels))
        self.devices: dict[str, SimDevice] = {}
        for dev in devices or []:
            dev.dhs = dev.dhs or first
            self.devices[dev.name] = dev
        self.listen = listen
        self.handshake_timeout_s = handshake_timeout_s
        self.duplicate_close_s = duplicate_close_s
        self.client_number = client_number
        self.host_name = host_name
        self.record_messages = record_messages  # False for benchmarks: keep no history
        self.handles = itertools.count(1)
        self.links: list[DhsLink] = []  # every accepted TCP connection, in order
        self.online: dict[str, DhsLink] = {}
        self.events: list[tuple[int, str]] = []  # (link id, what happened)
        self.stray_completions: list[tuple[int, d.Message]] = []
        self.protocol_errors: list[tuple[int, str]] = []
        self._server: asyncio.Server | None = None
        self._link_ids = itertools.count(1)
        self._tasks: set[asyncio.Task[None]] = set()
        self._online_changed: list[asyncio.Future[None]] = []

    async def start(self) -> None:
        host, _, port = self.listen.rpartition(":")
        self._server = await asyncio.start_server(self._accept, host.strip("[]"), int(port))

    @property
    def port(self) -> int:
        assert self._server is not None, "start() first"
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for link in self.links:
            link.writer.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def __aenter__(self) -> DcssSimulator:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def wait_online(self, dhs: str = "dhs", timeout: float = 10.0, after: int = 0) -> DhsLink:
        """The link of `dhs` once it is online with an id above `after` (use for reconnects)."""
        deadline = time.monotonic() + timeout
        while True:
            link = self.online.get(dhs)
            if link is not None and link.id > after:
                return link
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"DCSS sim: DHS {dhs!r} not online within {timeout} s")
            fut = asyncio.get_running_loop().create_future()
            self._online_changed.append(fut)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(fut, remaining)

    def _notify_online(self) -> None:
        waiters, self._online_changed = self._online_changed, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        link = DhsLink(self, next(self._link_ids), reader, writer)
        self.links.append(link)
        try:
            await self._serve(link)
        except (ConnectionError, asyncio.IncompleteReadError) as exc:
            link.close_reason = link.close_reason or f"connection lost: {exc!r}"
        except asyncio.CancelledError:
            link.close_reason = link.close_reason or "simulator closed"
        finally:
            self._tasks.discard(task)
            if self.online.get(link.dhs_name) is link:
                del self.online[link.dhs_name]
                self.events.append((link.id, "offline"))
                # the engine fails every operation of a lost DHS
                for op in list(link.operations.values()):
                    op._finish(f"no_hw_host_{link.dhs_name}")
                link.operations.clear()
                self._notify_online()
            writer.close()
            link.closed.set()

    async def _serve(self, link: DhsLink) -> None:
        link.writer.write(d.encode_v1("stoc_send_client_type"))
        try:
            reply = await asyncio.wait_for(
                link.reader.readexactly(d.V1_FRAME_BYTES), self.handshake_timeout_s
            )
        except TimeoutError:
            link.close_reason = "no handshake reply within 1 s"
            self.events.append((link.id, "handshake_timeout"))
            return
        link.handshake_reply = reply
        text, _ = d.decode_text(reply.split(b"\0", 1)[0])
        tokens = d.split_tokens(text)
        name = tokens[1] if len(tokens) > 1 else ""
        link.dhs_name = name
        if name not in self.dhs_levels:
            link.close_reason = f"unknown DHS name {name!r}"
            self.events.append((link.id, "unknown_name"))
            return
        if name in self.online:
            self.events.append((link.id, "duplicate"))
            link.close_reason = f"DHS {name} is already connected"
            await asyncio.sleep(self.duplicate_close_s)
            return
        link.level = self.dhs_levels[name]
        link.codec = d.DcssCodec(link.level, handshake=False)
        self.online[name] = link
        self.events.append((link.id, "online"))
        for dev in self.devices.values():
            if dev.dhs == name:
                link.send_text(dev.register_text())
        for dev in self.devices.values():
            if dev.dhs == name and dev.dependencies:
                link.send_text(f"stoh_set_motor_dependency {dev.name} {' '.join(dev.dependencies)}")
        self._notify_online()
        while True:
            data = await link.reader.read(1 << 16)
            if not data:
                link.close_reason = "DHS closed the connection"
                return
            try:
                messages = link.codec.feed(data)
            except ProtocolError as exc:
                self.protocol_errors.append((link.id, str(exc)))
                link.close_reason = f"protocol error: {exc}"
                return
            for m in messages:
                link._on_message(m)


# ------------------------------------------------------------------------------------ command


def _device_option(kind: str, values: tuple[str, ...]) -> list[SimDevice]:
    out = []
    for value in values:
        spec, _, args = value.partition("=")
        name, _, owner = spec.partition("@")
        out.append(SimDevice(kind, name, dhs=owner, operation_args=args))
    return out


async def _run(
    sim: DcssSimulator, exercise_interval_s: float, quiet: bool, count: int | None
) -> None:
    await sim.start()
    click.echo(
        f"DCSS simulator on {sim.listen.rpartition(':')[0]}:{sim.port}, DHS "
        + ", ".join(f"{n} (level {lv})" for n, lv in sim.dhs_levels.items())
        + f", {len(sim.devices)} devices",
        err=True,
    )
    seen: dict[int, int] = {}
    rounds = 0
    sign = 1.0
    try:
        while count is None or rounds < count:
            await asyncio.sleep(exercise_interval_s if exercise_interval_s > 0 else 0.2)
            for link in list(sim.links):
                start = seen.get(link.id, 0)
                for m in link.received[start:]:
                    if not quiet:
                        click.echo(f"{link.dhs_name}> {d.mask_private(m.to_text())}")
                seen[link.id] = len(link.received)
            if exercise_interval_s <= 0:
                continue
            rounds += 1
            sign = -sign
            for link in list(sim.online.values()):
                for dev in sim.devices.values():
                    if dev.dhs != link.dhs_name:
                        continue
                    if dev.kind == "operation":
                        link.start_operation(dev.name, dev.operation_args)
                    elif dev.kind == "real_motor" and not dev.active:
                        link.move_motor(dev.name, sign * 1.0)
                    elif dev.kind == "ion_chamber":
                        link.read_ion_chambers(0.1, dev.name)
                    elif dev.kind == "shutter":
                        link.set_shutter(dev.name, "open" if sign > 0 else "closed")
    finally:
        await sim.close()


@click.command("dcss")
@click.option("--listen", default="127.0.0.1:14242", show_default=True, help="hardware port")
@click.option(
    "--dhs",
    "dhs_names",
    multiple=True,
    default=("dhs=2",),
    show_default=True,
    help="a known DHS: NAME or NAME=LEVEL (repeatable)",
)
@click.option("--motor", multiple=True, help="real motor NAME[@DHS] (repeatable)")
@click.option("--shutter", multiple=True, help="shutter NAME[@DHS]")
@click.option("--ion-chamber", multiple=True, help="ion chamber NAME[@DHS]")
@click.option(
    "--operation", multiple=True, help="operation NAME[@DHS][=ARGS] (ARGS: for --exercise)"
)
@click.option("--encoder", multiple=True, help="encoder NAME[@DHS]")
@click.option("--string", multiple=True, help="string NAME[@DHS]")
@click.option(
    "--exercise-interval-s",
    type=float,
    default=0.0,
    help="every N s: start each operation, move each motor, read each ion chamber, toggle shutters",
)
@click.option("--count", type=click.IntRange(1), default=None, help="stop after N exercise rounds")
@click.option("--quiet", is_flag=True, help="do not print what the DHS sends")
def command(
    listen: str,
    dhs_names: tuple[str, ...],
    motor: tuple[str, ...],
    shutter: tuple[str, ...],
    ion_chamber: tuple[str, ...],
    operation: tuple[str, ...],
    encoder: tuple[str, ...],
    string: tuple[str, ...],
    exercise_interval_s: float,
    count: int | None,
    quiet: bool,
) -> None:
    """A DCSS server for a DHS to connect to: handshake, registrations, operations, moves."""
    levels: dict[str, int] = {}
    for entry in dhs_names:
        name, _, level = entry.partition("=")
        if level not in ("", "1", "2"):
            raise click.BadParameter(f"level must be 1 or 2 in {entry!r}", param_hint="--dhs")
        levels[name] = int(level or 2)
    devices = (
        _device_option("real_motor", motor)
        + _device_option("shutter", shutter)
        + _device_option("ion_chamber", ion_chamber)
        + _device_option("operation", operation)
        + _device_option("encoder", encoder)
        + _device_option("string", string)
    )
    sim = DcssSimulator(levels, devices, listen=listen)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    import uvloop

    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(_run(sim, exercise_interval_s, quiet, count))
