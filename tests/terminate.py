"""A terminated test run stops the servers it started, as an interrupted one does.

Ctrl-C raises ``KeyboardInterrupt`` in pytest, which then tears its fixtures down and so
stops mosquitto, FerretDB, the search engine and the service processes (they run in
sessions of their own, out of reach of the terminal's signals). SIGTERM, from a cancelled
CI job, ``timeout`` or ``kill``, ended pytest at once by default, with no teardown: every
server it had started kept running, the search engine holding gigabytes.
"""

from __future__ import annotations

import signal
from types import FrameType

import pytest


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"terminated by signal {signum}")


def interrupt_on_sigterm() -> None:
    """Make SIGTERM end this process as Ctrl-C does (the benchmarks use it too: a ``timeout``
    left the servers of bench.chaos running)."""
    signal.signal(signal.SIGTERM, _interrupt)


def pytest_configure(config: pytest.Config) -> None:
    interrupt_on_sigterm()
