"""Compare-and-set conflicts in the SQLite store leave nothing for the cyclic collector."""

from __future__ import annotations

import asyncio
import gc
from pathlib import Path

from tests.store.contract import change
from twin_service.settings import SqliteSettings, StreamSettings
from twin_service.store.base import RevisionConflict, Write
from twin_service.store.sqlite import SqliteStore


def test_conflicting_writes_create_no_reference_cycles(tmp_path: Path) -> None:
    """A conflict used to come back as an exception whose traceback held the writer's frame
    (and the whole batch with it) and the awaiting frame (and the future holding it): cycles
    that only a full collection frees, which is a pause of tens of milliseconds with
    thousands of cached twins. Reference counting must free all of it."""

    async def run() -> int:
        store = SqliteStore(tmp_path / "twins.sqlite3", SqliteSettings(), StreamSettings())
        await store.open()
        try:
            twin_id = "org.acme:hot"
            await store.write(change(None, twin_id, {"desired": {"n": 0}}))
            gc.collect()
            gc.disable()
            try:
                conflicts = 0
                for n in range(1, 21):
                    current = await store.get(twin_id)
                    assert current is not None
                    # Two writers computed from the same revision, committed in one batch.
                    first = change(current, twin_id, {"desired": {"n": n}})
                    second = change(current, twin_id, {"desired": {"n": -n}})
                    results = await asyncio.gather(
                        store.write(Write(twin_id, current.revision, first.twin, first.event)),
                        store.write(Write(twin_id, current.revision, second.twin, second.event)),
                        return_exceptions=True,
                    )
                    conflicts += sum(isinstance(r, RevisionConflict) for r in results)
                    del results
                assert conflicts == 20
                return gc.collect()
            finally:
                gc.enable()
        finally:
            await store.close()

    assert asyncio.run(run()) == 0
