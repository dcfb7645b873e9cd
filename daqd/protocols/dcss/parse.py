"""`parse_message`: one DCS message text to its typed message, and what it gives for a text that
is not one of the known messages: `Unknown` (a command with no class) and `Malformed` (a known
command whose arguments did not parse; made by the codec)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from daqd.errors import ProtocolError

# both catalogues register their commands in MESSAGES when imported: stoh first, then htos
from daqd.protocols.dcss import stoh  # noqa: F401
from daqd.protocols.dcss.base import _FAST_COMMANDS, MESSAGES, Message, _from_match, _rest_from
from daqd.protocols.dcss.htos import HtosConfigurePseudoMotor, HtosConfigureRealMotor
from daqd.protocols.dcss.text import next_token, split_tokens


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
