"""Reusable dependencies: context, authentication, JSON bodies, twin ids, preconditions."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal
from urllib.parse import unquote

from fastapi import Depends, Path, Request
from starlette.requests import HTTPConnection
from starlette.types import Scope

from twin_service.api.context import AppContext
from twin_service.api.etags import parse_tags, strong_revisions
from twin_service.auth import Credential, Principal
from twin_service.digits import ascii_decimal, ascii_integer
from twin_service.errors import BadRequest, PayloadTooLarge, Unavailable, UnsupportedMediaType
from twin_service.service import Amend, Preconditions
from twin_service.twin.ids import MAX_ID_LENGTH, TWIN_ID_PATTERN
from twin_service.twin.jsonvalue import loads_strict
from twin_service.twin.lifecycle import MAX_TTL_SECONDS, lifecycle_amend_ttl
from twin_service.twin.patch import split_pointer
from twin_service.twin.pointer import unescape_token
from twin_service.types import JSON


# Dependencies are ``async def`` although they never await: FastAPI runs plain ``def``
# dependencies in a worker thread, and those hops cost more than the work itself.
def context(connection: HTTPConnection) -> AppContext:
    """The context of a request or WebSocket (also for the hot routes that skip the
    ``Context`` dependency)."""
    try:
        ctx: AppContext = connection.app.state.ctx
    except AttributeError:
        raise _starting() from None
    return ctx


def _starting() -> Unavailable:
    """What a request gets while the service waits for its store to start (``api.app``);
    the store's own error is for ``/ready`` and the log."""
    return Unavailable(
        "twin-service is starting: its twin store does not answer yet.",
        code="service.starting",
        description="The service serves once its store answers; try again later "
        "(GET /ready says why it waits).",
    )


async def get_context(request: Request) -> AppContext:
    return context(request)


Context = Annotated[AppContext, Depends(get_context)]


@dataclass(frozen=True)
class RawParam:
    """A parameter that a hot route reads from the request itself.

    FastAPI spends several microseconds per declared parameter (and per dependency) on every
    request, a large share of a cached twin GET; such a route declares its parameters in
    the OpenAPI with :func:`documented` and reads them with :meth:`get` / :meth:`get_int`,
    which fail like FastAPI's validation would (400 ``request.invalid``).
    """

    name: str
    location: Literal["query", "header"]
    description: str
    schema: dict[str, Any]

    def get(self, request: Request) -> str | None:
        if self.location == "query":
            return request.query_params.get(self.name)
        # A header sent on several lines is one comma-separated list (RFC 9110 section 5.3).
        lines = request.headers.getlist(self.name)
        return ", ".join(lines) if lines else None

    def get_positive_decimal(self, request: Request) -> float | None:
        raw = self.get(request)
        if raw is None:
            return None
        maximum = self.schema.get("maximum", float("inf"))
        # ASCII digits and an optional fraction only: float() also read "1_0" as 10, " +1"
        # as 1, "1e2" as 100 and "\u0661" (an Arabic-Indic one) as 1.
        value = ascii_decimal(raw)
        # A finite maximum also refuses infinity (too many digits for a float).
        if value is None or not value > 0 or value == float("inf") or value > maximum:
            most = "" if maximum == float("inf") else f" and <= {maximum}"
            raise BadRequest(
                f"Invalid request at {self.location}/{self.name}: expected a decimal number "
                f"> 0{most} (ASCII digits, optionally a fraction: 1.5), got {raw!r}."
            )
        return value

    def get_int(self, request: Request) -> int | None:
        raw = self.get(request)
        if raw is None:
            return None
        minimum, maximum = self.schema.get("minimum"), self.schema.get("maximum")
        # ASCII decimal digits only, a minus sign only where the schema allows negatives:
        # int() also read "\u0663" (an Arabic-Indic three) as 3, "3_0" as 30, " +3" as 3.
        negative = raw.startswith("-") and (minimum is None or minimum < 0)
        value = ascii_integer(raw[1:] if negative else raw)
        if value is not None and negative:
            value = -value
        if (
            value is None
            or (minimum is not None and value < minimum)
            or (maximum is not None and value > maximum)
        ):
            bounds = "" if minimum is None else f" >= {minimum}"
            bounds += "" if maximum is None else f" and <= {maximum}"
            raise BadRequest(
                f"Invalid request at {self.location}/{self.name}: expected an integer{bounds}, "
                f"got {raw!r}."
            )
        return value


def documented(*params: RawParam) -> dict[str, Any]:
    """``openapi_extra`` declaring ``params`` (appended to the generated parameters)."""
    return {
        "parameters": [
            {
                "name": p.name,
                "in": p.location,
                "required": False,
                "description": p.description,
                "schema": p.schema,
            }
            for p in params
        ]
    }


def _authenticate(request: Request) -> Principal:
    # The Authorization header is read here rather than declared as a parameter: it is
    # documented once, as the OpenAPI bearer security scheme (see app.py), and every
    # declared parameter costs FastAPI noticeable time on each request.
    principal = context(request).tokens.authenticate(request.headers.get("authorization"))
    return principal


def read_access(request: Request) -> Principal:
    """The caller, who must be allowed to read (for routes that skip the dependency)."""
    principal = _authenticate(request)
    principal.require("read")
    return principal


def write_access(request: Request) -> Principal:
    """The caller, who must be allowed to write."""
    principal = _authenticate(request)
    principal.require("write")
    return principal


async def require_read(request: Request) -> Principal:
    return read_access(request)


async def require_write(request: Request) -> Principal:
    return write_access(request)


