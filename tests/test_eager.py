"""daqd.eager.start_eagerly: the first step runs at once, and the task behaves as a plain task."""

from __future__ import annotations

import asyncio
import contextvars

import pytest

from daqd.eager import start_eagerly

VAR: contextvars.ContextVar[str] = contextvars.ContextVar("VAR", default="outside")


async def test_first_step_runs_before_start_returns_in_its_own_task_and_context() -> None:
    loop = asyncio.get_running_loop()
    seen: list[object] = []

    async def quick() -> int:
        seen.append(asyncio.current_task())
        VAR.set("inside")
        return 7

    task = start_eagerly(loop, quick(), name="quick")
    assert seen == [task]  # ran already, with its own task as the current one
    assert VAR.get() == "outside"  # its context is its own
    assert asyncio.current_task() is not task  # the caller's task is current again
    assert await task == 7
    assert task.get_name() == "quick"


async def test_a_suspended_coroutine_carries_on_in_the_task() -> None:
    loop = asyncio.get_running_loop()
    gate = asyncio.Event()
    steps: list[str] = []

    async def slow() -> str:
        steps.append("first")
        VAR.set("mine")
        await gate.wait()
        await asyncio.sleep(0)  # a bare yield too
        steps.append(f"rest in {asyncio.current_task().get_name()} with {VAR.get()}")  # type: ignore[union-attr]
        return "done"

    task = start_eagerly(loop, slow(), name="slow")
    assert steps == ["first"]
    gate.set()
    assert await asyncio.wait_for(task, 10) == "done"
    assert steps == ["first", "rest in slow with mine"]


async def test_timeout_and_taskgroup_work_in_the_first_step() -> None:
    loop = asyncio.get_running_loop()

    async def bounded() -> None:
        async with asyncio.timeout(0.05):
            await asyncio.sleep(30)

    with pytest.raises(TimeoutError):
        await asyncio.wait_for(start_eagerly(loop, bounded()), 10)

    async def grouped() -> int:
        async with asyncio.TaskGroup() as group:
            child = group.create_task(asyncio.sleep(0, 5))
        return child.result()

    assert await asyncio.wait_for(start_eagerly(loop, grouped()), 10) == 5


async def test_cancel_before_the_task_ran_reaches_the_coroutine_where_it_waits() -> None:
    loop = asyncio.get_running_loop()
    cleaned = asyncio.Event()

    async def waits() -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cleaned.set()
            raise

    task = start_eagerly(loop, waits())
    task.cancel()  # before the event loop ever ran the task
    with pytest.raises(asyncio.CancelledError):
        await task
    assert cleaned.is_set()
    assert task.cancelled()


async def test_exceptions_from_the_first_step_and_later_reach_the_awaiter() -> None:
    loop = asyncio.get_running_loop()

    async def at_once() -> None:
        raise ValueError("first step")

    async def later() -> None:
        await asyncio.sleep(0)
        raise KeyError("later")

    with pytest.raises(ValueError, match="first step"):
        await start_eagerly(loop, at_once())
    with pytest.raises(KeyError):
        await start_eagerly(loop, later())


def test_from_a_plain_callback_and_from_inside_another_task() -> None:
    async def main() -> tuple[str, str]:
        loop = asyncio.get_running_loop()
        names: list[str] = []

        async def who() -> None:
            names.append(asyncio.current_task().get_name())  # type: ignore[union-attr]

        done = loop.create_future()

        def callback() -> None:  # no task is running here
            done.set_result(start_eagerly(loop, who(), name="from-callback"))

        loop.call_soon(callback)
        await (await done)
        outer = asyncio.current_task()
        await start_eagerly(loop, who(), name="from-task")
        assert asyncio.current_task() is outer
        return names[0], names[1]

    assert asyncio.run(main()) == ("from-callback", "from-task")
