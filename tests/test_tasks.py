"""stop_task: a background task is stopped even when it drops a cancellation."""

from __future__ import annotations

import asyncio
import logging

import pytest

from twin_service.tasks import stop_task


async def _retrying_loop(dropped: list[int], drops: list[int]) -> None:
    """A retry loop as the store's maintenance: every error is logged and retried. The
    first `drops[0]` cancellations are lost, as the store's maintenance loop lost one inside
    pymongo's server selection (see twin_service.tasks.stop_task)."""
    while True:
        try:
            await asyncio.sleep(0.01)
        except asyncio.CancelledError:
            if len(dropped) >= drops[0]:
                raise
            dropped.append(1)


async def test_a_task_that_drops_cancellations_is_cancelled_again() -> None:
    dropped: list[int] = []
    task = asyncio.create_task(_retrying_loop(dropped, [3]))
    await asyncio.sleep(0.02)
    assert await stop_task(task, deadline_seconds=5)
    assert task.cancelled()
    assert len(dropped) == 3


async def test_a_task_that_never_stops_is_left_at_the_deadline(
    caplog: pytest.LogCaptureFixture,
) -> None:
    dropped: list[int] = []
    drops = [10**9]
    task = asyncio.create_task(_retrying_loop(dropped, drops), name="stubborn")
    await asyncio.sleep(0.02)
    with caplog.at_level(logging.ERROR, logger="twin_service.tasks"):
        assert not await stop_task(task, deadline_seconds=0.5)
    assert not task.done()
    assert "stubborn did not stop within" in caplog.text
    assert len(dropped) >= 2  # cancelled again and again until the deadline
    drops[0] = 0  # now let it go
    assert await stop_task(task, deadline_seconds=5)


async def test_a_finished_or_missing_task_and_a_failed_one(
    caplog: pytest.LogCaptureFixture,
) -> None:
    assert await stop_task(None)

    async def done() -> None:
        return None

    finished = asyncio.create_task(done())
    await finished
    assert await stop_task(finished)

    async def fail() -> None:
        raise ValueError("broken loop")

    failed = asyncio.create_task(fail(), name="broken")
    await asyncio.sleep(0)
    with caplog.at_level(logging.ERROR, logger="twin_service.tasks"):
        assert await stop_task(failed)
    assert "broken had failed" in caplog.text
    assert "broken loop" in caplog.text
