"""DHS → DCSS messages (`htos_`, docs/protocols/dcss.md section 6): a frozen dataclass per command,
registered for parsing by `@message` (but for the two forms of `htos_configure_device`, which
`parse_message` tells apart by their length)."""

from __future__ import annotations

from typing import Any

from daqd.errors import ProtocolError
from daqd.protocols.dcss.base import Message, _check_token, _convert, message
from daqd.protocols.dcss.text import format_number, split_tokens


@message("htos_client_is_hardware")
class HtosClientIsHardware(Message):
    dhs_name: str


@message("htos_motor_move_started")
class HtosMotorMoveStarted(Message):
    device_field = "motor"
    motor: str
    position: float


@message("htos_update_motor_position")
class HtosUpdateMotorPosition(Message):
    device_field = "motor"
    motor: str
    position: float
    status: str = "normal"


@message("htos_motor_move_completed")
class HtosMotorMoveCompleted(Message):
    device_field = "motor"
    motor: str
    position: float
    status: str = "normal"


@message("htos_motor_correct_started")
class HtosMotorCorrectStarted(Message):
    rest_field = "args"
    args: str = ""


@message("htos_configure_device", register=False)
class HtosConfigureRealMotor(Message):
    """`htos_configure_device` for a real motor: 12 values after the name."""

    device_field = "motor"
    motor: str
    position: float
    upper_limit: float
    lower_limit: float
    scale_factor: float
    speed: float
    acceleration: float
    backlash: float
    lower_limit_on: bool
    upper_limit_on: bool
    locked: bool
    backlash_on: bool
    reverse_on: bool


@message("htos_configure_device", register=False)
class HtosConfigurePseudoMotor(Message):
    """`htos_configure_device` for a pseudo motor: 6 values after the name."""

    device_field = "motor"
    motor: str
    position: float
    upper_limit: float
    lower_limit: float
    lower_limit_on: bool
    upper_limit_on: bool
    locked: bool


@message("htos_send_configuration")
class HtosSendConfiguration(Message):
    device_field = "device_name"
    device_name: str


@message("htos_report_shutter_state")
class HtosReportShutterState(Message):
    device_field = "shutter"
    shutter: str
    state: str
    result: str = ""


@message("htos_report_ion_chambers")
class HtosReportIonChambers(Message):
    """`time ch1 counts1 [ch2 counts2 …]`; a time ≤ 0 marks an error report."""

    time_s: float
    readings: tuple[tuple[str, float], ...] = ()

    def args_text(self) -> str:
        parts = [format_number(self.time_s)]
        for channel, counts in self.readings:
            parts.append(_check_token(type(self), "readings", channel))
            parts.append(format_number(counts))
        return " ".join(parts)

    @classmethod
    def from_args(cls, tail: str, **extra: Any) -> Message:
        tokens = split_tokens(tail)
        if not tokens:
            raise ProtocolError(f"{cls.command}: missing field 'time_s'")
        if len(tokens) % 2 == 0:
            raise ProtocolError(f"{cls.command}: channel {tokens[-1]!r} has no count")
        time_s = _convert(cls, "time_s", float, tokens[0])
        readings = tuple(
            (tokens[i], _convert(cls, "readings", float, tokens[i + 1]))
            for i in range(1, len(tokens), 2)
        )
        return cls(time_s=time_s, readings=readings, **extra)


class _Operation(Message):
    device_field = "name"
    rest_field = "args"


@message("htos_operation_update")
class HtosOperationUpdate(_Operation):
    name: str
    handle: str
    args: str = ""


@message("htos_operation_completed")
class HtosOperationCompleted(_Operation):
    name: str
    handle: str
    status: str
    args: str = ""


@message("htos_start_operation")
class HtosStartOperation(_Operation):
    name: str
    handle: str
    args: str = ""


@message("htos_get_encoder_completed")
class HtosGetEncoderCompleted(Message):
    device_field = "encoder"
    encoder: str
    position: float
    status: str = "normal"


@message("htos_set_encoder_completed")
class HtosSetEncoderCompleted(Message):
    device_field = "encoder"
    encoder: str
    position: float
    status: str = "normal"


@message("htos_set_string_completed")
class HtosSetStringCompleted(Message):
    device_field = "name"
    rest_field = "contents"
    name: str
    status: str
    contents: str = ""


class _FreeText(Message):
    rest_field = "text"


@message("htos_limit_hit")
class HtosLimitHit(_FreeText):
    text: str = ""


@message("htos_simulating_device")
class HtosSimulatingDevice(_FreeText):
    text: str = ""


@message("htos_note")
class HtosNote(_FreeText):
    text: str = ""


@message("htos_log")
class HtosLog(Message):
    rest_field = "text"
    level: str
    text: str = ""
