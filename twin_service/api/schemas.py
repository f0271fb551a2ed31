"""Pydantic models used only to document the API (responses are serialised directly)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class ErrorBody(BaseModel):
    status: int = Field(examples=[404])
    error: str = Field(examples=["twin.notfound"])
    message: str
    description: str = ""


class Connection(BaseModel):
    status: str = Field(examples=["online"])
    since: str | None = None
    lastSeen: str | None = None


class TwinDocument(BaseModel):
    model_config = ConfigDict(extra="allow")

    twinId: str = Field(examples=["org.acme.plant1:pump-7"])
    namespace: str
    definition: str | None = None
    attributes: dict[str, Any] = {}
    desired: dict[str, Any] = {}
    reported: dict[str, Any] = {}
    live: dict[str, Any] = {}
    delta: dict[str, Any] = {}
    connection: Connection | None = None
    lifecycle: dict[str, Any] = {}
    revision: int
    desiredVersion: int
    reportedVersion: int
    created: str
    modified: str
    metadata: dict[str, Any] = {}


class TwinSelection(BaseModel):
    """A twin document reduced to the paths asked for with ``fields``: the properties of a
    twin document, none of them required (a path the twin lacks is left out)."""

    model_config = ConfigDict(extra="allow")

    twinId: str | None = None
    namespace: str | None = None
    definition: str | None = None
    attributes: dict[str, Any] | None = None
    desired: dict[str, Any] | None = None
    reported: dict[str, Any] | None = None
    live: dict[str, Any] | None = None
    delta: dict[str, Any] | None = None
    connection: dict[str, Any] | None = None
    lifecycle: dict[str, Any] | None = None
    revision: int | None = None
    desiredVersion: int | None = None
    reportedVersion: int | None = None
    created: str | None = None
    modified: str | None = None
    metadata: dict[str, Any] | None = None


class TwinWrite(BaseModel):
    """A twin as written by PUT/POST (read-only fields are ignored)."""

    definition: str | None = None
    attributes: dict[str, Any] = {}
    desired: dict[str, Any] = {}
    reported: dict[str, Any] = {}
    live: dict[str, Any] = {}


class SearchResult(BaseModel):
    items: list[dict[str, Any]]
    cursor: str | None = None


class CountResult(BaseModel):
    count: int


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries for the given error statuses, and those every
    operation can meet: invalid input, authentication, and an unavailable store, index or
    broker (or a service stopping with the request still running)."""
    base = {400, 401, 403, 503}
    return {
        status: {
            "model": ErrorBody,
            "description": _DESCRIPTIONS.get(status, "Error"),
            **_HEADERS.get(status, {}),
        }
        for status in sorted(base | set(statuses))
    }


_DESCRIPTIONS = {
    400: "Invalid input (JSON, pointer, patch, RQL, limits)",
    401: "Missing or invalid bearer token",
    403: "The token's role or namespaces do not allow this",
    404: "Twin or path not found; on search routes, search.disabled (search is off)",
    409: "Conflict",
    410: "History no longer retained",
    412: "Precondition (If-Match, If-None-Match, condition) failed",
    413: "Request or resulting twin too large",
    415: "Unsupported Content-Type",
    503: "Store, index or broker unavailable, or the service stopping",
    507: "No room in the store for this write (full disk, or sqlite.max_database_mib)",
}

_HEADERS: dict[int, dict[str, Any]] = {
    503: {
        "headers": {
            "Retry-After": {
                "description": "Seconds to wait before trying again; absent where the "
                "broker refused (mqtt.connect.refused, mqtt.refused).",
                "schema": {"type": "integer"},
            }
        }
    }
}


def json_request_body(schema: dict[str, Any] | None = None, *types: str) -> dict[str, Any]:
    """``openapi_extra`` declaring a request body we parse ourselves."""
    content = {t: {"schema": schema or {}} for t in (types or ("application/json",))}
    return {"requestBody": {"required": True, "content": content}}
