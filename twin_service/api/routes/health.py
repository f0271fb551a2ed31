"""Liveness and readiness (no authentication)."""

from __future__ import annotations

import inspect
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse

from twin_service import __version__
from twin_service.api.deps import context
from twin_service.api.schemas import ErrorBody
from twin_service.errors import BadRequest, TwinServiceError, Unavailable

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
    try:
        ctx = context(request)
    except Unavailable:  # starting, until the store answers (api.app)
        down = {"status": "down", "error": request.app.state.starting}
        return JSONResponse({"status": "starting", "checks": {"store": down}}, status_code=503)
    known = ["store", *ctx.readiness]
    counted = set(known) if require is None else {n.strip() for n in require.split(",")}
    unknown = sorted(counted - set(known))
    if unknown:
        raise BadRequest(
            f"Unknown readiness check(s) {', '.join(unknown)}: this service has "
            f"{', '.join(known)}.",
            code="request.invalid",
        )
    checks: dict[str, object] = {}
    ok = True
    try:
        await ctx.store.ping()
        service = ctx.service
        writes: dict[str, object] = {
            "committed": service.committed,
            "retried": service.retried,
            "failed": service.failed,
        }
        if service.last_failure is not None:
            writes["lastError"], writes["lastErrorAt"] = service.last_failure
        checks["store"] = {"status": "up", **ctx.store.describe(), "writes": writes}
    except TwinServiceError as exc:
        if "store" in counted:
            ok = False
        checks["store"] = {"status": "down", "error": exc.message}
    for name, probe in ctx.readiness.items():
        result = probe()
        if inspect.isawaitable(result):
            result = await result
        checks[name] = result
        if name in counted and isinstance(result, dict) and result.get("status") != "up":
            ok = False
    return JSONResponse(
        {"status": "ready" if ok else "unavailable", "checks": checks},
        status_code=200 if ok else 503,
    )
