"""Stopping background tasks (server.background.stop_task): a task that survives one cancellation."""

from __future__ import annotations

import asyncio
import sys

import pytest

from server.background import stop_task


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="asyncio.wait_for keeps the cancellation since 3.12")
async def test_wait_for_returns_instead_of_raising_when_cancelled_as_its_awaitable_completes() -> None:
    # The premise of stop_task's second cancellation, made deterministic: the inner future
    # completes and the task is cancelled in the same turn of the loop, before the task resumes.
    inner: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(asyncio.wait_for(inner, 10))
    await asyncio.sleep(0)
    inner.set_result("done")
    task.cancel()
    assert await task == "done"  # the cancellation is gone


async def test_a_task_that_ignores_the_first_cancellation_is_cancelled_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    stages: list[str] = []

    async def stubborn() -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            stages.append("first cancellation lost")  # as wait_for's race loses it
        await asyncio.sleep(30)

    task = asyncio.create_task(stubborn(), name="stubborn")
    await asyncio.sleep(0)
    await asyncio.wait_for(stop_task(task, recancel_after=0.1), timeout=5)
    assert stages == ["first cancellation lost"]
    assert task.cancelled()
    assert "'stubborn' still runs after its cancellation" in caplog.text


async def test_a_task_that_stops_at_once_is_cancelled_once(caplog: pytest.LogCaptureFixture) -> None:
    task = asyncio.create_task(asyncio.sleep(30), name="obedient")
    await asyncio.sleep(0)
    await stop_task(task, recancel_after=0.1)
    assert task.cancelled() and "still runs" not in caplog.text
    await stop_task(None)  # nothing to stop
