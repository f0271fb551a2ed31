"""Reusable dependencies: context, authentication, JSON bodies, twin ids, preconditions."""

from __future__ import annotations

from typing import Annotated
from urllib.parse import unquote

from fastapi import Depends, Header, Path, Query, Request

from twin_service.api.context import AppContext
from twin_service.auth import Principal
from twin_service.errors import BadRequest, PayloadTooLarge, UnsupportedMediaType
from twin_service.service import Amend, Preconditions
from twin_service.twin.ids import parse_twin_id
from twin_service.twin.jsonvalue import loads_strict
from twin_service.twin.lifecycle import lifecycle_amend_ttl
from twin_service.twin.patch import split_pointer
from twin_service.types import JSON


# Dependencies are ``async def`` although they never await: FastAPI runs plain ``def``
# dependencies in a worker thread, and those hops cost more than the work itself.
async def get_context(request: Request) -> AppContext:
    ctx: AppContext = request.app.state.ctx
    return ctx


Context = Annotated[AppContext, Depends(get_context)]


async def authenticate(
    ctx: Context, authorization: Annotated[str | None, Header()] = None
) -> Principal:
    return ctx.tokens.authenticate(authorization)


async def require_read(principal: Annotated[Principal, Depends(authenticate)]) -> Principal:
    principal.require("read")
    return principal


async def require_write(principal: Annotated[Principal, Depends(authenticate)]) -> Principal:
    principal.require("write")
    return principal


Reader = Annotated[Principal, Depends(require_read)]
Writer = Annotated[Principal, Depends(require_write)]


async def _twin_id(twin_id: Annotated[str, Path(description="namespace:name")]) -> str:
    parse_twin_id(twin_id)
    return twin_id


TwinId = Annotated[str, Depends(_twin_id)]


async def read_body(request: Request, ctx: AppContext) -> bytes:
    """The raw body, refusing anything over ``limits.max_request_bytes`` before reading it."""
    limit = ctx.settings.limits.max_request_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(
            f"Request body of {declared} bytes exceeds the limit of {limit} bytes.",
            code="request.toolarge",
            extra={"size": int(declared), "limit": limit},
        )
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(
                f"Request body exceeds the limit of {limit} bytes.",
                code="request.toolarge",
                extra={"limit": limit},
            )
        chunks.append(chunk)
    return b"".join(chunks)


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def json_body(request: Request, ctx: Context) -> JSON:
    """A strictly decoded JSON body with an ``application/json`` (or ``+json``) type."""
    kind = media_type(request)
    if kind != "application/json" and not kind.endswith("+json"):
        raise UnsupportedMediaType(
            f"Content-Type {kind or '(none)'!r} is not supported; send application/json."
        )
    raw = await read_body(request, ctx)
    if not raw:
        raise BadRequest(
            "The request body is empty; a JSON value is required.", code="json.invalid"
        )
    return loads_strict(raw)


Body = Annotated[JSON, Depends(json_body)]


def parse_etag_revision(value: str) -> int | None:
    """``"rev:N"`` (weak or strong) to N; ``None`` when it is not one of our ETags."""
    value = value.strip()
    if value.startswith("W/"):
        value = value[2:]
    if value.startswith('"rev:') and value.endswith('"') and value[5:-1].isdigit():
        return int(value[5:-1])
    return None


def etag(revision: int) -> str:
    return f'"rev:{revision}"'


async def preconditions(
    if_match: Annotated[str | None, Header()] = None,
    if_none_match: Annotated[str | None, Header()] = None,
    condition: Annotated[
        str | None, Query(description="RQL that must hold for the current twin.")
    ] = None,
) -> Preconditions:
    match_rev = None
    match_any = False
    if if_match is not None:
        if if_match.strip() == "*":
            match_any = True
        else:
            match_rev = parse_etag_revision(if_match)
            if match_rev is None:
                raise BadRequest(f"If-Match {if_match!r} is not an ETag of this service.")
    none_match_any = False
    if if_none_match is not None:
        if if_none_match.strip() != "*":
            raise BadRequest("On writes, If-None-Match only supports '*'.")
        none_match_any = True
    node = None
    if condition is not None:
        from search.rql.parser import parse_filter

        node = parse_filter(condition)
    return Preconditions(match_rev, match_any, none_match_any, node)


Conditions = Annotated[Preconditions, Depends(preconditions)]


async def ttl_amend(
    ttl: Annotated[
        float | None,
        Query(
            gt=0,
            description="Seconds after which desired values written here that the device "
            "has not applied become 'expired' in the lifecycle.",
        ),
    ] = None,
) -> Amend | None:
    return lifecycle_amend_ttl(ttl) if ttl is not None else None


DesiredTtl = Annotated[Amend | None, Depends(ttl_amend)]


def pointer_after(request: Request, fixed_segments: int) -> list[str]:
    """Unescaped JSON pointer tokens from the raw URL path after ``fixed_segments`` segments.

    The raw path is used so that ``%2F`` inside a segment stays part of a key instead of
    splitting it; each segment is percent-decoded, then ``~1``/``~0`` unescaped (RFC 6901).
    """
    raw: bytes = request.scope.get("raw_path") or request.url.path.encode()
    root = request.scope.get("root_path", "")
    path = raw.decode("latin-1")
    if root and path.startswith(root):
        path = path[len(root) :]
    segments = path.split("/")[fixed_segments + 1 :]
    if segments and segments[-1] == "":
        segments = segments[:-1]
    try:
        decoded = [unquote(segment, errors="strict") for segment in segments]
    except UnicodeDecodeError as exc:
        raise BadRequest("The pointer is not valid percent-encoded UTF-8.") from exc
    return [unescape_token(s) for s in decoded]


def unescape_token(token: str) -> str:
    """RFC 6901 token unescaping; a ``~`` not followed by 0 or 1 is an error."""
    if "~" in token:
        split_pointer("/" + token)  # raises InvalidPointer on a bad escape
    return token.replace("~1", "/").replace("~0", "~")
