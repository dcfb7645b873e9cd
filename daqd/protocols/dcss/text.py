"""The text of DCS messages: decoding frame bytes, numbers formatted as tokens, splitting
tokens, and Tcl lists (split, quote, join) as DCSS and Blu-Ice write them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import Any

from daqd.errors import ProtocolError

# Tcl's list separators; the same set separates tokens (DCSS's sscanf also skips exactly these).
WHITESPACE = " \t\n\v\f\r"
_TOKEN = re.compile(r"[^ \t\n\v\f\r]+")


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
