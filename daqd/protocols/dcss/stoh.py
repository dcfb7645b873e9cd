"""DCSS → DHS messages (`stoc_`/`stoh_`, docs/protocols/dcss.md section 5): a frozen dataclass per
command, registered for parsing by `@message`."""

from __future__ import annotations

from daqd.protocols.dcss.base import Message, message
from daqd.protocols.dcss.text import next_token


@message("stoc_send_client_type")
class StocSendClientType(Message):
    pass


class _Register(Message):
    device_field = "name"


@message("stoh_register_real_motor")
class StohRegisterRealMotor(_Register):
    name: str
    hardware_name: str = ""


@message("stoh_register_pseudo_motor")
class StohRegisterPseudoMotor(_Register):
    name: str
    hardware_name: str = ""


@message("stoh_register_ion_chamber")
class StohRegisterIonChamber(_Register):
    name: str
    counter: str
    channel: str
    timer: str
    timer_type: str


@message("stoh_register_shutter")
class StohRegisterShutter(_Register):
    name: str
    state: str
    hardware_name: str = ""


@message("stoh_register_operation")
class StohRegisterOperation(_Register):
    name: str
    hardware_name: str = ""


@message("stoh_register_encoder")
class StohRegisterEncoder(_Register):
    name: str
    hardware_name: str = ""


@message("stoh_register_string")
class StohRegisterString(_Register):
    name: str
    hardware_name: str = ""


@message("stoh_register_object")
class StohRegisterObject(_Register):
    name: str
    hardware_name: str = ""


@message("stoh_set_motor_dependency")
class StohSetMotorDependency(Message):
    device_field = "motor"
    motor: str
    dependencies: tuple[str, ...] = ()


@message("stoh_set_motor_children")
class StohSetMotorChildren(Message):
    device_field = "motor"
    motor: str
    children: tuple[str, ...] = ()


@message("stoh_configure_real_motor")
class StohConfigureRealMotor(Message):
    """The 16-field form of the 2012 DCSS: host and hardware name come before the values."""

    device_field = "name"
    name: str
    host: str
    hardware_name: str
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
    status: str = ""


@message("stoh_configure_pseudo_motor")
class StohConfigurePseudoMotor(Message):
    device_field = "name"
    name: str
    host: str
    hardware_name: str
    position: float
    upper_limit: float
    lower_limit: float
    lower_limit_on: bool
    upper_limit_on: bool
    locked: bool
    status: str = ""


class _ConfigureOther(Message):
    device_field = "name"
    rest_field = "args"


@message("stoh_configure_shutter")
class StohConfigureShutter(_ConfigureOther):
    name: str
    host: str
    args: str = ""


@message("stoh_configure_ion_chamber")
class StohConfigureIonChamber(_ConfigureOther):
    name: str
    host: str
    args: str = ""


@message("stoh_configure_encoder")
class StohConfigureEncoder(_ConfigureOther):
    name: str
    host: str
    args: str = ""


@message("stoh_configure_string")
class StohConfigureString(_ConfigureOther):
    name: str
    host: str
    args: str = ""


@message("stoh_configure_operation")
class StohConfigureOperation(_ConfigureOther):
    name: str
    host: str
    args: str = ""


@message("stoh_configure_object")
class StohConfigureObject(_ConfigureOther):
    name: str
    host: str
    args: str = ""


@message("stoh_start_motor_move")
class StohStartMotorMove(Message):
    device_field = "motor"
    motor: str
    destination: float


@message("stoh_set_motor_position")
class StohSetMotorPosition(Message):
    device_field = "motor"
    motor: str
    position: float


@message("stoh_correct_motor_position")
class StohCorrectMotorPosition(Message):
    device_field = "motor"
    motor: str
    correction: float


@message("stoh_abort_motor_move")
class StohAbortMotorMove(Message):
    device_field = "motor"
    rest_field = "args"
    motor: str
    args: str = ""


@message("stoh_abort_all")
class StohAbortAll(Message):
    rest_field = "args"
    args: str = ""  # "hard" or "soft", as forwarded

    @property
    def mode(self) -> str:
        return next_token(self.args)[0] or ""


@message("stoh_start_oscillation")
class StohStartOscillation(Message):
    device_field = "motor"
    rest_field = "args"
    motor: str
    shutter: str
    delta_motor: float
    delta_time: float
    args: str = ""


class _Vector(Message):
    rest_field = "args"


@message("stoh_start_vector_move")
class StohStartVectorMove(_Vector):
    args: str = ""


@message("stoh_stop_vector_move")
class StohStopVectorMove(_Vector):
    args: str = ""


@message("stoh_change_vector_speed")
class StohChangeVectorSpeed(_Vector):
    args: str = ""


@message("stoh_read_ion_chambers")
class StohReadIonChambers(Message):
    time_s: float
    repeat: int
    channels: tuple[str, ...] = ()


@message("stoh_set_shutter_state")
class StohSetShutterState(Message):
    device_field = "shutter"
    shutter: str
    state: str


@message("stoh_start_operation")
class StohStartOperation(Message):
    device_field = "name"
    rest_field = "args"
    name: str
    handle: str
    args: str = ""


@message("stoh_stop_operation")
class StohStopOperation(Message):
    device_field = "name"
    rest_field = "args"
    name: str
    args: str = ""


@message("stoh_get_encoder")
class StohGetEncoder(Message):
    device_field = "encoder"
    encoder: str


@message("stoh_set_encoder")
class StohSetEncoder(Message):
    device_field = "encoder"
    encoder: str
    position: float


@message("stoh_set_string")
class StohSetString(Message):
    device_field = "name"
    rest_field = "contents"
    name: str
    contents: str = ""
