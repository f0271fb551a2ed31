"""Twin commands addressed by a single JSON pointer, for the WebSocket (and any other
message-based transport): the same pure operations, service and errors as the REST routes.

A command is ``{"command": "get"|"put"|"patch"|"delete"|"search", "twinId": ..., "path":
"/desired/fan/speed" (optional, first token is the section), "value": ..., "patchType":
"merge"|"json", "fields", "condition", "ifMatch": <revision>, "ifNoneMatch": "*", "ttl":
<seconds>, "filter", "option", "namespaces", "waitFor"}``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from search.rql.parser import parse_filter
from search.rql.query import SearchQuery, build_query, parse_namespaces
from twin_service.api.context import AppContext
from twin_service.auth import Principal
from twin_service.digits import ascii_integer
from twin_service.errors import BadRequest, MethodNotAllowed, NotFound
from twin_service.index.base import search_disabled
from twin_service.service import Amend, Preconditions
from twin_service.twin.document import SECTIONS, Twin
from twin_service.twin.fields import parse_fields, select
from twin_service.twin.ids import parse_twin_id
from twin_service.twin.lifecycle import MAX_TTL_SECONDS, lifecycle_amend_ttl
from twin_service.twin.operations import (
    Edit,
    delete_at,
    json_patch_twin,
    merge_patch_twin,
    patch_at,
    put_at,
    replace_twin,
)
from twin_service.twin.patch import get_at, has_at, split_pointer
from twin_service.types import JSON, JSONObject

READ_ONLY_VIEWS = ("delta", "connection", "metadata", "lifecycle")

#: The caller as the tokens in force say now (401 revoked, 403 demoted), as for a new
#: request: a search asks again once its wait for the index is over.
Access = Callable[[], Principal]


def _str(message: JSONObject, key: str, required: bool = False) -> str | None:
    value = message.get(key)
    if value is None:
        if required:
            raise BadRequest(f"Command needs a string {key!r}.")
        return None
    if not isinstance(value, str):
        raise BadRequest(f"{key!r} must be a string.")
    return value


def _preconditions(message: JSONObject) -> Preconditions:
    if_match = message.get("ifMatch")
    if if_match is not None and (isinstance(if_match, bool) or not isinstance(if_match, int)):
        raise BadRequest("'ifMatch' must be a revision number.")
    if_none_match = message.get("ifNoneMatch")
    if if_none_match is not None and if_none_match != "*":
        raise BadRequest("On writes, 'ifNoneMatch' only supports '*' (create only).")
    condition = _str(message, "condition")
    return Preconditions(
        if_match=frozenset((if_match,)) if if_match is not None else None,
        if_none_match_any=if_none_match == "*",
        condition=parse_filter(condition) if condition is not None else None,
    )


def _ttl_amend(message: JSONObject) -> Amend | None:
    """The lifecycle amend of a ``ttl`` (seconds), as REST's ``?ttl=``: desired values
    written by the command that the device has not applied by then become ``expired``."""
    ttl = message.get("ttl")
    if ttl is None:
        return None
    if (
        isinstance(ttl, bool)
        or not isinstance(ttl, int | float)
        or not 0 < ttl <= MAX_TTL_SECONDS  # also refuses NaN
    ):
        raise BadRequest(f"'ttl' must be a number of seconds > 0 and <= {MAX_TTL_SECONDS}.")
    return lifecycle_amend_ttl(float(ttl))


def _exists(twin: Twin | None) -> Twin:
    if twin is None:
        raise NotFound("Twin does not exist.")
    return twin


async def run_command(ctx: AppContext, access: Access, message: JSONObject) -> tuple[int, JSON]:
    """Execute one command; returns (HTTP-like status, body). Raises typed errors."""
    principal = access()
    name = _str(message, "command", required=True)
    if name == "search":
        principal.require("read")

        def reader() -> Principal:
            now = access()
            now.require("read")
            return now

        return 200, await search_twins(
            ctx,
            reader,
            _str(message, "filter"),
            _str(message, "option"),
            _str(message, "fields"),
            _str(message, "namespaces"),
            _str(message, "waitFor"),
        )
    twin_id = _str(message, "twinId", required=True)
    assert twin_id is not None
    namespace, _ = parse_twin_id(twin_id)
    principal.check_namespace(namespace)
    parts = split_pointer(_str(message, "path") or "")
    section = parts[0] if parts else None
    pointer = parts[1:]
    # The errors of REST's URLs: one under a twin that names nothing is 404, a write to a
    # view 405 (whatever the token may do).
    if section is not None and section not in (*SECTIONS, *READ_ONLY_VIEWS):
        raise NotFound(f"Unknown section {section!r} in path.", code="resource.notfound")
    if section in READ_ONLY_VIEWS and name in ("put", "patch", "delete"):
        raise MethodNotAllowed(f"{section!r} is a read-only view: it takes 'get' only.")
    if name == "get":
        principal.require("read")
        twin = await ctx.service.get(twin_id)
        doc = twin.to_document()
        if section is None:
            return 200, select(doc, parse_fields(_str(message, "fields")))
        return 200, get_at(doc[section], pointer)
    principal.require("write")
    conditions = _preconditions(message)
    amend = _ttl_amend(message) if name != "delete" else None
    value = message.get("value")
    edit: Any
    may_create = False
    # Whether a put at a pointer found a value there, at its last try (REST: 201 if not).
    existed: list[bool] = []
    if name == "put":
        if "value" not in message:
            raise BadRequest("'put' needs a 'value'.")
        if section is None:
            change = replace_twin(value, twin_id)
            edit = lambda _t: change  # noqa: E731
            may_create = True
        else:

            def edit(twin: Twin | None) -> Edit:
                current = _exists(twin)
                existed.append(has_at(current.section(section), pointer))
                return put_at(current, section, pointer, value)
    elif name == "patch":
        kind = message.get("patchType", "merge")
        if kind not in ("merge", "json"):
            raise BadRequest("'patchType' must be 'merge' or 'json'.")
        if section is None:
            edit = (
                (lambda t: merge_patch_twin(_exists(t), value))
                if kind == "merge"
                else (lambda t: json_patch_twin(_exists(t), value, ctx.service.limits))
            )
        elif kind == "json":
            raise BadRequest("JSON Patch applies to the whole twin (no 'path').")
        else:
            edit = lambda t: patch_at(_exists(t), section, pointer, value)  # noqa: E731
    elif name == "delete":
        if section is None:
            edit = lambda _t: None  # noqa: E731
        else:
            edit = lambda t: delete_at(_exists(t), section, pointer)  # noqa: E731
    else:
        raise BadRequest(f"Unknown command {name!r}.")
    outcome = await ctx.service.mutate(
        twin_id,
        edit,
        origin=principal.name,
        preconditions=conditions,
        may_create=may_create,
        amend=amend,
    )
    if outcome.twin is None:
        return 204, None
    # 200, not REST's 204: the reply has a body.
    status = 201 if outcome.created or existed[-1:] == [False] else 200
    return status, {"revision": outcome.twin.revision, "seq": outcome.stored.seq}


async def search_twins(
    ctx: AppContext,
    access: Access,
    filter: str | None,
    option: str | None,
    fields: str | None,
    namespaces: str | None,
    wait_for: str | None = None,
) -> JSONObject:
    """One page of search results, limited to the namespaces the token may read.

    ``wait_for``: a write's sequence number (``X-Twin-Seq``) or ``latest``; the search then
    first waits until the index covers that write (external indexes only lag behind).
    """
    _refuse_when_off(ctx)
    requested = parse_namespaces(namespaces)
    paths = parse_fields(fields)

    def query(principal: Principal) -> SearchQuery:
        return build_query(
            filter,
            option,
            principal.visible_namespaces(requested),
            default_size=ctx.settings.query.default_size,
            max_size=ctx.settings.query.max_size,
        )

    built = await _after_wait(ctx, access, query, wait_for)
    if built is None:
        return {"items": []}
    twins, cursor = await ctx.index.search(built)
    body: JSONObject = {"items": [select(t.to_document(), paths) for t in twins]}
    if cursor is not None:
        body["cursor"] = cursor
    return body


async def count_twins(
    ctx: AppContext,
    access: Access,
    filter: str | None,
    namespaces: str | None,
    wait_for: str | None = None,
) -> int:
    _refuse_when_off(ctx)
    requested = parse_namespaces(namespaces)

    def query(principal: Principal) -> SearchQuery:
        return build_query(filter, None, principal.visible_namespaces(requested))

    built = await _after_wait(ctx, access, query, wait_for)
    return 0 if built is None else await ctx.index.count(built)


async def _after_wait(
    ctx: AppContext,
    access: Access,
    query: Callable[[Principal], SearchQuery],
    wait_for: str | None,
) -> SearchQuery | None:
    """The caller's ``query``, None when its token reads none of the namespaces asked for.

    With ``wait_for``, once the index covers that write and for the token as the tokens in
    force then say: a wait lasts up to ``elasticsearch.wait_timeout_seconds``, and a search
    waiting when a reload took a namespace from its token returned that namespace's twins.
    """
    # Checked first: a bad waitFor was answered with no items for a token that reads none
    # of the namespaces asked for, and refused (400) for every other token.
    seq = await _wait_target(ctx, wait_for)
    built = query(access())
    if built.namespaces == ():
        return None
    if seq is None:
        return built
    await ctx.index.wait_for_seq(seq)
    built = query(access())
    return None if built.namespaces == () else built


def _refuse_when_off(ctx: AppContext) -> None:
    # Before the query is parsed or the namespaces narrowed: with search off, every search
    # gets the same answer, whatever it asks.
    if ctx.settings.search == "off":
        raise search_disabled()


async def _wait_target(ctx: AppContext, wait_for: str | None) -> int | None:
    if wait_for is None or wait_for == "":
        return None
    if wait_for == "latest":
        return await ctx.store.last_seq()
    if (seq := ascii_integer(wait_for)) is not None:
        # Beyond the store's newest write it names no write: waiting for it would end only
        # in index.timeout (503), which blames the index for the client's mistake.
        if seq > (newest := await ctx.store.last_seq()):
            raise BadRequest(
                f"waitFor {seq} is beyond the newest write ({newest}): it must be the "
                "X-Twin-Seq of a write."
            )
        return seq
    raise BadRequest(
        f"waitFor must be a sequence number (X-Twin-Seq of a write) or 'latest', not {wait_for!r}."
    )


__all__ = ["Edit", "count_twins", "run_command", "search_twins"]
