"""Twin resources: whole twins, sections by JSON pointer, and read-only views."""

from __future__ import annotations

from typing import Annotated, Any, Literal, get_args
from urllib.parse import quote, unquote

from fastapi import APIRouter, Query, Request, Response
from starlette.convertors import Convertor, register_url_convertor
from starlette.types import Scope

from twin_service.api.context import AppContext
from twin_service.api.deps import (
    PRECONDITIONS,
    WRITE_OPTIONS,
    Body,
    Context,
    RawParam,
    Reader,
    TwinId,
    Writer,
    context,
    documented,
    json_body,
    parse_preconditions,
    pointer_after,
    raw_segments,
    read_access,
    request_preconditions,
    write_access,
    write_options,
)
from twin_service.api.etags import etag, parse_tags, weak_revisions
from twin_service.api.retained import holds_from, oldest_retained
from twin_service.api.schemas import (
    TwinDocument,
    TwinSelection,
    TwinWrite,
    errors,
    json_request_body,
)
from twin_service.auth import Principal
from twin_service.errors import BadRequest, Gone, NotFound, UnsupportedMediaType
from twin_service.service import Amend, EditFn, Outcome, Preconditions
from twin_service.store.base import MAX_SEQ
from twin_service.twin.document import Twin
from twin_service.twin.fields import DESCRIPTION as FIELDS_DESCRIPTION
from twin_service.twin.fields import parse_fields, select
from twin_service.twin.ids import MAX_GENERATED_NAMESPACE, generate_twin_id, parse_twin_id
from twin_service.twin.jsonvalue import dumps_bytes
from twin_service.twin.operations import (
    Edit,
    delete_at,
    json_patch_twin,
    merge_patch_twin,
    patch_at,
    put_at,
    replace_twin,
)
from twin_service.twin.patch import get_at, has_at
from twin_service.types import JSON

router = APIRouter(prefix="/api/v1", tags=["twins"])

Section = Literal["attributes", "desired", "reported", "live"]
View = Literal["delta", "connection", "metadata", "lifecycle"]


class _SectionSegment(Convertor[str]):
    """A path segment naming a writable section. The routes themselves say which resources
    exist, so a write to a read-only view is 405 (``Allow: GET``) and a segment that names
    nothing is 404, instead of a 400 from validating the parameter."""

    regex = "|".join(get_args(Section))

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


class _PartSegment(_SectionSegment):
    """A path segment naming a section or a read-only view."""

    regex = "|".join(get_args(Section) + get_args(View))


register_url_convertor("twin_section", _SectionSegment())
register_url_convertor("twin_part", _PartSegment())

Fields = Annotated[str | None, Query(description=FIELDS_DESCRIPTION)]
MERGE = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"
TWIN_BASE = 4  # raw path segments before a section: "", api, v1, twins, {id}
_TWINS = ["", "api", "v1", "twins"]


def refuse_encoded_slash(scope: Scope) -> None:
    """Refuse a path with ``%2F`` anywhere but in a JSON pointer, the one place where it is
    part of a key (api.deps.pointer_after).

    Routes are found on the decoded path, where it separates segments, while the pointer is
    read from the raw path, where it does not: the two disagreed, and ``desired%2Ffan``
    routed as section ``desired`` with the pointer ``""``, so its DELETE emptied
    ``desired``; ``<id>%2Fdesired`` routed as the twin's section. Before a pointer it
    names nothing: the twin id ``a:b/c``, which no twin can have, else no resource.
    """
    raw: bytes = scope.get("raw_path") or b""
    if b"%2f" not in raw.lower():  # the usual case: nothing to decode
        return
    segments = raw_segments(scope)
    first = next(i for i, s in enumerate(segments) if "%2f" in s.lower())
    under_twins = [unquote(s) for s in segments[: len(_TWINS)]] == _TWINS
    if under_twins and first > TWIN_BASE + 1:  # a pointer
        return
    if under_twins and first == TWIN_BASE:
        parse_twin_id(unquote(segments[TWIN_BASE]))  # raises InvalidTwinId: it has a '/'
    raise NotFound(
        "No resource at this path: an encoded slash (%2F) is part of a key inside a JSON "
        "pointer, and names nothing before one.",
        code="resource.notfound",
    )


def json_response(value: JSON, status: int = 200, revision: int | None = None) -> Response:
    return _encoded_response(dumps_bytes(value), status, revision)


