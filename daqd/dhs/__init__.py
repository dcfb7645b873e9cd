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

The package, by job: `handlers` (the handler API: `operation`, `device`, `Operation`, loading
handler modules), `devices` (device classes, the simulated devices and their settings), `engine`
(`Dhs`, which dispatches DCSS's messages, and its counters `STATS`). Import from `daqd.dhs`.
"""

from daqd.dhs.devices import (
    SIMULATED,
    Device,
    Encoder,
    EncoderSettings,
    GenericDevice,
    IonChamber,
    IonChamberSettings,
    Motor,
    MotorError,
    MotorSettings,
    Shutter,
    ShutterSettings,
    SimulatedEncoder,
    SimulatedIonChamber,
    SimulatedMotor,
    SimulatedShutter,
    SimulatedString,
    StringDevice,
    StringSettings,
)
from daqd.dhs.engine import STATS, Dhs
from daqd.dhs.handlers import (
    Operation,
    OperationError,
    OperationHandler,
    collect_handlers,
    device,
    freeze_settings,
    load_handler_module,
    operation,
)

__all__ = [
    "SIMULATED",
    "STATS",
    "Device",
    "Dhs",
    "Encoder",
    "EncoderSettings",
    "GenericDevice",
    "IonChamber",
    "IonChamberSettings",
    "Motor",
    "MotorError",
    "MotorSettings",
    "Operation",
    "OperationError",
    "OperationHandler",
    "Shutter",
    "ShutterSettings",
    "SimulatedEncoder",
    "SimulatedIonChamber",
    "SimulatedMotor",
    "SimulatedShutter",
    "SimulatedString",
    "StringDevice",
    "StringSettings",
    "collect_handlers",
    "device",
    "freeze_settings",
    "load_handler_module",
    "operation",
]
