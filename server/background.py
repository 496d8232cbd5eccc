"""Background tasks a component owns: started with it, cancelled and awaited when it stops."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any


async def stop_task(task: asyncio.Task[Any] | None) -> None:
    """Cancel `task` (if any) and wait until it has finished, swallowing its cancellation."""
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def repeat_every(
    interval: float,
    work: Callable[[], Awaitable[object]],
    *,
    name: str,
    retry_on: tuple[type[Exception], ...] = (),
    on_failure: Callable[[Exception], None] = lambda exc: None,
) -> asyncio.Task[None]:
    """A task running `work` every `interval` seconds (first after one interval) until cancelled.

    A failure of a `retry_on` type goes to `on_failure` and the next round comes as usual; any
    other exception ends the task.
    """

    async def loop() -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await work()
            except retry_on as exc:
                on_failure(exc)

    return asyncio.create_task(loop(), name=name)
