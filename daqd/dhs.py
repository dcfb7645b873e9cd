"""The DCSS hardware-server engine and the handler API users write: operations and devices.

Write an operation handler::

    from daqd.dhs import Operation, operation

    @operation("getLoopTip")
    async def get_loop_tip(op: Operation) -> None:
        # op.name "getLoopTip", op.handle "1.7", op.args_raw "0 {a b}", op.args ["0", "a b"]
        op.update("searching")                # htos_operation_update getLoopTip 1.7 searching
        x, y = await find_tip()
        op.complete("normal", x, y)           # htos_operation_completed getLoopTip 1.7 normal 1.5 2.0

Name the module in the receiver's settings, `handlers = ["mypackage.loop_handlers"]` (or a file path
ending in `.py`). Give handlers their own settings in the receiver's `handler_settings` table; they
read them as `op.settings`, a read-only mapping (nested tables are read-only mappings too, arrays
are tuples), the same for every operation::

    [receiver.handler_settings]            # under that receiver's [[receiver]] entry
    inference_url = "http://127.0.0.1:8008/predict"
    timeouts = { grab_s = 5.0 }

    url = op.settings["inference_url"]    # KeyError if absent: check, and complete with a reason
    grab_s = op.settings.get("timeouts", {}).get("grab_s", 5.0)

An operation answered without waiting can be a plain function; it runs at once, with no task::

    @operation("getTemperature")
    def get_temperature(op: Operation) -> float:
        return read_sensor()                  # htos_operation_completed getTemperature 1.8 normal 21.5

An `async def` operation runs as its own task, started eagerly: its code up to the first `await`
runs at once, as that task. Neither kind may block (the DHS must keep reading). The rules:

- Exactly one completion per operation. `complete()` a second time raises `OperationError`. A
  handler that returns without completing completes with `normal` and its return value (None: no
  values; a tuple or list: those values; anything else: that one value). A handler that raises
  completes with status `error` and the exception text.
- `stoh_abort_all` cancels every running operation task at once (`asyncio.CancelledError` arrives
  at the handler's current `await`). A handler that does not complete the operation itself while
  handling the cancellation gets `aborted` sent for it. `stoh_stop_operation <name>` sets
  `op.stop_requested` instead, for handlers that can stop gracefully.
- When the connection to DCSS drops, every operation is cancelled and nothing more is sent for it:
  DCSS has already failed it (`no_hw_host_<dhs>`). `update()`/`complete()` on such an operation are
  silently dropped (counted as `stale`), so a handler finishing late cannot confuse the next
  connection.
- `update()` and `complete()` never block; they may be called from any callback in the event loop,
  so an operation can be finished by another connection's event while its handler awaits it.
- Values are formatted by daqd: numbers with `str()`-style shortest form, bools as 1/0, words that
  contain spaces braced for Tcl (`{two words}`).

Device handlers subclass `Motor`, `Shutter`, `IonChamber`, `Encoder` or `StringDevice` and override
the hardware methods (`move`, `set_position`, `set_state`, `read`, ...), registered with
`@device("dcss_name")`. Devices DCSS registers that no handler claims get the built-in simulated
devices (`SimulatedMotor`, ...), configured from the receiver's settings, unless
`simulate_devices = false`.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import inspect
import logging
import re
import sys
import types
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from daqd import trust
from daqd.eager import start_eagerly
from daqd.errors import ConfigError, DaqdError
from daqd.protocols import dcss as d
from daqd.protocols.dcss import format_number, tcl_join, tcl_split

# async def (a coroutine to await) or plain def (its result); see `operation`
OperationHandler = Callable[["Operation"], Any]
_F = TypeVar("_F", bound=Callable[..., Any])
_DevT = TypeVar("_DevT", bound="Device")

_OPERATION_ATTR = "__dhs_operation__"
_ONE_WORD = re.compile(r"[^ \t\n\v\f\r\0]+")
_DEVICE_ATTR = "__dhs_device__"


class OperationError(DaqdError):
    """An operation was used against the protocol's rules (e.g. completed twice)."""


class MotorError(DaqdError):
    """A move that ended badly; `status` is what `htos_motor_move_completed` reports."""

    def __init__(self, status: str, message: str = "") -> None:
        super().__init__(message or status)
        self.status = status


def operation(name: str) -> Callable[[_F], _F]:
    """Register `handler(op: Operation)` for the DCSS operation `name`: an `async def`, or a plain
    `def` for an operation answered without waiting (it runs at once, with no task)."""
    if not name or any(c in d.WHITESPACE for c in name):
        raise ValueError(f"operation name must be one word, got {name!r}")

    def mark(func: _F) -> _F:
        if not callable(func):
            raise TypeError(f"operation handler {func!r} must be a function")
        names = getattr(func, _OPERATION_ATTR, ())
        setattr(func, _OPERATION_ATTR, (*names, name))
        return func

    return mark


