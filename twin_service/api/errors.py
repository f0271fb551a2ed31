"""The one place where errors become HTTP responses: one JSON body for every failure."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import Match

from twin_service.api.head import ASKED_METHOD
from twin_service.errors import TwinServiceError, Unavailable

log = logging.getLogger(__name__)

_STARLETTE_CODES = {
    404: "resource.notfound",
    405: "request.method",
    406: "request.notacceptable",
    413: "request.toolarge",
}


def error_headers(error: TwinServiceError) -> dict[str, str]:
    """The headers that go with ``error``'s body."""
    if error.status == 401:
        return {"WWW-Authenticate": "Bearer"}
    if isinstance(error, Unavailable) and error.retry_after_seconds is not None:
        # Clients and proxies back off by this rather than hammer a store, index or
        # broker that is restarting.
        return {"Retry-After": str(error.retry_after_seconds)}
    return {}


def error_response(error: TwinServiceError) -> JSONResponse:
    headers = error_headers(error)
    return JSONResponse(error.to_body(), status_code=error.status, headers=headers or None)


def _body(status: int, code: str, message: str, description: str = "") -> JSONResponse:
    return JSONResponse(
        {"status": status, "error": code, "message": message, "description": description},
        status_code=status,
    )


def unexpected_response(_exc: Exception) -> JSONResponse:
    log.exception("unexpected error")
    response = _body(500, "service.internal", "Internal error; see the service log.")
    # Starlette raises the exception again once this is sent, and uvicorn then closes the
    # connection: said here, the client opens a new one for its next request instead of
    # sending it on the closed one (a reset).
    response.headers["Connection"] = "close"
    return response


def disconnected_response(request: Request) -> Response:
    # The client went away while its body was being read: nobody gets this answer, and
    # it is not a server error worth a traceback in the log.
    log.debug("client disconnected during %s %s", request.method, request.url.path)
    return Response(status_code=499)


def allowed_methods(app: FastAPI, request: Request) -> list[str]:
    """Every method some route of ``app`` takes at the request's path (RFC 9110 asks a 405
    to list them in ``Allow``), HEAD wherever GET is (api.head). Starlette names only the
    methods of the first route whose path matched, while each method of a path here is a
    route of its own."""
    methods: set[str] = set()
    for route in app.router.routes:
        match, _ = route.matches(request.scope)
        if match is not Match.NONE:
            methods.update(getattr(route, "methods", None) or ())
    if "GET" in methods:
        methods.add("HEAD")
    return sorted(methods)


def install(app: FastAPI) -> None:
    @app.exception_handler(TwinServiceError)
    async def _twin_error(_: Request, exc: TwinServiceError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = "/".join(str(p) for p in first.get("loc", ()))
        return _body(
            400, "request.invalid", f"Invalid request at {where}: {first.get('msg', 'invalid')}."
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _STARLETTE_CODES.get(exc.status_code, "request.invalid")
        if exc.status_code != 405:
            return _body(exc.status_code, code, str(exc.detail))
        allowed = ", ".join(allowed_methods(app, request))
        # The usual case: a write to what the service computes (delta, lifecycle, ...).
        method = request.scope.get(ASKED_METHOD, request.method)
        message = f"{method} is not allowed on {request.url.path}; it takes {allowed}."
        response = _body(405, code, message)
        response.headers["Allow"] = allowed
        return response

    @app.exception_handler(ClientDisconnect)
    async def _gone(request: Request, _: ClientDisconnect) -> Response:
        return disconnected_response(request)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        return unexpected_response(exc)
