"""RQL search over twins: GET with query parameters, POST with a form body, and count."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, Query, Request, Response

from twin_service.api.deps import Context, Reader, read_access
from twin_service.api.routes.twins import json_response
from twin_service.api.schemas import CountResult, SearchResult, errors
from twin_service.commands import Access, count_twins, search_twins
from twin_service.twin.fields import DESCRIPTION as FIELDS_DESCRIPTION

router = APIRouter(prefix="/api/v1/search", tags=["search"])

FilterParam = Annotated[str | None, Query(description='RQL filter, e.g. eq(attributes/site,"a")')]
OptionParam = Annotated[str | None, Query(description="sort(+p,-q),size(n),cursor(c)")]
FieldsParam = Annotated[str | None, Query(description=FIELDS_DESCRIPTION)]
NamespacesParam = Annotated[str | None, Query(description="Comma-separated namespaces")]
WAIT_DOC = (
    "Wait until the index covers this write (its X-Twin-Seq) or 'latest'; 503 index.timeout "
    "after elasticsearch.wait_timeout_seconds. The built-in index never lags."
)
WaitParam = Annotated[str | None, Query(alias="waitFor", description=WAIT_DOC)]
#: The same parameters as form fields, for the POST routes (long queries).
TextForm = Annotated[str | None, Form()]
WaitForm = Annotated[str | None, Form(alias="waitFor", description=WAIT_DOC)]


def _access(request: Request) -> Access:
    """The caller as the tokens in force say when asked (checked again after a wait)."""
    return lambda: read_access(request)


@router.get("/twins", response_model=SearchResult, responses=errors(404))
async def search_get(
    ctx: Context,
    request: Request,
    _: Reader,
    filter: FilterParam = None,
    option: OptionParam = None,
    fields: FieldsParam = None,
    namespaces: NamespacesParam = None,
    wait_for: WaitParam = None,
) -> Response:
    return json_response(
        await search_twins(ctx, _access(request), filter, option, fields, namespaces, wait_for)
    )


@router.post(
    "/twins",
    response_model=SearchResult,
    responses=errors(404),
    summary="Search with a form body (for long queries)",
)
async def search_post(
    ctx: Context,
    request: Request,
    _: Reader,
    filter: TextForm = None,
    option: TextForm = None,
    fields: TextForm = None,
    namespaces: TextForm = None,
    wait_for: WaitForm = None,
) -> Response:
    return json_response(
        await search_twins(ctx, _access(request), filter, option, fields, namespaces, wait_for)
    )


@router.get("/twins/count", response_model=CountResult, responses=errors(404))
async def count_get(
    ctx: Context,
    request: Request,
    _: Reader,
    filter: FilterParam = None,
    namespaces: NamespacesParam = None,
    wait_for: WaitParam = None,
) -> Response:
    count = await count_twins(ctx, _access(request), filter, namespaces, wait_for)
    return json_response({"count": count})


@router.post(
    "/twins/count",
    response_model=CountResult,
    responses=errors(404),
    summary="Count with a form body (for long queries)",
)
async def count_post(
    ctx: Context,
    request: Request,
    _: Reader,
    filter: TextForm = None,
    namespaces: TextForm = None,
    wait_for: WaitForm = None,
) -> Response:
    count = await count_twins(ctx, _access(request), filter, namespaces, wait_for)
    return json_response({"count": count})
