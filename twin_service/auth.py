"""Bearer tokens with a role (read < write < admin) and optional namespace restriction."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from twin_service.errors import Forbidden, Unauthorized
from twin_service.settings import Settings, TokenSettings, describe_invalid

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

    def visible_namespaces(self, requested: str | None) -> str | None:
        """A ``namespaces`` search parameter limited to what this token may read.

        ``None`` means no restriction; ``""`` means nothing is visible. A blank request
        means "not given", as for every search parameter.
        """
        if self.namespaces is None:
            return requested if requested and requested.strip() else None
        wanted = {n.strip() for n in (requested or "").split(",") if n.strip()}
        return ",".join(sorted((wanted or set(self.namespaces)) & self.namespaces))

    def check_namespace(self, namespace: str) -> None:
        if not self.may_see(namespace):
            raise Forbidden(f"Token {self.name!r} may not use namespace {namespace!r}.")


ANONYMOUS_ADMIN = Principal(name="anonymous", role="admin")
#: Most Authorization header values remembered as accepted.
_ACCEPTED_MAX = 1024


class TokenRegistry:
    """Looks tokens up by their SHA-256 so the comparison does not leak timing."""

    def __init__(self, tokens: list[TokenSettings], disabled: bool = False) -> None:
        self.disabled = disabled
        self._by_hash = {
            _digest(t.token): Principal(
                t.name, t.role, frozenset(t.namespaces) if t.namespaces is not None else None
            )
            for t in tokens
        }
        # Authorization headers already accepted, so that a client's every request does not
        # hash its token again. Only valid tokens get in (bounded by the tokens configured
        # and the spellings of the header); a lookup compares strings only on a keyed-hash
        # match, so it reveals nothing about tokens that are not in it.
        self._accepted: dict[str, Principal] = {}

    def authenticate(self, authorization: str | None) -> Principal:
        if self.disabled:
            return ANONYMOUS_ADMIN
        if authorization is not None:
            known = self._accepted.get(authorization)
            if known is not None:
                return known
        if not authorization:
            raise Unauthorized("A bearer token is required (Authorization: Bearer <token>).")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized("Authorization must be 'Bearer <token>'.")
        principal = self.authenticate_token(token.strip())
        if len(self._accepted) < _ACCEPTED_MAX:
            self._accepted[authorization] = principal
        return principal

    def authenticate_token(self, token: str) -> Principal:
        if self.disabled:
            return ANONYMOUS_ADMIN
        digest = _digest(token)
        for known, principal in self._by_hash.items():
            if hmac.compare_digest(known, digest):
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
        detail = exc.strerror if isinstance(exc, OSError) else describe_invalid(exc)
        raise ValueError(f"The tokens file {path} cannot be used: {detail}") from None


def load_tokens(settings: Settings) -> tuple[list[TokenSettings], str | None]:
    """Tokens from Settings and the tokens file; creates an admin token when there are none.

    Returns the tokens and, only when it was just created, the new admin token to print once.
    """
    tokens = list(settings.auth.tokens)
    if settings.auth.tokens_file is not None:
        tokens.extend(_read_tokens_file(settings.auth.tokens_file))
    if tokens or settings.auth.disabled:
        return tokens, None
    path = settings.data_dir / ADMIN_TOKEN_FILE
    created = None
    if not path.exists():
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        created = secrets.token_urlsafe(32)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(created + "\n")
    token = Path(path).read_text().strip()
    admin = TokenSettings.model_validate({"name": "admin", "token": token, "role": "admin"})
    return [admin], created
