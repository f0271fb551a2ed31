"""Bearer tokens with a role (read < write < admin) and optional namespace restriction."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from twin_service.errors import Forbidden, Unauthorized
from twin_service.settings import Settings, TokenSettings, describe_invalid

log = logging.getLogger(__name__)

Role = Literal["read", "write", "admin"]
_RANK = {"read": 0, "write": 1, "admin": 2}
ADMIN_TOKEN_FILE = "admin-token"


@dataclass(frozen=True)
class Principal:
    name: str
    role: Role
    namespaces: frozenset[str] | None = None

    def require(self, role: Role) -> None:
        if _RANK[self.role] < _RANK[role]:
            raise Forbidden(f"Token {self.name!r} has role {self.role!r}; {role!r} is required.")

    def may_see(self, namespace: str) -> bool:
        return self.namespaces is None or namespace in self.namespaces

    def visible_namespaces(self, requested: tuple[str, ...] | None) -> tuple[str, ...] | None:
        """The namespaces of a search (``requested``, None if not given) limited to what
        this token may read: ``None`` means no restriction, ``()`` nothing visible.

        A tuple, not a comma-joined string: the empty namespace (twin ids ``:name``) may be
        given to a token, and as a blank entry of such a string it read as "not given", so
        the token's search found none of its twins.
        """
        if self.namespaces is None:
            return requested
        if requested is None:
            return tuple(sorted(self.namespaces))
        return tuple(n for n in requested if n in self.namespaces)

    def check_namespace(self, namespace: str) -> None:
        if not self.may_see(namespace):
            raise Forbidden(f"Token {self.name!r} may not use namespace {namespace!r}.")


ANONYMOUS_ADMIN = Principal(name="anonymous", role="admin")
#: Most Authorization header values remembered as accepted.
_ACCEPTED_MAX = 1024


@dataclass(frozen=True)
class _Known:
    """The tokens in force, and the Authorization headers already accepted for them: one
    value, so that a reload replaces both at once."""

    by_hash: dict[str, Principal]
    accepted: dict[str, Principal]


def revoked() -> Unauthorized:
    """What a connection that stays open gets once a reload dropped its token."""
    return Unauthorized(
        "Token revoked: the service's tokens were reloaded without it.", code="auth.revoked"
    )


class Credential:
    """The token of a connection that stays open (a WebSocket, a server-sent-event stream).

    Its :attr:`principal` is the token's under the tokens in force: a reload that changes
    the token's role or namespaces changes it, and one that drops the token marks it
    :attr:`revoked` and calls the connection back (:meth:`on_revoked`). Checked once at
    connect instead, a revoked token went on receiving changes, and writing, until its
    client left.
    """

    __slots__ = ("__weakref__", "_callback", "_digest", "_registry", "principal", "revoked")

    def __init__(self, registry: TokenRegistry | None, digest: str, principal: Principal) -> None:
        self._registry = registry
        self._digest = digest
        self._callback: Callable[[], None] | None = None
        #: The token's principal now (the last one it had, once revoked).
        self.principal = principal
        self.revoked = False

    def current(self) -> Principal:
        """The principal to act for now; :func:`revoked` (401) once the token is."""
        if self.revoked:
            raise revoked()
        return self.principal

    def on_revoked(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once, when a reload drops the token (at once if it did)."""
        self._callback = callback
        if self.revoked:
            self._revoke()

    def release(self) -> None:
        """The connection is closed: reloads no longer concern it."""
        self._callback = None
        if self._registry is not None:
            self._registry._held.discard(self)

    def _follow(self, by_hash: dict[str, Principal]) -> bool:
        """Take the token's principal under ``by_hash``: whether it was revoked."""
        principal = by_hash.get(self._digest)
        if principal is not None:
            self.principal = principal
            return False
        self._revoke()
        return True

    def _revoke(self) -> None:
        self.revoked = True
        callback = self._callback
        self.release()
        if callback is not None:
            callback()


class TokenRegistry:
    """Looks tokens up by their SHA-256 so the comparison does not leak timing."""

    def __init__(self, tokens: list[TokenSettings], disabled: bool = False) -> None:
        self.disabled = disabled
        self._known = _known(tokens)
        # Weak: a connection that failed before it could release its credential leaves
        # nothing behind.
        self._held: weakref.WeakSet[Credential] = weakref.WeakSet()

    def replace(self, tokens: list[TokenSettings]) -> int:
        """Put ``tokens`` in force instead (a reload): from the next request on, only
        these are accepted, whatever was accepted before. Open connections take their
        token's new principal, or are told it was revoked: returns how many were."""
        self._known = known = _known(tokens)
        if self.disabled:
            return 0
        return sum(credential._follow(known.by_hash) for credential in list(self._held))

    def authenticate(self, authorization: str | None) -> Principal:
        if self.disabled:
            return ANONYMOUS_ADMIN
        known = self._known
        principal = known.accepted.get(authorization) if authorization else None
        if principal is None:
            principal = _look_up(known, _digest(bearer_token(authorization)))
            if authorization and len(known.accepted) < _ACCEPTED_MAX:
                known.accepted[authorization] = principal
        return principal

    def hold(self, authorization: str | None) -> Credential:
        """:meth:`authenticate` for a connection that stays open: a :class:`Credential`
        that follows reloads until released."""
        if self.disabled:
            return Credential(None, "", ANONYMOUS_ADMIN)
        return self.hold_token(bearer_token(authorization))

    def hold_token(self, token: str) -> Credential:
        """:meth:`hold` for a bare token (a WebSocket's ``auth`` message)."""
        if self.disabled:
            return Credential(None, "", ANONYMOUS_ADMIN)
        digest = _digest(token)
        credential = Credential(self, digest, _look_up(self._known, digest))
        self._held.add(credential)
        return credential


