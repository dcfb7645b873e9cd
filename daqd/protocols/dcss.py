"""DCS protocol v1/v2 framing, tokenising and typed messages for a DCSS hardware server (sans-IO).

Wire facts are in shared/protocols/dcss.md. In short: the first frame each way is the v1 handshake
(200 bytes, NUL padded); after it every frame uses the connection's protocol level, 1 (200-byte
frames) or 2 (a 26-byte header of two decimals, text with its NUL counted, then a binary part).
Bytes never raise: text that is not UTF-8 is decoded with replacement and counted in `bad_bytes`.
Only a broken frame (a v2 header that is not two numbers, or a length over the limit) raises
`ProtocolError`; a frame whose text cannot be parsed as its command becomes a `Malformed` message.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar, dataclass_transform

from daqd.errors import ProtocolError

V1_FRAME_BYTES = 200
V1_MAX_TEXT_BYTES = V1_FRAME_BYTES - 1
V2_HEADER_BYTES = 26
DEFAULT_MAX_TEXT_BYTES = 1 << 20
DEFAULT_MAX_BINARY_BYTES = 64 << 20

# Tcl's list separators; the same set separates tokens (DCSS's sscanf also skips exactly these).
WHITESPACE = " \t\n\v\f\r"
_TOKEN = re.compile(r"[^ \t\n\v\f\r]+")
_LEADING_WS = re.compile(r"[ \t\n\v\f\r]*")
_V2_HEADER = re.compile(rb"[ \t\n\v\f\r]*([0-9]+)[ \t\n\v\f\r]+([0-9]+)[ \t\n\v\f\r]*")
_NUL_TO_SPACE = bytes.maketrans(b"\0", b" ")


# --------------------------------------------------------------------------- text and numbers


def decode_text(raw: bytes) -> tuple[str, int]:
    """Decode frame text as UTF-8; undecodable bytes become U+FFFD. Returns (text, bad byte count)."""
    try:
        return raw.decode("utf-8"), 0
    except UnicodeDecodeError:
        pass
    text = raw.decode("utf-8", "surrogateescape")
    bad = 0
    out = []
    for ch in text:
        if "\udc80" <= ch <= "\udcff":
            bad += 1
            out.append("\ufffd")
        else:
            out.append(ch)
    return "".join(out), bad


def format_number(value: Any) -> str:
    """Format a value as one token: bool → 1/0, int → digits, float → shortest round-trip form."""
    if isinstance(value, str):
        return value
    item = getattr(value, "item", None)  # numpy scalars → Python numbers
    if callable(item) and not isinstance(value, (int, float)):
        value = item()
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return int.__repr__(value)
    if isinstance(value, float):
        return float.__repr__(value) if math.isfinite(value) else float.__str__(value)
    return str(value)


def split_tokens(text: str) -> list[str]:
    """Split on the ASCII whitespace DCSS uses; runs of whitespace never yield empty tokens."""
    return _TOKEN.findall(text)


def next_token(text: str, pos: int = 0) -> tuple[str | None, int]:
    """Return the token starting at or after `pos`, and the position just after it."""
    m = _TOKEN.search(text, pos)
    if m is None:
        return None, len(text)
    return m.group(), m.end()


def _rest_from(text: str, pos: int) -> str:
    return text[_LEADING_WS.match(text, pos).end() :].rstrip(WHITESPACE)  # type: ignore[union-attr]


# --------------------------------------------------------------------------- Tcl lists

_TCL_SPECIAL = frozenset(WHITESPACE + '{}[]$"\\;')
_TCL_BACKSLASH = {"n": "\n", "t": "\t", "r": "\r", "v": "\v", "f": "\f", "a": "\a", "b": "\b"}
_TCL_ESCAPE_OUT = {
    "\n": "\\n",
    "\t": "\\t",
    "\r": "\\r",
    "\v": "\\v",
    "\f": "\\f",
    " ": "\\u0020",
    "\0": "\\u0000",
}
_HEX = "0123456789abcdefABCDEF"
_TCL_PLAIN = re.compile(r'[^ \t\n\v\f\r{}\[\]$"\\;\0]+')
_PLAIN_TOKEN = re.compile(r"[^ \t\n\v\f\r\0]+")


def _tcl_backslash(text: str, i: int) -> tuple[str, int]:
    """Substitute the backslash sequence at text[i] == '\\'; return (replacement, next index)."""
    n = len(text)
    if i + 1 >= n:
        return "\\", n
    c = text[i + 1]
    if c in _TCL_BACKSLASH:
        return _TCL_BACKSLASH[c], i + 2
    if c in "xu":
        limit = 2 if c == "x" else 4
        j = i + 2
        while j < n and j - (i + 2) < limit and text[j] in _HEX:
            j += 1
        if j == i + 2:
            return c, i + 2
        return chr(int(text[i + 2 : j], 16)), j
    if c == "\n":
        j = i + 2
        while j < n and text[j] in " \t":
            j += 1
        return " ", j
    return c, i + 2


def tcl_split(text: str) -> list[str]:
    """Split a Tcl list: whitespace-separated words, `{braced}` verbatim, `"quoted"` and bare words
    with backslash substitution. Unbalanced braces or quotes raise ProtocolError."""
    words: list[str] = []
    i = 0
    n = len(text)
    while True:
        while i < n and text[i] in WHITESPACE:
            i += 1
        if i >= n:
            return words
        c = text[i]
        if c == "{":
            depth = 1
            j = i + 1
            while j < n:
                ch = text[j]
                if ch == "\\":
                    j += 2
                    continue
                if ch == "{":
                    depth += 1
                elif ch == "}":
                    depth -= 1
                    if depth == 0:
                        break
                j += 1
            if j >= n:
                raise ProtocolError(f"Tcl list: unmatched open brace at offset {i}")
            words.append(text[i + 1 : j])
            i = j + 1
            if i < n and text[i] not in WHITESPACE:
                raise ProtocolError(
                    f"Tcl list: braced word followed by {text[i]!r} instead of space at offset {i}"
                )
        elif c == '"':
            out: list[str] = []
            j = i + 1
            while j < n and text[j] != '"':
                if text[j] == "\\":
                    sub, j = _tcl_backslash(text, j)
                    out.append(sub)
                else:
                    out.append(text[j])
                    j += 1
            if j >= n:
                raise ProtocolError(f"Tcl list: unmatched open quote at offset {i}")
            words.append("".join(out))
            i = j + 1
            if i < n and text[i] not in WHITESPACE:
                raise ProtocolError(
                    f"Tcl list: quoted word followed by {text[i]!r} instead of space at offset {i}"
                )
        else:
            out = []
            j = i
            while j < n and text[j] not in WHITESPACE:
                if text[j] == "\\":
                    sub, j = _tcl_backslash(text, j)
                    out.append(sub)
                else:
                    out.append(text[j])
                    j += 1
            words.append("".join(out))
            i = j


def _braces_balanced(word: str) -> bool:
    depth = 0
    i = 0
    n = len(word)
    while i < n:
        ch = word[i]
        if ch == "\\":
            if i + 1 >= n or word[i + 1] == "\n":
                return False
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth < 0:
                return False
        i += 1
    return depth == 0


def tcl_quote(value: Any) -> str:
    """One value as one Tcl list element: numbers formatted, words with spaces braced."""
    word = value if isinstance(value, str) else format_number(value)
    if word.isidentifier():  # letters, digits and _: nothing Tcl would read specially
        return word
    if word == "":
        return "{}"
    if _TCL_PLAIN.fullmatch(word):
        return word
    if "\0" not in word and _braces_balanced(word):
        return "{" + word + "}"
    out = []
    for ch in word:
        if ch in _TCL_ESCAPE_OUT:
            out.append(_TCL_ESCAPE_OUT[ch])
        elif ch in _TCL_SPECIAL:
            out.append("\\" + ch)
        else:
            out.append(ch)
    return "".join(out)


def tcl_join(values: Iterable[Any]) -> str:
    """Values as a Tcl list (the inverse of tcl_split for strings)."""
    if type(values) is tuple and len(values) == 1:  # an operation's usual one value: 3x faster
        return tcl_quote(values[0])
    return " ".join(map(tcl_quote, values))


def mask_private(text: str) -> str:
    """Hide session ids (`PRIVATE…` tokens) the way DCSS does in its logs."""
    return re.sub(r"PRIVATE[^ \t\n\v\f\r]*", "PRIVATE*****", text)


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


# --------------------------------------------------------------------------- framing


def encode_v1(text: str | bytes) -> bytes:
    """One 200-byte v1 frame: the text (≤ 199 bytes) and NUL padding."""
    data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    if len(data) > V1_MAX_TEXT_BYTES:
        raise ProtocolError(
            f"DCS v1 text is {len(data)} bytes, the 200-byte frame holds at most "
            f"{V1_MAX_TEXT_BYTES}: {data[:40]!r}…"
        )
    if b"\0" in data:
        raise ProtocolError("DCS text must not contain NUL")
    return data + b"\0" * (V1_FRAME_BYTES - len(data))


# Headers of frames without a binary part, by text length (with its NUL), built once each.
_V2_TEXT_HEADERS = [b"%12d %12d " % (n, 0) for n in range(1024)]


def encode_v2(text: str | bytes, binary: bytes = b"") -> bytes:
    """One v2 frame in DCSS's own form: `%12d %12d ` header, text + NUL (counted), binary."""
    # the text with its NUL, encoded in one go (a third faster than adding the NUL after)
    data = (text + "\0").encode() if isinstance(text, str) else bytes(text) + b"\0"
    n = len(data)  # DCSS counts the NUL
    if data.find(0) != n - 1:
        raise ProtocolError("DCS text must not contain NUL")
    if not binary and n < 1024:
        return _V2_TEXT_HEADERS[n] + data
    return b"%12d %12d " % (n, len(binary)) + data + binary


