"""Device payloads: parsing and validation into frozen values, and the reply bodies.

Everything here is pure. A payload that fails validation raises one of the typed errors of
:mod:`twin_service.errors`; :func:`rejection` turns any of them into the one ``rejected`` body
devices see::

    {"clientToken": "...", "code": 400, "error": "json.invalid", "message": "..."}
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal

from twin_service.errors import (
    BadRequest,
    InvalidJson,
    LimitExceeded,
    PayloadTooLarge,
    TwinServiceError,
)
from twin_service.twin.document import Twin
from twin_service.twin.jsonvalue import loads_strict
from twin_service.types import JSON, JSONObject

#: As AWS: a client token is an opaque string of at most 64 bytes.
MAX_CLIENT_TOKEN_BYTES = 64
#: A device's refusal (``rejected``) is copied into the lifecycle entry of every leaf under
#: the path it names, and into the journal with it: both are bounded here, at the door.
MAX_REASON_LENGTH = 256
MAX_REJECTED_KEYS = 256

Status = Literal["online", "offline"]


@dataclass(frozen=True)
class ReportedUpdate:
    """``.../reported/update``: a merge patch on reported, with optional bookkeeping."""

    state: JSONObject
    client_token: str | None = None
    desired_version: int | None = None
    rejected: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class GetRequest:
    """``.../get``: asks for desired, reported, delta and their versions."""

    client_token: str | None = None


def decode(payload: bytes, max_bytes: int) -> JSON:
    """Strict JSON (no NaN, no duplicate keys) of at most ``max_bytes``."""
    if len(payload) > max_bytes:
        raise PayloadTooLarge(
            f"Payload of {len(payload)} bytes exceeds the limit of {max_bytes} bytes.",
            extra={"limit": max_bytes},
        )
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidJson("Payload is not UTF-8.") from None
    return loads_strict(text)


def _object(value: JSON, what: str) -> JSONObject:
    if not isinstance(value, dict):
        raise BadRequest(f"{what} must be a JSON object.", code="request.invalid")
    return value


def _client_token(body: JSONObject) -> str | None:
    token = body.get("clientToken")
    if token is None:
        return None
    if not isinstance(token, str) or not token:
        raise BadRequest("'clientToken' must be a non-empty string.")
    if len(token.encode()) > MAX_CLIENT_TOKEN_BYTES:
        raise BadRequest(f"'clientToken' is longer than {MAX_CLIENT_TOKEN_BYTES} bytes.")
    return token


def _version(body: JSONObject) -> int | None:
    version = body.get("desiredVersion")
    if version is None:
        return None
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise BadRequest("'desiredVersion' must be a non-negative integer.")
    return version


def _rejected(body: JSONObject) -> tuple[tuple[str, str], ...]:
    """The ``rejected`` map: at most MAX_REJECTED_KEYS paths, each with a string reason of at
    most MAX_REASON_LENGTH characters (limits.exceeded past either, 400)."""
    raw = body.get("rejected")
    if raw is None:
        return ()
    raw = _object(raw, "'rejected'")
    if len(raw) > MAX_REJECTED_KEYS:
        raise LimitExceeded(
            f"'rejected' names {len(raw)} paths; the limit is {MAX_REJECTED_KEYS}.",
            extra={"limit": MAX_REJECTED_KEYS},
        )
    out: list[tuple[str, str]] = []
    for path, reason in raw.items():
        named = repr(path) if len(path) <= 80 else f"{path[:80]!r}..."
        if not isinstance(reason, str):
            raise BadRequest(f"'rejected' reason for {named} must be a string.")
        if len(reason) > MAX_REASON_LENGTH:
            raise LimitExceeded(
                f"'rejected' reason for {named} is {len(reason)} characters long; the limit "
                f"is {MAX_REASON_LENGTH}.",
                extra={"limit": MAX_REASON_LENGTH},
            )
        out.append((path, reason))
    return tuple(out)


def parse_reported_update(payload: bytes, max_bytes: int) -> ReportedUpdate:
    body = _object(decode(payload, max_bytes), "A reported update")
    unknown = sorted(set(body) - {"state", "clientToken", "desiredVersion", "rejected"})
    if unknown:
        raise BadRequest(f"Unknown field(s) in a reported update: {', '.join(unknown)}.")
    token = _client_token(body)
    rejected = _rejected(body)
    if "state" not in body and not rejected:
        raise BadRequest("A reported update needs 'state' (or 'rejected').")
    state = _object(body.get("state", {}), "'state'")
    return ReportedUpdate(state, token, _version(body), rejected)


def parse_live_update(payload: bytes, max_bytes: int) -> JSONObject:
    """``.../live/update``: the payload is itself a merge patch on live."""
    return _object(decode(payload, max_bytes), "A live update")


def parse_get(payload: bytes, max_bytes: int) -> GetRequest:
    if not payload.strip():
        return GetRequest()
    body = _object(decode(payload, max_bytes), "A get request")
    unknown = sorted(set(body) - {"clientToken"})
    if unknown:  # as for a reported update: a misspelt clientToken is not silently dropped
        raise BadRequest(f"Unknown field(s) in a get request: {', '.join(unknown)}.")
    return GetRequest(_client_token(body))


def parse_status(payload: bytes) -> Status | None:
    """``online``/``offline`` (plain or JSON string); None for a cleared or unknown status."""
    text = payload.decode("utf-8", errors="replace").strip().strip('"').lower()
    if text == "online":
        return "online"
    if text == "offline":
        return "offline"
    return None


def token_hint(payload: bytes) -> str | None:
    """The client token of a payload that failed validation, when one can be found."""
    try:
        body = json.loads(payload)
    except (ValueError, RecursionError):
        return None
    token = body.get("clientToken") if isinstance(body, dict) else None
    if isinstance(token, str) and len(token.encode()) <= MAX_CLIENT_TOKEN_BYTES:
        return token
    return None


def rejection(error: TwinServiceError, client_token: str | None) -> JSONObject:
    body: JSONObject = {"code": error.status, "error": error.code, "message": error.message}
    if client_token is not None:
        body["clientToken"] = client_token
    if "desiredVersion" in error.extra:
        body["desiredVersion"] = error.extra["desiredVersion"]
    return body


def answer_too_large(size: int, limit: int) -> PayloadTooLarge:
    """The refusal a device gets for an answer the broker would not take: a ``get/accepted``
    carries desired twice (as itself and as the delta) and the lifecycle, so a twin within
    ``limits.max_twin_bytes`` can still have one over the broker's packet size limit."""
    return PayloadTooLarge(
        f"The answer is {size} bytes, over the MQTT broker's packet size limit of {limit} "
        "bytes: read the twin over HTTP, or make its desired state smaller.",
        extra={"size": size, "limit": limit},
    )


def report_accepted(
    client_token: str | None, revision: int, reported_version: int, duplicate: bool = False
) -> JSONObject:
    body: JSONObject = {"revision": revision, "reportedVersion": reported_version}
    if client_token is not None:
        body["clientToken"] = client_token
    if duplicate:
        body["duplicate"] = True
    return body


def get_accepted(twin: Twin, client_token: str | None) -> JSONObject:
    body: JSONObject = {
        "desired": twin.desired,
        "reported": twin.reported,
        "delta": twin.delta,
        "desiredVersion": twin.desired_version,
        "reportedVersion": twin.reported_version,
        "revision": twin.revision,
        "lifecycle": twin.lifecycle,
    }
    if client_token is not None:
        body["clientToken"] = client_token
    return body


def delta_message(twin: Twin) -> JSONObject:
    """The retained ``.../delta`` body: the whole current delta and its desired version."""
    return {"state": twin.delta, "desiredVersion": twin.desired_version}
