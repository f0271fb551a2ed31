"""Runs the real service (``python -m twin_service serve``) on a free port for tests."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from tests.servers.process import ServerStartError, free_port, wait_healthy

ADMIN_TOKEN = "test-admin-token-0123456789"
WRITER_TOKEN = "test-writer-token-0123456789"
READER_TOKEN = "test-reader-token-0123456789"
ACME_TOKEN = "test-acme-only-token-0123456789"

TOKENS = [
    {"name": "admin", "token": ADMIN_TOKEN, "role": "admin"},
    {"name": "writer", "token": WRITER_TOKEN, "role": "write"},
    {"name": "reader", "token": READER_TOKEN, "role": "read"},
    {"name": "acme", "token": ACME_TOKEN, "role": "write", "namespaces": ["org.acme"]},
]


def service_env(settings: dict[str, str]) -> dict[str, str]:
    """The environment of a service process (or another ``twin-service`` command): this
    one's without its TWIN_ variables, the test tokens, MQTT off, then ``settings``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TWIN_")}
    env.update(
        {
            "TWIN_AUTH__TOKENS": json.dumps(TOKENS),
            "TWIN_MQTT__ENABLED": "false",
            "TWIN_LOG_LEVEL": "warning",
        }
    )
    return env | settings


class ServiceProcess:
    """One service process; ``env`` entries are ``TWIN_*`` settings."""

    def __init__(
        self,
        data_dir: Path,
        env: dict[str, str] | None = None,
        port: int = 0,
        open_files: int | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.port = port or free_port()
        self.env = dict(env or {})
        #: The process's open files limit (soft and hard), when not this one's.
        self.open_files = open_files
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = data_dir / f"service-{self.port}.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(
        self,
        timeout: float = 30.0,
        spawned: Callable[[subprocess.Popen[bytes]], None] | None = None,
    ) -> ServiceProcess:
        """Starts the process (``spawned`` is called with it as soon as it is) and waits
        until it answers ``/health``."""
        if self.proc is not None and self.proc.poll() is None:
            # A second process on the same port would fail to bind, while the health check
            # found the first one healthy: the first was then never stopped.
            raise RuntimeError(f"the service on port {self.port} is running already")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        env = service_env(self.env)
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "twin_service",
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--data-dir",
                str(self.data_dir),
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=None if self.open_files is None else self._limit_open_files,
        )
        try:
            if spawned is not None:
                spawned(self.proc)
            healthy = wait_healthy(self.proc, self.url, timeout, "service", self.log_path)
        except ServerStartError:
            raise RuntimeError(f"service exited at start-up:\n{self.log_tail()}") from None
        except BaseException:
            # Interrupted while waiting (Ctrl-C, SIGTERM: tests/terminate.py): the caller
            # never got this process to stop, so it must not outlive the run.
            self.kill()
            raise
        if healthy:
            return self
        self.stop()
        raise RuntimeError(f"service did not start in {timeout}s:\n{self.log_tail()}")

    def _limit_open_files(self) -> None:
        assert self.open_files is not None
        resource.setrlimit(resource.RLIMIT_NOFILE, (self.open_files, self.open_files))

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def writer_pid(self, timeout: float = 30.0) -> int:
        """The process id of this service's SQLite writer process, from ``/ready``; waits
        while there is none (one that died is being replaced, or the store's check did not
        answer in time on a busy machine)."""
        deadline = time.monotonic() + timeout
        while True:
            store = httpx.get(f"{self.url}/ready", timeout=10).json()["checks"]["store"]
            pid = store.get("writer", {}).get("pid")
            if pid is not None:
                return int(pid)
            if time.monotonic() > deadline:
                raise AssertionError(f"no writer process in {timeout} s: {store}")
            time.sleep(0.05)

    def client(self, token: str = ADMIN_TOKEN, **kwargs: Any) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30, **kwargs)

    def async_client(self, token: str = ADMIN_TOKEN, **kwargs: Any) -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.AsyncClient(base_url=self.url, headers=headers, timeout=30, **kwargs)