def device(name: str) -> Callable[[type[_DevT]], type[_DevT]]:
    """Register a Device subclass as the handler of the DCSS device `name`."""

    def mark(cls: type[_DevT]) -> type[_DevT]:
        names = cls.__dict__.get(_DEVICE_ATTR, ())
        setattr(cls, _DEVICE_ATTR, (*names, name))
        return cls

    return mark


def load_handler_module(spec: str) -> Any:
    """Import a handler module by dotted name, or from a file path ending in `.py`.

    Refused (ConfigError) unless every file the import would run passes daqd.trust's owner and
    mode check: the configuration checked it already, and this holds for any other caller too.
    """
    problem = trust.code_problem(spec, Path.cwd())
    if problem:
        raise ConfigError(f"refusing to load handler module {spec!r}: {problem}")
    if spec.endswith(".py"):
        path = Path(spec).resolve()
        modname = f"daqd_handlers_{path.stem}_{abs(hash(str(path))):x}"
        if modname in sys.modules:
            return sys.modules[modname]
        loader_spec = importlib.util.spec_from_file_location(modname, path)
        if loader_spec is None or loader_spec.loader is None or not path.is_file():
            raise ConfigError(f"handler module file {spec!r} not found")
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[modname] = module
        try:
            loader_spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[modname]
            raise
        return module
    try:
        return importlib.import_module(spec)
    except ImportError as exc:
        raise ConfigError(f"handler module {spec!r} cannot be imported: {exc}") from exc


def freeze_settings(value: Any) -> Any:
    """A read-only copy of a settings value: tables become read-only mappings, arrays tuples."""
    if isinstance(value, Mapping):
        return types.MappingProxyType({str(k): freeze_settings(v) for k, v in value.items()})
    if isinstance(value, list | tuple):
        return tuple(freeze_settings(v) for v in value)
    return value


def collect_handlers(
    modules: Iterable[Any],
) -> tuple[dict[str, OperationHandler], dict[str, type[Device]]]:
    """Operation handlers and device classes marked with @operation / @device in `modules`."""
    ops: dict[str, OperationHandler] = {}
    devices: dict[str, type[Device]] = {}
    for module in modules:
        for value in vars(module).values():
            for name in getattr(value, _OPERATION_ATTR, ()) if callable(value) else ():
                if name in ops and ops[name] is not value:
                    raise ConfigError(
                        f"operation {name!r} has two handlers: {ops[name].__qualname__} and "
                        f"{value.__qualname__}"
                    )
                ops[name] = value
            if isinstance(value, type) and issubclass(value, Device):
                for name in value.__dict__.get(_DEVICE_ATTR, ()):
                    devices[name] = value
    return ops, devices


# ------------------------------------------------------------------------------------ operations


class Operation:
    """One `stoh_start_operation`: what the handler gets, and how it answers."""

    __slots__ = (
        "_args",
        "_conn",
        "_data",
        "_dhs",
        "_stop",
        "args_raw",
        "handle",
        "message",
        "name",
        "status",
        "task",
    )

    def __init__(self, dhs: Dhs, message: d.StohStartOperation, conn: int) -> None:
        self._dhs = dhs
        self._conn = conn
        self.message = message
        self.name: str = message.name
        self.handle: str = message.handle
        self.args_raw: str = message.args
        self._args: list[str] | None = None
        self._data: dict[str, Any] | None = None
        self.status: str | None = None  # the completion status once completed
        self._stop: asyncio.Event | None = None
        self.task: asyncio.Task[None] | None = None

    @property
    def args(self) -> list[str]:
        """The arguments as a Tcl list (`{two words}` is one argument). Raises ProtocolError if
        the braces do not balance; `args_raw` is always there."""
        if self._args is None:
            self._args = tcl_split(self.args_raw)
        return self._args

    @property
    def data(self) -> dict[str, Any]:
        """A dict for the handler's own per-operation state (made on first use)."""
        if self._data is None:
            self._data = {}
        return self._data

    @property
    def stop_requested(self) -> asyncio.Event:
        """Set by `stoh_stop_operation <name>`: finish early and complete (graceful stop)."""
        if self._stop is None:
            self._stop = asyncio.Event()
        return self._stop

    @property
    def settings(self) -> Mapping[str, Any]:
        """The receiver's `handler_settings` table, read-only (a `types.MappingProxyType`)."""
        return self._dhs.handler_settings

    @property
    def dhs(self) -> Dhs:
        return self._dhs

    @property
    def log(self) -> logging.Logger:
        return self._dhs.log

    @property
    def done(self) -> bool:
        return self.status is not None

    @property
    def stale(self) -> bool:
        """True once the connection this operation came on is gone."""
        return self._conn != self._dhs.connection_id

    def update(self, *values: Any) -> None:
        """Send `htos_operation_update <name> <handle> values…`."""
        if self.status is not None:
            raise OperationError(
                f"operation {self.name} {self.handle} already completed ({self.status}): "
                "no update after completion"
            )
        dhs = self._dhs
        send = dhs._send
        if self._conn != dhs.connection_id or send is None:
            dhs.stats["stale"] += 1
            return
        if values:
            send(f"htos_operation_update {self.name} {self.handle} {tcl_join(values)}", False)
        else:
            send(f"htos_operation_update {self.name} {self.handle}", False)
        dhs.stats["operation_updates"] += 1

    def complete(self, status: str = "normal", *values: Any) -> None:
        """Send `htos_operation_completed <name> <handle> <status> values…`; exactly once.

        `normal` means success; any other one-word status is the failure reason.
        """
        if self.status is not None:
            raise OperationError(
                f"operation {self.name} {self.handle} already completed ({self.status})"
            )
        if status != "normal":
            status = format_number(status)
            if not _ONE_WORD.fullmatch(status):
                raise OperationError(f"operation status must be one word, got {status!r}")
        self.status = status
        dhs = self._dhs
        if dhs.operations.get(self.handle) is self:
            del dhs.operations[self.handle]
        send = dhs._send
        if self._conn != dhs.connection_id or send is None:
            dhs.stats["stale"] += 1
            return
        if values:
            text = f"htos_operation_completed {self.name} {self.handle} {status} {tcl_join(values)}"
        else:
            text = f"htos_operation_completed {self.name} {self.handle} {status}"
        send(text, True)  # the end of an operation: out now, not at the end of the loop turn
        dhs.stats["operations_completed"] += 1

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._dhs._operation_task_done(self)

    def cancel(self) -> None:
        if self.task is not None and not self.task.done():
            self.task.cancel()
            # a task cancelled before its first step runs no except clause: finish it here
            self.task.add_done_callback(self._task_done)

    def __repr__(self) -> str:
        return f"<Operation {self.name} {self.handle} {d.mask_private(self.args_raw)!r}>"


