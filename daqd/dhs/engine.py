"""The DHS engine: `Dhs` dispatches DCSS's messages to operation handlers and devices;
`STATS` names its counters.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

from daqd.dhs.devices import (
    SIMULATED,
    Device,
    Encoder,
    IonChamber,
    Motor,
    Shutter,
    StringDevice,
)
from daqd.dhs.handlers import Operation, OperationHandler, freeze_settings
from daqd.eager import start_eagerly
from daqd.protocols import dcss as d

_DevT = TypeVar("_DevT", bound="Device")

# which stoh_register_* message registers which kind of device
_REGISTER_KIND: dict[type[d.Message], str] = {
    d.StohRegisterRealMotor: "real_motor",
    d.StohRegisterPseudoMotor: "pseudo_motor",
    d.StohRegisterShutter: "shutter",
    d.StohRegisterIonChamber: "ion_chamber",
    d.StohRegisterEncoder: "encoder",
    d.StohRegisterString: "string",
    d.StohRegisterObject: "object",
}


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
