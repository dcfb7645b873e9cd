"""Where each table and key of a TOML text starts, so configuration errors can give line numbers.

tomllib parses without positions; this scanner reads the text line by line the way TOML lays it
out: table headers (`[a.b]`, `[[a]]`) and `key = value` lines, skipping the inside of multi-line
strings and arrays. Keys are addressed like pydantic error locations: `("receiver", 1, "listen")`
is the key `listen` of the first `[[receiver]]` (arrays of tables count from 1 at the top level,
as errors name them, and from 0 below, as pydantic does).
"""

from __future__ import annotations

import re

Loc = tuple[str | int, ...]

_BARE = re.compile(r"[A-Za-z0-9_-]+")


def _keys(text: str) -> tuple[list[str], str] | None:
    """Parse a dotted key at the start of `text`; return its parts and the rest, or None."""
    parts: list[str] = []
    rest = text.lstrip()
    while True:
        if rest[:1] in ('"', "'"):
            quote = rest[0]
            end = rest.find(quote, 1)
            while quote == '"' and end > 0 and rest[end - 1] == "\\":
                end = rest.find(quote, end + 1)
            if end < 0:
                return None
            parts.append(rest[1:end])
            rest = rest[end + 1 :].lstrip()
        else:
            m = _BARE.match(rest)
            if not m:
                return None
            parts.append(m.group())
            rest = rest[m.end() :].lstrip()
        if rest[:1] != ".":
            return parts, rest
        rest = rest[1:].lstrip()


def _strip_strings(line: str) -> str:
    """The line with its one-line string contents removed (for bracket counting)."""
    return re.sub(r'"(?:[^"\\]|\\.)*"|\'[^\']*\'', '""', line)


def key_lines(text: str) -> dict[Loc, int]:
    """Map each table (by its path) and each key (by its path) to its 1-based line number."""
    lines: dict[Loc, int] = {}
    counts: dict[Loc, int] = {}  # arrays of tables: how many entries so far, by path
    table: Loc = ()
    in_string: str | None = None
    depth = 0
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if in_string:
            if in_string in line:
                in_string = None
            continue
        if depth > 0:
            depth += _depth_change(line)
            continue
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            array = line.startswith("[[")
            parsed = _keys(line[2:] if array else line[1:])
            if parsed is None:
                continue
            names = parsed[0]
            table = _resolve(names, counts, array)
            lines.setdefault(table, number)
            continue
        parsed = _keys(line)
        if parsed is None or not parsed[1].startswith("="):
            continue
        names, rest = parsed
        lines.setdefault((*table, *names), number)
        value = rest[1:].strip()
        for quote in ('"""', "'''"):
            if value.startswith(quote) and value.count(quote) == 1:
                in_string = quote
        if in_string is None:
            depth = max(_depth_change(value), 0)
    return lines


def _depth_change(text: str) -> int:
    text = _strip_strings(text).split("#", 1)[0]
    return text.count("[") + text.count("{") - text.count("]") - text.count("}")


def _resolve(names: list[str], counts: dict[Loc, int], array: bool) -> Loc:
    """The location of a table header: array-of-table entries get their index."""
    path: list[str | int] = []
    for i, name in enumerate(names):
        path.append(name)
        last = i == len(names) - 1
        key = tuple(path)
        if last and array:
            counts[key] = counts.get(key, 0) + 1
            index = counts[key] if len(path) == 1 else counts[key] - 1
            path.append(index)
            for k in [k for k in counts if len(k) > len(key) and k[: len(key)] == key]:
                del counts[k]  # sub-arrays restart in each new entry
        elif key in counts:  # [receiver.motors.x] belongs to the latest [[receiver]]
            path.append(counts[key] if len(path) == 1 else counts[key] - 1)
    return tuple(path)


def line_of(lines: dict[Loc, int], loc: Loc) -> int | None:
    """The line of `loc`, or of its nearest enclosing table or key that has one."""
    for n in range(len(loc), 0, -1):
        if loc[:n] in lines:
            return lines[loc[:n]]
    return None