def _encoded_response(body: bytes, status: int = 200, revision: int | None = None) -> Response:
    headers = {"ETag": etag(revision)} if revision is not None else None
    return Response(body, status_code=status, media_type="application/json", headers=headers)


def written(response: Response, outcome: Outcome) -> Response:
    """Headers of every write response: the new ETag, and ``X-Twin-Seq``, the write's
    journal sequence number (to resume streams from, or to wait for in a search)."""
    if outcome.twin is not None:
        response.headers["ETag"] = etag(outcome.twin.revision)
    response.headers["X-Twin-Seq"] = str(outcome.stored.seq)
    return response


def _visible(principal: Principal, twin_id: str) -> None:
    namespace, _ = parse_twin_id(twin_id)
    principal.check_namespace(namespace)


async def _commit(
    request: Request,
    ctx: AppContext,
    twin_id: str,
    edit: EditFn,
    *,
    preconditions: Preconditions,
    may_create: bool = False,
    amend: Amend | None = None,
) -> Outcome:
    """``ctx.service.mutate`` for the caller's token as the tokens in force say now, every
    write route's commit.

    The routes check the token when the headers arrive, before reading a body; it is
    checked again here, once the body was read, as a new request would be (401 revoked, 403
    demoted or kept from the namespace): checked only then, a write whose body was still
    arriving at a reload was committed with rights the token no longer had, however long
    after. A token accepted before costs a dictionary lookup (``TokenRegistry``).
    """
    principal = write_access(request)
    _visible(principal, twin_id)
    return await ctx.service.mutate(
        twin_id,
        edit,
        origin=principal.name,
        preconditions=preconditions,
        may_create=may_create,
        amend=amend,
    )


def _read_if_match(request: Request) -> Preconditions | None:
    """A read's ``If-Match``, parsed as a write's (a malformed one is 400 before the read)."""
    value = IF_MATCH_READ.get(request)
    return None if value is None else parse_preconditions(value, None, None)


def _conditional_read(
    request: Request, if_match: Preconditions | None, twin: Twin
) -> Response | None:
    """The answer of a read's preconditions about ``twin`` (the revision it answers), else
    ``None``: in the order of RFC 9110 section 13.2.2, ``If-Match`` first (the 412 a write
    gives), then ``If-None-Match`` (304).

    Called once the read would be a 200: the conditions of a 404 or 410 are not evaluated
    (section 13.2.1).
    """
    if if_match is not None:
        if_match.check(twin)
    if_none_match = IF_NONE_MATCH.get(request)
    if if_none_match is None:
        return None
    tags = parse_tags("If-None-Match", if_none_match)
    if tags is None or twin.revision in weak_revisions(tags):
        return Response(status_code=304, headers={"ETag": etag(twin.revision)})
    return None


_NAMESPACE = RawParam(
    "namespace",
    "query",
    "Namespace of the generated id (default_namespace when not given or empty): dotted "
    "words starting with a letter",
    {"type": "string", "maxLength": MAX_GENERATED_NAMESPACE},
)


@router.post(
    "/twins",
    status_code=201,
    response_model=TwinDocument,
    responses=errors(412, 413, 415, 507),
    openapi_extra={
        **json_request_body(TwinWrite.model_json_schema()),
        **documented(_NAMESPACE, *WRITE_OPTIONS),
    },
    summary="Create a twin with a generated id in the default namespace",
)
async def create_twin(request: Request, ctx: Context, principal: Writer, body: Body) -> Response:
    # The preconditions and ttl of PUT: a new twin has no current representation, so any
    # If-Match or condition fails (412, RFC 9110 13.1.1) and If-None-Match: * holds.
    conditions, ttl = write_options(request)
    twin_id = generate_twin_id(_NAMESPACE.get(request) or ctx.settings.default_namespace)
    _visible(principal, twin_id)
    edit = (
        replace_twin(body, twin_id) if not isinstance(body, dict) or "twinId" not in body else None
    )
    if edit is None:
        raise BadRequest("POST generates the twin id; use PUT /twins/{id} to choose one.")
    return await _write_whole(request, ctx, twin_id, edit, conditions, ttl)


