"""Token checks of :class:`TokenRegistry` (pure: no server)."""

from __future__ import annotations

import pytest

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
