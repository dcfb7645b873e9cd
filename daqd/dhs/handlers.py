"""The handler API: `@operation`, `@device`, `Operation` (what an operation handler gets and
how it answers), and loading handler modules (refused unless daqd.trust passes their files).
How to write handlers: see daqd.dhs.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import logging
import re
import sys
import types
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from daqd import trust
from daqd.dhs.devices import Device
from daqd.errors import ConfigError, DaqdError
from daqd.protocols import dcss as d
from daqd.protocols.dcss import format_number, tcl_join, tcl_split

if TYPE_CHECKING:
    from daqd.dhs.engine import Dhs

# async def (a coroutine to await) or plain def (its result); see `operation`
OperationHandler = Callable[["Operation"], Any]
_F = TypeVar("_F", bound=Callable[..., Any])
_DevT = TypeVar("_DevT", bound="Device")

_OPERATION_ATTR = "__dhs_operation__"
_ONE_WORD = re.compile(r"[^ \t\n\v\f\r\0]+")
_DEVICE_ATTR = "__dhs_device__"


class OperationError(DaqdError):
    """An operation was used against the protocol's rules (e.g. completed twice)."""


def operation(name: str) -> Callable[[_F], _F]:
    """Register `handler(op: Operation)` for the DCSS operation `name`: an `async def`, or a plain
    `def` for an operation answered without waiting (it runs at once, with no task)."""
    if not name or any(c in d.WHITESPACE for c in name):
        raise ValueError(f"operation name must be one word, got {name!r}")

    def mark(func: _F) -> _F:
        if not callable(func):
            raise TypeError(f"operation handler {func!r} must be a function")
        names = getattr(func, _OPERATION_ATTR, ())
        setattr(func, _OPERATION_ATTR, (*names, name))
        return func

    return mark


def device(name: str) -> Callable[[type[_DevT]], type[_DevT]]:
    """Register a Device subclass as the handler of the DCSS device `name`."""

    def mark(cls: type[_DevT]) -> type[_DevT]:
        names = cls.__dict__.get(_DEVICE_ATTR, ())
        setattr(cls, _DEVICE_ATTR, (*names, name))
        return cls

    return mark


def load_handler_module(spec: str) -> Any:
    """Import a handler module by dotted name, or from a file path ending in `.py`.

    Refused (ConfigError) unless every file the import would run passes daqd.trust's owner and
    mode check: the configuration checked it already, and this holds for any other caller too.
    """
    problem = trust.code_problem(spec, Path.cwd())
    if problem:
        raise ConfigError(f"refusing to load handler module {spec!r}: {problem}")
    if spec.endswith(".py"):
        path = Path(spec).resolve()
        modname = f"daqd_handlers_{path.stem}_{abs(hash(str(path))):x}"
        if modname in sys.modules:
            return sys.modules[modname]
        loader_spec = importlib.util.spec_from_file_location(modname, path)
        if loader_spec is None or loader_spec.loader is None or not path.is_file():
            raise ConfigError(f"handler module file {spec!r} not found")
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[modname] = module
        try:
            loader_spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[modname]
            raise
        return module
    try:
        return importlib.import_module(spec)
    except ImportError as exc:
        raise ConfigError(f"handler module {spec!r} cannot be imported: {exc}") from exc


def freeze_settings(value: Any) -> Any:
    """A read-only copy of a settings value: tables become read-only mappings, arrays tuples."""
    if isinstance(value, Mapping):
        return types.MappingProxyType({str(k): freeze_settings(v) for k, v in value.items()})
    if isinstance(value, list | tuple):
        return tuple(freeze_settings(v) for v in value)
    return value


def collect_handlers(
    modules: Iterable[Any],
) -> tuple[dict[str, OperationHandler], dict[str, type[Device]]]:
    """Operation handlers and device classes marked with @operation / @device in `modules`."""
    ops: dict[str, OperationHandler] = {}
    devices: dict[str, type[Device]] = {}
    for module in modules:
        for value in vars(module).values():
            for name in getattr(value, _OPERATION_ATTR, ()) if callable(value) else ():
                if name in ops and ops[name] is not value:
                    raise ConfigError(
                        f"operation {name!r} has two handlers: {ops[name].__qualname__} and "
                        f"{value.__qualname__}"
                    )
                ops[name] = value
            if isinstance(value, type) and issubclass(value, Device):
                for name in value.__dict__.get(_DEVICE_ATTR, ()):
                    devices[name] = value
    return ops, devices