@router.get(
    "/twins",
    response_model=list[TwinDocument | TwinSelection],
    responses=errors(),
    summary="Get several twins at once (missing or invisible ones are left out)",
)
async def get_twins(
    ctx: Context,
    principal: Reader,
    ids: Annotated[str, Query(description="Comma-separated twin ids")],
    fields: Fields = None,
) -> Response:
    # Each once, in the order first asked for.
    wanted = list(dict.fromkeys(i for i in (s.strip() for s in ids.split(",")) if i))
    if len(wanted) > ctx.settings.query.max_size:
        raise BadRequest(f"At most {ctx.settings.query.max_size} ids per request.")
    for twin_id in wanted:
        parse_twin_id(twin_id)
    paths = parse_fields(fields)
    twins = await ctx.store.get_many(wanted)
    return json_response(
        [select(t.to_document(), paths) for t in twins if principal.may_see(t.namespace)]
    )


FIELDS = RawParam(
    "fields",
    "query",
    FIELDS_DESCRIPTION,
    {"type": "string"},
)
AT = RawParam(
    "at",
    "query",
    "Reconstruct the twin as of this revision",
    {"type": "integer", "minimum": 1, "maximum": MAX_SEQ},
)
IF_NONE_MATCH = RawParam(
    "If-None-Match", "header", "ETags (or *) for which to answer 304", {"type": "string"}
)
IF_MATCH_READ = RawParam(
    "If-Match",
    "header",
    "Answer only if the twin is at one of these strong ETags (or exists, for *), else 412",
    {"type": "string"},
)
_NOT_MODIFIED: dict[int | str, dict[str, Any]] = {304: {"description": "Not modified"}}


async def _as_of(ctx: AppContext, twin_id: str, at: int | None) -> Twin:
    """The twin, or as it was at revision ``at`` (rebuilt from the journal): 404 for a
    revision it never had, 410 for one no longer retained."""
    twin = await ctx.service.get(twin_id)
    if at is None or at == twin.revision:
        return twin
    if at > twin.revision:
        raise NotFound(
            f"Twin {twin_id} is at revision {twin.revision}; revision {at} does not exist.",
            code="revision.notfound",
        )
    old = await ctx.store.twin_at(twin_id, at)
    if old is None:
        journaled = await ctx.store.history(twin_id, at, at)
        if journaled and journaled[-1].event.action == "deleted":
            raise NotFound(
                f"Revision {at} of {twin_id} is the deletion of an earlier twin of this id: "
                "no twin is at that revision.",
                code="revision.notfound",
            )
        # Not journaled, though the journal holds the id's history from there on: a
        # revision the twin never had here (one a restore's renumbering skipped, or
        # before a twin created past a restore's floor), not a pruned one.
        first = await oldest_retained(ctx.store, twin_id)
        if first is not None and await holds_from(ctx.store, twin_id, first, at):
            raise NotFound(
                f"Twin {twin_id} never had revision {at} in this database.",
                code="revision.notfound",
            )
        raise Gone(
            f"Revision {at} of twin {twin_id} is no longer retained in the journal.",
            extra=None if first is None else {"oldestRevision": first.event.revision},
        )
    return old


@router.get(
    "/twins/{twin_id}",
    # With ``fields``, only the selected parts.
    response_model=TwinDocument | TwinSelection,
    responses={**errors(404, 410, 412), **_NOT_MODIFIED},
    openapi_extra=documented(FIELDS, AT, IF_MATCH_READ, IF_NONE_MATCH),
)
async def get_twin(request: Request, twin_id: TwinId) -> Response:
    # The most frequent request: access and parameters are checked here rather than through
    # dependencies and declared parameters, which cost FastAPI more than the rest of a
    # cached read (see RawParam).
    principal = read_access(request)
    ctx = context(request)
    fields = at = None
    if request.scope.get("query_string"):  # most GETs have none: skip parsing it
        fields, at = FIELDS.get(request), AT.get_int(request)
    _visible(principal, twin_id)
    # Before the read: a bad selector or If-Match is a 400 whether or not the twin is there.
    paths = parse_fields(fields)
    if_match = _read_if_match(request)
    twin = await _as_of(ctx, twin_id, at)
    if (conditional := _conditional_read(request, if_match, twin)) is not None:
        return conditional
    if paths is None:
        return _encoded_response(twin.document_json, revision=twin.revision)
    return json_response(select(twin.to_document(), paths), revision=twin.revision)


@router.put(
    "/twins/{twin_id}",
    response_model=TwinDocument,
    status_code=200,
    responses={**errors(404, 409, 412, 413, 415, 507), 201: {"model": TwinDocument}},
    openapi_extra={
        **json_request_body(TwinWrite.model_json_schema()),
        **documented(*WRITE_OPTIONS),
    },
    summary="Create (201) or replace (200) a twin",
)
async def put_twin(
    request: Request, ctx: Context, principal: Writer, twin_id: TwinId, body: Body
) -> Response:
    conditions, ttl = write_options(request)
    _visible(principal, twin_id)
    edit = replace_twin(body, twin_id)
    return await _write_whole(request, ctx, twin_id, edit, conditions, ttl)


