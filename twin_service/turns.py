"""Turns: one writer at a time per key in this process, first come first served.

Writers of one twin that run side by side only collide on its compare-and-set: every one but
the winner re-reads and tries again, so n of them cost about n²/2 attempts. Taking turns
costs n. The entry for a key lives only while someone holds or waits for it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field


@dataclass(eq=False)
class _Turn:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0
    failures: int = 0


@dataclass(eq=False)
class Ticket:
    """One writer's place in a key's queue."""

    #: Another writer held or waited for the key when this one came.
    waited: bool
    _turn: _Turn
    _failures_before: int

    @property
    def failed_ahead(self) -> bool:
        """A writer that held the key while this one waited called :meth:`fail`."""
        return self._turn.failures != self._failures_before

    def fail(self) -> None:
        """Tell the writers waiting now that this one failed (see :attr:`failed_ahead`)."""
        self._turn.failures += 1


class Turns:
    """Per-key FIFO mutual exclusion (``asyncio.Lock`` wakes its waiters in order)."""

    def __init__(self) -> None:
        self._turns: dict[str, _Turn] = {}

    def __len__(self) -> int:
        return len(self._turns)

    @asynccontextmanager
    async def take(self, key: str) -> AsyncIterator[Ticket]:
        """Hold ``key`` for the block."""
        turn = self._turns.get(key)
        if turn is None:
            turn = self._turns[key] = _Turn()
        turn.users += 1
        ticket = Ticket(turn.users > 1, turn, turn.failures)
        try:
            async with turn.lock:
                yield ticket
        finally:
            turn.users -= 1
            if turn.users == 0:
                del self._turns[key]
