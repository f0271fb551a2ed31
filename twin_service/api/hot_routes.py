"""The two most frequent requests, served without FastAPI's request machinery.

A whole-twin ``GET`` or ``PATCH /api/v1/twins/{id}`` is handed to the same endpoint
functions as through FastAPI (:mod:`twin_service.api.routes.twins`), with the same
authentication, preconditions, service call and error bodies; only the framework's layers
around them are skipped: the middleware stack, the linear route match, dependency
resolution and the per-request exit stack. Those layers cost a PATCH's event loop about as
much as the twin logic itself (py-spy, ``bench.rest``). Every other request, and these two
when ``api_hot_routes`` is off, go through FastAPI as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import unquote_to_bytes

from fastapi import FastAPI
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send
from starlette.websockets import WebSocketClose

from twin_service.api.errors import disconnected_response, error_response, unexpected_response
from twin_service.api.head import as_get
from twin_service.api.http_protocol import answered_status
from twin_service.api.routes import twins
from twin_service.errors import BadRequest, TwinServiceError, Unavailable
from twin_service.metrics import RequestMetrics

PREFIX = "/api/v1/twins/"
#: The route label of the requests served here: FastAPI's template of the same route.
HOT_ROUTE = "/api/v1/twins/{twin_id}"
#: The route label of a request no route matched (a 404 or a request refused before routing).
UNMATCHED = "unmatched"

BAD_QUERY = BadRequest("The query string is not valid percent-encoded UTF-8.")

Endpoint = Callable[[Request, str], Awaitable[Response]]
ENDPOINTS: dict[str, Endpoint] = {"GET": twins.get_twin, "PATCH": twins.patch_twin}


class TwinApp(FastAPI):
    """FastAPI, with the whole-twin GET and PATCH taken ahead of the framework, every HEAD
    served as its GET without the body (api.head), and every HTTP request counted for
    ``GET /metrics``."""

    hot_routes = True

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.requests = RequestMetrics()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await super().__call__(scope, receive, self._startup_failure_in_one_line(send))
            return
        if scope["type"] == "websocket":
            try:  # as on HTTP: /api%2Fv1/ws was /api/v1/ws past a proxy's prefix rule
                twins.refuse_encoded_slash(scope)
            except TwinServiceError:
                await WebSocketClose()(scope, receive, send)  # as for a path of no route
                return
        if scope["type"] != "http":
            await super().__call__(scope, receive, send)
            return
        start = time.perf_counter()
        method: str = scope["method"]
        if method == "HEAD":  # served as its GET, here for every route (api.head)
            scope, receive, send = as_get(scope, receive, send)
        try:
            if not _query_is_utf8(scope["query_string"]):
                await error_response(BAD_QUERY)(scope, receive, send)
                self.requests.observe(method, UNMATCHED, 400, time.perf_counter() - start)
                return
            try:  # before any route is sought, the hot ones included
                twins.refuse_encoded_slash(scope)
            except TwinServiceError as exc:
                await error_response(exc)(scope, receive, send)
                self.requests.observe(method, UNMATCHED, exc.status, time.perf_counter() - start)
                return
            if self.hot_routes and not self.root_path:
                endpoint = ENDPOINTS.get(scope["method"])
                path: str = scope["path"]
                if endpoint is not None and path.startswith(PREFIX):
                    twin_id = path[len(PREFIX) :]
                    # The route's own match: one non-empty path segment.
                    if twin_id and "/" not in twin_id:
                        status = await self._serve(endpoint, twin_id, scope, receive, send)
                        elapsed = time.perf_counter() - start
                        status = answered_status(scope, status)
                        self.requests.observe(method, HOT_ROUTE, status, elapsed)
                        return
            await self._through_fastapi(method, scope, receive, send, start)
        except asyncio.CancelledError:
            # uvicorn cancels the requests still running when its graceful shutdown timeout
            # (Settings.shutdown_timeout_seconds) ends, and would answer them with a
            # plain-text 500. The request's task ends here, answered in the one error shape.
            await _answer_stopping(scope, receive, send)

    async def _through_fastapi(
        self, method: str, scope: Scope, receive: Receive, send: Send, start: float
    ) -> None:
        # What uvicorn answers a request the app failed without answering.
        status = 500

        async def send_noting_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        def count() -> None:
            route = getattr(scope.get("route"), "path_format", UNMATCHED)
            answered = answered_status(scope, status)
            self.requests.observe(method, route, answered, time.perf_counter() - start)

        try:
            await super().__call__(scope, receive, send_noting_status)
        except Exception:  # answered 500 by Starlette, which raises it again for uvicorn's log
            count()
            raise
        # Not a request cut by the end of a shutdown (CancelledError): the counters end with
        # the process.
        count()

    def _startup_failure_in_one_line(self, send: Send) -> Send:
        """Starlette reports a failed start with the traceback, which uvicorn logs; for a
        failure the lifespan recognised (``state.startup_failure``, see ``api.app``) there is
        nothing to log: ``cli`` prints that line once uvicorn has stopped."""

        async def relay(message: Message) -> None:
            failure = getattr(self.state, "startup_failure", None)
            if message["type"] == "lifespan.startup.failed" and failure:
                message = {**message, "message": ""}
            await send(message)

        return relay

    async def _serve(
        self, endpoint: Endpoint, twin_id: str, scope: Scope, receive: Receive, send: Send
    ) -> int:
        """Answer with ``endpoint``; the status answered."""
        scope["app"] = self  # what Starlette sets, and Request.app reads
        request = Request(scope, receive)
        try:
            response = await endpoint(request, twin_id)
        except TwinServiceError as exc:
            response = error_response(exc)
        except ClientDisconnect:
            response = disconnected_response(request)
        except Exception as exc:
            response = unexpected_response(exc)
        await response(scope, receive, send)
        return response.status_code


def _query_is_utf8(query: bytes) -> bool:
    """Whether the query's percent-escapes spell UTF-8 (the HTTP parser already refuses
    raw bytes beyond ASCII). Starlette decodes them with replacement characters: a filter
    with ``%FF`` searched for U+FFFD, and answered 200."""
    if b"%" not in query:
        return True
    try:
        unquote_to_bytes(query).decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


async def _answer_stopping(scope: Scope, receive: Receive, send: Send) -> None:
    response = error_response(
        Unavailable(
            "The service stopped before this request completed; a write may or may not "
            "have been applied: read the twin, then retry.",
            code="service.stopping",
        )
    )
    response.headers["Connection"] = "close"
    # RuntimeError: the response had already started; OSError: the client is gone.
    with contextlib.suppress(RuntimeError, OSError):
        await response(scope, receive, send)
