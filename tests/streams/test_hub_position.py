"""Where the event hub files a new subscription while nobody listens.

With no subscriber the hub skips to the end of the journal. Commit notices may tell it where
that is only where writes are numbered as they commit (SQLite). On MongoDB a write takes its
number before its compare-and-set, so a notice of number N does not mean that every lower
number has committed: a hub moved to N filed the next subscription after an event still to
come, which that subscriber never got (found by bench.chaos watchers on FerretDB).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from tests.servers.ferretdb import FerretDB
from tests.store.contract import mutate
from tests.store_fixtures import mongodb_settings
from twin_service.store.mongodb import MongoStore
from twin_service.streams.hub import EventHub


async def test_a_notice_past_a_number_in_flight_does_not_move_the_hub_past_it(
    ferretdb_server: FerretDB, tmp_path: Path, unique_name: str
) -> None:
    settings = mongodb_settings(
        tmp_path, ferretdb_server.url, unique_name, gap_timeout_seconds=30.0
    )
    store = MongoStore(settings)
    await store.open()
    hub = EventHub(store, poll_interval=0.05)
    await hub.start()
    try:
        await mutate(store, "org.acme:a", "k")
        # A writer that has numbered its write and not yet committed it...
        in_flight = await store._allocator.next()
        # ...while another commits the next number and tells the hub.
        later = await mutate(store, "org.acme:b", "k")
        assert later > in_flight
        hub.poke(later)
        await asyncio.sleep(0.5)  # the hub has drained, with nobody listening
        assert hub.position < in_flight, (hub.position, in_flight)
    finally:
        await hub.stop()
        await store.close()