async def _write_whole(
    request: Request,
    ctx: AppContext,
    twin_id: str,
    edit: Edit,
    conditions: Preconditions,
    ttl: Amend | None,
) -> Response:
    """Create or replace a whole twin (PUT, and POST's new id): 201 with its Location when
    it was created, else 200."""
    outcome = await _commit(
        request,
        ctx,
        twin_id,
        lambda _: edit,
        preconditions=conditions,
        may_create=True,
        amend=ttl,
    )
    assert outcome.twin is not None
    response = json_response(outcome.twin.to_document(), 201 if outcome.created else 200)
    if outcome.created:
        # Encoded: a name's '%' is its own (``x%41`` sent as ``x%2541``), and left bare the
        # Location named another twin (``xA``). Every other character of a name is one a
        # path segment may hold as it is (RFC 3986 pchar), ':' included.
        location = quote(twin_id, safe=":@!$&'()*+,;=")
        response.headers["Location"] = f"/api/v1/twins/{location}"
    return written(response, outcome)


@router.patch(
    "/twins/{twin_id}",
    response_model=TwinDocument,
    responses=errors(404, 409, 412, 413, 415, 507),
    openapi_extra={
        **json_request_body(None, MERGE, JSON_PATCH),
        **documented(*WRITE_OPTIONS),
    },
    summary="Merge patch (RFC 7396) or JSON Patch (RFC 6902) a twin",
)
async def patch_twin(request: Request, twin_id: TwinId) -> Response:
    # The most frequent write: access and parameters are read here, not through
    # dependencies (see RawParam), which cost FastAPI about as much as the write's own work
    # in the event loop.
    principal = write_access(request)
    ctx = context(request)
    conditions, ttl = write_options(request)
    _visible(principal, twin_id)
    kind, body = await _patch_body(request, ctx)
    outcome = await _commit(
        request,
        ctx,
        twin_id,
        (lambda t: merge_patch_twin(_exists(t), body))
        if kind == MERGE
        else (lambda t: json_patch_twin(_exists(t), body, ctx.service.limits)),
        preconditions=conditions,
        amend=ttl,
    )
    assert outcome.twin is not None
    # The twin's own encoding: a GET served from the cache sends these same bytes.
    return written(_encoded_response(outcome.twin.document_json), outcome)


@router.delete(
    "/twins/{twin_id}",
    status_code=204,
    responses=errors(404, 409, 412, 507),
    openapi_extra=documented(*PRECONDITIONS),
)
async def delete_twin(
    request: Request, ctx: Context, principal: Writer, twin_id: TwinId
) -> Response:
    conditions = request_preconditions(request)
    _visible(principal, twin_id)
    outcome = await _commit(request, ctx, twin_id, lambda _: None, preconditions=conditions)
    return written(Response(status_code=204), outcome)


# -- sections by JSON pointer ----------------------------------------------------------------

_POINTER_DOC = "JSON pointer inside the section (RFC 6901; ~1 is '/', ~0 is '~')"


@router.get(
    "/twins/{twin_id}/{section:twin_part}",
    responses={**errors(404, 410, 412), **_NOT_MODIFIED},
    openapi_extra=documented(AT, IF_MATCH_READ, IF_NONE_MATCH),
)
@router.get(
    "/twins/{twin_id}/{section:twin_part}/{pointer:path}",
    responses={**errors(404, 410, 412), **_NOT_MODIFIED},
    openapi_extra=documented(AT, IF_MATCH_READ, IF_NONE_MATCH),
)
async def get_section(
    request: Request,
    ctx: Context,
    principal: Reader,
    twin_id: TwinId,
    section: Section | View,
    pointer: str = "",
) -> Response:
    _visible(principal, twin_id)
    if_match = _read_if_match(request)
    # A section or view of an older revision too: ignored, ?at= answered the current one.
    twin = await _as_of(ctx, twin_id, AT.get_int(request))
    doc = twin.to_document()
    value = get_at(doc[section], pointer_after(request, TWIN_BASE + 1))
    # After the lookup: a path that is not there is a 404 whatever the tag (RFC 9110 13.2.1).
    if (conditional := _conditional_read(request, if_match, twin)) is not None:
        return conditional
    return json_response(value, revision=twin.revision)