# ------------------------------------------------------------------------------------ devices


class Device:
    """A device DCSS registered with this DHS. Subclass one of the kinds below."""

    kinds: ClassVar[tuple[str, ...]] = ()

    def __init__(self, dhs: Dhs, name: str, hardware_name: str = "", **settings: Any) -> None:
        self.dhs = dhs
        self.name = name
        self.hardware_name = hardware_name or name
        self.settings = settings
        self.registered = False
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def log(self) -> logging.Logger:
        return self.dhs.log

    def send(self, message: d.Message) -> None:
        self.dhs.send(message)

    def on_register(self, message: d.Message) -> None:
        """DCSS registered this device (every connection)."""
        self.registered = True

    def spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        """Run `coro` as a task of this device: cancelled on abort_all and on disconnect."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.dhs.stats["device_errors"] += 1
            self.log.error(
                "%s: device %s task failed: %r", self.dhs.name, self.name, task.exception()
            )

    def abort(self) -> None:
        for task in list(self._tasks):
            task.cancel()


class Motor(Device):
    """A real or pseudo motor. Override `move` (and `set_position`) to drive real hardware."""

    kinds = ("real_motor", "pseudo_motor")
    # True: this DHS owns the configuration and pushes htos_configure_device on registration;
    # False: it asks DCSS with htos_send_configuration (SSRL simdhs's way).
    owns_configuration = False

    def __init__(self, dhs: Dhs, name: str, hardware_name: str = "", **settings: Any) -> None:
        super().__init__(dhs, name, hardware_name, **settings)
        self.pseudo = False
        self.position = float(settings.get("position", 0.0))
        self.upper_limit = float(settings.get("upper_limit", 1000.0))
        self.lower_limit = float(settings.get("lower_limit", -1000.0))
        self.scale_factor = float(settings.get("scale_factor", 1000.0))
        self.speed = float(settings.get("speed", 1000.0))
        self.acceleration = float(settings.get("acceleration", 0.1))
        self.backlash = float(settings.get("backlash", 0.0))
        self.lower_limit_on = bool(settings.get("lower_limit_on", False))
        self.upper_limit_on = bool(settings.get("upper_limit_on", False))
        self.locked = bool(settings.get("locked", False))
        self.backlash_on = bool(settings.get("backlash_on", False))
        self.reverse_on = bool(settings.get("reverse_on", False))
        if "owns_configuration" in settings:
            self.owns_configuration = bool(settings["owns_configuration"])
        self.configured = False
        self.dependencies: tuple[str, ...] = ()
        self.children: tuple[str, ...] = ()
        self.move_task: asyncio.Task[Any] | None = None

    # ---- hardware hooks
    async def move(self, destination: float) -> float:
        """Drive to `destination`; call `report_position()` on the way; return where it stopped.
        Raise MotorError(status) for a limit; cancellation means abort."""
        self.position = destination
        return destination

    async def set_position(self, position: float) -> None:
        """Redefine the current position (no motion)."""
        self.position = position

    # ---- protocol
    @property
    def moving(self) -> bool:
        return self.move_task is not None and not self.move_task.done()

    def on_register(self, message: d.Message) -> None:
        super().on_register(message)
        self.pseudo = isinstance(message, d.StohRegisterPseudoMotor)
        if self.owns_configuration:
            self.send(self.configuration_message())
        else:
            self.send(d.HtosSendConfiguration(self.name))

    def configuration_message(self) -> d.Message:
        if self.pseudo:
            return d.HtosConfigurePseudoMotor(
                self.name, self.position, self.upper_limit, self.lower_limit,
                self.lower_limit_on, self.upper_limit_on, self.locked,
            )  # fmt: skip
        return d.HtosConfigureRealMotor(
            self.name, self.position, self.upper_limit, self.lower_limit, self.scale_factor,
            self.speed, self.acceleration, self.backlash, self.lower_limit_on,
            self.upper_limit_on, self.locked, self.backlash_on, self.reverse_on,
        )  # fmt: skip

    def configure(self, message: d.StohConfigureRealMotor | d.StohConfigurePseudoMotor) -> None:
        """DCSS's configuration (reply to htos_send_configuration, or a GUI configure)."""
        self.position = message.position
        self.upper_limit = message.upper_limit
        self.lower_limit = message.lower_limit
        self.lower_limit_on = message.lower_limit_on
        self.upper_limit_on = message.upper_limit_on
        self.locked = message.locked
        if isinstance(message, d.StohConfigureRealMotor):
            self.scale_factor = message.scale_factor
            self.speed = message.speed
            self.acceleration = message.acceleration
            self.backlash = message.backlash
            self.backlash_on = message.backlash_on
            self.reverse_on = message.reverse_on
        self.configured = True

    def report_position(self, position: float, status: str = "moving") -> None:
        self.position = position
        self.send(d.HtosUpdateMotorPosition(self.name, position, status))

    def start_move(self, destination: float) -> None:
        if self.moving:
            self.dhs.stats["move_while_moving"] += 1
            self.log.warning(
                "%s: motor %s is already moving; move ignored", self.dhs.name, self.name
            )
            return
        self.send(d.HtosMotorMoveStarted(self.name, destination))
        self.move_task = self.spawn(self._run_move(destination))
        self.move_task.add_done_callback(self._move_task_done)

    def _move_task_done(self, task: asyncio.Task[Any]) -> None:
        # Done callbacks also see a task cancelled before its first step.
        if task.cancelled():
            self.send(d.HtosMotorMoveCompleted(self.name, self.position, "aborted"))

    async def _run_move(self, destination: float) -> None:
        status = "normal"
        try:
            self.position = await self.move(destination)
        except MotorError as exc:
            status = exc.status
        except Exception as exc:
            self.log.error("%s: motor %s move failed: %r", self.dhs.name, self.name, exc)
            status = "unknown"
        self.send(d.HtosMotorMoveCompleted(self.name, self.position, status))

    async def oscillate(self, shutter: Shutter | None, delta: float, time_s: float) -> None:
        """`stoh_start_oscillation`: open the shutter, move by `delta` over `time_s`, close."""
        if shutter is not None:
            await shutter.set_state("open")
            shutter.report()
        try:
            self.send(d.HtosMotorMoveStarted(self.name, self.position + delta))
            await self._run_move(self.position + delta)
        except asyncio.CancelledError:
            self.send(d.HtosMotorMoveCompleted(self.name, self.position, "aborted"))
            raise
        finally:
            if shutter is not None:
                await shutter.set_state("closed")
                shutter.report()


