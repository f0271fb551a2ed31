"""Typed errors with a stable code and an HTTP status.

Every failure a client can see is one of these. They are mapped in exactly one place per
transport: to one JSON body over HTTP (``twin_service.api.errors``), to a close code or an
error message over WebSocket, and to a ``rejected`` message over MQTT.

    TwinServiceError
    ├── BadRequest (400)              request.invalid
    │   ├── InvalidJson               json.invalid
    │   ├── InvalidTwinId             twin.id.invalid
    │   ├── InvalidPointer            pointer.invalid
    │   ├── InvalidPatch              patch.invalid
    │   ├── LimitExceeded             limits.exceeded (depth, key length, forbidden key)
    │   ├── RqlSyntaxError            rql.syntax
    │   └── RqlInvalid                rql.invalid
    ├── Unauthorized (401)            auth.required / auth.revoked
    ├── Forbidden (403)               auth.forbidden
    ├── NotFound (404)                twin.notfound / pointer.notfound / resource.notfound
    │   └── SearchDisabled            search.disabled
    ├── MethodNotAllowed (405)        request.method
    ├── Conflict (409)                twin.conflict / version.conflict
    ├── Gone (410)                    history.expired
    ├── PreconditionFailed (412)      twin.precondition.failed / twin.condition.failed
    ├── PayloadTooLarge (413)         twin.toolarge
    ├── UnsupportedMediaType (415)    request.mediatype
    └── Unavailable (503)             service.unavailable / service.starting
        ├── StoreUnreachable          (the store did not answer)
        ├── Unconfirmed               (a write that may commit still)
        ├── StoreMissing              (an operator command found no store)
        └── StoreFull (507)           store.full
"""

from __future__ import annotations

from typing import Any, ClassVar


class TwinServiceError(Exception):
    """Base of every error a client may see."""

    status: ClassVar[int] = 500
    default_code: ClassVar[str] = "service.internal"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        description: str | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code or self.default_code
        self.description = description
        self.extra = extra or {}

    def to_body(self) -> dict[str, Any]:
        """The one JSON error shape: status, error, message, description (+ extra fields)."""
        body: dict[str, Any] = {
            "status": self.status,
            "error": self.code,
            "message": self.message,
            "description": self.description or "",
        }
        body.update(self.extra)
        return body


class BadRequest(TwinServiceError):
    status = 400
    default_code = "request.invalid"


class InvalidJson(BadRequest):
    default_code = "json.invalid"


class InvalidTwinId(BadRequest):
    default_code = "twin.id.invalid"


class InvalidPointer(BadRequest):
    default_code = "pointer.invalid"


class InvalidPatch(BadRequest):
    default_code = "patch.invalid"


class LimitExceeded(BadRequest):
    default_code = "limits.exceeded"


class RqlSyntaxError(BadRequest):
    """An RQL string that does not parse; ``position`` is the 0-based character offset."""

    default_code = "rql.syntax"

    def __init__(self, message: str, *, position: int, expected: str | None = None) -> None:
        extra: dict[str, Any] = {"position": position}
        if expected is not None:
            extra["expected"] = expected
        super().__init__(message, extra=extra)
        self.position = position
        self.expected = expected


class RqlInvalid(BadRequest):
    """An RQL query that parses but is not valid (unknown property root, bad value type...)."""

    default_code = "rql.invalid"


class Unauthorized(TwinServiceError):
    status = 401
    default_code = "auth.required"


class Forbidden(TwinServiceError):
    status = 403
    default_code = "auth.forbidden"


class NotFound(TwinServiceError):
    status = 404
    default_code = "twin.notfound"


class SearchDisabled(NotFound):
    """The search API is turned off (``search = "off"``)."""

    default_code = "search.disabled"


class MethodNotAllowed(TwinServiceError):
    """A write to a read-only view (``delta``...). Over HTTP Starlette answers it (the
    routes say which methods each path takes); a WebSocket command gets this."""

    status = 405
    default_code = "request.method"


class Conflict(TwinServiceError):
    status = 409
    default_code = "twin.conflict"


class Gone(TwinServiceError):
    status = 410
    default_code = "history.expired"


class PreconditionFailed(TwinServiceError):
    status = 412
    default_code = "twin.precondition.failed"


class PayloadTooLarge(TwinServiceError):
    status = 413
    default_code = "twin.toolarge"


class RequestTimeout(TwinServiceError):
    status = 408
    default_code = "request.timeout"


class HeadTooLarge(TwinServiceError):
    status = 431
    default_code = "request.head.toolarge"


class UnsupportedMediaType(TwinServiceError):
    status = 415
    default_code = "request.mediatype"


class Unavailable(TwinServiceError):
    status = 503
    default_code = "service.unavailable"
    #: Seconds a client should wait before it tries again (HTTP ``Retry-After``), or
    #: ``None`` where trying again cannot help until an operator acts (a broker's refusal).
    retry_after_seconds: ClassVar[int | None] = 1


class TooManyStreams(Unavailable):
    """The process serves ``stream.max_connections`` change-stream readers already."""

    default_code = "stream.toomany"
    retry_after_seconds = 5


class Busy(Unavailable):
    """What clients are still sending holds ``limits.incoming_bytes`` of the process."""

    default_code = "service.busy"


class StoreUnreachable(Unavailable):
    """The store's server did not answer at all (down, or out of the network's reach), or
    not within ``mongodb.operation_timeout_ms``, as opposed to answering with a refusal: a
    starting service waits for it to come (``mongodb.start_wait_seconds``) instead of
    exiting."""


class Unconfirmed(Unavailable):
    """A write whose commit was under way when the store stopped answering: it may have
    committed, or may still, with no change event from this process (readers of the journal
    see it once it lands). ``settles_after`` is how many seconds after the failure its fate
    is usually known (the store's bound on the write)."""

    def __init__(self, message: str, *, settles_after: float = 0.0) -> None:
        super().__init__(message)
        self.settles_after = settles_after


class StoreMissing(Unavailable):
    """An operator command found no store where its settings point (a mistyped data
    directory or database name): it opens existing stores only. No client sees it."""

    retry_after_seconds = None


class StoreFull(Unavailable):
    """The store has no room for the write: the disk is full, or the SQLite database reached
    ``sqlite.max_database_mib``. Nothing was written; writes succeed again once there is
    room (an operator frees space or raises the limit)."""

    status = 507
    default_code = "store.full"
    retry_after_seconds = None
