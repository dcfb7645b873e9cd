"""Which files the daemon may trust: owner and mode checks (like sshd's StrictModes) for code and
the directories it keeps sockets in.

Code named in a configuration (a DCSS `handlers` module, a packetstream `handler`) runs as the
daemon's user, often root. It is loaded only from a file owned by root or that user, that nobody
else can write, in a directory nobody else can write (or a sticky one, like /tmp, where nobody
else can replace it). The configuration file that names it must pass the same test (CodeTrust
checks a configuration's code settings so; UntrustedCode refuses them from a source that may not
load code, a Constellation controller's map). Kept light: `daqctl` and the control socket import
this module.
"""

from __future__ import annotations

import contextvars
import os
import pwd
import stat
import sys
from pathlib import Path
from typing import Any

from daqd.errors import ConfigError

# True while a control request (ICCP REQUEST) is served: configuration text that arrives over the
# control socket may load code only if it is, word for word, a file that passes `file_problem`.
CONTROL_REQUEST: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "daqd_control_request", default=False
)


def user_name(uid: int) -> str:
    """`name (uid N)`, or `uid N` for a uid without a passwd entry."""
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def trusted_owners() -> str:
    """Who may own trusted files, in words."""
    me = os.geteuid()
    return "root" if me == 0 else f"root or {user_name(me)}"


def _writable_by_others(mode: int) -> str:
    if mode & 0o022 == 0o022:
        return "group- and world-writable"
    return "group-writable" if mode & 0o020 else "world-writable"


def stat_problem(
    path: Path | str, info: os.stat_result, what: str, *, sticky_ok: bool = True
) -> str | None:
    """Why `path` (with `info` from stat) is not to be trusted, or None.

    Owned by root or by us, and writable by nobody else; a sticky directory may be writable by
    others (they cannot rename or remove what they do not own in it) unless not `sticky_ok`
    (for a directory where a file someone else adds would count).
    """
    if info.st_uid not in (0, os.geteuid()):
        return f"{what} {path} is owned by {user_name(info.st_uid)}, not by {trusted_owners()}"
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o022 and not (sticky_ok and stat.S_ISDIR(info.st_mode) and mode & stat.S_ISVTX):
        return f"{what} {path} is {_writable_by_others(mode)} (mode {mode:04o})"
    return None


def file_problem(path: Path | str, what: str = "file") -> str | None:
    """Why the file at `path` and the directory it is in are not to be trusted, or None.

    The file is followed through symbolic links; the directory that holds the name and the one
    that holds the target are both checked.
    """
    given = Path(os.path.abspath(path))
    try:
        real = Path(os.path.realpath(given))
        info = os.stat(real)
    except OSError as exc:
        return f"{what} {given}: cannot check it: {exc.strerror or exc}"
    if not stat.S_ISREG(info.st_mode):
        return f"{what} {given} is not a regular file"
    problem = stat_problem(real, info, what)
    if problem:
        return problem
    for directory in dict.fromkeys([given.parent, real.parent]):
        try:
            dinfo = os.stat(directory)
        except OSError as exc:
            return f"directory {directory}: cannot check it: {exc.strerror or exc}"
        problem = stat_problem(directory, dinfo, f"the directory of {what} {given},")
        if problem:
            return problem
    return None


def module_files(name: str) -> list[Path]:
    """The files importing module `name` would run (package `__init__`s, then the module), found
    without importing anything. What is imported already runs nothing new and is left out.

    Raises ImportError if the module cannot be found.
    """
    files: list[Path] = []
    search: list[str] | None = None
    parts = name.split(".")
    for i in range(len(parts)):
        dotted = ".".join(parts[: i + 1])
        module = sys.modules.get(dotted)
        if module is not None:
            search = list(getattr(module, "__path__", []) or []) or None
        else:
            spec = None
            for finder in sys.meta_path:
                find_spec = getattr(finder, "find_spec", None)
                if find_spec is None:
                    continue
                spec = find_spec(dotted, search)
                if spec is not None:
                    break
            if spec is None:
                raise ImportError(f"no module named {dotted!r}")
            if spec.has_location and spec.origin:
                files.append(Path(spec.origin))
            locations = spec.submodule_search_locations
            search = list(locations) if locations is not None else None
        if search is None and i < len(parts) - 1:
            raise ImportError(f"{dotted!r} is not a package, so {name!r} cannot be imported")
    return files


