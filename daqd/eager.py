"""Eager tasks: a coroutine's first step runs at once, inside its task, in the caller's turn.

A task made by `loop.create_task` first runs on the next turn of the event loop. For a handler that
answers at once (most DCSS operations) that turn is pure latency. Python 3.12 starts such tasks
eagerly (`asyncio.Task(..., eager_start=True)`); `start_eagerly` does the same on 3.11: the first
step runs now with the new task as `asyncio.current_task()` (so `asyncio.timeout` and TaskGroup
work in it) and in the task's own context; the task then carries on from where the step stopped.
"""

from __future__ import annotations

import asyncio
import collections.abc
import contextvars
import sys
from collections.abc import Coroutine
from typing import Any, TypeVar

_T = TypeVar("_T")

_enter_task = asyncio.tasks._enter_task
_leave_task = asyncio.tasks._leave_task
# what asyncio.current_task(loop) reads, without its call
_current_tasks: dict[asyncio.AbstractEventLoop, asyncio.Task[Any]]
_current_tasks = asyncio.tasks._current_tasks  # type: ignore[attr-defined]

_NATIVE = sys.version_info >= (3, 12)


def start_eagerly(
    loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, _T], name: str | None = None
) -> asyncio.Task[_T]:
    """A task for `coro` whose first step has run before this returns."""
    if _NATIVE:  # pragma: no cover - exercised on Python >= 3.12 only
        return asyncio.Task(coro, loop=loop, name=name, eager_start=True)  # type: ignore[call-arg]
    rest = _AfterFirstStep(coro)
    context = contextvars.copy_context()
    task = loop.create_task(rest, name=name, context=context)
    # asyncio's own hooks for "this task is running", as Task.__step uses them around each step
    outer = _current_tasks.get(loop)  # set when called from inside another task
    if outer is not None:
        _leave_task(loop, outer)
    _enter_task(loop, task)
    try:
        context.run(rest.first_step)
    finally:
        _leave_task(loop, task)
        if outer is not None:
            _enter_task(loop, outer)
    return task


class _AfterFirstStep(collections.abc.Coroutine[Any, Any, Any]):
    """What the task drives: `coro` after its first step. The task's first `send` gets what that
    step yielded (the future it awaits, or its outcome); from then on every send, throw and close
    goes straight to `coro`, so cancellation and exceptions reach it exactly as in a plain task."""

    __slots__ = ("_coro", "_done", "_error", "_started", "_value", "_yielded")

    def __init__(self, coro: Coroutine[Any, Any, Any]) -> None:
        self._coro = coro
        self._started = False
        self._done = False
        self._value: Any = None
        self._error: BaseException | None = None
        self._yielded: Any = None

    def first_step(self) -> None:
        try:
            self._yielded = self._coro.send(None)
        except StopIteration as stop:
            self._done = True
            self._value = stop.value
        except BaseException as exc:
            self._done = True
            self._error = exc
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise

    def send(self, value: Any) -> Any:
        if self._started:
            return self._coro.send(value)
        self._started = True
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        if self._done:
            raise StopIteration(self._value)
        yielded, self._yielded = self._yielded, None
        return yielded

    def throw(self, typ: Any, val: Any = None, tb: Any = None) -> Any:
        # before the task's first send too: the coroutine is suspended where its first step
        # stopped, and that is where a cancellation must land
        if not self._started:
            self._started = True
            if self._done:  # finished already: nothing left to interrupt
                raise typ if val is None else val
        return self._coro.throw(typ, val, tb) if val is not None else self._coro.throw(typ)

    def close(self) -> None:
        self._coro.close()

    def __await__(self) -> Any:
        return self

    def __iter__(self) -> Any:
        return self

    def __next__(self) -> Any:
        return self.send(None)
