"""Change streams over HTTP: per-twin history, the WebSocket API, and Server-Sent Events.

WebSocket close codes: 4401 not authenticated (or the token revoked by a reload of the
tokens), 4403 forbidden, 4408 slow consumer (resume with ``since``), 1011 internal error.
Errors of single messages never close the socket: they come back as
``{"type": "error", ...}`` with the one error body.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Header, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import Response, StreamingResponse

from search.rql.parser import parse_filter
from twin_service.api.context import AppContext
from twin_service.api.deps import (
    Context,
    RawParam,
    Reader,
    StreamReader,
    TwinId,
    context,
    documented,
)
from twin_service.api.http_protocol import cut_when_unread, on_shutdown
from twin_service.api.retained import holds_from, oldest_retained
from twin_service.api.schemas import errors
from twin_service.api.websocket_protocol import allow_full_messages
from twin_service.auth import Credential, revoked
from twin_service.commands import run_command
from twin_service.digits import ascii_integer
from twin_service.errors import (
    BadRequest,
    Gone,
    NotFound,
    TooManyStreams,
    TwinServiceError,
    Unauthorized,
    Unavailable,
)
from twin_service.store.base import MAX_SEQ, TwinStore
from twin_service.streams.direct_ws import pump_websocket
from twin_service.streams.messages import Outgoing
from twin_service.streams.session import StreamSession
from twin_service.streams.subscription import Subscription, validate_id
from twin_service.twin.document import Twin
from twin_service.twin.fields import parse_fields
from twin_service.twin.ids import parse_twin_id
from twin_service.twin.jsonvalue import dumps, dumps_bytes, loads_strict
from twin_service.types import JSONObject

log = logging.getLogger(__name__)
router = APIRouter(prefix="/api/v1", tags=["streams"])

CLOSE_UNAUTHENTICATED = 4401
CLOSE_FORBIDDEN = 4403
CLOSE_SLOW_CONSUMER = 4408
CLOSE_UNSUPPORTED_DATA = 1003
CLOSE_TRY_AGAIN_LATER = 1013
#: Longest correlation id a reply echoes.
MAX_CORRELATION = 256
AUTH_TIMEOUT = 10.0
SSE_KEEPALIVE = 15.0
#: The ``retry`` (milliseconds) of an event stream's ``stopping`` event: an EventSource comes
#: back this soon, to another replica (the Retry-After of a 503 ``service.stopping``).
SSE_STOPPING_RETRY_MS = 1000
#: Longest close reason, in bytes of UTF-8 (RFC 6455: a control frame's payload is at most
#: 125 bytes, two of them the code).
MAX_CLOSE_REASON = 123


# -- history ---------------------------------------------------------------------------------


#: Events in a history page when the request names no ``limit``, and the most it may name.
HISTORY_LIMIT = 100
HISTORY_MAX_LIMIT = 1000
#: A history page ends after the event that takes its events past this many bytes of JSON:
#: 1,000 revisions of a 60 KB twin were one 60 MB response.
HISTORY_PAGE_BYTES = 1 << 20
#: Events read from the store first, then at most at a time while a page fills.
HISTORY_FIRST_READ = 10
HISTORY_READ = 250


_REVISION = {"type": "integer", "minimum": 0, "maximum": MAX_SEQ}
SINCE = RawParam("since", "query", "The first revision of the page (default 0)", _REVISION)
UNTIL = RawParam("until", "query", "The last revision (default: the twin's)", _REVISION)
LIMIT = RawParam(
    "limit",
    "query",
    f"Events in a page (default {HISTORY_LIMIT})",
    {"type": "integer", "minimum": 1, "maximum": HISTORY_MAX_LIMIT},
)


@router.get(
    "/twins/{twin_id}/history",
    responses=errors(404, 410),
    summary="Retained change events of one twin (since <= revision <= until), a page at a time",
    # Read as every other integer of the API is (RawParam.get_int): pydantic's int also
    # took "3_0", "+3", " 3" and "3.0".
    openapi_extra=documented(SINCE, UNTIL, LIMIT),
)
async def history(request: Request, ctx: Context, principal: Reader, twin_id: TwinId) -> Any:
    since = SINCE.get_int(request) or 0
    until = UNTIL.get_int(request)
    limit = LIMIT.get_int(request) or HISTORY_LIMIT
    principal.check_namespace(parse_twin_id(twin_id)[0])
    current = await ctx.store.get(twin_id)
    if current is not None:
        # One consistent page: nothing after the revision read (nor, in a database from
        # before tombstones, later revisions of an earlier twin of the id).
        until = current.revision if until is None else min(until, current.revision)
    events, more = await _history_page(ctx.store, twin_id, since, until, limit)
    if not events or events[0][0] > since > 0:  # else the page starts at `since`
        await _check_retained(ctx.store, twin_id, since, current)
    items = b",".join(encoded for _, encoded in events)
    tail = b',"nextSince":%d' % (events[-1][0] + 1) if more else b""
    return Response(b'{"items":[' + items + b"]" + tail + b"}", media_type="application/json")


async def _check_retained(store: TwinStore, twin_id: str, since: int, current: Twin | None) -> None:
    """410 when the journal lost events of ``twin_id`` from ``since`` on (0: no ``since``,
    a page starts at the oldest event retained); 404 for an id that never had a twin."""
    first = await oldest_retained(store, twin_id)
    if first is not None:
        if since > 0 and not await holds_from(store, twin_id, first, since):
            raise Gone(
                f"History of {twin_id} before revision {first.event.revision} "
                "is no longer retained.",
                extra={"oldestRevision": first.event.revision},
            )
    elif current is None:
        # A tombstone tells a twin whose whole history aged out from one that never was.
        gone = await store.tombstone(twin_id)
        if gone is None:
            raise NotFound(f"Twin {twin_id} does not exist and has no retained history.")
        raise Gone(
            f"Twin {twin_id} was deleted at revision {gone.revision}; "
            "its history is no longer retained.",
            extra={"deletedRevision": gone.revision},
        )
    elif 0 < since <= current.revision:  # a live twin whose every event aged out
        oldest = current.revision + 1
        raise Gone(
            f"History of {twin_id} before revision {oldest} is no longer retained.",
            extra={"oldestRevision": oldest},
        )


async def _history_page(
    store: TwinStore, twin_id: str, since: int, until: int | None, limit: int
) -> tuple[list[tuple[int, bytes]], bool]:
    """At most ``limit`` events (revision, JSON) from revision ``since`` on, fewer when
    they pass ``HISTORY_PAGE_BYTES`` (at least one), and whether more follow.

    A few are read first, then about as many as the rest of the page holds at their
    average size: read 100 at a time, a page of 60 KB events read 6 MB to send 1 MB, and
    all pages of 1,000 such events took 2.5x as long as the old single response."""
    page: list[tuple[int, bytes]] = []
    size = 0
    want = min(HISTORY_FIRST_READ, limit)
    while True:
        chunk = await store.history(twin_id, since, until, want + 1)
        for index, stored in enumerate(chunk[:want]):
            encoded = dumps_bytes({"seq": stored.seq, **stored.event.to_json()})
            page.append((stored.event.revision, encoded))
            size += len(encoded)
            if size >= HISTORY_PAGE_BYTES:
                return page, index + 1 < len(chunk)
        if len(chunk) <= want or len(page) == limit:
            return page, len(chunk) > want
        since = page[-1][0] + 1
        fits = (HISTORY_PAGE_BYTES - size) * len(page) // size + 1  # the last one crosses
        want = min(HISTORY_READ, limit - len(page), fits)


# -- WebSocket -------------------------------------------------------------------------------


def _authenticate(ctx: AppContext, websocket: WebSocket) -> Credential | None:
    """The header's token; ``None`` when the first message must carry the token. With
    auth disabled (development), every connection is welcomed at once, as REST serves
    every request."""
    header = websocket.headers.get("authorization")
    if header is None and not ctx.tokens.disabled:
        return None
    return ctx.tokens.hold(header)


def subscription_from(message: JSONObject) -> tuple[Subscription, int | None]:
    filter_text = message.get("filter")
    if filter_text is not None and not isinstance(filter_text, str):
        raise BadRequest("'filter' must be an RQL string.")
    namespaces = message.get("namespaces")
    twins = message.get("twins")
    for name, value in (("namespaces", namespaces), ("twins", twins)):
        if value is not None and (
            not isinstance(value, list) or not all(isinstance(v, str) for v in value)
        ):
            raise BadRequest(f"'{name}' must be a list of strings.")
    fields = message.get("fields")
    if fields is not None and not isinstance(fields, str):
        raise BadRequest("'fields' must be a string like 'attributes,desired/fan'.")
    since = message.get("since")
    if since is not None and (
        isinstance(since, bool) or not isinstance(since, int) or not 0 <= since <= MAX_SEQ
    ):
        raise BadRequest("'since' must be a non-negative sequence number.")
    subscription = Subscription(
        id=validate_id(message.get("id")),
        filter=parse_filter(filter_text) if filter_text else None,
        namespaces=frozenset(namespaces) if namespaces is not None else None,
        twins=frozenset(twins) if twins is not None else None,
        fields=parse_fields(fields),
    )
    return subscription, since


def close_reason(text: str) -> str:
    """``text`` cut to whole characters of at most :data:`MAX_CLOSE_REASON` bytes: cut to
    as many characters, a non-ASCII reason did not fit, and the close failed (the client
    lost the connection without its code)."""
    cut = text.encode("utf-8", "replace")[:MAX_CLOSE_REASON]
    return cut.decode("utf-8", "ignore")  # "ignore" drops only a character cut in two


async def _close(websocket: WebSocket, code: int, reason: str) -> None:
    await websocket.close(code, close_reason(reason))


@router.websocket("/ws")
async def websocket_endpoint(websocket: WebSocket) -> None:
    refusal: tuple[int, str] | None = None
    credential: Credential | None = None
    try:
        ctx = context(websocket)
        credential = _authenticate(ctx, websocket)
    except Unavailable as exc:  # starting, until the store answers (api.app)
        refusal = (CLOSE_TRY_AGAIN_LATER, exc.message)
    except Unauthorized as exc:
        refusal = (CLOSE_UNAUTHENTICATED, exc.message)
    if credential is not None:
        # Before the accept: the client sends nothing until it has it.
        allow_full_messages(websocket)
    # Accept first so that a refusal reaches the client as a close code and reason.
    await websocket.accept()
    if refusal is not None:
        await _close(websocket, *refusal)
        return
    if credential is None:
        credential = await _first_message_auth(ctx, websocket)
        if credential is None:
            return
        allow_full_messages(websocket)
    stream = ctx.settings.stream
    try:
        session = _session(ctx, credential, stream.max_subscriptions)
    except TooManyStreams as exc:
        await _close(websocket, CLOSE_TRY_AGAIN_LATER, exc.message)
        return
    writer = asyncio.create_task(
        pump_websocket(websocket, session, CLOSE_SLOW_CONSUMER, CLOSE_UNAUTHENTICATED)
    )
    tasks: set[asyncio.Task[None]] = set()
    in_flight = asyncio.Semaphore(stream.max_in_flight)
    try:
        welcome = {"type": "welcome", "principal": credential.principal.name}
        await websocket.send_text(dumps(welcome))
        while True:
            raw = await _receive_text(websocket)
            if raw is None:
                break
            message = _parse(raw, session)
            if message is None:
                continue
            await in_flight.acquire()
            task = asyncio.create_task(_handle(ctx, credential, session, message))
            task.add_done_callback(lambda _: in_flight.release())
            # A command runs to its end even if the client leaves meanwhile: its write
            # may be queued already, and a commit must never skip its listeners (the
            # device's delta among them). The rest stops with the connection.
            group = _COMMANDS if message.get("type") == "command" else tasks
            group.add(task)
            task.add_done_callback(group.discard)
            if writer.done():
                break
    except WebSocketDisconnect:
        pass
    finally:
        session.close()
        for task in tasks:
            task.cancel()
        writer.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await writer


def _session(ctx: AppContext, credential: Credential, max_subscriptions: int = 1) -> StreamSession:
    """A reader's stream session, with the limits of the ``stream`` settings."""
    limits = ctx.settings.stream
    return StreamSession(
        ctx.hub,
        ctx.store,
        credential,
        limits.queue_size,
        max_subscriptions,
        limits.max_listed,
        limits.queue_bytes,
    )


