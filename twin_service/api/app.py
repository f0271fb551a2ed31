"""The FastAPI application and its lifespan (store, service, optional components)."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import signal
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

from fastapi import FastAPI

from twin_service import __version__, hangup
from twin_service.api import errors
from twin_service.api.context import AppContext, Component
from twin_service.api.hot_routes import TwinApp
from twin_service.api.routes import health, search, streams, twins
from twin_service.auth import TokenRegistry, configured_tokens, load_tokens
from twin_service.errors import StoreUnreachable, TwinServiceError
from twin_service.index.base import BuiltinIndex, NoIndex, SearchIndex
from twin_service.open_files import readers_bound
from twin_service.service import TwinService
from twin_service.settings import Settings
from twin_service.store.base import StoredEvent, TwinStore
from twin_service.streams.bus import EventBus, InProcessBus, MqttBus
from twin_service.streams.hub import EventHub
from twin_service.tasks import stop_task

log = logging.getLogger(__name__)


def build_store(
    settings: Settings, *, existing: bool = False, must_exist: bool = False
) -> TwinStore:
    """The store ``settings`` name. ``must_exist``: for an operator command, which opens
    only a store that exists (a mistyped data directory or database name once created an
    empty one; ``mqtt retire`` then handled a session's queued reports against it) and
    otherwise opens it as the service does (retire writes as the service does).
    ``existing`` implies it, and also leaves what the store records about search (the
    outbox, the built-in index) as the service recorded it (``index rebuild``, which
    writes no twin)."""
    if settings.store == "mongodb":
        from twin_service.store.mongodb import MongoStore  # type: ignore[import-not-found,unused-ignore]

        store: TwinStore = MongoStore(settings, existing=existing, must_exist=must_exist)
        return store
    from twin_service.store.sqlite import SqliteStore

    return SqliteStore(
        settings.data_dir / settings.sqlite.file_name,
        settings.sqlite,
        settings.stream,
        outbox=settings.search == "elasticsearch",
        builtin_index=settings.search == "builtin",
        gc_thresholds=settings.gc_thresholds,
        existing=existing,
        must_exist=must_exist,
    )


def build_index(settings: Settings, store: TwinStore) -> SearchIndex:
    if settings.search == "elasticsearch":
        from twin_service.index.elasticsearch import ElasticsearchIndex

        index: SearchIndex = ElasticsearchIndex(settings, store)
        return index
    if settings.search == "off":
        return NoIndex()
    return BuiltinIndex(store)


def build_bus(settings: Settings) -> EventBus:
    kind = settings.stream.bus
    if kind == "auto":
        kind = "mqtt" if settings.mqtt_url and settings.mqtt.enabled else "inprocess"
    if kind == "mqtt":
        assert settings.mqtt_url, "Settings refuses stream.bus=mqtt without mqtt_url"
        from connectivity.sync import service_options

        # As the service's broker user, like its device sync: a broker with a password file
        # refused an anonymous bus, and /ready stayed 503 for good.
        origin = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        options = service_options(
            settings,
            settings.mqtt_url,
            settings.mqtt.service_password,
            client_id=f"{settings.mqtt.client_id}-bus-{origin}",
            persistent_session=False,
        )
        return MqttBus(options)
    return InProcessBus()


def create_app(settings: Settings) -> TwinApp:
    tokens, created = load_tokens(settings)
    if created:
        # Printed once, on the first start only; the file in the data dir keeps it (0600).
        print(f"Created admin token (stored in {settings.data_dir}/admin-token): {created}")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with AsyncExitStack() as stack:
            registry = TokenRegistry(tokens, settings.auth.disabled)
            _reload_tokens_on_sighup(settings, registry, stack)
            try:
                app.state.ctx = await start_service(settings, registry, stack)
            except StoreUnreachable as exc:
                await stack.aclose()  # what the attempt started
                if settings.mongodb.start_wait_seconds <= 0:
                    app.state.startup_failure = _cannot_start(exc)
                    raise
                waiting = asyncio.create_task(
                    _start_when_the_store_answers(app, settings, registry, stack, exc),
                    name="start-when-the-store-answers",
                )
                stack.push_async_callback(stop_task, waiting)
            except STARTUP_ERRORS as exc:
                # A database, broker or index out of reach is the operator's to fix: uvicorn
                # prints this line instead of a traceback (TwinApp), and exits with status 3.
                app.state.startup_failure = _cannot_start(exc)
                raise
            yield

    app = TwinApp(
        title="twin-service",
        version=__version__,
        description="Digital twin state: desired, reported, delta, live and attributes. "
        "HEAD is answered wherever GET is (as GET, without the body).",
        lifespan=lifespan,
        # A path no route takes is a 404, not a 307 to a neighbour that one does: a DELETE
        # of /twins/<id>%2F (or /twins/<id>/) was redirected, method kept, to the twin.
        redirect_slashes=False,
    )
    app.hot_routes = settings.api_hot_routes
    errors.install(app)
    # The routes go straight into the app's route list, ahead of the documentation routes
    # (matching is a linear scan) and in this order (streams before twins:
    # /twins/{id}/history must win over /twins/{id}/{section}). include_router() would wrap
    # each router in a sub-router that FastAPI matches twice per request (a fifth of a
    # twin GET's cost).
    ours = [
        route
        for router in (streams.router, twins.router, search.router, health.router)
        for route in router.routes
    ]
    # The whole-twin routes take most requests: they are tried first (no other route
    # matches their one-segment path).
    hot = [r for r in ours if getattr(r, "path", "") == "/api/v1/twins/{twin_id}"]
    app.router.routes[:0] = hot + [r for r in ours if r not in hot]
    _complete_openapi(app)
    return app


def _reload_tokens_on_sighup(
    settings: Settings, registry: TokenRegistry, stack: AsyncExitStack
) -> None:
    """SIGHUP reads the tokens file again, until the stack closes.

    Read once at start, a revoked token went on working until a restart (and SIGHUP, left
    to its default, ended the service). A file that cannot be used keeps the tokens in
    force; one that holds no token revokes all of its tokens (how to lock every client
    out without a restart). Open WebSocket connections and server-sent-event streams take
    their token's new role and namespaces, or end if it was revoked (``auth.Credential``).
    A SIGHUP noted while the service started (twin_service.hangup) is a reload as soon as
    the handler is set. Only in the main thread, where the service runs: signal handlers
    cannot be set in another (an app run by a test client).
    """
    if threading.current_thread() is not threading.main_thread():
        return
    loop = asyncio.get_running_loop()
    turn = asyncio.Lock()  # reloads one after another: the last signal's file wins
    reloads: set[asyncio.Task[None]] = set()

    async def reload() -> None:
        async with turn:
            if settings.auth.tokens_file is None:
                log.warning("SIGHUP: tokens not reloaded: auth.tokens_file is not set")
                return
            try:
                tokens = await asyncio.to_thread(configured_tokens, settings, empty_file=True)
            except ValueError as exc:
                log.error("SIGHUP: tokens not reloaded, those in force stay: %s", exc)
                return
            closed = registry.replace(tokens)
            if tokens:
                log.info("SIGHUP: tokens reloaded: %d in force", len(tokens))
            else:
                log.warning("SIGHUP: tokens reloaded: the tokens file holds none, none is accepted")
            if closed:
                log.info("SIGHUP: %d open streams of revoked tokens closed", closed)

    def hung_up() -> None:
        task = loop.create_task(reload(), name="reload-tokens")
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    async def stop() -> None:
        loop.remove_signal_handler(signal.SIGHUP)
        for task in list(reloads):
            await stop_task(task)

    loop.add_signal_handler(signal.SIGHUP, hung_up)
    stack.push_async_callback(stop)
    if hangup.arrived():  # while the service started (twin_service.hangup)
        hung_up()


def _complete_openapi(app: FastAPI) -> None:
    """What FastAPI's generated document does not know: the bearer token, and that no
    request is ever answered 422."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        schema = generate()  # built once, then cached by FastAPI
        _declare_bearer_auth(schema)
        _drop_validation_422(schema)
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def _declare_bearer_auth(schema: dict[str, Any]) -> None:
    """The bearer token is the security scheme of every operation.

    The routes read the Authorization header themselves (see ``api.deps``); operations
    open to anyone (health) declare ``security: []``.
    """
    schemes = schema.setdefault("components", {}).setdefault("securitySchemes", {})
    schemes["bearer"] = {
        "type": "http",
        "scheme": "bearer",
        "description": "A token of the service (admin-token file, auth.tokens).",
    }
    schema["security"] = [{"bearer": []}]


def _drop_validation_422(schema: dict[str, Any]) -> None:
    """FastAPI documents a 422 on every operation with parameters; the service answers
    invalid parameters 400 ``request.invalid`` in the one error body (``api.errors``)."""
    for item in schema.get("paths", {}).values():
        for operation in item.values():
            operation.get("responses", {}).pop("422", None)
    schemas = schema.get("components", {}).get("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)


#: What a start can fail with for reasons outside the service (unreachable or unusable
#: database, broker, index or port): reported in one line. Anything else is a bug, and
#: keeps its traceback.
STARTUP_ERRORS = (TwinServiceError, OSError)


def _cannot_start(exc: BaseException) -> str:
    """The one line a failed start prints."""
    return f"twin-service cannot start: {_reason(exc)}"


def _reason(exc: BaseException) -> str:
    if not isinstance(exc, TwinServiceError):
        return str(exc)
    return f"{exc.message} ({exc.description})" if exc.description else exc.message


async def start_service(
    settings: Settings,
    tokens: TokenRegistry,
    stack: AsyncExitStack,
    components: list[Component] | None = None,
    *,
    must_exist: bool = False,
) -> AppContext:
    """Start the store, the index, the change feed and the components (by default those
    the settings ask for), in that order. ``must_exist``: see :func:`build_store`.

    Each part's stop is registered before its start, so a start that fails part way (a
    client opened, then its server out of reach) still closes what it opened; the stack
    stops everything in reverse order.
    """
    store = build_store(settings, must_exist=must_exist)
    await _begin(stack, "the store", store.open, store.close)
    service = TwinService(store, settings.limits.to_limits(), settings.default_namespace)
    index = build_index(settings, store)
    await _begin(stack, "the search index", index.start, index.stop)
    stream = settings.stream
    hub = EventHub(
        store,
        stream.poll_interval_seconds,
        stream.total_queue_bytes,
        readers_bound(stream.max_connections, _embedded_broker_connections(settings)),
    )
    await _begin(stack, "the event hub", hub.start, hub.stop)
    bus = build_bus(settings)
    await _begin(stack, "the bus", functools.partial(bus.start, hub.poke), bus.stop)

    async def announce(stored: StoredEvent, _twin: object) -> None:
        await bus.announce(stored.seq)

    service.add_listener(announce)
    ctx = AppContext(settings, store, service, tokens, index, hub)
    ctx.readiness["index"] = index.health
    ctx.readiness["bus"] = bus.describe
    ctx.readiness["streams"] = hub.health
    for component in _components(settings) if components is None else components:
        await _begin(stack, str(component), functools.partial(component.start, ctx), component.stop)
    return ctx


#: Attempts to start while the store does not answer: this far apart at first, doubling.
_START_RETRY_SECONDS = (1.0, 30.0)


async def _start_when_the_store_answers(
    app: FastAPI,
    settings: Settings,
    tokens: TokenRegistry,
    stack: AsyncExitStack,
    unreachable: StoreUnreachable,
) -> None:
    """Start again and again until the store answers, serving meanwhile.

    A replica (re)started while MongoDB is down used to exit, and Kubernetes restarts a
    container that keeps exiting later and later (up to 5 minutes apart), long after the
    store is back. Meanwhile ``/health`` answers (the process is alive), and ``/ready`` and
    every other request answer 503 ``service.starting`` (``app.state.starting``: why). The
    device sync is not running yet, so device messages wait at the broker. A failure other
    than the store not answering, or ``mongodb.start_wait_seconds`` passing, ends the
    process as a failed start does (status 3, see ``cli``).
    """
    give_up = time.monotonic() + settings.mongodb.start_wait_seconds
    delay, longest = _START_RETRY_SECONDS
    app.state.starting = _reason(unreachable)
    log.warning("the twin store does not answer; starting when it does: %s", app.state.starting)
    while True:
        left = give_up - time.monotonic()
        if left <= 0:
            _end_serving(app, _cannot_start(unreachable))
            return
        await asyncio.sleep(min(delay, left))
        delay = min(delay * 2, longest)
        attempt = AsyncExitStack()
        try:
            ctx = await start_service(settings, tokens, attempt)
        except StoreUnreachable as exc:
            await attempt.aclose()
            unreachable = exc
            app.state.starting = _reason(exc)
            continue
        except STARTUP_ERRORS as exc:
            await attempt.aclose()
            _end_serving(app, _cannot_start(exc))
            return
        except BaseException:  # cancelled by a shutdown meanwhile
            await attempt.aclose()
            raise
        stack.push_async_callback(attempt.aclose)
        app.state.ctx = ctx
        del app.state.starting
        log.warning("the twin store answers: the service has started")
        return


def _end_serving(app: FastAPI, failure: str) -> None:
    """End the server as a failed start would: ``cli`` (which sets ``state.end_serving``)
    prints ``failure`` and exits with status 3. Run another way, the app goes on answering
    503, with the failure logged."""
    app.state.starting = failure
    app.state.startup_failure = failure
    end_serving = getattr(app.state, "end_serving", None)
    if end_serving is None:
        log.error("%s", failure)
    else:
        end_serving()


def _embedded_broker_connections(settings: Settings) -> int:
    """The embedded broker's bounds on connections (devices, and logins under way), when it
    runs: they share the process's descriptors."""
    mqtt = settings.mqtt
    if not mqtt.enabled or settings.mqtt_url:
        return 0
    return mqtt.embedded_max_devices + mqtt.embedded_max_connecting


async def _begin(
    stack: AsyncExitStack,
    name: str,
    start: Callable[[], Awaitable[None]],
    stop: Callable[[], Awaitable[None]],
) -> None:
    async def stop_quietly() -> None:
        try:
            await stop()
        except Exception:  # the other parts still stop
            log.exception("stopping %s failed", name)

    stack.push_async_callback(stop_quietly)
    await start()


def _components(settings: Settings) -> list[Component]:
    """Background components started with the app (MQTT bridge, expiry sweeper...)."""
    from twin_service.expiry import ExpirySweeper

    components: list[Component] = [ExpirySweeper()]
    if settings.mqtt.enabled:
        from connectivity.sync import MqttSync

        components.append(MqttSync())
    return components