def bearer_token(authorization: str | None) -> str:
    """The token of an ``Authorization: Bearer <token>`` header value."""
    if not authorization:
        raise Unauthorized("A bearer token is required (Authorization: Bearer <token>).")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("Authorization must be 'Bearer <token>'.")
    return token.strip()


def _known(tokens: list[TokenSettings]) -> _Known:
    by_hash = {
        _digest(t.token): Principal(
            t.name, t.role, frozenset(t.namespaces) if t.namespaces is not None else None
        )
        for t in tokens
    }
    # Authorization headers already accepted, so that a client's every request does not
    # hash its token again. Only valid tokens get in (bounded by the tokens configured
    # and the spellings of the header); a lookup compares strings only on a keyed-hash
    # match, so it reveals nothing about tokens that are not in it.
    return _Known(by_hash, {})


def _look_up(known: _Known, digest: str) -> Principal:
    for candidate, principal in known.by_hash.items():
        if hmac.compare_digest(candidate, digest):
            return principal
    raise Unauthorized("The bearer token is not valid.")


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _read_tokens_file(path: Path) -> list[TokenSettings]:
    try:
        raw = json.loads(path.read_text())
        if not isinstance(raw, list):
            raise ValueError("it must hold a JSON array of tokens")
        return [TokenSettings.model_validate(item) for item in raw]
    except (OSError, ValueError) as exc:
        raise _unusable(f"The tokens file {path}", exc) from None


def _unusable(what: str, exc: OSError | ValueError) -> ValueError:
    """``what`` cannot be used, and why, in one line without the value it holds."""
    detail = exc.strerror if isinstance(exc, OSError) else describe_invalid(exc)
    return ValueError(f"{what} cannot be used: {detail}")


def configured_tokens(settings: Settings, *, empty_file: bool = False) -> list[TokenSettings]:
    """The tokens of ``auth.tokens`` and of the tokens file, read afresh (also on a reload).

    Raises ValueError, naming the problem without any token's value, for a tokens file that
    cannot be used or (unless ``empty_file``) holds no token, and for two tokens of the
    same value or name: the last one silently won, so a token listed as read in one place
    and admin in another could write.
    """
    sources = [("auth.tokens", list(settings.auth.tokens))]
    if settings.auth.tokens_file is not None:
        path = settings.auth.tokens_file
        held = _read_tokens_file(path)
        if not held and not empty_file:
            raise ValueError(
                f"The tokens file {path} holds no token: list at least one (the generated "
                "admin token is used only when no tokens file is set)"
            )
        sources.append((f"the tokens file {path}", held))
    _check_unique(sources)
    return [token for _, tokens in sources for token in tokens]


def _check_unique(sources: list[tuple[str, list[TokenSettings]]]) -> None:
    seen_tokens: dict[str, tuple[str, str]] = {}
    seen_names: dict[str, str] = {}
    for where, tokens in sources:
        for token in tokens:
            digest = _digest(token.token)
            if digest in seen_tokens:
                name, first = seen_tokens[digest]
                raise ValueError(
                    f"tokens {name!r} ({first}) and {token.name!r} ({where}) are the same "
                    "token: give each its own"
                )
            if token.name in seen_names:
                first = seen_names[token.name]
                places = first if first == where else f"{first}, {where}"
                raise ValueError(
                    f"two tokens are named {token.name!r} ({places}): a name says whose a "
                    "change is (its events' origin), give each its own"
                )
            seen_tokens[digest] = (token.name, where)
            seen_names[token.name] = where


def load_tokens(settings: Settings) -> tuple[list[TokenSettings], str | None]:
    """The tokens of a start; the generated admin token when none is configured.

    Returns the tokens and, only when it was just created, the new admin token to print
    once. The admin token in ``data_dir`` is used only when there is no tokens file and
    ``auth.tokens`` lists none: a tokens file emptied (or left empty) made an admin token
    of an earlier start work again, without a word. Such a file is refused (ValueError)
    instead, as no request could be served.
    """
    tokens = configured_tokens(settings)
    if tokens or settings.auth.tokens_file is not None or settings.auth.disabled:
        return tokens, None
    admin_path = settings.data_dir / ADMIN_TOKEN_FILE
    created = None
    if not admin_path.exists():
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        created = secrets.token_urlsafe(32)
        fd = os.open(admin_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(created + "\n")
    try:
        token = admin_path.read_text().strip()
        admin = TokenSettings.model_validate({"name": "admin", "token": token, "role": "admin"})
    except (OSError, ValueError) as exc:  # a hand-written file: pydantic would repeat it
        raise _unusable(f"The admin token file {admin_path}", exc) from None
    if created is None:
        log.info(
            "no token is configured (auth.tokens, auth.tokens_file): the admin token in %s "
            "is accepted",
            admin_path,
        )
    return [admin], created