# ------------------------------------------------------------------------------------ operations


class Operation:
    """One `stoh_start_operation`: what the handler gets, and how it answers."""

    __slots__ = (
        "_args",
        "_conn",
        "_data",
        "_dhs",
        "_stop",
        "args_raw",
        "handle",
        "message",
        "name",
        "status",
        "task",
    )

    def __init__(self, dhs: Dhs, message: d.StohStartOperation, conn: int) -> None:
        self._dhs = dhs
        self._conn = conn
        self.message = message
        self.name: str = message.name
        self.handle: str = message.handle
        self.args_raw: str = message.args
        self._args: list[str] | None = None
        self._data: dict[str, Any] | None = None
        self.status: str | None = None  # the completion status once completed
        self._stop: asyncio.Event | None = None
        self.task: asyncio.Task[None] | None = None

    @property
    def args(self) -> list[str]:
        """The arguments as a Tcl list (`{two words}` is one argument). Raises ProtocolError if
        the braces do not balance; `args_raw` is always there."""
        if self._args is None:
            self._args = tcl_split(self.args_raw)
        return self._args

    @property
    def data(self) -> dict[str, Any]:
        """A dict for the handler's own per-operation state (made on first use)."""
        if self._data is None:
            self._data = {}
        return self._data

    @property
    def stop_requested(self) -> asyncio.Event:
        """Set by `stoh_stop_operation <name>`: finish early and complete (graceful stop)."""
        if self._stop is None:
            self._stop = asyncio.Event()
        return self._stop

    @property
    def settings(self) -> Mapping[str, Any]:
        """The receiver's `handler_settings` table, read-only (a `types.MappingProxyType`)."""
        return self._dhs.handler_settings

    @property
    def dhs(self) -> Dhs:
        return self._dhs

    @property
    def log(self) -> logging.Logger:
        return self._dhs.log

    @property
    def done(self) -> bool:
        return self.status is not None

    @property
    def stale(self) -> bool:
        """True once the connection this operation came on is gone."""
        return self._conn != self._dhs.connection_id

    def update(self, *values: Any) -> None:
        """Send `htos_operation_update <name> <handle> values…`."""
        if self.status is not None:
            raise OperationError(
                f"operation {self.name} {self.handle} already completed ({self.status}): "
                "no update after completion"
            )
        dhs = self._dhs
        send = dhs._send
        if self._conn != dhs.connection_id or send is None:
            dhs.stats["stale"] += 1
            return
        if values:
            send(f"htos_operation_update {self.name} {self.handle} {tcl_join(values)}", False)
        else:
            send(f"htos_operation_update {self.name} {self.handle}", False)
        dhs.stats["operation_updates"] += 1

    def complete(self, status: str = "normal", *values: Any) -> None:
        """Send `htos_operation_completed <name> <handle> <status> values…`; exactly once.

        `normal` means success; any other one-word status is the failure reason.
        """
        if self.status is not None:
            raise OperationError(
                f"operation {self.name} {self.handle} already completed ({self.status})"
            )
        if status != "normal":
            status = format_number(status)
            if not _ONE_WORD.fullmatch(status):
                raise OperationError(f"operation status must be one word, got {status!r}")
        self.status = status
        dhs = self._dhs
        if dhs.operations.get(self.handle) is self:
            del dhs.operations[self.handle]
        send = dhs._send
        if self._conn != dhs.connection_id or send is None:
            dhs.stats["stale"] += 1
            return
        if values:
            text = f"htos_operation_completed {self.name} {self.handle} {status} {tcl_join(values)}"
        else:
            text = f"htos_operation_completed {self.name} {self.handle} {status}"
        send(text, True)  # the end of an operation: out now, not at the end of the loop turn
        dhs.stats["operations_completed"] += 1

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._dhs._operation_task_done(self)

    def cancel(self) -> None:
        if self.task is not None and not self.task.done():
            self.task.cancel()
            # a task cancelled before its first step runs no except clause: finish it here
            self.task.add_done_callback(self._task_done)

    def __repr__(self) -> str:
        return f"<Operation {self.name} {self.handle} {d.mask_private(self.args_raw)!r}>"
