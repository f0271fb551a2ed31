"""The expiry sweeper keeps one scheduled sweep per twin, however often the twin commits.

Every commit of a twin with a pending expiry is offered to the sweeper; it used to push one
heap entry per commit, so a chatty device under a long time to live grew the heap without
bound. What the sweeps then do is tested on the real service (tests/api/test_lifecycle.py).
"""

from __future__ import annotations

import asyncio

from twin_service.expiry import ExpirySweeper
from twin_service.store.base import StoredEvent
from twin_service.twin.document import ChangeEvent, Twin

STAMP = "2026-12-05T10:00:00.000Z"


def _twin(twin_id: str, *expires: str, revision: int = 1) -> Twin:
    lifecycle = {
        f"k{n}": {"state": "pending", "since": STAMP, "desiredVersion": 1, "expires": at}
        for n, at in enumerate(expires)
    }
    return Twin(twin_id, "org.acme", revision, STAMP, STAMP, lifecycle=lifecycle)


def test_a_twin_committing_often_is_scheduled_once() -> None:
    sweeper = ExpirySweeper()
    for revision in range(1, 1001):
        sweeper.watch(_twin("org.acme:chatty", "2026-12-06T10:00:00.000Z", revision=revision))
    assert sweeper.scheduled == 1
    assert len(sweeper._due) == 1


def test_an_earlier_expiry_is_scheduled_and_a_later_one_waits_for_it() -> None:
    sweeper = ExpirySweeper()
    sweeper.watch(_twin("org.acme:a", "2026-12-06T10:00:00.000Z"))
    sweeper.watch(_twin("org.acme:a", "2026-12-05T11:00:00.000Z"))  # earlier: scheduled
    sweeper.watch(_twin("org.acme:a", "2026-12-07T10:00:00.000Z"))  # later: waits
    sweeper.watch(_twin("org.acme:b", "2026-12-05T12:00:00.000Z", "2026-12-05T11:30:00.000Z"))
    sweeper.watch(_twin("org.acme:c"))  # nothing pending with a time to live
    assert sweeper.scheduled == 2
    assert sweeper._next == {
        "org.acme:a": "2026-12-05T11:00:00.000Z",
        "org.acme:b": "2026-12-05T11:30:00.000Z",
    }


def test_a_deleted_twin_is_forgotten_and_the_heap_stays_bounded() -> None:
    """A deleted twin's expiry stayed scheduled until its time (up to 100 years), and then
    logged that the twin does not exist: a fleet creating and deleting twins with a time to
    live grew the sweeper without end (1,000 entries after 1,000 such twins)."""
    sweeper = ExpirySweeper()

    async def churn() -> None:
        for n in range(1000):
            twin = _twin(f"org.acme:t{n}", "2126-12-05T10:00:00.000Z")
            sweeper.watch(twin)
            deleted = ChangeEvent(twin.twin_id, 2, STAMP, "api", "deleted", {})
            await sweeper._on_commit(StoredEvent(n + 1, deleted), None)

    asyncio.run(churn())
    assert sweeper.scheduled == 0
    assert len(sweeper._due) <= 64


def test_expiries_moved_earlier_over_and_over_keep_the_heap_bounded() -> None:
    sweeper = ExpirySweeper()
    for minute in range(1000, 0, -1):  # each one earlier than the last: scheduled anew
        sweeper.watch(_twin("org.acme:a", f"2026-12-06T{minute // 60:02}:{minute % 60:02}:00.000Z"))
    assert sweeper.scheduled == 1
    assert len(sweeper._due) <= 64 + 2