class SimulatedMotor(Motor):
    """A motor that moves at `speed_units_per_s` and reports its position every `update_interval_s`.

    One `htos_update_motor_position` per interval at most (an interval the loop was too busy for
    is skipped, not made up in a burst), none when the position shown did not change, positions
    rounded to one step of the motor (1 / scale_factor units, DCSS's steps per unit), and the
    completion carries the destination exactly.
    """

    def __init__(self, dhs: Dhs, name: str, hardware_name: str = "", **settings: Any) -> None:
        super().__init__(dhs, name, hardware_name, **settings)
        self.speed_units_per_s = float(settings.get("speed_units_per_s", 10.0))
        self.update_interval_s = float(settings.get("update_interval_s", 0.1))

    def step(self, position: float) -> float:
        """`position` rounded to the motor's precision (one step); as is without a scale."""
        if self.scale_factor <= 0:
            return position
        return round(position * self.scale_factor) / self.scale_factor

    async def move(self, destination: float) -> float:
        target = destination
        limit_status = ""
        if self.upper_limit_on and destination > self.upper_limit:
            target, limit_status = self.upper_limit, "cw_hw_limit"
        elif self.lower_limit_on and destination < self.lower_limit:
            target, limit_status = self.lower_limit, "ccw_hw_limit"
        loop = asyncio.get_running_loop()
        start, t0 = self.position, loop.time()
        span = target - start
        duration = abs(span) / self.speed_units_per_s if self.speed_units_per_s > 0 else 0.0
        interval = max(self.update_interval_s, 0.001)
        shown = self.step(start)
        tick = 1
        while tick * interval < duration:
            await asyncio.sleep(max(t0 + tick * interval - loop.time(), 0.0))
            elapsed = loop.time() - t0
            if elapsed >= duration:
                break
            tick = max(tick + 1, int(elapsed / interval) + 1)  # next tick still ahead
            position = self.step(start + span * (elapsed / duration))
            if position != shown:
                shown = position
                self.report_position(position)
        await asyncio.sleep(max(t0 + duration - loop.time(), 0.0))
        self.position = target
        if limit_status:
            raise MotorError(limit_status)
        return target