async def _receive_text(websocket: WebSocket) -> str | None:
    """The next text message; a binary one closes the connection with 1003 (RFC 6455: data
    of a type the endpoint cannot accept) and gives ``None``."""
    message = await websocket.receive()
    if message["type"] == "websocket.disconnect":
        raise WebSocketDisconnect(message.get("code", 1000), message.get("reason"))
    text: str | None = message.get("text")
    if text is None:
        await _close(websocket, CLOSE_UNSUPPORTED_DATA, "Messages are JSON in text frames.")
    return text


async def _first_message_auth(ctx: AppContext, websocket: WebSocket) -> Credential | None:
    try:
        raw = await asyncio.wait_for(_receive_text(websocket), AUTH_TIMEOUT)
        if raw is None:
            return None
        message = loads_strict(raw)
        if not isinstance(message, dict) or message.get("type") != "auth":
            raise Unauthorized('The first message must be {"type": "auth", "token": ...}.')
        token = message.get("token")
        if not isinstance(token, str):
            raise Unauthorized("The auth message needs a 'token' string.")
        return ctx.tokens.hold_token(token)
    except (TimeoutError, TwinServiceError) as exc:
        reason = exc.message if isinstance(exc, TwinServiceError) else "No auth message in time."
        with contextlib.suppress(Exception):
            await _close(websocket, CLOSE_UNAUTHENTICATED, reason)
        return None
    except WebSocketDisconnect:
        return None


