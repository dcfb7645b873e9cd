"""The machinery of DCS messages: the `Message` base class, the `@message` decorator that makes a
command's frozen dataclass and registers it in `MESSAGES`, the conversion of wire tokens to fields
and back, and the fast parsing pattern built for every message class. The messages themselves are
in `stoh` (DCSS → DHS) and `htos` (DHS → DCSS); `parse` turns a text into one of them.
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
