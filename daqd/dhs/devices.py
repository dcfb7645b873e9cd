"""Device handlers DCSS's devices are driven by (`Motor`, `Shutter`, `IonChamber`, `Encoder`,
`StringDevice`), the simulated devices a DHS runs for devices no handler claims, and the settings
those take (`motors.<name>`, ...).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from daqd.errors import DaqdError
from daqd.protocols import dcss as d

if TYPE_CHECKING:
    from daqd.dhs.engine import Dhs


class MotorError(DaqdError):
    """A move that ended badly; `status` is what `htos_motor_move_completed` reports."""

    def __init__(self, status: str, message: str = "") -> None:
        super().__init__(message or status)
        self.status = status


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