def _correlation(value: Any) -> Any:
    """What a reply echoes of a request's ``correlationId`` (or ``id``): a string of at most
    ``MAX_CORRELATION`` characters or a number, else null (never a client's whole payload)."""
    if isinstance(value, str) and len(value) <= MAX_CORRELATION:
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return value
    return None


def _parse(raw: str, session: StreamSession) -> JSONObject | None:
    """The message as a JSON object, or ``None`` once the error has been sent back."""
    try:
        message = loads_strict(raw)
        if not isinstance(message, dict):
            raise BadRequest("A message must be a JSON object.")
    except TwinServiceError as exc:
        session.send(_error(None, exc.status, exc.to_body()))
        return None
    return message


def _error(correlation: Any, status: int, body: JSONObject) -> JSONObject:
    return {"type": "error", "correlationId": correlation, "status": status, "error": body}


async def _handle(
    ctx: AppContext, credential: Credential, session: StreamSession, message: JSONObject
) -> None:
    correlation = _correlation(message.get("correlationId", message.get("id")))
    try:
        kind = message.get("type")
        if kind == "subscribe":
            subscription, since = subscription_from(message)
            await session.subscribe(subscription, since)
        elif kind == "unsubscribe":
            found = await session.unsubscribe_answered(validate_id(message.get("id")))
            session.send({"type": "unsubscribed", "subscription": message["id"], "found": found})
        elif kind == "auth":
            # A client written for a service with tokens, welcomed at once by one without.
            raise BadRequest("This connection is authenticated already.", code="auth.done")
        elif kind == "command":
            # The token's role and namespaces now (and again after a search's wait for the
            # index): a reload may have changed them.
            status, body = await run_command(ctx, credential.current, message)
            session.send(
                {"type": "response", "correlationId": correlation, "status": status, "body": body}
            )
        else:
            raise BadRequest(f"Unknown message type {kind!r}.")
    except TwinServiceError as exc:
        session.send(_error(correlation, exc.status, exc.to_body()))
    except Exception:
        log.exception("websocket message failed")
        internal = {
            "status": 500,
            "error": "service.internal",
            "message": "Internal error.",
            "description": "",
        }
        session.send(_error(correlation, 500, internal))


