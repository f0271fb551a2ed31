"""Waiting for a step that an event may cut short (a client stopped, Ctrl-C)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable


async def unless_set(step: Awaitable[object], event: asyncio.Event) -> bool:
    """Await ``step`` until it ends or ``event`` is set, whichever comes first. True when the
    step ended (its exception, if any, raised here); False when ``event`` cut it short
    (the step is cancelled and awaited)."""
    work = asyncio.ensure_future(step)
    cut = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait({work, cut}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        cut.cancel()
        if not work.done():
            work.cancel()
        await asyncio.gather(work, cut, return_exceptions=True)
    if work.cancelled():
        return False
    work.result()
    return True
