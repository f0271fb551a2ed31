"""The expiry sweeper keeps one scheduled sweep per twin, however often the twin commits.

Every commit of a twin with a pending expiry is offered to the sweeper; it used to push one
heap entry per commit, so a chatty device under a long time to live grew the heap without
bound. What the sweeps then do is tested on the real service (tests/api/test_lifecycle.py).
"""

from __future__ import annotations

from twin_service.expiry import ExpirySweeper
from twin_service.twin.document import Twin

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
