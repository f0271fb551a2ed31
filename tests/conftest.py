"""Shared fixtures: real servers (tests/servers) and the real twin service process."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings

from tests.servers.require import servers_required

# Hypothesis's time limits are timed assertions: a property test failed its 200 ms deadline,
# or "Input generation is slow", when other work loaded the machine. Speed is for bench/.
settings.register_profile(
    "twin-service", deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("twin-service")

pytest_plugins = [
    "tests.servers.fixtures",
    "tests.servers.search_fixtures",
    "tests.service_fixtures",
    "tests.store_fixtures",
    "tests.terminate",
]


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """In CI (TWIN_TEST_REQUIRE_SERVERS=1) any skipped test fails the run, whatever skipped
    it: a green run must mean every test ran (a test that skipped as root, as CI runs, went
    unnoticed in the counts)."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter is not None else []
    if servers_required() and skipped and exitstatus == pytest.ExitCode.OK:
        names = ", ".join(report.nodeid for report in skipped[:5])
        reporter.write("\n")
        reporter.write_line(f"{len(skipped)} test(s) skipped, which CI forbids: {names}", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