_WRITE_EXTRA = {**json_request_body(), **documented(*WRITE_OPTIONS)}
_MERGE_EXTRA = {**json_request_body(None, MERGE), **documented(*WRITE_OPTIONS)}


@router.put(
    "/twins/{twin_id}/{section:twin_section}",
    status_code=204,
    responses={**errors(404, 409, 412, 413, 415, 507), 201: {"description": "Created"}},
    openapi_extra=_WRITE_EXTRA,
)
@router.put(
    "/twins/{twin_id}/{section:twin_section}/{pointer:path}",
    status_code=204,
    responses={**errors(404, 409, 412, 413, 415, 507), 201: {"description": "Created"}},
    openapi_extra=_WRITE_EXTRA,
)
async def put_section(
    request: Request, twin_id: TwinId, section: Section, pointer: str = ""
) -> Response:
    # Section writes are what devices' apps and dashboards send most: like patch_twin, they
    # read access, body and options themselves instead of through dependencies.
    principal = write_access(request)
    ctx = context(request)
    body = await json_body(request, ctx)
    conditions, ttl = write_options(request)
    _visible(principal, twin_id)
    parts = pointer_after(request, TWIN_BASE + 1)
    existed: list[bool] = []

    def edit(twin: Twin | None) -> Edit:
        current = _exists(twin)
        existed.append(has_at(current.section(section), parts))
        return put_at(current, section, parts, body)

    outcome = await _commit(
        request,
        ctx,
        twin_id,
        edit,
        preconditions=conditions,
        amend=ttl,
    )
    assert outcome.twin is not None
    if existed and not existed[-1]:
        return written(json_response(body, 201), outcome)
    return written(Response(status_code=204), outcome)


@router.patch(
    "/twins/{twin_id}/{section:twin_section}",
    status_code=204,
    responses=errors(404, 409, 412, 413, 415, 507),
    openapi_extra=_MERGE_EXTRA,
)
@router.patch(
    "/twins/{twin_id}/{section:twin_section}/{pointer:path}",
    status_code=204,
    responses=errors(404, 409, 412, 413, 415, 507),
    openapi_extra=_MERGE_EXTRA,
)
async def patch_section(
    request: Request, twin_id: TwinId, section: Section, pointer: str = ""
) -> Response:
    principal = write_access(request)
    ctx = context(request)
    conditions, ttl = write_options(request)
    _visible(principal, twin_id)
    parts = pointer_after(request, TWIN_BASE + 1)
    _, body = await _patch_body(request, ctx, allow_json_patch=False)
    outcome = await _commit(
        request,
        ctx,
        twin_id,
        lambda t: patch_at(_exists(t), section, parts, body),
        preconditions=conditions,
        amend=ttl,
    )
    assert outcome.twin is not None
    return written(Response(status_code=204), outcome)


_DELETE_EXTRA = documented(*PRECONDITIONS)


@router.delete(
    "/twins/{twin_id}/{section:twin_section}",
    status_code=204,
    responses=errors(404, 409, 412, 507),
    openapi_extra=_DELETE_EXTRA,
)
@router.delete(
    "/twins/{twin_id}/{section:twin_section}/{pointer:path}",
    status_code=204,
    responses=errors(404, 409, 412, 507),
    openapi_extra=_DELETE_EXTRA,
)
async def delete_section(
    request: Request,
    ctx: Context,
    principal: Writer,
    twin_id: TwinId,
    section: Section,
    pointer: str = "",
) -> Response:
    conditions = request_preconditions(request)
    _visible(principal, twin_id)
    parts = pointer_after(request, TWIN_BASE + 1)
    outcome = await _commit(
        request,
        ctx,
        twin_id,
        lambda t: delete_at(_exists(t), section, parts),
        preconditions=conditions,
    )
    assert outcome.twin is not None
    return written(Response(status_code=204), outcome)


def _exists(twin: Twin | None) -> Twin:
    if twin is None:
        raise NotFound("Twin does not exist.")
    return twin


async def _patch_body(
    request: Request, ctx: Context, *, allow_json_patch: bool = True
) -> tuple[str, JSON]:
    from twin_service.api.deps import media_type

    kind = media_type(request)
    allowed = (MERGE, JSON_PATCH) if allow_json_patch else (MERGE,)
    if kind not in allowed:
        raise UnsupportedMediaType(
            f"PATCH needs Content-Type {' or '.join(allowed)}, not {kind or '(none)'!r}."
        )
    return kind, await json_body(request, ctx)
