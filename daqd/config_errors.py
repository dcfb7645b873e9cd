"""How a configuration's errors are found and worded: every problem of one text collected, each
naming the file, the table, the key and its line, in daqd's words (never pydantic's), with a
"did you mean" for a mistyped name, and never showing a secret."""

from __future__ import annotations

import datetime
import difflib
import re
from typing import Any

from pydantic import ValidationError

from daqd.errors import ConfigError
from daqd.tomllines import key_lines, line_of


class ConfigErrors(ConfigError):
    """Every problem found in one configuration: one line each, naming file, table, key, line."""

    def __init__(self, path: str, problems: list[str]) -> None:
        self.problems = problems
        if len(problems) == 1:
            text = problems[0]
        else:
            text = f"{path}: {len(problems)} errors\n" + "\n".join(problems)
        super().__init__(text)


_SECRET_KEY = re.compile(r"pass|secret|token|credential|curve", re.IGNORECASE)
_URL_USERINFO = re.compile(r"(?<=://)[^/@\s]+@")


def _shown(key: str, value: Any) -> str:
    """The offending value as an error may show it: never a secret, never a URL's password."""
    if _SECRET_KEY.search(key):
        return "(value hidden)"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, datetime.date | datetime.time):
        return value.isoformat()  # as TOML writes it, not Python's repr
    return _URL_USERINFO.sub("***@", repr(value))


_BOUNDS = {
    "greater_than": ("gt", "must be greater than {}"),
    "greater_than_equal": ("ge", "must be at least {}"),
    "less_than": ("lt", "must be less than {}"),
    "less_than_equal": ("le", "must be at most {}"),
    "multiple_of": ("multiple_of", "must be a multiple of {}"),
    "string_pattern_mismatch": ("pattern", "must match the pattern {}"),
    "string_too_long": ("max_length", "must have at most {} characters"),
    "too_long": ("max_length", "must have at most {} items"),
    "literal_error": ("expected", "must be one of {}"),
    "enum": ("expected", "must be one of {}"),
}
_KINDS = {
    "string_type": "must be a string",
    "int_type": "must be an integer",
    "int_parsing": "must be an integer",
    "int_from_float": "must be a whole number",
    "float_type": "must be a number",
    "float_parsing": "must be a number",
    "finite_number": "must be a finite number",
    "bool_type": "must be true or false",
    "bool_parsing": "must be true or false",
    "list_type": "must be an array",
    "tuple_type": "must be an array",
    "set_type": "must be an array",
    "frozen_set_type": "must be an array",
    "dict_type": "must be a table",
    "model_type": "must be a table",
    "model_attributes_type": "must be a table",
}


def _words(err: Any) -> str:
    """A pydantic error in daqd's words: what the value must be, never pydantic's phrasing."""
    kind, ctx = err["type"], err.get("ctx") or {}
    if kind in ("value_error", "assertion_error"):
        text = str(ctx.get("error") or err["msg"])
        return text if text else str(err["msg"])
    if kind in _KINDS:
        return _KINDS[kind]
    if kind in ("string_too_short", "too_short"):
        n = ctx.get("min_length", 1)
        if n == 1:
            return "must not be empty"
        return f"must have at least {n} {'characters' if kind == 'string_too_short' else 'items'}"
    if kind in _BOUNDS and _BOUNDS[kind][0] in ctx:
        name, text = _BOUNDS[kind]
        return text.format(ctx[name])
    msg = str(err["msg"])
    for prefix in ("Value error, ", "Assertion failed, "):
        msg = msg.removeprefix(prefix)
    return msg[:1].lower() + msg[1:]


def _field_names(model: Any, loc: tuple[Any, ...]) -> list[str]:
    """The keys the (sub-)table at `loc` of `model` accepts, as far as they can be found."""
    for part in loc:
        fields = getattr(model, "model_fields", None)
        if not fields or part not in fields:
            return []
        model = fields[part].annotation
        args = getattr(model, "__args__", ())
        if args and not hasattr(model, "model_fields"):  # dict[str, Sub] / Sub | None
            model = next((a for a in reversed(args) if hasattr(a, "model_fields")), model)
    return list(getattr(model, "model_fields", {}) or {})


def suggest(word: str, choices: list[str] | set[str]) -> str:
    close = difflib.get_close_matches(word, sorted(choices), n=1, cutoff=0.6)
    return f'; did you mean "{close[0]}"?' if close else ""


class Problems:
    """Collects the errors of one configuration text, each with its line number."""

    def __init__(self, path: str, text: str) -> None:
        self.path = path
        self._lines: dict[Any, int] | None = None
        self._text = text
        self.items: list[str] = []
        self._order: list[float] = []  # each item's line (inf: none)

    def line(self, loc: tuple[Any, ...]) -> int | None:
        if self._lines is None:
            self._lines = key_lines(self._text)
        return line_of(self._lines, loc)

    def add(self, where: str, loc: tuple[Any, ...], message: str) -> None:
        """`where` starts with the path; `loc` places the line (table, index, key...)."""
        n = self.line(loc)
        self.items.append(f"{where}: {message}" + (f" (line {n})" if n else ""))
        self._order.append(n or float("inf"))

    def add_raised(self, exc: ConfigError, loc: tuple[Any, ...]) -> None:
        n = self.line(loc)
        self.items.append(f"{exc}" + (f" (line {n})" if n else ""))
        self._order.append(n or float("inf"))

    def add_validation(
        self, where: str, base: tuple[Any, ...], exc: ValidationError, model: Any
    ) -> None:
        errors = exc.errors()
        missing = {str(e["loc"][-1]) for e in errors if e["type"] == "missing" and e["loc"]}
        for err in errors:
            loc = tuple(err["loc"])
            key = ".".join(str(p) for p in loc)
            if err["type"] == "extra_forbidden":
                accepted = [k for k in _field_names(model, loc[:-1]) if k]
                hint = suggest(str(loc[-1]), missing or accepted) or suggest(str(loc[-1]), accepted)
                self.add(where, (*base, *loc), f'key "{key}": unknown key{hint}')
            elif err["type"] == "missing":
                self.add(where, (*base, *loc[:-1]), f'key "{key}": required key is missing')
            elif not loc:
                self.add(where, base, _URL_USERINFO.sub("***@", _words(err)))
            else:
                words, shown = _words(err), _shown(key, err.get("input"))
                if shown != "(value hidden)" and shown not in words:
                    words += f" (got {shown})"
                text = f'key "{key}": {words}'
                self.add(where, (*base, *loc), _URL_USERINFO.sub("***@", text))

    def raise_if_any(self) -> None:
        if self.items:  # in file order, as an editor would walk them
            order = sorted(range(len(self.items)), key=lambda i: (self._order[i], i))
            raise ConfigErrors(self.path, [self.items[i] for i in order])