def code_files(spec: str, base: Path) -> list[Path]:
    """The files a code setting names: `file.py` (relative to `base`), `pkg.mod`, `pkg.mod:attr`."""
    if spec.endswith(".py"):
        path = Path(spec)
        return [path if path.is_absolute() else base / path]
    module = spec.partition(":")[0]
    if not module:
        raise ImportError(f"{spec!r} names no module")
    return module_files(module)


def code_base(config_path: str) -> Path:
    """Where relative handler files are found: next to the config file (systemd runs us from /),
    or in the working directory for a configuration that does not come from a file."""
    return Path(config_path).parent if config_path.endswith(".toml") else Path.cwd()


def code_problem(spec: str, base: Path) -> str | None:
    """Why the code `spec` names must not be loaded, or None."""
    try:
        files = code_files(spec, base)
    except ImportError as exc:
        return f"{spec!r} cannot be found: {exc}"
    except (ValueError, OSError) as exc:
        return f"{spec!r} cannot be looked up: {exc}"
    for path in files:
        problem = file_problem(path, "code file")
        if problem:
            return problem
    return None


def dir_problem(path: Path) -> str | None:
    """Why a directory the daemon keeps its sockets in is not safe, or None: it must belong to the
    daemon's user and be writable by nobody else (or another user could move our sockets away or
    put their own in their place)."""
    try:
        info = os.stat(path)
    except OSError as exc:
        return f"runtime directory {path}: cannot check it: {exc.strerror or exc}"
    me = os.geteuid()
    if not stat.S_ISDIR(info.st_mode):
        return f"runtime directory {path} is not a directory"
    if info.st_uid != me:
        return (
            f"runtime directory {path} belongs to {user_name(info.st_uid)}, not to the daemon's "
            f"user {user_name(me)}"
        )
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o022:
        return (
            f"runtime directory {path} is {_writable_by_others(mode)} (mode {mode:04o}); "
            "only the daemon's user may write to it"
        )
    return None


class CodeTrust:
    """Whether one configuration text may name code to load; decided once, when first needed."""

    def __init__(self, text: str, path: str, from_file: bool) -> None:
        self.text = text
        self.path = path
        self.from_file = from_file
        self._problem: str | None = None
        self._decided = False

    def problem(self) -> str | None:
        if not self._decided:
            self._problem = self._decide()
            self._decided = True
        return self._problem

    def _decide(self) -> str | None:
        over_control = CONTROL_REQUEST.get()
        if not (self.from_file or over_control):
            return None  # handed over by Python code, which runs as the daemon's user anyway
        problem = file_problem(self.path, "configuration file")
        if problem:
            return problem
        if over_control:
            try:
                on_disk = Path(self.path).read_text()
            except (OSError, UnicodeDecodeError) as exc:
                return f"configuration file {self.path} cannot be read: {exc}"
            if on_disk != self.text:
                return (
                    f"the configuration sent is not the content of {self.path}: text alone may "
                    "not load code (send the file itself: daqctl reconfigure FILE)"
                )
        return None

    def check(self, where: str, key: str, value: Any) -> None:
        """Refuse `value` of code setting `key` unless the text and every file it names pass."""
        specs = [value] if isinstance(value, str) else value if isinstance(value, list) else []
        specs = [s for s in specs if isinstance(s, str) and s]
        if not specs:
            return  # nothing to load (or not strings: the settings' validation says so)
        rule = (
            f"code runs as the daemon's user {user_name(os.geteuid())}, so it is loaded "
            f"only from files owned by {trusted_owners()} that nobody else can write, "
            "in directories nobody else can write"
        )
        problem = self.problem()
        if problem:
            raise ConfigError(
                f'{where}: key "{key}": refusing to load code: {problem} ({rule}; the same goes '
                "for the configuration that names it)"
            )
        base = code_base(self.path)
        for spec in specs:
            problem = code_problem(spec, base)
            if problem:
                raise ConfigError(
                    f'{where}: key "{key}": refusing to load {spec!r}: {problem} ({rule})'
                )


class UntrustedCode:
    """Code settings from a source that may not load code (a controller's configuration map)."""

    def __init__(self, source: str) -> None:
        self.source = source

    def check(self, where: str, key: str, value: Any) -> None:
        if value:
            raise ConfigError(
                f'{where}: key "{key}": refusing to load code given by {self.source}: code is '
                "loaded only from trusted configuration files"
            )
