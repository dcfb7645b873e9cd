"""Example DHS handlers: name this file (or its module) in a dcss receiver's `handlers` list.

    [[receiver]]
    type = "dcss"
    handlers = ["examples/dhs_handlers.py"]

Operations are functions taking an `Operation`: `async def` when they wait for something, a plain
`def` when they answer at once (it runs with no task); devices are classes. See daqd.dhs.
"""

from __future__ import annotations

import asyncio

from daqd.dhs import Motor, MotorError, Operation, device, operation


@operation("readTemperature")
def read_temperature(op: Operation) -> float:
    """readTemperature [sensor]: one value back (a returned value completes with `normal`); it
    waits for nothing, so a plain def."""
    sensor = op.args[0] if op.args else "cryojet"
    readings = {"cryojet": 100.2, "room": 295.4}
    if sensor not in readings:
        # a raised exception completes the operation as `error {ValueError: ...}`
        raise ValueError(f"no sensor {sensor}")
    return readings[sensor]


@operation("collectFrames")
async def collect_frames(op: Operation) -> None:
    """collectFrames COUNT EXPOSURE_S [PREFIX]: an update per frame, `normal COUNT` at the end.

    `stoh_stop_operation collectFrames` stops after the current frame (status `stopped`);
    `stoh_abort_all` cancels at once (status `aborted`, sent by daqd).
    """
    count, exposure_s = int(op.args[0]), float(op.args[1])
    prefix = op.args[2] if len(op.args) > 2 else "frame"
    for i in range(1, count + 1):
        if op.stop_requested.is_set():
            op.complete("stopped", i - 1)
            return
        await asyncio.sleep(exposure_s)
        op.update("frame", i, f"{prefix}_{i:04d}.img")
    op.complete("normal", count)


@device("detector_z")
class DetectorDistance(Motor):
    """A motor whose truth lives in this DHS: it pushes its configuration on registration."""

    owns_configuration = True

    async def move(self, destination: float) -> float:
        if not 100.0 <= destination <= 1000.0:
            raise MotorError("cw_hw_limit" if destination > 1000.0 else "ccw_hw_limit")
        step = 50.0 if destination > self.position else -50.0
        while abs(destination - self.position) > abs(step):
            await asyncio.sleep(0.01)
            self.report_position(self.position + step)
        return destination
