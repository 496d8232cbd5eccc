"""Background tasks a component owns: started with it, cancelled and awaited when it stops."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

log = logging.getLogger(__name__)

#: How long a cancelled task may take to finish before it is cancelled again.
RECANCEL_AFTER = 1.0


async def stop_task(task: asyncio.Task[Any] | None, *, recancel_after: float = RECANCEL_AFTER) -> None:
    """Cancel `task` (if any) and wait until it has finished, swallowing its cancellation.

    A task can survive one cancellation: before Python 3.12, `asyncio.wait_for` returns its
    awaitable's result instead of raising when the cancellation comes just as that awaitable
    completes, and a loop around it then goes on. A task still running `recancel_after` seconds
    after its cancellation is cancelled again (a server once waited forever at shutdown for
    its shard-map listener this way).
    """
    if task is None:
        return
    task.cancel()
    while True:
        done, _ = await asyncio.wait([task], timeout=recancel_after)
        if done:
            break
        log.warning("task %r still runs after its cancellation; cancelling it again", task.get_name())
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
