"""Liveness and readiness (no authentication)."""

from __future__ import annotations

import inspect
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from twin_service import __version__
from twin_service.api.deps import Context
from twin_service.errors import TwinServiceError

router = APIRouter(tags=["health"])


#: No token needed: overrides the service-wide bearer security scheme in the OpenAPI.
PUBLIC: dict[str, Any] = {"security": []}


@router.get("/health", summary="Liveness: the process answers", openapi_extra=PUBLIC)
async def health() -> dict[str, str]:
    return {"status": "ok", "version": __version__}


@router.get(
    "/ready",
    summary="Readiness: the store (and broker, index when configured) can serve",
    responses={503: {"description": "A dependency is not ready"}},
    openapi_extra=PUBLIC,
)
async def ready(ctx: Context) -> JSONResponse:
    checks: dict[str, object] = {}
    ok = True
    try:
        await ctx.store.ping()
        writes = {"committed": ctx.service.committed, "retried": ctx.service.retried}
        checks["store"] = {"status": "up", **ctx.store.describe(), "writes": writes}
    except TwinServiceError as exc:
        ok = False
        checks["store"] = {"status": "down", "error": exc.message}
    for name, probe in ctx.readiness.items():
        result = probe()
        if inspect.isawaitable(result):
            result = await result
        checks[name] = result
        if isinstance(result, dict) and result.get("status") != "up":
            ok = False
    return JSONResponse(
        {"status": "ready" if ok else "unavailable", "checks": checks},
        status_code=200 if ok else 503,
    )
