"""RQL search over twins: GET with query parameters, POST with a form body, and count."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, Query, Response

from search.rql.query import build_query
from twin_service.api.deps import Context, Reader
from twin_service.api.fields import parse_fields, select
from twin_service.api.routes.twins import json_response
from twin_service.api.schemas import CountResult, SearchResult, errors
from twin_service.auth import Principal

router = APIRouter(prefix="/api/v1/search", tags=["search"])

FilterParam = Annotated[str | None, Query(description='RQL filter, e.g. eq(attributes/site,"a")')]
OptionParam = Annotated[str | None, Query(description="sort(+p,-q),size(n),cursor(c)")]
FieldsParam = Annotated[str | None, Query(description="Comma-separated paths to include")]
NamespacesParam = Annotated[str | None, Query(description="Comma-separated namespaces")]


def _visible_namespaces(namespaces: str | None, principal: Principal) -> str | None:
    """The namespaces parameter limited to what the token may read ("" when nothing is left)."""
    if principal.namespaces is None:
        return namespaces
    allowed = set(principal.namespaces)
    wanted = {n.strip() for n in namespaces.split(",") if n.strip()} if namespaces else allowed
    return ",".join(sorted(wanted & allowed))


async def _search(
    ctx: Context,
    principal: Principal,
    filter: str | None,
    option: str | None,
    fields: str | None,
    namespaces: str | None,
) -> Response:
    paths = parse_fields(fields)
    visible = _visible_namespaces(namespaces, principal)
    query = build_query(
        filter,
        option,
        visible,
        default_size=ctx.settings.query.default_size,
        max_size=ctx.settings.query.max_size,
    )
    if visible == "":
        return json_response({"items": []})
    twins, cursor = await ctx.store.search(query)
    body: dict[str, object] = {"items": [select(t.to_document(), paths) for t in twins]}
    if cursor is not None:
        body["cursor"] = cursor
    return json_response(body)


@router.get("/twins", response_model=SearchResult, responses=errors())
async def search_twins(
    ctx: Context,
    principal: Reader,
    filter: FilterParam = None,
    option: OptionParam = None,
    fields: FieldsParam = None,
    namespaces: NamespacesParam = None,
) -> Response:
    return await _search(ctx, principal, filter, option, fields, namespaces)


@router.post(
    "/twins",
    response_model=SearchResult,
    responses=errors(),
    summary="Search with a form body (for long queries)",
)
async def search_twins_form(
    ctx: Context,
    principal: Reader,
    filter: Annotated[str | None, Form()] = None,
    option: Annotated[str | None, Form()] = None,
    fields: Annotated[str | None, Form()] = None,
    namespaces: Annotated[str | None, Form()] = None,
) -> Response:
    return await _search(ctx, principal, filter, option, fields, namespaces)


@router.get("/twins/count", response_model=CountResult, responses=errors())
async def count_twins(
    ctx: Context,
    principal: Reader,
    filter: FilterParam = None,
    namespaces: NamespacesParam = None,
) -> Response:
    visible = _visible_namespaces(namespaces, principal)
    query = build_query(filter, None, visible)
    count = 0 if visible == "" else await ctx.store.count(query)
    return json_response({"count": count})
