"""Small helpers shared by the benchmarks: the service as a child process, an HTTP load loop
bounded by a request count and a time budget, latency summaries and Markdown tables.

The load loop runs in the calling process (the service is always a separate process), with
aiohttp, which costs far less client CPU per request than httpx; on a small machine the
client still competes with the server for cores, which every figure should say.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.servers.process import free_port, wait_healthy

ROOT = Path(__file__).resolve().parent.parent
BENCH_TOKEN = "bench-admin-token-0123456789abcdef"


def machine() -> str:
    """One line describing where the figures were measured."""
    return (
        f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"SQLite {__import__('sqlite3').sqlite_version}"
    )


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds so far of process ``pid`` and its live child processes
    (the SQLite writer of the service), from Linux ``/proc`` (0 elsewhere)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat.rsplit(")", 1)[1].split()
    total = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total + sum(process_cpu_seconds(child) for child in _children(pid))


def _children(pid: int) -> list[int]:
    children: list[int] = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            children += [int(c) for c in (task / "children").read_text().split()]
    except OSError:
        pass
    return children


class Service:
    """``python -m twin_service serve`` on a free loopback port with one admin token.

    ``env`` adds ``TWIN_*`` settings; MQTT is off and the log level is ``warning`` unless
    overridden. Use as a context manager or call :meth:`start` / :meth:`stop`.
    """

    def __init__(
        self, data_dir: Path, env: dict[str, str] | None = None, token: str = BENCH_TOKEN
    ) -> None:
        self.data_dir = data_dir
        self.token = token
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = data_dir / "service.log"
        self.env = {
            "TWIN_AUTH__TOKENS": json.dumps([{"name": "bench", "token": token, "role": "admin"}]),
            "TWIN_MQTT__ENABLED": "false",
            "TWIN_LOG_LEVEL": "warning",
            **(env or {}),
        }
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def start(self, timeout: float = 60.0) -> Service:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("TWIN_")}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        env.update(self.env)
        argv = [sys.executable, "-m", "twin_service", "serve", "--host", "127.0.0.1"]
        argv += ["--port", str(self.port), "--data-dir", str(self.data_dir)]
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                argv, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT
            )
        if not wait_healthy(self.proc, self.url, timeout, "the service", self.log_path):
            self.stop()
            raise RuntimeError(f"the service did not start in {timeout} s; see {self.log_path}")
        return self

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def cpu_seconds(self) -> float:
        """User + system CPU seconds of the service so far (Linux ``/proc``; 0 elsewhere)."""
        return process_cpu_seconds(self.proc.pid) if self.proc is not None else 0.0

    def __enter__(self) -> Service:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()


# -- latency summaries --------------------------------------------------------------------------


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The nearest-rank percentile ``q`` (0-100) of already sorted values; 0.0 when empty."""
    if not sorted_values:
        return 0.0
    rank = max(1, min(len(sorted_values), round(q / 100 * len(sorted_values) + 0.5)))
    return sorted_values[rank - 1]


@dataclass(frozen=True)
class Summary:
    """Outcome of one measured run. Latencies in milliseconds."""

    requests: int
    errors: int
    seconds: float
    p50_ms: float
    p99_ms: float
    max_ms: float

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0

    @classmethod
    def of(cls, latencies: list[float], seconds: float, errors: int = 0) -> Summary:
        """From per-request latencies in seconds and the wall time of the whole run."""
        ordered = sorted(latencies)
        return cls(
            requests=len(ordered),
            errors=errors,
            seconds=seconds,
            p50_ms=percentile(ordered, 50) * 1000,
            p99_ms=percentile(ordered, 99) * 1000,
            max_ms=(ordered[-1] * 1000) if ordered else 0.0,
        )


# -- HTTP load ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    params: dict[str, str] | None = None
    body: bytes | None = None
    content_type: str | None = None


#: Builds the next request from a per-worker random generator (so runs are reproducible).
RequestFactory = Callable[[random.Random], Request]


async def load(
    url: str,
    headers: dict[str, str],
    make: RequestFactory,
    *,
    concurrency: int,
    count: int | None = None,
    seconds: float | None = None,
    warmup: int = 0,
    seed: int = 0,
    ok: Callable[[int], bool] = lambda status: status < 400,
) -> Summary:
    """Send requests from ``concurrency`` workers until ``count`` were sent or ``seconds``
    passed (whichever comes first; at least one bound is required), after ``warmup``
    unmeasured requests. Every response body is read; a status failing ``ok`` is an error.
    """
    import aiohttp

    if count is None and seconds is None:
        raise ValueError("load() needs a count, a time budget or both")
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(
        url, connector=connector, headers=headers, timeout=timeout
    ) as session:

        async def send(rng: random.Random) -> tuple[float, bool]:
            request = make(rng)
            extra = {"Content-Type": request.content_type} if request.content_type else None
            started = time.perf_counter()
            async with session.request(
                request.method,
                request.path,
                params=request.params,
                data=request.body,
                headers=extra,
            ) as response:
                await response.read()
                good = ok(response.status)
            return time.perf_counter() - started, good

        warm_rng = random.Random(seed - 1)
        for _ in range(warmup):
            await send(warm_rng)

        latencies: list[float] = []
        errors = 0
        remaining = count if count is not None else -1
        started = time.perf_counter()
        deadline = started + seconds if seconds is not None else float("inf")

        async def worker(rng: random.Random) -> None:
            nonlocal remaining, errors
            while remaining != 0 and time.perf_counter() < deadline:
                remaining -= 1
                latency, good = await send(rng)
                latencies.append(latency)
                errors += not good

        await asyncio.gather(*(worker(random.Random(seed * 1000 + i)) for i in range(concurrency)))
        elapsed = time.perf_counter() - started
    return Summary.of(latencies, elapsed, errors)


def run_load(*args: Any, **kwargs: Any) -> Summary:
    """:func:`load` on a fresh event loop (uvloop when installed)."""
    try:
        import uvloop

        return uvloop.run(load(*args, **kwargs))
    except ImportError:
        return asyncio.run(load(*args, **kwargs))


# -- output -------------------------------------------------------------------------------------


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub-flavoured Markdown table; numbers right-aligned."""

    def cell(value: object) -> str:
        if isinstance(value, float):
            return f"{value:,.1f}" if value >= 100 else f"{value:.2f}"
        if isinstance(value, int):
            return f"{value:,}"
        return str(value)

    body = [[cell(v) for v in row] for row in rows]
    numeric = [
        all(isinstance(row[i], int | float) for row in rows) if rows else False
        for i in range(len(header))
    ]
    lines = [
        "| " + " | ".join(header) + " |",
        "| " + " | ".join("---:" if n else "---" for n in numeric) + " |",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)
