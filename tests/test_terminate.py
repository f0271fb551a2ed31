"""A test run ended by SIGTERM tears its fixtures down (tests/terminate.py)."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

SLOW_TEST = textwrap.dedent(
    """
    import pathlib
    import time

    import pytest

    STATE = pathlib.Path(__file__).with_name("state")


    @pytest.fixture(scope="session")
    def server():
        STATE.write_text("up")
        yield
        STATE.write_text("torn down")


    def test_slow(server):
        time.sleep(120)
    """
)


@pytest.mark.parametrize("plugin", [True, False])
def test_sigterm_tears_session_fixtures_down(tmp_path: Path, plugin: bool) -> None:
    """With the plugin, a session fixture (a server) is torn down; without it, SIGTERM ends
    pytest at once and the fixture is left "up": what the plugin fixes."""
    (tmp_path / "test_slow.py").write_text(SLOW_TEST)
    state = tmp_path / "state"
    argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly"]
    if plugin:
        argv += ["-p", "tests.terminate"]
    proc = subprocess.Popen(
        [*argv, str(tmp_path / "test_slow.py")],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        while not state.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert state.read_text() == "up"
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=60)[0].decode()
    finally:
        proc.kill()
    if plugin:
        assert state.read_text() == "torn down", output
        assert proc.returncode == pytest.ExitCode.INTERRUPTED, output
        assert "KeyboardInterrupt" in output and "terminated by signal 15" in output
    else:
        assert state.read_text() == "up"
        assert proc.returncode == -signal.SIGTERM
