"""The one mapping from typed errors to HTTP responses (``api.errors.error_response``)."""

from __future__ import annotations

import json

import pytest

from connectivity.errors import ConnectRefused, NotConnected, PublishTimeout, Refused
from twin_service.api.errors import error_response
from twin_service.errors import (
    Conflict,
    NotFound,
    PayloadTooLarge,
    TwinServiceError,
    Unauthorized,
    Unavailable,
)


@pytest.mark.parametrize(
    ("error", "retry_after"),
    [
        (Unavailable("The twin store failed to commit: disk I/O error"), "1"),
        (Unavailable("stopping", code="service.stopping"), "1"),
        (NotConnected("no session"), "1"),
        (PublishTimeout("no PUBACK"), "1"),
        # Trying again cannot help until someone changes the credentials or the ACL.
        (ConnectRefused("not authorised"), None),
        (Refused("ACL"), None),
        # Only a 503 says when to come back.
        (Conflict("too fast", code="twin.contention"), None),
        (NotFound("no twin"), None),
        (PayloadTooLarge("big"), None),
    ],
)
def test_a_503_says_when_to_try_again_unless_retrying_cannot_help(
    error: TwinServiceError, retry_after: str | None
) -> None:
    response = error_response(error)
    assert response.status_code == error.status
    assert response.headers.get("retry-after") == retry_after
    body = json.loads(bytes(response.body))
    assert body == {
        "status": error.status,
        "error": error.code,
        "message": error.message,
        "description": "",
    }


def test_a_401_names_the_scheme() -> None:
    response = error_response(Unauthorized("no token"))
    assert response.headers["www-authenticate"] == "Bearer"
    assert "retry-after" not in response.headers
