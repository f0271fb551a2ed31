"""The skip-or-fail rule for tests that need a real server.

On a developer's machine a missing server binary or toolchain skips the test with a reason that
says how to get it. In CI, where `TWIN_TEST_REQUIRE_SERVERS=1`, a missing server is a failure:
a green run must mean every server test really ran.
"""

from __future__ import annotations

import os
from typing import NoReturn

import pytest

REQUIRE_SERVERS_ENV = "TWIN_TEST_REQUIRE_SERVERS"


def servers_required() -> bool:
    """True when the environment forbids skipping server tests."""
    return os.environ.get(REQUIRE_SERVERS_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


def require_server(name: str, reason: str) -> NoReturn:
    """Skip the current test because server `name` is unavailable, or fail it in CI.

    `reason` should tell the reader how to fix it, e.g.
    ``require_server("mosquitto", "not installed: run scripts/servers/install-mosquitto")``.
    """
    message = f"{name} {reason}"
    if servers_required():
        pytest.fail(f"{message} ({REQUIRE_SERVERS_ENV}=1 forbids skipping)", pytrace=False)
    pytest.skip(message)
