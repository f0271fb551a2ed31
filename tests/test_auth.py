"""Token checks of :class:`TokenRegistry` (pure: no server)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from twin_service.auth import TokenRegistry
from twin_service.errors import Unauthorized
from twin_service.settings import TokenSettings

GOOD = "g" * 32


def registry() -> TokenRegistry:
    return TokenRegistry([TokenSettings(name="ops", token=GOOD, role="write")])


def test_a_valid_token_is_accepted_every_time() -> None:
    tokens = registry()
    for _ in range(3):  # the later ones come from the accepted headers
        principal = tokens.authenticate(f"Bearer {GOOD}")
        assert (principal.name, principal.role) == ("ops", "write")
    assert tokens.authenticate(f"bearer   {GOOD} ").name == "ops"


@pytest.mark.parametrize(
    "header", [None, "", f"Basic {GOOD}", "Bearer ", "Bearer " + "x" * 32, GOOD, f"Bearer {GOOD}x"]
)
def test_anything_else_is_refused_again_and_again(header: str | None) -> None:
    tokens = registry()
    tokens.authenticate(f"Bearer {GOOD}")
    for _ in range(2):  # a refusal is never remembered as an acceptance
        with pytest.raises(Unauthorized):
            tokens.authenticate(header)


def test_replaced_tokens_forget_the_headers_accepted_before() -> None:
    """The accepted headers outlived a change of tokens: a revoked token went on working."""
    tokens = registry()
    assert tokens.authenticate(f"Bearer {GOOD}").name == "ops"
    other = "o" * 32
    tokens.replace([TokenSettings(name="new", token=other, role="read")])
    with pytest.raises(Unauthorized):
        tokens.authenticate(f"Bearer {GOOD}")
    assert tokens.authenticate(f"Bearer {other}").role == "read"


@pytest.mark.parametrize(
    "token",
    [
        " " + GOOD,
        GOOD + " ",
        GOOD[:8] + " " + GOOD[8:],
        GOOD + "\u00e9",
        GOOD + "\x00",
        GOOD + "\x7f",
    ],
)
def test_a_token_no_header_can_carry_is_refused(token: str) -> None:
    with pytest.raises(ValidationError, match="must be visible ASCII characters"):
        TokenSettings(name="ops", token=token)


def test_every_visible_ascii_character_may_be_in_a_token() -> None:
    visible = "".join(map(chr, range(0x21, 0x7F)))
    assert TokenSettings(name="ops", token=visible).token == visible


def test_a_held_token_follows_a_reload_and_a_revoked_one_calls_back_once() -> None:
    """Open streams kept the principal they connected with: a revoked token went on
    receiving changes and writing until its client left."""
    tokens = registry()
    other = "o" * 32
    tokens.replace(
        [
            TokenSettings(name="ops", token=GOOD, role="write"),
            TokenSettings(name="other", token=other, role="write", namespaces=["a", "b"]),
        ]
    )
    kept, dropped = tokens.hold(f"Bearer {GOOD}"), tokens.hold_token(other)
    calls: list[str] = []
    kept.on_revoked(lambda: calls.append("kept"))
    dropped.on_revoked(lambda: calls.append("dropped"))
    changed = TokenSettings(name="ops", token=GOOD, role="read", namespaces=["a"])
    assert tokens.replace([changed]) == 1
    assert (kept.current().role, kept.current().namespaces) == ("read", frozenset({"a"}))
    assert dropped.revoked and calls == ["dropped"]
    with pytest.raises(Unauthorized) as refused:
        dropped.current()
    assert refused.value.code == "auth.revoked"
    # Told once; a callback set after the revocation is called at once.
    assert tokens.replace([changed]) == 0
    dropped.on_revoked(lambda: calls.append("late"))
    assert calls == ["dropped", "late"]
    # A released credential (its connection closed) no longer hears of reloads.
    kept.release()
    assert tokens.replace([]) == 0
    assert not kept.revoked and calls == ["dropped", "late"]


@pytest.mark.parametrize("header", [None, "", f"Basic {GOOD}", "Bearer " + "x" * 32])
def test_a_token_is_held_only_if_valid(header: str | None) -> None:
    with pytest.raises(Unauthorized):
        registry().hold(header)


def test_with_auth_disabled_a_held_token_is_the_anonymous_admin_for_good() -> None:
    tokens = TokenRegistry([], disabled=True)
    held = tokens.hold(None)
    assert tokens.replace([]) == 0
    assert held.current().role == "admin" and not held.revoked
