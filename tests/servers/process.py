"""Child-process plumbing shared by the server helpers: ports, readiness and shutdown."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import random
import signal
import socket
import subprocess
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar, Protocol, Self, TypeVar

import httpx

REPO_ROOT = Path(__file__).resolve().parents[2]
"""Root of the checkout; build products live under ``REPO_ROOT / ".cache"``."""


class ServerStartError(RuntimeError):
    """A server process exited or never became reachable; the message holds its log tail."""


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that was free a moment ago, below the ephemeral range.

    Outgoing connections take their local ports from the ephemeral range, and so does
    ``bind(0)``. A server given such a port and later restarted on it (after a SIGKILL, say)
    could find it taken by some client's connection: CI saw a service fail to start again
    with "address already in use". Ports below the range are only ever taken by a bind.
    """
    low = _ephemeral_low()
    if low > 10_100:
        for _ in range(200):
            port = random.randrange(10_000, low)
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                try:
                    sock.bind((host, port))
                except OSError:
                    continue
                return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_healthy(
    proc: subprocess.Popen[bytes], url: str, timeout: float, name: str, log: Path
) -> bool:
    """Poll ``url``/health until it answers 200 (True) or ``timeout`` passes (False).

    Raises :class:`ServerStartError` if the process exits first.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServerStartError(f"{name} exited at start-up; see {log}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    return False


def port_accepts(host: str, port: int, timeout: float = 0.2) -> bool:
    """True when a TCP connection to host:port succeeds."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def log_tail(*paths: Path, lines: int = 40) -> str:
    """The last lines of each existing log file, for error messages."""
    parts = []
    for path in paths:
        if path.exists():
            text = path.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {path.name} ---\n" + "\n".join(text))
    return "\n".join(parts) or "(no log output)"


class ManagedProcess:
    """One child process: started in its own session, stopped with SIGTERM then SIGKILL.

    Every running instance is also stopped at interpreter exit, so an interrupted test run does
    not leave servers behind.
    """

    _live: ClassVar[weakref.WeakSet[ManagedProcess]] = weakref.WeakSet()

    def __init__(self, argv: Sequence[str | os.PathLike[str]], output: Path) -> None:
        self.argv = [os.fspath(arg) for arg in argv]
        self.output = output
        self._popen: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self._popen.pid if self._popen is not None else None

    def running(self) -> bool:
        return self._popen is not None and self._popen.poll() is None

    def start(self, env: dict[str, str] | None = None) -> None:
        if self.running():
            raise RuntimeError(f"already running: {self.argv[0]} (pid {self.pid})")
        with self.output.open("ab") as out:
            self._popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, **(env or {})},
                # Own session: a Ctrl-C aimed at pytest must not kill the server before the
                # fixture finalizers run.
                start_new_session=True,
            )
        ManagedProcess._live.add(self)

    def wait_until(
        self, ready: Callable[[], bool], timeout: float, what: str, logs: Sequence[Path]
    ) -> None:
        """Poll `ready` until true; raise ServerStartError if the process dies or time runs out."""
        deadline = time.monotonic() + timeout
        while True:
            if ready():
                return
            if self._popen is None or self._popen.poll() is not None:
                code = None if self._popen is None else self._popen.returncode
                raise ServerStartError(
                    f"{what} exited with code {code} before it was ready\n{log_tail(*logs)}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise ServerStartError(f"{what} not ready after {timeout:.0f}s\n{log_tail(*logs)}")
            time.sleep(0.02)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, wait up to `timeout`, then SIGKILL. Returns the exit code."""
        popen, self._popen = self._popen, None
        ManagedProcess._live.discard(self)
        if popen is None:
            return None
        if popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                popen.send_signal(signal.SIGTERM)
            try:
                popen.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    popen.kill()
                popen.wait(5)
        return popen.returncode

    def kill(self) -> None:
        """SIGKILL without grace, to simulate a crash."""
        popen, self._popen = self._popen, None
        ManagedProcess._live.discard(self)
        if popen is not None and popen.poll() is None:
            popen.kill()
            popen.wait(5)


@atexit.register
def _stop_leftovers() -> None:
    for process in list(ManagedProcess._live):
        process.stop(timeout=5.0)


class LocalServer:
    """What every test server helper shares: one :class:`ManagedProcess` behind ``start``.

    Subclasses set ``self._process`` in ``start`` and return ``self``.
    """

    _process: ManagedProcess | None = None

    def start(self) -> Self:
        raise NotImplementedError

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def running(self) -> bool:
        return self._process is not None and self._process.running()

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (the server shuts down cleanly), SIGKILL after ``timeout``."""
        if self._process is not None:
            self._process.stop(timeout)
            self._process = None

    def kill(self) -> None:
        """SIGKILL: a crash."""
        if self._process is not None:
            self._process.kill()
            self._process = None

    def restart(self) -> Self:
        """Stop and start again on the same port with the same data."""
        self.stop()
        return self.start()

    async def astart(self) -> Self:
        return await asyncio.to_thread(self.start)

    async def astop(self) -> None:
        await asyncio.to_thread(self.stop)

    async def arestart(self) -> Self:
        return await asyncio.to_thread(self.restart)


class _Server(Protocol):
    def start(self) -> Any: ...

    def stop(self) -> Any: ...


_S = TypeVar("_S", bound=_Server)


def started_then_stopped(server: _S) -> Iterator[_S]:
    """The body of a fixture (``yield from``): start ``server``, yield it, stop it after."""
    try:
        server.start()
        yield server
    finally:
        server.stop()
