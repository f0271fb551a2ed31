"""Reports the broker delivers again (DUP flag) long after they were committed.

A replica killed between its commit and its PUBACK gets those reports again when its session
resumes; meanwhile the other replicas went on with the device's later reports, so the token
can be far behind the twin's book. The handlers run here on each real store, fed the
messages a broker would deliver.
"""

from __future__ import annotations

import json

from connectivity.messages import InboundMessage
from connectivity.sync_handlers import DeviceHandlers, HandlerSettings
from connectivity.topics import TopicLayout
from tests.store_fixtures import StoreFactory
from twin_service.service import TwinService
from twin_service.twin.jsonvalue import Limits
from twin_service.twin.operations import Edit
from twin_service.types import JSONObject

TWIN = "org.acme:redelivered"
MEMORY = 4
DEPTH = 50


def _report(token: str, value: int, *, redelivered: bool) -> InboundMessage:
    body = {"state": {"counter": value}, "clientToken": token}
    topic = f"twins/{TWIN}/reported/update"
    return InboundMessage(topic, json.dumps(body).encode(), 1, False, redelivered)


async def _handlers(
    store_factory: StoreFactory,
) -> tuple[DeviceHandlers, TwinService, list[JSONObject]]:
    service = TwinService(await store_factory(), Limits(), "default")
    await service.mutate(TWIN, lambda _: Edit({"reported": {}}, {}), origin="test", may_create=True)
    answers: list[JSONObject] = []

    async def reply(_msg: InboundMessage, _twin: str, suffix: str, body: JSONObject) -> None:
        answers.append({"suffix": suffix, **body})

    settings = HandlerSettings(
        max_payload_bytes=65536,
        client_token_memory=MEMORY,
        lastseen_coalesce_seconds=1e6,
        redelivery_depth=DEPTH,
    )
    return DeviceHandlers(service, TopicLayout(), settings, reply), service, answers


async def test_a_redelivery_far_behind_the_book_is_answered_not_applied_again(
    store_factory: StoreFactory,
) -> None:
    handlers, service, answers = await _handlers(store_factory)
    await handlers.on_reported(_report("first", 0, redelivered=False))
    first = answers[-1]
    for n in range(1, 5 * MEMORY + 2):  # the book forgot "first" long ago
        await handlers.on_reported(_report(f"later-{n}", n, redelivered=False))
    before = await service.get(TWIN)

    await handlers.on_reported(_report("first", 0, redelivered=True))

    after = await service.get(TWIN)
    assert answers[-1] == {**first, "duplicate": True}
    assert (after.revision, after.reported) == (before.revision, before.reported)
    assert handlers.duplicates == 1


async def test_a_redelivery_never_committed_is_applied_once(store_factory: StoreFactory) -> None:
    # The connection was lost before the handler ran: the journal is walked to its start
    # without finding the token, and the report is applied.
    handlers, service, answers = await _handlers(store_factory)
    for n in range(3 * MEMORY):
        await handlers.on_reported(_report(f"r-{n}", n, redelivered=False))
    before = await service.get(TWIN)

    await handlers.on_reported(_report("lost", 99, redelivered=True))
    await handlers.on_reported(_report("lost", 99, redelivered=True))

    after = await service.get(TWIN)
    assert after.revision == before.revision + 1 and after.reported == {"counter": 99}
    assert [a.get("duplicate", False) for a in answers[-2:]] == [False, True]


async def test_a_redelivery_is_looked_for_only_within_the_depth(
    store_factory: StoreFactory,
) -> None:
    # The look back is bounded: a backlog of redeliveries must not each read a week of journal.
    handlers, service, answers = await _handlers(store_factory)
    await handlers.on_reported(_report("old", 0, redelivered=False))
    for n in range(1, DEPTH + MEMORY + 1):
        await handlers.on_reported(_report(f"later-{n}", n, redelivered=False))
    before = await service.get(TWIN)

    await handlers.on_reported(_report("old", 0, redelivered=True))

    after = await service.get(TWIN)
    assert after.revision == before.revision + 1 and "duplicate" not in answers[-1]
