"""A shutdown deadline shared by every part that drains, which a second signal cuts short."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


class Deadline:
    """`drain_timeout_s` from the moment shutdown began; `force()` ends it at once.

    `reason` names what is dropped once it has passed: "shutdown_timeout" when the time ran out,
    "forced_exit" when a second signal cut the drain short.
    """

    def __init__(self, timeout_s: float) -> None:
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._at = loop.time() + timeout_s
        self._forced = asyncio.Event()
        self.timeout_s = timeout_s

    @property
    def forced(self) -> bool:
        return self._forced.is_set()

    @property
    def reason(self) -> str:
        return "forced_exit" if self.forced else "shutdown_timeout"

    def remaining(self) -> float:
        return 0.0 if self.forced else max(0.0, self._at - self._loop.time())

    @property
    def expired(self) -> bool:
        return self.remaining() <= 0.0

    def force(self) -> None:
        self._forced.set()

    async def wait(self, aw: Awaitable[T]) -> tuple[bool, T | None]:
        """Await `aw` until the deadline (or a forced exit): (True, result) if it finished in
        time, (False, None) if not; `aw` is cancelled then."""
        task = asyncio.ensure_future(aw)
        forced = asyncio.ensure_future(self._forced.wait())
        try:
            done, _ = await asyncio.wait(
                {task, forced}, timeout=self.remaining(), return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            forced.cancel()
        if task in done:
            return True, task.result()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return False, None
