"""Turns: per-key FIFO turns, who waited, failures told to the queue, no leftovers."""

from __future__ import annotations

import asyncio

import pytest

from twin_service.turns import Turns


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_one_holder_per_key_in_arrival_order_and_keys_apart() -> None:
    turns = Turns()
    log: list[str] = []
    release = asyncio.Event()

    async def writer(key: str, name: str) -> bool:
        async with turns.take(key) as ticket:
            log.append(f"{name} in")
            await release.wait()
            log.append(f"{name} out")
            return ticket.waited

    tasks = [asyncio.create_task(writer("a", f"a{i}")) for i in range(4)]
    other = asyncio.create_task(writer("b", "b0"))
    await _settle()
    # a0 holds "a" and the others wait; "b" is not held up by "a".
    assert log == ["a0 in", "b0 in"]
    release.set()
    waited = await asyncio.gather(*tasks)
    assert not await other
    assert [entry for entry in log if entry.startswith("a")] == [
        "a0 in",
        "a0 out",
        "a1 in",
        "a1 out",
        "a2 in",
        "a2 out",
        "a3 in",
        "a3 out",
    ]
    assert waited == [False, True, True, True]
    assert len(turns) == 0


async def test_a_failure_is_told_to_the_writers_waiting_then_only() -> None:
    turns = Turns()
    go = asyncio.Event()
    seen: dict[str, bool] = {}

    async def failing() -> None:
        async with turns.take("t") as ticket:
            await go.wait()
            ticket.fail()

    async def waiting(name: str) -> None:
        async with turns.take("t") as ticket:
            seen[name] = ticket.failed_ahead

    first = asyncio.create_task(failing())
    await _settle()
    queued = [asyncio.create_task(waiting(f"q{i}")) for i in range(3)]
    await _settle()
    go.set()
    await asyncio.gather(first, *queued)
    # A writer that comes after the failure tries for itself.
    await waiting("later")
    assert seen == {"q0": True, "q1": True, "q2": True, "later": False}
    assert len(turns) == 0


async def test_a_cancelled_waiter_leaves_no_entry_and_no_hole() -> None:
    turns = Turns()
    release = asyncio.Event()
    order: list[str] = []

    async def writer(name: str) -> None:
        async with turns.take("t"):
            order.append(name)
            await release.wait()

    holder = asyncio.create_task(writer("first"))
    await _settle()
    cancelled = asyncio.create_task(writer("cancelled"))
    last = asyncio.create_task(writer("last"))
    await _settle()
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    release.set()
    await asyncio.gather(holder, last)
    assert order == ["first", "last"]
    assert len(turns) == 0

    # A holder cancelled inside its turn hands it on as well.
    release.clear()
    inside = asyncio.create_task(writer("inside"))
    after = asyncio.create_task(writer("after"))
    await _settle()
    inside.cancel()
    with pytest.raises(asyncio.CancelledError):
        await inside
    release.set()
    await after
    assert order[-2:] == ["inside", "after"]
    assert len(turns) == 0