#: Commands of every connection still running (the loop keeps only weak references to
#: tasks; a command outlives its connection).
_COMMANDS: set[asyncio.Task[None]] = set()


# -- Server-Sent Events ----------------------------------------------------------------------


def _sse_message(item: Outgoing, started_live: bool) -> str:
    # A resync's seq is where its subscription goes on live after the reader reloads: its
    # id, so that an EventSource cut off before the next event resumes from there, not
    # again from before the journal's start (one more resync). So is the seq of a stream
    # that started live (no resume point): without it, an EventSource cut off before its
    # first event came back live from a later point, and missed what was committed in
    # between (bench.chaos, a replica killed). A resumed stream's "subscribed" has none:
    # its seq is where the replay ends, and the reader's own Last-Event-ID stays right.
    if (
        item.advances_resume
        or (item.kind == "resync.required" and item.seq is not None)
        or (item.kind == "subscribed" and started_live and item.seq is not None)
    ):
        return f"id: {item.seq}\nevent: {item.kind}\ndata: {item.text}\n\n"
    return f"event: {item.kind}\ndata: {item.text}\n\n"


def _sse_stopping(resume_with: int) -> str:
    """The last event of a stream the service ends as it stops: an EventSource comes back
    after ``retry`` with ``resume_with`` as its Last-Event-ID, and misses nothing."""
    data = json.dumps({"resumeWith": resume_with})
    return f"id: {resume_with}\nevent: stopping\nretry: {SSE_STOPPING_RETRY_MS}\ndata: {data}\n\n"


