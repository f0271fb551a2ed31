"""Liveness, readiness and metrics (no authentication)."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from twin_service import __version__
from twin_service.api.context import AppContext
from twin_service.api.deps import context
from twin_service.api.schemas import ErrorBody
from twin_service.errors import BadRequest, TwinServiceError, Unavailable
from twin_service.metrics import CONTENT_TYPE, render

router = APIRouter(tags=["health"])


#: No token needed: overrides the service-wide bearer security scheme in the OpenAPI.
PUBLIC: dict[str, Any] = {"security": []}


@router.get("/health", summary="Liveness: the process answers", openapi_extra=PUBLIC)
async def health() -> dict[str, str]:
    return {"status": "ok", "version": __version__}


@router.get(
    "/ready",
    summary="Readiness: the store (and broker, index when configured) can serve",
    responses={
        400: {"model": ErrorBody, "description": "Unknown check in `require`"},
        503: {"description": "A dependency is not ready"},
    },
    openapi_extra=PUBLIC,
)
async def ready(
    request: Request,
    require: Annotated[
        str | None,
        Query(
            description="Comma-separated checks that decide the status code (all by default; "
            "the body shows every check either way). `store` suits a Kubernetes readiness "
            "probe: a search engine or broker that is down for every replica should not take "
            "every replica out of the Service, since twins are still read and written."
        ),
    ] = None,
) -> JSONResponse:
    checks, starting = await _checks(request)
    if starting:
        return JSONResponse({"status": "starting", "checks": checks}, status_code=503)
    counted = set(checks) if require is None else {n.strip() for n in require.split(",")}
    unknown = sorted(counted - set(checks))
    if unknown:
        raise BadRequest(
            f"Unknown readiness check(s) {', '.join(unknown)}: this service has "
            f"{', '.join(checks)}.",
            code="request.invalid",
        )
    ok = all(checks[name].get("status") == "up" for name in counted)
    return JSONResponse(
        {"status": "ready" if ok else "unavailable", "checks": checks},
        status_code=200 if ok else 503,
    )


@router.get(
    "/metrics",
    summary="The readiness figures as Prometheus metrics",
    response_class=PlainTextResponse,
    responses={200: {"content": {CONTENT_TYPE: {}}, "description": "Text exposition 0.0.4"}},
    openapi_extra=PUBLIC,
)
async def metrics(request: Request) -> Response:
    checks, starting = await _checks(request)
    body = render(checks, version=__version__, starting=starting, requests=request.app.requests)
    return Response(body, media_type=CONTENT_TYPE)


async def _checks(request: Request) -> tuple[dict[str, dict[str, Any]], bool]:
    """Every check's answer, the store's first (a check is up when its ``status`` is), and
    whether the service is still starting: then only the store's, down, with why it waits
    (api.app).

    The checks run side by side, each for at most ``ready_check_timeout_seconds``: a search
    engine that accepts connections and never answers held ``/ready?require=store`` for the
    client's whole request timeout (30 s), so a probe that requires only the store failed
    on every replica at once.
    """
    try:
        ctx = context(request)
    except Unavailable:
        return {"store": {"status": "down", "error": request.app.state.starting}}, True
    probes: dict[str, Callable[[], Any]] = {"store": lambda: _store_check(ctx)}
    probes.update(ctx.readiness)
    tasks = {name: asyncio.ensure_future(_answer(probe)) for name, probe in probes.items()}
    limit = ctx.settings.ready_check_timeout_seconds
    await asyncio.wait(tasks.values(), timeout=limit)
    checks: dict[str, dict[str, Any]] = {}
    for name, task in tasks.items():
        if task.done():
            checks[name] = task.result()
        else:
            task.cancel()
            # A late failure of a check given up on is not an error of this request.
            task.add_done_callback(lambda t: t.cancelled() or t.exception())
            checks[name] = {"status": "down", "error": f"no answer within {limit:g} s"}
    return checks, False


async def _answer(probe: Callable[[], Any]) -> dict[str, Any]:
    result = probe()
    if inspect.isawaitable(result):
        result = await result
    answer: dict[str, Any] = result
    return answer


async def _store_check(ctx: AppContext) -> dict[str, Any]:
    try:
        await ctx.store.ping()
    except TwinServiceError as exc:
        return {"status": "down", "error": exc.message}
    service = ctx.service
    writes: dict[str, object] = {
        "committed": service.committed,
        "retried": service.retried,
        "failed": service.failed,
    }
    if service.last_failure is not None:
        writes["lastError"], writes["lastErrorAt"] = service.last_failure
    return {"status": "up", **ctx.store.describe(), "writes": writes}