async def hold_reader(request: Request) -> Credential:
    """The caller's token for a stream that stays open: it follows reloads of the tokens
    (every role may read)."""
    return context(request).tokens.hold(request.headers.get("authorization"))


Reader = Annotated[Principal, Depends(require_read)]
StreamReader = Annotated[Credential, Depends(hold_reader)]
Writer = Annotated[Principal, Depends(require_write)]

#: A twin id path parameter. Routes check it with ``parse_twin_id`` (400 on a bad id) after
#: authentication, instead of through one more dependency per request.
TwinId = Annotated[
    str,
    Path(
        description="namespace:name",
        # Described, not enforced here: the routes' check answers with twin.id.invalid.
        json_schema_extra={"pattern": TWIN_ID_PATTERN, "maxLength": MAX_ID_LENGTH},
    ),
]


async def read_body(request: Request, ctx: AppContext) -> bytes:
    """The raw body, refusing anything over ``limits.max_request_bytes`` before reading it."""
    limit = ctx.settings.limits.max_request_bytes
    declared = request.headers.get("content-length")
    announced = None if declared is None else ascii_integer(declared)
    if announced is not None and announced > limit:
        raise PayloadTooLarge(
            f"Request body of {announced} bytes exceeds the limit of {limit} bytes.",
            code="request.toolarge",
            extra={"size": announced, "limit": limit},
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


_TEXT = {"type": "string"}
IF_MATCH = RawParam(
    "If-Match",
    "header",
    "Write only if the twin is at one of these strong ETags (or exists, for *)",
    _TEXT,
)
IF_NONE_MATCH_WRITE = RawParam(
    "If-None-Match",
    "header",
    "Only *: write only if the twin does not exist",
    {"type": "string", "enum": ["*"]},
)
CONDITION = RawParam("condition", "query", "RQL that must hold for the current twin.", _TEXT)
TTL = RawParam(
    "ttl",
    "query",
    "Seconds after which desired values written here that the device has not applied "
    "become 'expired' in the lifecycle: ASCII digits, optionally a fraction (90, 0.5).",
    {"type": "number", "exclusiveMinimum": 0, "maximum": MAX_TTL_SECONDS},
)
#: The parameters :func:`request_preconditions` reads, for ``documented``.
PRECONDITIONS = (IF_MATCH, IF_NONE_MATCH_WRITE, CONDITION)
#: The parameters :func:`write_options` reads, for ``documented``.
WRITE_OPTIONS = (*PRECONDITIONS, TTL)


def request_preconditions(request: Request) -> Preconditions:
    """The preconditions of a write (``If-Match``, ``If-None-Match: *``, ``condition``).

    Every write route reads them itself (see :class:`RawParam`) and documents them with
    ``documented(*PRECONDITIONS)`` or ``documented(*WRITE_OPTIONS)``.
    """
    query = bool(request.scope.get("query_string"))
    return parse_preconditions(
        IF_MATCH.get(request),
        IF_NONE_MATCH_WRITE.get(request),
        CONDITION.get(request) if query else None,
    )


def write_options(request: Request) -> tuple[Preconditions, Amend | None]:
    """:func:`request_preconditions`, and the lifecycle amend of a ``ttl``, if given."""
    ttl = TTL.get_positive_decimal(request) if request.scope.get("query_string") else None
    conditions = request_preconditions(request)
    return conditions, (lifecycle_amend_ttl(ttl) if ttl is not None else None)


def parse_preconditions(
    if_match: str | None, if_none_match: str | None, condition: str | None
) -> Preconditions:
    match_revisions = None
    match_any = False
    if if_match is not None:
        tags = parse_tags("If-Match", if_match)
        if tags is None:
            match_any = True
        elif not tags:
            raise BadRequest("If-Match is empty: give '*' or the ETags to write at.")
        else:
            match_revisions = strong_revisions(tags)
    none_match_any = False
    if if_none_match is not None:
        if parse_tags("If-None-Match", if_none_match) is not None:
            raise BadRequest("On writes, If-None-Match only supports '*'.")
        none_match_any = True
    node = None
    if condition is not None:
        from search.rql.parser import parse_filter

        node = parse_filter(condition)
    return Preconditions(match_revisions, match_any, none_match_any, node)


def raw_segments(scope: Scope) -> list[str]:
    """The segments of the request's path as sent (below the root path), still
    percent-encoded: the first is the empty one before the leading slash."""
    raw: bytes = scope.get("raw_path") or scope["path"].encode()
    root = scope.get("root_path", "")
    path = raw.decode("latin-1")
    if root and path.startswith(root):
        path = path[len(root) :]
    return path.split("/")


def pointer_after(request: Request, fixed_segments: int) -> list[str]:
    """Unescaped JSON pointer tokens from the raw URL path after ``fixed_segments`` segments.

    The raw path is used so that ``%2F`` inside a segment stays part of a key instead of
    splitting it; each segment is percent-decoded, then ``~1``/``~0`` unescaped (RFC 6901).
    """
    # A trailing slash is a last, empty token (RFC 6901): ``desired/fan/`` is the key ""
    # in ``fan``. Dropped, a DELETE of ``desired/fan/`` deleted ``fan``.
    segments = raw_segments(request.scope)[fixed_segments + 1 :]
    try:
        decoded = [unquote(segment, errors="strict") for segment in segments]
    except UnicodeDecodeError as exc:
        raise BadRequest("The pointer is not valid percent-encoded UTF-8.") from exc
    return [_pointer_token(s) for s in decoded]


def _pointer_token(token: str) -> str:
    """RFC 6901 token unescaping; a ``~`` not followed by 0 or 1 is an error."""
    if "~" in token:
        split_pointer("/" + token)  # raises InvalidPointer on a bad escape
    return unescape_token(token)