_STREAM_SINCE = RawParam("since", "query", "The journal sequence number to resume from", _REVISION)


@router.get(
    "/stream/twins",
    responses=errors(),
    summary="Server-Sent Events of twin changes; resume with Last-Event-ID",
    response_class=StreamingResponse,
    openapi_extra=documented(_STREAM_SINCE),  # strict digits, as history's (RawParam)
)
async def sse(
    request: Request,
    ctx: Context,
    credential: StreamReader,
    filter: str | None = None,
    fields: str | None = None,
    namespaces: str | None = None,
    last_event_id: Annotated[str | None, Header()] = None,
) -> StreamingResponse:
    resume = _STREAM_SINCE.get_int(request)
    # An EventSource sends none while its last event id is empty; an empty one from
    # elsewhere (a proxy, a hand-written client) means the same.
    if last_event_id is not None and last_event_id.strip():
        resume = ascii_integer(last_event_id.strip())
        if resume is None or resume > MAX_SEQ:
            raise BadRequest("Last-Event-ID must be a sequence number.")
    message: JSONObject = {"id": "sse", "filter": filter, "fields": fields}
    if namespaces:
        message["namespaces"] = [n for n in namespaces.split(",") if n]
    subscription, _ = subscription_from(message)
    session = _session(ctx, credential)
    try:
        # Answered before the response starts, so that a resume the store cannot serve now
        # is a 503 (with Retry-After, which an EventSource waits out), not a stream cut at
        # once; the replay goes on while the response streams.
        replaying = await session.subscribe_in_background(subscription, resume)
    except BaseException:
        session.close()
        raise
    # Each yield below waits for room in the socket, for good when the client reads
    # nothing, the overflow's too: the finally never ran, and the stream kept its reader's
    # place, and the socket its buffers, until the client reset. Cut instead (api.closing).
    cut_when_unread(request)
    # Else the stream ran on until the shutdown timeout ended it mid-body, and held up
    # the stop of the process that long.
    unregister = on_shutdown(request, session.stop)

    async def stream() -> AsyncIterator[str]:
        try:
            while True:
                if await request.is_disconnected():
                    return
                try:
                    queued = await asyncio.wait_for(session.wait(), SSE_KEEPALIVE)
                except TimeoutError:
                    yield ": keep-alive\n\n"
                    continue
                if not queued and session.revoked:
                    yield f"event: revoked\ndata: {dumps(revoked().to_body())}\n\n"
                    return
                if not queued:  # overflowed
                    yield (
                        "event: overflow\ndata: "
                        + json.dumps({"resumeWith": session.resume_hint()})
                        + "\n\n"
                    )
                    return
                # Everything queued in one chunk: one write and one turn of this loop for a
                # burst, not one per event (a reader fell behind 500 events/s that way).
                chunk = "".join(_sse_message(item, resume is None) for item in session.take_all())
                if session.stopping:
                    # After what was queued: its id is where the reader resumes, elsewhere.
                    yield chunk + _sse_stopping(session.resume_hint())
                    return
                yield chunk
        finally:
            unregister()
            session.close()
            replaying.cancel()

    return StreamingResponse(
        stream(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