def _fast_v2_lengths(header: bytes | bytearray | memoryview) -> tuple[int, int] | None:
    # DCSS's own "%12d %12d " form, the common case; anything else takes the general path
    parts = bytes(header).split()
    if len(parts) == 2 and parts[0].isdigit() and parts[1].isdigit():
        return int(parts[0]), int(parts[1])
    return None


def parse_v2_header(
    header: bytes | bytearray | memoryview,
    max_text_bytes: int = DEFAULT_MAX_TEXT_BYTES,
    max_binary_bytes: int = DEFAULT_MAX_BINARY_BYTES,
) -> tuple[int, int]:
    """Two decimals from a 26-byte v2 header (any of the known writers' layouts)."""
    lengths = _fast_v2_lengths(header)
    if lengths is None:
        m = _V2_HEADER.fullmatch(bytes(header).translate(_NUL_TO_SPACE))
        if m is None:
            raise ProtocolError(f"DCS v2 header is not two decimal lengths: {bytes(header)!r}")
        lengths = int(m.group(1)), int(m.group(2))
    text_len, bin_len = lengths
    if text_len > max_text_bytes:
        raise ProtocolError(
            f"DCS v2 text length {text_len} exceeds the limit of {max_text_bytes} bytes"
        )
    if bin_len > max_binary_bytes:
        raise ProtocolError(
            f"DCS v2 binary length {bin_len} exceeds the limit of {max_binary_bytes} bytes"
        )
    return text_len, bin_len


