"""DCS messages: the `Message` base, the `@message` registry with its fast parsing patterns,
a frozen dataclass per `stoc_`/`stoh_`/`htos_` command, and `parse_message`.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar, dataclass_transform

from daqd.errors import ProtocolError
from daqd.protocols.dcss.text import WHITESPACE, format_number, next_token, split_tokens

_LEADING_WS = re.compile(r"[ \t\n\v\f\r]*")
_PLAIN_TOKEN = re.compile(r"[^ \t\n\v\f\r\0]+")


def _rest_from(text: str, pos: int) -> str:
    return text[_LEADING_WS.match(text, pos).end() :].rstrip(WHITESPACE)  # type: ignore[union-attr]


# --------------------------------------------------------------------------- messages


@dataclass(frozen=True)
class Message:
    """One DCS message. `binary` is the v2 binary part; `raw` the received text bytes."""

    command: ClassVar[str] = ""
    # Name of the field holding the device/operation name (for record tags), if any.
    device_field: ClassVar[str | None] = None
    # Name of the last field when it takes the untouched rest of the line.
    rest_field: ClassVar[str | None] = None

    binary: bytes = field(default=b"", kw_only=True, repr=False)
    raw: bytes = field(default=b"", kw_only=True, repr=False, compare=False)

    @property
    def verb(self) -> str:
        """The command word as sent (for unknown and malformed messages too)."""
        return self.command

    @property
    def device(self) -> str | None:
        return getattr(self, self.device_field) if self.device_field else None

    def args_text(self) -> str:
        """The text after the command word."""
        parts: list[str] = []
        for f in _wire_fields(type(self)):
            value = getattr(self, f.name)
            if f.name == self.rest_field:
                if value:
                    parts.append(value)
            elif isinstance(value, tuple):
                parts.extend(_check_token(type(self), f.name, format_number(v)) for v in value)
            elif value == "" and f.default == "":
                continue  # an optional trailing token left out
            else:
                parts.append(_check_token(type(self), f.name, format_number(value)))
        return " ".join(parts)

    def to_text(self) -> str:
        args = self.args_text()
        return f"{self.verb} {args}" if args else self.verb

    @classmethod
    def from_args(cls, tail: str, **extra: Any) -> Message:
        """Parse the text after the command word. Raises ProtocolError naming the field."""
        fast = _FAST.get(cls)
        if fast is not None:
            m = fast[0].fullmatch(tail)
            if m is not None:
                return _from_match(cls, fast[1], m, extra.get("binary", b""), extra.get("raw", b""))
        # the general path: optional fields left out, extra tokens, precise errors
        values: dict[str, Any] = {}
        pos = 0
        for f in _wire_fields(cls):
            if f.name == cls.rest_field:
                values[f.name] = _rest_from(tail, pos)
                pos = len(tail)
                continue
            kind = _FIELD_KINDS[cls][f.name]
            if kind is tuple:
                values[f.name] = tuple(split_tokens(tail[pos:]))
                pos = len(tail)
                continue
            tok, pos = next_token(tail, pos)
            if tok is None:
                if f.default is not dataclasses.MISSING:
                    continue
                raise ProtocolError(f"{cls.command}: missing field {f.name!r}")
            values[f.name] = _convert(cls, f.name, kind, tok)
        return cls(**values, **extra)


def _check_token(cls: type, name: str, token: str) -> str:
    if not _PLAIN_TOKEN.fullmatch(token):
        raise ProtocolError(f"{cls.__name__}.{name}: {token!r} is not one whitespace-free token")
    return token


def _convert(cls: type[Message], name: str, kind: type, token: str) -> Any:
    if kind is str:
        return token
    try:
        if kind is float:
            return float(token)
        number = int(token)
    except ValueError:
        raise ProtocolError(
            f"{cls.command}: field {name!r} is {token!r}, expected {kind.__name__}"
        ) from None
    return number != 0 if kind is bool else number


_WIRE_FIELDS: dict[type, tuple[dataclasses.Field[Any], ...]] = {}
_FIELD_KINDS: dict[type, dict[str, type]] = {}
_KINDS = {"str": str, "float": float, "int": int, "bool": bool}


def _wire_fields(cls: type) -> tuple[dataclasses.Field[Any], ...]:
    return _WIRE_FIELDS[cls]


MESSAGES: dict[str, type[Message]] = {}
_FAST: dict[type, tuple[re.Pattern[str], tuple[Callable[[Any], Any], ...] | None]] = {}
# every message class's fill(fields, values): its instance dict's fields, in order, from values
_FILL: dict[type, Callable[[dict[str, Any], Sequence[Any]], None]] = {}
# registered commands whose class parses with Message.from_args: class, pattern, converters
_FAST_COMMANDS: dict[
    str, tuple[type[Message], re.Pattern[str], tuple[Callable[[Any], Any], ...] | None]
] = {}
_new_object = object.__new__


def _from_match(
    cls: type[_M],
    converters: tuple[Callable[[Any], Any], ...] | None,
    m: re.Match[str],
    binary: bytes,
    raw: bytes,
) -> _M:
    """A message from its fast pattern's match. A frozen dataclass's __init__ sets each field
    through object.__setattr__; filling the instance dict at once is the same object, faster."""
    # One group and one converter per field, by construction (_fast_pattern). No strict= for
    # zip: in 3.11 any keyword argument to zip costs ~180 ns, a third of this function.
    if converters is None:  # only words and the rest of the line
        values: Sequence[Any] = m.groups("")
    else:
        values = [c(g) for c, g in zip(converters, m.groups())]  # noqa: B905
    obj = _new_object(cls)
    fields = obj.__dict__
    _FILL[cls](fields, values)
    fields["binary"] = binary
    fields["raw"] = raw
    return obj


def _fill_function(names: tuple[str, ...]) -> Callable[[dict[str, Any], Sequence[Any]], None]:
    """`fill(fields, values)` sets fields[names[i]] = values[i] in one unpacking assignment.
    Generated, the way dataclasses generates __init__: half the time of update(zip(...))."""
    if not names:
        return lambda fields, values: None
    targets = "".join(f"f[{name!r}], " for name in names)  # field names are identifiers
    namespace: dict[str, Any] = {}
    exec(f"def fill(f, values):\n    {targets}= values\n", namespace)
    fill: Callable[[dict[str, Any], Sequence[Any]], None] = namespace["fill"]
    return fill


_WS = "[ \t\n\v\f\r]"
_NOT_WS = "[^ \t\n\v\f\r]"


def _as_text(group: str | None) -> str:
    return group or ""


def _as_tokens(group: str | None) -> tuple[str, ...]:
    return tuple(split_tokens(group or ""))


def _fast_pattern(
    cls: type[Message], fields: tuple[dataclasses.Field[Any], ...], kinds: dict[str, type]
) -> tuple[re.Pattern[str], tuple[Callable[[Any], Any], ...] | None]:
    """One regex for the usual shape of a message (every token present, then the rest), and
    a converter per field (None when every field is text)."""
    parts = []
    converters: list[Callable[[Any], Any]] = []
    for i, f in enumerate(fields):
        kind = kinds[f.name]
        if f.name == cls.rest_field or kind is tuple:
            # the rest up to its last non-space: greedy, so a long rest is not matched one
            # character at a time (a lazy .*? before the trailing spaces was 5x slower)
            rest = f"((?:.*{_NOT_WS})?)"
            parts.append(f"(?:{_WS}+{rest})?" if i else rest)
            converters.append(_as_tokens if kind is tuple else _as_text)
        else:
            parts.append(f"{_WS}+({_NOT_WS}+)" if i else f"({_NOT_WS}+)")
            if kind is str:
                converters.append(_as_text)
            else:
                converters.append(functools.partial(_convert, cls, f.name, kind))
    pattern = re.compile(f"{_WS}*{''.join(parts)}{_WS}*", re.DOTALL)
    all_text = all(c is _as_text for c in converters)
    return pattern, None if all_text else tuple(converters)


_M = TypeVar("_M", bound=Message)


@dataclass_transform(frozen_default=True, field_specifiers=(field,))
def message(command: str, *, register: bool = True) -> Callable[[type[_M]], type[_M]]:
    """Class decorator: a frozen dataclass message for `command`, registered for parsing."""

    def wrap(cls: type[_M]) -> type[_M]:
        cls.command = command
        dc = dataclass(frozen=True)(cls)
        fields = tuple(f for f in dataclasses.fields(dc) if f.name not in ("binary", "raw"))
        kinds: dict[str, type] = {}
        for f in fields:
            ann = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
            kinds[f.name] = tuple if ann.startswith("tuple") else _KINDS[ann]
        _WIRE_FIELDS[dc] = fields
        _FIELD_KINDS[dc] = kinds
        _FAST[dc] = _fast_pattern(dc, fields, kinds)
        _FILL[dc] = _fill_function(tuple(f.name for f in fields))
        if register:
            MESSAGES[command] = dc
            if all("from_args" not in vars(k) for k in dc.__mro__ if k is not Message):
                _FAST_COMMANDS[command] = (dc, *_FAST[dc])
        return dc

    return wrap


# ---- DCSS → DHS (stoc_/stoh_), section 5


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


# ---- DHS → DCSS (htos_), section 6


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


@dataclass(frozen=True)
class Unknown(Message):
    """A command this module has no class for: kept whole, to be counted and published."""

    command_text: str
    args: str = ""

    @property
    def verb(self) -> str:
        return self.command_text

    def args_text(self) -> str:
        return self.args


@dataclass(frozen=True)
class Malformed(Message):
    """A known command whose arguments did not parse; `reason` says which field and why."""

    command_text: str
    text: str
    reason: str

    @property
    def verb(self) -> str:
        return self.command_text

    def args_text(self) -> str:
        return self.text.partition(" ")[2]

    def to_text(self) -> str:
        return self.text


def _parse_configure_device(tail: str, **extra: Any) -> Message:
    count = len(split_tokens(tail))
    if count >= 13:
        return HtosConfigureRealMotor.from_args(tail, **extra)
    if count >= 7:
        return HtosConfigurePseudoMotor.from_args(tail, **extra)
    raise ProtocolError(
        f"htos_configure_device: {count} tokens, expected 13 (real motor) or 7 (pseudo motor)"
    )


def parse_message(text: str, binary: bytes = b"", raw: bytes = b"") -> Message:
    """Parse one message text. Unknown commands give `Unknown`; bad arguments raise ProtocolError."""
    # Fast path: a known command word (never whitespace) followed by a space or the end.
    cut = text.find(" ")
    fast = _FAST_COMMANDS.get(text if cut < 0 else text[:cut])
    if fast is not None:
        m = fast[1].fullmatch(text, len(text) if cut < 0 else cut)
        if m is not None:
            return _from_match(fast[0], fast[2], m, binary, raw)
    command, pos = next_token(text)
    if command is None:
        raise ProtocolError("empty message")
    tail = text[pos:]
    if command == "htos_configure_device":
        return _parse_configure_device(tail, binary=binary, raw=raw)
    cls = MESSAGES.get(command)
    if cls is None:
        return Unknown(command, _rest_from(tail, 0), binary=binary, raw=raw)
    return cls.from_args(tail, binary=binary, raw=raw)