class Shutter(Device):
    kinds = ("shutter",)

    def __init__(self, dhs: Dhs, name: str, hardware_name: str = "", **settings: Any) -> None:
        super().__init__(dhs, name, hardware_name, **settings)
        self.state = str(settings.get("state", "closed"))

    async def set_state(self, state: str) -> None:
        """Open or close the hardware. Override for a real shutter."""
        self.state = state

    def on_register(self, message: d.Message) -> None:
        super().on_register(message)
        if isinstance(message, d.StohRegisterShutter):
            self.state = message.state
            if message.hardware_name:
                self.hardware_name = message.hardware_name

    def report(self, result: str = "") -> None:
        self.send(d.HtosReportShutterState(self.name, self.state, result))

    async def _set_and_report(self, state: str) -> None:
        try:
            await self.set_state(state)
        except Exception as exc:
            self.log.error("%s: shutter %s failed: %r", self.dhs.name, self.name, exc)
            self.report("error")
            return
        self.report()


class SimulatedShutter(Shutter):
    pass


class IonChamber(Device):
    kinds = ("ion_chamber",)

    async def read(self, time_s: float) -> float:
        """Count for `time_s` seconds and return the counts. Override for real hardware."""
        raise NotImplementedError(f"ion chamber {self.name} has no read()")


class SimulatedIonChamber(IonChamber):
    """Counts at `rate_hz` (default 100000) for the requested time."""

    async def read(self, time_s: float) -> float:
        await asyncio.sleep(max(0.0, min(time_s, 3600.0)))
        return float(round(float(self.settings.get("rate_hz", 1e5)) * time_s))


class Encoder(Device):
    kinds = ("encoder",)

    def __init__(self, dhs: Dhs, name: str, hardware_name: str = "", **settings: Any) -> None:
        super().__init__(dhs, name, hardware_name, **settings)
        self.position = float(settings.get("position", 0.0))

    async def get_position(self) -> float:
        return self.position

    async def set_position(self, position: float) -> None:
        self.position = position


class SimulatedEncoder(Encoder):
    pass


class StringDevice(Device):
    kinds = ("string",)

    def __init__(self, dhs: Dhs, name: str, hardware_name: str = "", **settings: Any) -> None:
        super().__init__(dhs, name, hardware_name, **settings)
        self.contents = str(settings.get("contents", ""))

    async def set_contents(self, contents: str) -> None:
        self.contents = contents


class SimulatedString(StringDevice):
    pass


class GenericDevice(Device):
    """An object or operation entry: remembered, nothing to drive."""

    kinds = ("object", "operation")


SIMULATED: dict[str, type[Device]] = {
    "real_motor": SimulatedMotor,
    "pseudo_motor": SimulatedMotor,
    "shutter": SimulatedShutter,
    "ion_chamber": SimulatedIonChamber,
    "encoder": SimulatedEncoder,
    "string": SimulatedString,
    "object": GenericDevice,
}

_REGISTER_KIND: dict[type[d.Message], str] = {
    d.StohRegisterRealMotor: "real_motor",
    d.StohRegisterPseudoMotor: "pseudo_motor",
    d.StohRegisterShutter: "shutter",
    d.StohRegisterIonChamber: "ion_chamber",
    d.StohRegisterEncoder: "encoder",
    d.StohRegisterString: "string",
    d.StohRegisterObject: "object",
}


# ------------------------------------------------------------------------------------ settings


class MotorSettings(BaseModel):
    """A simulated motor (or settings for a handler class): keys under `motors.<name>`."""

    model_config = ConfigDict(extra="forbid")
    speed_units_per_s: float = Field(10.0, gt=0)
    update_interval_s: float = Field(0.1, gt=0)
    owns_configuration: bool = False  # push these values with htos_configure_device
    position: float = 0.0
    upper_limit: float = 1000.0
    lower_limit: float = -1000.0
    upper_limit_on: bool = False
    lower_limit_on: bool = False


class ShutterSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    state: str = "closed"


class IonChamberSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rate_hz: float = Field(1e5, ge=0)


class EncoderSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    position: float = 0.0


class StringSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    contents: str = ""


# ------------------------------------------------------------------------------------ the engine


# The Dhs's counters (status: extra.dhs).
STATS = (
    "operations_started",
    "operation_updates",
    "operations_completed",
    "operations_aborted",  # by stoh_abort_all, or cancelled before completing
    "operation_errors",  # the handler raised
    "operations_dropped_on_disconnect",
    "duplicate_handle",  # stoh_start_operation with a handle that is still active: ignored
    "unknown_operation",  # no handler: completed with error
    "operation_without_handler",  # DCSS registered an operation no handler takes
    "stale",  # sends for a connection that is gone: not sent
    "abort_all",
    "registrations",  # devices DCSS registered
    "unknown_device",  # a device message for a device not registered (or of another kind)
    "unhandled_device",  # registered, but no handler and no simulated device for it
    "device_kind_mismatch",
    "device_errors",  # a device handler raised
    "move_while_moving",
    "malformed",
    "unexpected_handshake",
    "unhandled",  # messages a DHS has nothing to do for
)


class Dhs:
    """Dispatches DCSS messages to operations and devices; owns no socket.

    The receiver calls `connected(send_text)` after the handshake, `handle(message)` for every
    message (never blocks), and `disconnected()` when the connection ends.
    """

    def __init__(
        self,
        name: str,
        *,
        operations: dict[str, OperationHandler] | None = None,
        device_classes: dict[str, type[Device]] | None = None,
        device_settings: dict[str, dict[str, Any]] | None = None,
        simulate_devices: bool = True,
        handler_settings: Mapping[str, Any] | None = None,
        log: logging.Logger | None = None,
    ) -> None:
        self.name = name
        # what handlers read as op.settings; one read-only copy shared by every operation
        self.handler_settings: Mapping[str, Any] = freeze_settings(handler_settings or {})
        self.log = log or logging.getLogger(f"daqd.dhs.{name}")
        self.handlers: dict[str, OperationHandler] = dict(operations or {})
        self.device_classes: dict[str, type[Device]] = dict(device_classes or {})
        self.device_settings = device_settings or {}
        self.simulate_devices = simulate_devices
        self.devices: dict[str, Device] = {}
        self.registered_operations: dict[str, str] = {}
        self.operations: dict[str, Operation] = {}  # active, by handle
        # every counter there is, from 0 (a plain dict: += costs 46 ns, on a Counter 109)
        self.stats: dict[str, int] = dict.fromkeys(STATS, 0)
        self.connection_id = 0
        # cached: on Python 3.11 every get_running_loop() costs a getpid() system call
        self._loop: asyncio.AbstractEventLoop | None = None
        # the connection's send(text, now): queue one text for DCSS; `now` (a completion) has it
        # written before the event loop turns, else it may wait for the end of the turn
        self._send: Callable[[str, bool], None] | None = None
        self._dispatch: dict[type[d.Message], Callable[[Any], None]] = {
            d.StohStartOperation: self._start_operation,
            d.StohAbortAll: self._abort_all,
            d.StohStopOperation: self._stop_operation,
            d.StohConfigureRealMotor: self._configure_motor,
            d.StohConfigurePseudoMotor: self._configure_motor,
            d.StohStartMotorMove: self._start_motor_move,
            d.StohAbortMotorMove: self._abort_motor_move,
            d.StohSetMotorPosition: self._set_motor_position,
            d.StohCorrectMotorPosition: self._correct_motor_position,
            d.StohSetMotorDependency: self._set_motor_dependency,
            d.StohSetMotorChildren: self._set_motor_children,
            d.StohSetShutterState: self._set_shutter_state,
            d.StohReadIonChambers: self._read_ion_chambers,
            d.StohGetEncoder: self._get_encoder,
            d.StohSetEncoder: self._set_encoder,
            d.StohSetString: self._set_string,
            d.StohStartOscillation: self._start_oscillation,
            d.StohRegisterOperation: self._register_operation,
        }
        for cls in _REGISTER_KIND:
            self._dispatch[cls] = self._register_device

    # ---- connection life
    def connected(self, send: Callable[[str, bool], None]) -> None:
        """A new connection: `send(text, now)` queues one message text for it; `now` asks for it
        to be written before the event loop turns (an operation's completion)."""
        self.connection_id += 1
        self._loop = asyncio.get_running_loop()
        self._send = send

    def disconnected(self) -> None:
        """Forget the connection: cancel every operation and device task, send nothing more."""
        self.connection_id += 1
        self._send = None
        dropped = list(self.operations.values())
        self.operations.clear()
        for op in dropped:
            op.cancel()
        if dropped:
            self.stats["operations_dropped_on_disconnect"] += len(dropped)
        for dev in self.devices.values():
            dev.abort()
            dev.registered = False

    def send_text(self, text: str) -> None:
        if self._send is None:
            self.stats["stale"] += 1
            return
        self._send(text, False)

    def send(self, message: d.Message) -> None:
        self.send_text(message.to_text())

    # ---- dispatch
    def handle(self, message: d.Message) -> None:
        """Act on one message from DCSS. Never blocks; slow work runs in tasks."""
        fn = self._dispatch.get(type(message))
        if fn is not None:
            fn(message)
        elif isinstance(message, d.Malformed):
            self.stats["malformed"] += 1
            self.log.warning("%s: malformed %s: %s", self.name, message.verb, message.reason)
        elif isinstance(message, d.StocSendClientType):
            self.stats["unexpected_handshake"] += 1
        else:
            self.stats["unhandled"] += 1
            self.log.info("%s: %s not handled, ignored", self.name, message.verb)

    # ---- operations
    def _start_operation(self, m: d.StohStartOperation) -> None:
        self.stats["operations_started"] += 1
        if m.handle in self.operations:
            self.stats["duplicate_handle"] += 1
            self.log.warning(
                "%s: operation handle %s is already active; ignored", self.name, m.handle
            )
            return
        op = Operation(self, m, self.connection_id)
        handler = self.handlers.get(m.name)
        if handler is None:
            self.stats["unknown_operation"] += 1
            self.log.warning("%s: no handler for operation %s", self.name, m.name)
            op.complete("error", f"no handler for operation {m.name} in DHS {self.name}")
            return
        self.operations[m.handle] = op
        try:
            result = handler(op)  # an async def gives its coroutine; a plain def has run
        except Exception as exc:
            self._operation_failed(op, exc)
            return
        if result is not None and inspect.isawaitable(result):
            # Its first step runs now: a handler that answers at once is answered in this turn.
            # Named after the operation: cheaper than asyncio's numbered default, more telling.
            loop = self._loop or asyncio.get_running_loop()
            op.task = start_eagerly(loop, self._run_operation(op, result), name=m.name)
        elif op.status is None:  # (most handlers complete their operation themselves)
            self._operation_returned(op, result)

    def _operation_task_done(self, op: Operation) -> None:
        # Also covers a task cancelled before its first step, where no except clause runs.
        if op.status is None:
            self.stats["operations_aborted"] += 1
            op.complete("aborted")

    async def _run_operation(self, op: Operation, running: Awaitable[Any]) -> None:
        try:
            result = await running
        except asyncio.CancelledError:
            if op.status is None:
                self.stats["operations_aborted"] += 1
                op.complete("aborted")
            raise
        except Exception as exc:
            self._operation_failed(op, exc)
            return
        self._operation_returned(op, result)

    def _operation_failed(self, op: Operation, exc: Exception) -> None:
        self.stats["operation_errors"] += 1
        self.log.error("%s: operation %r failed: %r", self.name, op, exc)
        if op.status is None:
            op.complete("error", f"{type(exc).__name__}: {exc}")

    def _operation_returned(self, op: Operation, result: Any) -> None:
        """A handler returned without completing: complete normal with what it returned."""
        if op.status is None:
            if result is None:
                op.complete("normal")
            elif isinstance(result, (tuple, list)):
                op.complete("normal", *result)
            else:
                op.complete("normal", result)

    def _abort_all(self, m: d.StohAbortAll) -> None:
        self.stats["abort_all"] += 1
        for op in list(self.operations.values()):
            op.cancel()
        for dev in self.devices.values():
            dev.abort()

    def _stop_operation(self, m: d.StohStopOperation) -> None:
        for op in self.operations.values():
            if op.name == m.name:
                op.stop_requested.set()

    def _register_operation(self, m: d.StohRegisterOperation) -> None:
        self.registered_operations[m.name] = m.hardware_name
        if m.name not in self.handlers:
            self.stats["operation_without_handler"] += 1
            self.log.warning("%s: DCSS registered operation %s, no handler here", self.name, m.name)

    # ---- devices
    def _register_device(self, m: d.Message) -> None:
        kind = _REGISTER_KIND[type(m)]
        name = str(getattr(m, "name", ""))
        dev = self.devices.get(name)
        if dev is None:
            cls = self.device_classes.get(name)
            if cls is None and (self.simulate_devices or name in self.device_settings):
                cls = SIMULATED.get(kind)
            if cls is None:
                self.stats["unhandled_device"] += 1
                self.log.warning(
                    "%s: DCSS registered %s %s, no handler here", self.name, kind, name
                )
                return
            if cls.kinds and kind not in cls.kinds:
                self.stats["device_kind_mismatch"] += 1
                self.log.error("%s: %s is a %s, handler %s is not", self.name, name, kind, cls)
                return
            hw = str(getattr(m, "hardware_name", "") or getattr(m, "counter", ""))
            dev = cls(self, name, hw, **self.device_settings.get(name, {}))
            self.devices[name] = dev
        dev.on_register(m)
        self.stats["registrations"] += 1

    def _device(self, name: str, kind: type[_DevT]) -> _DevT | None:
        dev = self.devices.get(name)
        if isinstance(dev, kind):
            return dev
        self.stats["unknown_device"] += 1
        self.log.warning("%s: no %s named %s here", self.name, kind.__name__, name)
        return None

    def _configure_motor(self, m: d.StohConfigureRealMotor | d.StohConfigurePseudoMotor) -> None:
        motor = self._device(m.name, Motor)
        if motor is not None:
            motor.configure(m)

    def _start_motor_move(self, m: d.StohStartMotorMove) -> None:
        motor = self._device(m.motor, Motor)
        if motor is not None:
            motor.start_move(m.destination)

    def _abort_motor_move(self, m: d.StohAbortMotorMove) -> None:
        motor = self._device(m.motor, Motor)
        if motor is not None:
            motor.abort()

    def _set_motor_position(self, m: d.StohSetMotorPosition) -> None:
        motor = self._device(m.motor, Motor)
        if motor is not None:

            async def run(motor: Motor = motor) -> None:
                await motor.set_position(m.position)
                motor.send(d.HtosMotorMoveCompleted(motor.name, motor.position, "normal"))

            motor.spawn(run())

    def _correct_motor_position(self, m: d.StohCorrectMotorPosition) -> None:
        motor = self._device(m.motor, Motor)
        if motor is not None:
            motor.position += m.correction

    def _set_motor_dependency(self, m: d.StohSetMotorDependency) -> None:
        motor = self._device(m.motor, Motor)
        if motor is not None:
            motor.dependencies = m.dependencies

    def _set_motor_children(self, m: d.StohSetMotorChildren) -> None:
        motor = self._device(m.motor, Motor)
        if motor is not None:
            motor.children = m.children

    def _start_oscillation(self, m: d.StohStartOscillation) -> None:
        motor = self._device(m.motor, Motor)
        if motor is None:
            return
        shutter = self.devices.get(m.shutter)
        motor.move_task = motor.spawn(
            motor.oscillate(
                shutter if isinstance(shutter, Shutter) else None, m.delta_motor, m.delta_time
            )
        )

    def _set_shutter_state(self, m: d.StohSetShutterState) -> None:
        shutter = self._device(m.shutter, Shutter)
        if shutter is not None:
            shutter.spawn(shutter._set_and_report(m.state))

    def _read_ion_chambers(self, m: d.StohReadIonChambers) -> None:
        chambers = [self._device(ch, IonChamber) for ch in m.channels]
        found = [c for c in chambers if c is not None]
        if not found:
            self.send(d.HtosReportIonChambers(-1.0, tuple((ch, 0.0) for ch in m.channels)))
            return

        async def run() -> None:
            try:
                counts = await asyncio.gather(*(c.read(m.time_s) for c in found))
            except asyncio.CancelledError:
                self.send(d.HtosReportIonChambers(-1.0, tuple((c.name, 0.0) for c in found)))
                raise
            except Exception as exc:
                self.log.error("%s: ion chamber read failed: %r", self.name, exc)
                self.send(d.HtosReportIonChambers(-1.0, tuple((c.name, 0.0) for c in found)))
                return
            self.send(
                d.HtosReportIonChambers(
                    m.time_s, tuple((c.name, n) for c, n in zip(found, counts, strict=True))
                )
            )

        found[0].spawn(run())

    def _get_encoder(self, m: d.StohGetEncoder) -> None:
        enc = self._device(m.encoder, Encoder)
        if enc is not None:

            async def run(enc: Encoder = enc) -> None:
                pos = await enc.get_position()
                enc.send(d.HtosGetEncoderCompleted(enc.name, pos, "normal"))

            enc.spawn(run())

    def _set_encoder(self, m: d.StohSetEncoder) -> None:
        enc = self._device(m.encoder, Encoder)
        if enc is not None:

            async def run(enc: Encoder = enc) -> None:
                await enc.set_position(m.position)
                enc.send(d.HtosSetEncoderCompleted(enc.name, enc.position, "normal"))

            enc.spawn(run())

    def _set_string(self, m: d.StohSetString) -> None:
        string = self._device(m.name, StringDevice)
        if string is not None:

            async def run(s: StringDevice = string) -> None:
                await s.set_contents(m.contents)
                s.send(d.HtosSetStringCompleted(s.name, "normal", s.contents))

            string.spawn(run())

    def snapshot(self) -> dict[str, Any]:
        """For status: counters, active operations and devices."""
        return {
            **self.stats,
            "active_operations": len(self.operations),
            "devices": len(self.devices),
        }
