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
from collections.abc import Awaitable, Callable

from fastapi import FastAPI
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from twin_service.api.errors import disconnected_response, error_response, unexpected_response
from twin_service.api.routes import twins
from twin_service.errors import TwinServiceError, Unavailable

PREFIX = "/api/v1/twins/"

Endpoint = Callable[[Request, str], Awaitable[Response]]
ENDPOINTS: dict[str, Endpoint] = {"GET": twins.get_twin, "PATCH": twins.patch_twin}


class TwinApp(FastAPI):
    """FastAPI, with the whole-twin GET and PATCH taken ahead of the framework."""

    hot_routes = True

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await super().__call__(scope, receive, self._startup_failure_in_one_line(send))
            return
        try:
            if self.hot_routes and scope["type"] == "http" and not self.root_path:
                endpoint = ENDPOINTS.get(scope["method"])
                path: str = scope["path"]
                if endpoint is not None and path.startswith(PREFIX):
                    twin_id = path[len(PREFIX) :]
                    # The route's own match: one non-empty path segment.
                    if twin_id and "/" not in twin_id:
                        await self._serve(endpoint, twin_id, scope, receive, send)
                        return
            await super().__call__(scope, receive, send)
        except asyncio.CancelledError:
            if scope["type"] != "http":
                raise
            # uvicorn cancels the requests still running when its graceful shutdown timeout
            # (Settings.shutdown_timeout_seconds) ends, and would answer them with a
            # plain-text 500. The request's task ends here, answered in the one error shape.
            await _answer_stopping(scope, receive, send)

    def _startup_failure_in_one_line(self, send: Send) -> Send:
        """Starlette reports a failed start with the traceback; for a failure the lifespan
        recognised (``state.startup_failure``, see ``api.app``) uvicorn prints its line."""

        async def relay(message: Message) -> None:
            failure = getattr(self.state, "startup_failure", None)
            if message["type"] == "lifespan.startup.failed" and failure:
                message = {**message, "message": failure}
            await send(message)

        return relay

    async def _serve(
        self, endpoint: Endpoint, twin_id: str, scope: Scope, receive: Receive, send: Send
    ) -> None:
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
