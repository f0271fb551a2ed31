"""Device -> service messages: each one is validated, committed through ``TwinService.mutate``
and answered. The MQTT client acknowledges a message only after its handler returned, so a
handler returns only once the write is committed (or the message is answered as rejected).

A store that is unavailable is retried for as long as it stays down: the message cannot be
acknowledged before its write, and the broker would send it again only on a new session (see
_retry). The handlers that wait hold the intake back meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

from connectivity.errors import PacketTooLarge
from connectivity.messages import Handler, InboundMessage
from connectivity.sync_messages import (
    Status,
    answer_too_large,
    get_accepted,
    parse_get,
    parse_live_update,
    parse_reported_update,
    parse_status,
    rejection,
    report_accepted,
    token_hint,
)
from connectivity.topics import TopicLayout
from twin_service.errors import NotFound, TwinServiceError, Unavailable
from twin_service.service import Outcome, TwinService
from twin_service.twin.device import DeviceBook, TokenRecord, earlier_books, next_connection
from twin_service.twin.document import Twin
from twin_service.twin.lifecycle import lifecycle_for_edit
from twin_service.twin.metadata import written_paths
from twin_service.twin.operations import Edit
from twin_service.twin.patch import json_equal, merge_patch
from twin_service.types import JSONObject

log = logging.getLogger(__name__)

#: ``reply(request, twin_id, suffix, body)`` publishes an answer to the device; raises
#: :class:`PacketTooLarge`, nothing sent, for one over the broker's packet size limit.
Reply = Callable[[InboundMessage, str, str, JSONObject], Awaitable[None]]
T = TypeVar("T")

#: Back-off (seconds) while the store is unavailable; the last one repeats until it is back.
_STORE_RETRIES = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)


@dataclass(frozen=True)
class HandlerSettings:
    max_payload_bytes: int
    client_token_memory: int
    lastseen_coalesce_seconds: float
    #: How many revisions back a redelivered report's token is looked for (the journal keeps
    #: at least ``stream.journal_max_per_twin`` events per twin).
    redelivery_depth: int


class _Duplicate(Exception):
    def __init__(self, record: TokenRecord) -> None:
        super().__init__(record.token)
        self.record = record


def ignoring_replays(handler: Handler) -> Handler:
    """``handler``, except for a message the broker replays from its retained store.

    A request a device published with the retain flag stays on the broker, which sends it
    again (retain flag set) at every new subscription of the service: a reported or live
    update would be applied again at each reconnection, putting back values the device has
    long changed. The first delivery, live, has the flag cleared and is handled as usual.
    """

    async def handle(msg: InboundMessage) -> None:
        if msg.retain:
            log.warning(
                "ignored a retained request the broker replayed on %s: devices must publish "
                "requests without the retain flag (clear it with an empty retained publish)",
                msg.topic,
            )
            return
        await handler(msg)

    return handle


class DeviceHandlers:
    """The handlers for ``reported/update``, ``live/update``, ``get`` and ``status``."""

    def __init__(
        self, service: TwinService, layout: TopicLayout, settings: HandlerSettings, reply: Reply
    ) -> None:
        self._service = service
        self._layout = layout
        self._settings = settings
        self._reply = reply
        self.applied = 0
        self.duplicates = 0
        self.rejected = 0

    # -- reported/update ---------------------------------------------------------------

    async def on_reported(self, msg: InboundMessage) -> None:
        twin_id = self._twin(msg)
        token: str | None = None
        try:
            update = parse_reported_update(msg.payload, self._settings.max_payload_bytes)
            token = update.client_token
            if msg.duplicate and token is not None:
                earlier = await self._retry(lambda: self._committed_earlier(twin_id, token))
                if earlier is not None:
                    raise _Duplicate(earlier)
            book_holder: list[DeviceBook] = []

            def edit(current: Twin | None) -> Edit:
                assert current is not None  # mutate raises NotFound first
                book = DeviceBook.read(current.private)
                record = book.find(token)
                if record is not None:
                    raise _Duplicate(record)
                book.check_desired_version(update.desired_version, current.desired_version)
                book_holder[:] = [book]
                reported = merge_patch(current.reported, update.state)
                return Edit({"reported": reported}, {"reported": written_paths(update.state)})

            def amend(current: Twin | None, change: Edit) -> dict[str, Any]:
                assert current is not None
                now = datetime.now(UTC)
                changed = not json_equal(current.reported, change.values["reported"])
                book = book_holder[0].after_report(
                    token,
                    update.desired_version,
                    current.revision + 1,
                    current.reported_version + (1 if changed else 0),
                    self._settings.client_token_memory,
                )
                extra: dict[str, Any] = {
                    "private": book.write(current.private),
                    "lifecycle": lifecycle_for_edit(
                        current,
                        change,
                        now,
                        rejected=dict(update.rejected),
                        rejected_version=update.desired_version,
                    ),
                }
                connection = self._connection(current, now, None)
                if connection is not None:
                    extra["connection"] = connection
                return extra

            outcome = await self._mutate(twin_id, edit, amend)
        except _Duplicate as dup:
            self.duplicates += 1
            body = report_accepted(token, dup.record.revision, dup.record.reported_version, True)
            await self._accept(msg, twin_id, "reported/update", body)
            await self._seen(twin_id)
            return
        except TwinServiceError as exc:
            if isinstance(exc, Unavailable):
                raise
            self.rejected += 1
            body = rejection(exc, token or token_hint(msg.payload))
            await self._reply(msg, twin_id, "reported/update/rejected", body)
            await self._seen(twin_id, exc)
            return
        assert outcome.twin is not None
        self.applied += 1
        body = report_accepted(token, outcome.twin.revision, outcome.twin.reported_version)
        await self._accept(msg, twin_id, "reported/update", body)

    async def _committed_earlier(self, twin_id: str, token: str) -> TokenRecord | None:
        """The record of ``token`` if a report with it was committed before, looking beyond
        the twin's book into the books the journal kept with earlier revisions.

        Only for a message the broker marked as a redelivery: a replica killed after
        committing reports and before acknowledging them gets them again when its session
        resumes, which can be many reports later (its share of the device's messages went
        on to other replicas meanwhile), past the book's last ``client_token_memory``
        tokens; applying one again would put back a value the device has since changed.
        Redeliveries are recognised within ``redelivery_depth`` revisions.
        """
        store = self._service.store
        twin = await store.get(twin_id)
        if twin is None:
            return None  # the write that follows answers 404
        record = DeviceBook.read(twin.private).find(token)
        if record is not None:
            return record
        s = self._settings
        revisions = earlier_books(twin.revision, s.client_token_memory, s.redelivery_depth)
        if not revisions:
            return None
        # One read for all of them: after a broker restart most of a backlog comes back
        # flagged, never committed, so each one looks back all the way.
        for private in (await store.privates_at(twin_id, revisions)).values():
            record = DeviceBook.read(private).find(token)
            if record is not None:
                return record
        return None

    # -- live/update -------------------------------------------------------------------

    async def on_live(self, msg: InboundMessage) -> None:
        twin_id = self._twin(msg)
        try:
            patch = parse_live_update(msg.payload, self._settings.max_payload_bytes)

            def edit(current: Twin | None) -> Edit:
                assert current is not None
                return Edit(
                    {"live": merge_patch(current.live, patch)}, {"live": written_paths(patch)}
                )

            def amend(current: Twin | None, _change: Edit) -> dict[str, Any]:
                assert current is not None
                connection = self._connection(current, datetime.now(UTC), None)
                return {} if connection is None else {"connection": connection}

            await self._mutate(twin_id, edit, amend)
        except TwinServiceError as exc:
            if isinstance(exc, Unavailable):
                raise
            self.rejected += 1
            await self._reply(msg, twin_id, "live/update/rejected", rejection(exc, None))
            await self._seen(twin_id, exc)
            return
        self.applied += 1

    # -- get -------------------------------------------------------------------------------

    async def on_get(self, msg: InboundMessage) -> None:
        twin_id = self._twin(msg)
        token: str | None = None
        try:
            request = parse_get(msg.payload, self._settings.max_payload_bytes)
            token = request.client_token
            twin = await self._retry(lambda: self._service.get(twin_id))
        except TwinServiceError as exc:
            if isinstance(exc, Unavailable):
                raise
            body = rejection(exc, token or token_hint(msg.payload))
            await self._reply(msg, twin_id, "get/rejected", body)
            await self._seen(twin_id, exc)
            return
        await self._accept(msg, twin_id, "get", get_accepted(twin, token))
        await self._touch(twin_id, twin, None)

    # -- status ----------------------------------------------------------------------------

    async def on_status(self, msg: InboundMessage) -> None:
        status = parse_status(msg.payload)
        if status is None:
            return  # a cleared retained status, or noise: nothing to record
        twin_id = self._twin(msg)
        try:
            twin = await self._retry(lambda: self._service.get(twin_id))
        except NotFound:
            log.debug("status for unknown twin %s ignored", twin_id)
            return
        except TwinServiceError as exc:
            if isinstance(exc, Unavailable):
                raise
            return
        await self._touch(twin_id, twin, status)

    # -- helpers -----------------------------------------------------------------------

    def _twin(self, msg: InboundMessage) -> str:
        twin_id = self._layout.twin_id(msg.topic)
        assert twin_id is not None, f"subscribed filter matched a foreign topic {msg.topic!r}"
        return twin_id

    async def _accept(
        self, msg: InboundMessage, twin_id: str, request: str, body: JSONObject
    ) -> None:
        """Answer ``body`` on ``<request>/accepted``, or, when it is over the broker's packet
        size limit (not sent), a 413 on ``<request>/rejected``: this device learns why, and
        the service's connection stays up for every other one."""
        try:
            await self._reply(msg, twin_id, f"{request}/accepted", body)
        except PacketTooLarge as exc:
            log.warning("answer to %s on %s not sent: %s", twin_id, request, exc.message)
            token = body.get("clientToken")
            error = answer_too_large(exc.extra["size"], exc.extra["limit"])
            refusal = rejection(error, token if isinstance(token, str) else None)
            await self._reply(msg, twin_id, f"{request}/rejected", refusal)

    def _connection(self, twin: Twin, now: datetime, status: Status | None) -> JSONObject | None:
        return next_connection(
            twin.connection,
            now=now,
            status=status,
            coalesce_seconds=self._settings.lastseen_coalesce_seconds,
        )

    async def _seen(self, twin_id: str, refusal: TwinServiceError | None = None) -> None:
        """Note the traffic of a message refused or applied before: it still says the device
        is there (a device resending its unanswered reports after a reconnection stayed
        offline). Not for a twin that is not there."""
        if isinstance(refusal, NotFound):
            return
        try:
            twin = await self._retry(lambda: self._service.get(twin_id))
            await self._touch(twin_id, twin, None)
        except TwinServiceError as exc:  # only lastSeen is lost: the message had its answer
            log.debug("lastSeen of %s not written: %s", twin_id, exc.message)

    async def _touch(self, twin_id: str, twin: Twin, status: Status | None) -> None:
        """Write ``connection`` only when it changes (status, or a stale ``lastSeen``)."""
        if self._connection(twin, datetime.now(UTC), status) is None:
            return

        def amend(current: Twin | None, _change: Edit) -> dict[str, Any]:
            assert current is not None
            connection = self._connection(current, datetime.now(UTC), status)
            return {} if connection is None else {"connection": connection}

        try:
            await self._mutate(twin_id, lambda _t: Edit({}, {}), amend)
        except NotFound:
            return

    async def _mutate(
        self,
        twin_id: str,
        edit: Callable[[Twin | None], Edit],
        amend: Callable[[Twin | None, Edit], dict[str, Any]],
    ) -> Outcome:
        return await self._retry(
            lambda: self._service.mutate(twin_id, edit, origin="device", amend=amend)
        )

    async def _retry(self, call: Callable[[], Awaitable[T]]) -> T:
        """``call()``, again and again while the store is unavailable.

        Giving up would leave the message unacknowledged on a connection that goes on: the
        broker sends it again only on a new session, so it stayed stuck after the store came
        back (a test on FerretDB showed it). And a broker sends a client only so many
        unacknowledged messages at a time (mosquitto's ``max_inflight_messages``): enough
        stuck ones would stop the intake. Shutdown cancels the wait; the message then goes
        to the next session.
        """
        attempt = 0
        while True:
            try:
                return await call()
            except Unavailable as exc:
                delay = _STORE_RETRIES[min(attempt, len(_STORE_RETRIES) - 1)]
                if attempt < len(_STORE_RETRIES) or attempt % 8 == 0:  # a line a minute later
                    log.warning("store unavailable, retrying in %ss: %s", delay, exc)
                await asyncio.sleep(delay)
            attempt += 1