_STRIP = b" \t\n\v\f\r"


def _clean_text(data: bytes) -> bytes:
    cut = data.find(b"\0")
    if cut >= 0:
        data = data[:cut]
    return data.rstrip(_STRIP)


class DcssCodec:
    """A DCS connection's framing, either side. The first frame each way is the v1 handshake;
    every later frame uses `level` (1 or 2).

    `feed(data)` returns the messages completed by `data`; `encode(message)` returns the bytes of
    one frame. `bad_bytes` counts undecodable text bytes, `malformed` the unparsable messages.
    """

    def __init__(
        self,
        level: int = 2,
        *,
        handshake: bool = True,
        max_text_bytes: int = DEFAULT_MAX_TEXT_BYTES,
        max_binary_bytes: int = DEFAULT_MAX_BINARY_BYTES,
    ) -> None:
        if level not in (1, 2):
            raise ValueError(f"DCS protocol level must be 1 or 2, not {level!r}")
        self.level = level
        self.max_text_bytes = max_text_bytes
        self.max_binary_bytes = max_binary_bytes
        self._in_v1_next = handshake or level == 1
        self._out_v1_next = handshake or level == 1
        self._buf = bytearray()
        self._pending: tuple[int, int] | None = None  # v2 lengths whose body has not arrived
        self.bad_bytes = 0
        self.malformed = 0
        self.frames_in = 0
        self.frames_out = 0

    def feed(self, data: bytes | bytearray | memoryview) -> list[Message]:
        if self._buf:
            self._buf += data
            buf = bytes(self._buf)
            self._buf.clear()
        else:
            buf = data if isinstance(data, bytes) else bytes(data)
        out: list[Message] = []
        pending = self._pending
        pos = 0
        end = len(buf)
        try:
            while True:
                if self._in_v1_next:
                    if end - pos < V1_FRAME_BYTES:
                        break
                    text = _clean_text(buf[pos : pos + V1_FRAME_BYTES])
                    binary = b""
                    pos += V1_FRAME_BYTES
                    self._in_v1_next = self.level == 1
                else:
                    if pending is None:
                        if end - pos < V2_HEADER_BYTES:
                            break
                        header = buf[pos : pos + V2_HEADER_BYTES]
                        parts = header.split()  # DCSS's own "%12d %12d " form, checked below
                        if len(parts) == 2 and parts[0].isdigit() and parts[1].isdigit():
                            pending = int(parts[0]), int(parts[1])
                        if (
                            pending is None
                            or pending[0] > self.max_text_bytes
                            or pending[1] > self.max_binary_bytes
                        ):  # any other layout, and every error message
                            pending = parse_v2_header(
                                header, self.max_text_bytes, self.max_binary_bytes
                            )
                    text_len, bin_len = pending
                    start = pos + V2_HEADER_BYTES
                    stop = start + text_len
                    if end - stop < bin_len:
                        break
                    cut = buf.find(0, start, stop)  # the counted NUL, or one before it
                    text = buf[start : stop if cut < 0 else cut].rstrip(_STRIP)
                    if bin_len:
                        binary = buf[stop : stop + bin_len]
                        pos = stop + bin_len
                    else:
                        binary = b""
                        pos = stop
                    pending = None
                try:  # the usual case, without a call more: UTF-8 text that parses
                    out.append(parse_message(text.decode(), binary, text))
                except (UnicodeDecodeError, ProtocolError):
                    out.append(self._message(text, binary))  # bad bytes replaced, or Malformed
        finally:
            self._pending = pending
            self.frames_in += len(out)
            if pos < end:
                self._buf += buf[pos:]
        return out

    def _message(self, raw: bytes, binary: bytes) -> Message:
        try:
            text = raw.decode()
        except UnicodeDecodeError:
            text, bad = decode_text(raw)
            self.bad_bytes += bad
        try:
            return parse_message(text, binary, raw)
        except ProtocolError as exc:
            self.malformed += 1
            command = next_token(text)[0] or ""
            return Malformed(command, text, str(exc), binary=binary, raw=raw)

    def encode_text(self, text: str | bytes, binary: bytes = b"") -> bytes:
        """Frame an already formatted text (the next frame's version: v1 handshake or level)."""
        if self._out_v1_next:
            if binary:
                raise ProtocolError("DCS v1 frames cannot carry a binary part")
            frame = encode_v1(text)
            self._out_v1_next = self.level == 1
        else:
            frame = encode_v2(text, binary)
        self.frames_out += 1
        return frame

    def encode(self, message: Message) -> bytes:
        return self.encode_text(message.to_text(), message.binary)

    @property
    def buffered(self) -> int:
        """Bytes received but not yet part of a whole frame."""
        return len(self._buf)
