"""REST throughput and latency of twins against a bare FastAPI baseline (issue 2).

Starts the real service (``python -m twin_service serve``: one uvicorn worker, access log
off) on a temporary data dir with a benchmark token, creates a fixed set of twins with
concurrent PUTs, then measures with a separate load generator, at a fixed number of
concurrent connections, for a fixed duration after a warm-up:

- GET   /api/v1/twins/{random id}
- PATCH /api/v1/twins/{random id}  (merge patch of ``desired``)

and the same two requests against ``bench/bare_app.py`` served by uvicorn the same way.
Prints req/s, p50 and p99 for each, and the ratios twin/bare, checked against the targets
of issue 2. The load generator is ``wrk`` (with a Lua script for random ids and bodies) when
it is installed, otherwise an aiohttp client in a child process.

Run from the repository root: ``python -m bench.rest`` (``--help`` for the knobs).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.common import BENCH_TOKEN, ROOT, machine, process_cpu_seconds
from tests.servers.process import free_port, wait_healthy
from tests.terminate import interrupt_on_sigterm

TOKEN = BENCH_TOKEN
NAMESPACE = "bench"
MERGE = "application/merge-patch+json"

#: Targets of issue 2: twin/bare throughput ratios and the p99 ceiling of the twin service.
TARGET_GET_RATIO = 0.70
TARGET_PATCH_RATIO = 0.50
TARGET_P99_MS = 25.0


def twin_id(index: int) -> str:
    return f"{NAMESPACE}:pump-{index:05d}"


def seed_body(index: int) -> dict[str, Any]:
    """The twin every benchmark id starts as (``bench/bare_app.py`` mirrors its shape)."""
    return {
        "attributes": {
            "site": f"plant-{index % 7}",
            "model": "P-100",
            "serial": f"SN-{index:05d}",
            "floor": index % 4,
        },
        "desired": {"fan": {"speed": index % 5}, "mode": "auto", "setpoint": 21.5},
        "reported": {
            "fan": {"speed": (index + 1) % 5},
            "mode": "auto",
            "setpoint": 21.0,
            "firmware": "1.4.2",
        },
    }


def patch_body(rng: random.Random) -> dict[str, Any]:
    """What the Lua script sends, for the Python load generator and the sanity check."""
    return {"desired": {"fan": {"speed": rng.randrange(10)}, "setpoint": rng.randrange(30) + 0.5}}


# -- processes ---------------------------------------------------------------------------------


class Server:
    """A server child process on a free loopback port, ready once ``/health`` answers."""

    def __init__(
        self,
        name: str,
        argv: Callable[[int], list[str]],
        env: dict[str, str],
        log: Path,
        root: Path = ROOT,
    ):
        self.name = name
        self.root = root
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._argv = argv(self.port)
        self._env = env
        self._log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> Server:
        with self._log.open("ab") as log:
            self.proc = subprocess.Popen(
                self._argv, env=self._env, cwd=self.root, stdout=log, stderr=subprocess.STDOUT
            )
        if not wait_healthy(self.proc, self.url, timeout, self.name, self._log):
            self.stop()
            raise RuntimeError(f"{self.name} did not start in {timeout} s; see {self._log}")
        return self

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server so far (Linux ``/proc``; 0 elsewhere)."""
        return process_cpu_seconds(self.proc.pid) if self.proc is not None else 0.0

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _base_env(root: Path = ROOT) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TWIN_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    return env


def twin_server(
    data_dir: Path, log: Path, settings: dict[str, str] | None = None, root: Path = ROOT
) -> Server:
    """The service of the source tree ``root`` (by default this one)."""
    env = _base_env(root)
    env.update(
        {
            "TWIN_AUTH__TOKENS": json.dumps([{"name": "bench", "token": TOKEN, "role": "admin"}]),
            "TWIN_MQTT__ENABLED": "false",
            "TWIN_LOG_LEVEL": "warning",
            **(settings or {}),
        }
    )
    argv = [sys.executable, "-m", "twin_service", "serve", "--host", "127.0.0.1"]
    return Server(
        "twin-service",
        lambda port: [*argv, "--port", str(port), "--data-dir", str(data_dir)],
        env,
        log,
        root,
    )


def bare_server(log: Path) -> Server:
    # Same server options as twin_service.cli: one worker, auto loop/http (uvloop, httptools).
    argv = [sys.executable, "-m", "uvicorn", "bench.bare_app:app", "--host", "127.0.0.1"]
    return Server(
        "bare",
        lambda port: [*argv, "--port", str(port), "--no-access-log", "--log-level", "warning"],
        _base_env(),
        log,
    )


# -- seeding -----------------------------------------------------------------------------------


async def seed(url: str, count: int, concurrency: int) -> float:
    """PUT ``count`` twins with ``concurrency`` requests in flight; returns PUTs per second."""
    # Connections idle in the pool expire before uvicorn's 5 s keep-alive closes them: at
    # httpx's default (also 5 s), a request now and then went out on a connection the
    # server was closing, and the seeding failed with a ReadError (3 of 13 runs).
    limits = httpx.Limits(
        max_connections=concurrency, max_keepalive_connections=concurrency, keepalive_expiry=2.0
    )
    headers = {"Authorization": f"Bearer {TOKEN}"}
    next_index = iter(range(count))
    started = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=60) as api:

        async def worker() -> None:
            for index in next_index:
                response = await api.put(f"/api/v1/twins/{twin_id(index)}", json=seed_body(index))
                if response.status_code not in (200, 201):
                    raise RuntimeError(f"seeding failed: {response.status_code} {response.text}")

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return count / (time.perf_counter() - started)


def response_sizes(url: str) -> tuple[int, int]:
    """Body sizes in bytes of one GET and one PATCH response (to compare the two servers)."""
    headers = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=url, headers=headers, timeout=10) as api:
        got = api.get(f"/api/v1/twins/{twin_id(0)}")
        patched = api.patch(
            f"/api/v1/twins/{twin_id(0)}",
            content=json.dumps(patch_body(random.Random(0))),
            headers={"Content-Type": MERGE},
        )
        for response in (got, patched):
            response.raise_for_status()
        return len(got.content), len(patched.content)


# -- load generation ---------------------------------------------------------------------------


@dataclass
class Result:
    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    #: Server CPU (user + system, all threads) per request: steadier than req/s when other
    #: processes share the cores.
    cpu_us: float = 0.0


# Random ids and bodies per request; done() prints one JSON line the benchmark parses.
_WRK_SCRIPT = r"""
local method, count, token
local ids = {}

function init(args)
  method, count, token = args[1], tonumber(args[2]), args[3]
  math.randomseed(os.time() + tonumber(tostring({}):sub(8), 16) % 100000)
end

function request()
  local path = string.format("/api/v1/twins/bench:pump-%05d", math.random(0, count - 1))
  local headers = {["Authorization"] = "Bearer " .. token}
  if method == "PATCH" then
    headers["Content-Type"] = "application/merge-patch+json"
    local body = string.format('{"desired":{"fan":{"speed":%d},"setpoint":%d.5}}',
      math.random(0, 9), math.random(0, 29))
    return wrk.format("PATCH", path, headers, body)
  end
  return wrk.format("GET", path, headers, nil)
end
"""

#: The ``done()`` every wrk script of the benchmarks ends with: the line :func:`run_wrk` reads.
WRK_DONE = r"""
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK-RESULT {"requests":%d,"us":%d,"p50":%d,"p99":%d,"errors":%d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.connect + e.read + e.write + e.timeout + e.status))
end
"""
_WRK_SCRIPT += WRK_DONE


def run_wrk(
    script: Path, url: str, method: str, count: int, connections: int, seconds: float
) -> Result:
    argv = [
        "wrk",
        "-t1",  # one thread: on 2 cores the other core belongs to the server
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        "--timeout",
        "10s",
        "-s",
        str(script),
        url,
        "--",
        method,
        str(count),
        TOKEN,
    ]
    out = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
    line = next(x for x in out.splitlines() if x.startswith("WRK-RESULT "))
    raw = json.loads(line.removeprefix("WRK-RESULT "))
    elapsed = raw["us"] / 1e6
    return Result(
        requests=raw["requests"],
        seconds=elapsed,
        rps=raw["requests"] / elapsed,
        p50_ms=raw["p50"] / 1000,
        p99_ms=raw["p99"] / 1000,
        errors=raw["errors"],
    )


async def _python_load(
    url: str, method: str, count: int, connections: int, seconds: float
) -> dict[str, Any]:
    import aiohttp

    latencies: list[float] = []
    errors = 0
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": MERGE}
    connector = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(url, connector=connector, headers=headers) as session:
        deadline = time.perf_counter() + seconds

        async def worker(rng: random.Random) -> None:
            nonlocal errors
            while time.perf_counter() < deadline:
                path = f"/api/v1/twins/{twin_id(rng.randrange(count))}"
                body = json.dumps(patch_body(rng)) if method == "PATCH" else None
                start = time.perf_counter()
                async with session.request(method, path, data=body) as response:
                    await response.read()
                    if response.status >= 400:
                        errors += 1
                latencies.append(time.perf_counter() - start)

        started = time.perf_counter()
        await asyncio.gather(*(worker(random.Random(i)) for i in range(connections)))
        elapsed = time.perf_counter() - started
    latencies.sort()
    return {
        "requests": len(latencies),
        "seconds": elapsed,
        "p50": latencies[len(latencies) // 2] if latencies else 0.0,
        "p99": latencies[int(len(latencies) * 0.99)] if latencies else 0.0,
        "errors": errors,
    }


def _python_load_child(queue: Any, *args: Any) -> None:
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    queue.put(asyncio.run(_python_load(*args)))


def run_python(url: str, method: str, count: int, connections: int, seconds: float) -> Result:
    """The fallback load generator, in its own process so it has its own event loop."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    child = context.Process(
        target=_python_load_child, args=(queue, url, method, count, connections, seconds)
    )
    child.start()
    raw = queue.get(timeout=seconds + 60)
    child.join()
    return Result(
        requests=raw["requests"],
        seconds=raw["seconds"],
        rps=raw["requests"] / raw["seconds"],
        p50_ms=raw["p50"] * 1000,
        p99_ms=raw["p99"] * 1000,
        errors=raw["errors"],
    )


# -- the benchmark -----------------------------------------------------------------------------


@dataclass
class Options:
    twins: int
    connections: int
    duration: float
    warmup: float
    rounds: int
    loadgen: str
    profile: Path | None
    #: Extra ``TWIN_*`` environment of the service (``--set``), for A/B runs of a setting.
    settings: dict[str, str] = field(default_factory=dict)


PHASES = [("twin", "GET"), ("twin", "PATCH"), ("bare", "GET"), ("bare", "PATCH")]


def measure(
    options: Options, servers: dict[str, Server], script: Path, profile: Callable[[], Any] | None
) -> dict[tuple[str, str], Result]:
    results: dict[tuple[str, str], Result] = {}
    for server, method in PHASES:

        def load(seconds: float, server: str = server, method: str = method) -> Result:
            url = servers[server].url
            if options.loadgen == "wrk":
                return run_wrk(script, url, method, options.twins, options.connections, seconds)
            return run_python(url, method, options.twins, options.connections, seconds)

        load(options.warmup)
        recorder = profile() if profile and (server, method) == ("twin", "PATCH") else None
        cpu_before = servers[server].cpu_seconds()
        result = load(options.duration)
        result.cpu_us = (servers[server].cpu_seconds() - cpu_before) / result.requests * 1e6
        results[server, method] = result
        if recorder is not None:
            recorder.wait()
        print(
            f"  {server:5} {method:5} {result.rps:9,.0f} req/s  p50 {result.p50_ms:6.2f} ms  "
            f"p99 {result.p99_ms:6.2f} ms  cpu {result.cpu_us:5.0f} us/req  "
            f"errors {result.errors}  (load avg {os.getloadavg()[0]:.1f})",
            flush=True,
        )
    return results


def median_result(results: list[Result]) -> Result:
    return Result(
        requests=sum(r.requests for r in results),
        seconds=sum(r.seconds for r in results),
        rps=statistics.median(r.rps for r in results),
        p50_ms=statistics.median(r.p50_ms for r in results),
        p99_ms=statistics.median(r.p99_ms for r in results),
        errors=sum(r.errors for r in results),
        cpu_us=statistics.median(r.cpu_us for r in results),
    )


def report(final: dict[tuple[str, str], Result]) -> dict[str, Any]:
    get_ratio = final["twin", "GET"].rps / final["bare", "GET"].rps
    patch_ratio = final["twin", "PATCH"].rps / final["bare", "PATCH"].rps
    checks = {
        f"GET twin/bare >= {TARGET_GET_RATIO:.0%}": get_ratio >= TARGET_GET_RATIO,
        f"PATCH twin/bare >= {TARGET_PATCH_RATIO:.0%}": patch_ratio >= TARGET_PATCH_RATIO,
        f"GET p99 < {TARGET_P99_MS:g} ms": final["twin", "GET"].p99_ms < TARGET_P99_MS,
        f"PATCH p99 < {TARGET_P99_MS:g} ms": final["twin", "PATCH"].p99_ms < TARGET_P99_MS,
    }
    print()
    print(f"{'':12}{'req/s':>10}{'p50 ms':>10}{'p99 ms':>10}{'cpu us/req':>12}{'errors':>8}")
    for (server, method), r in final.items():
        print(
            f"{server + ' ' + method:12}{r.rps:10,.0f}{r.p50_ms:10.2f}{r.p99_ms:10.2f}"
            f"{r.cpu_us:12.0f}{r.errors:8}"
        )
    print()
    print(f"ratio twin/bare  GET {get_ratio:.1%}   PATCH {patch_ratio:.1%}")
    for name, ok in checks.items():
        print(f"  {'MET ' if ok else 'MISS'}  {name}")
    return {
        "results": {f"{s} {m}": asdict(r) for (s, m), r in final.items()},
        "ratios": {"GET": get_ratio, "PATCH": patch_ratio},
        "targets": checks,
    }


def run(options: Options) -> dict[str, Any]:
    if options.loadgen == "wrk" and shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed (Debian: apt-get install wrk); use --loadgen python")
    with tempfile.TemporaryDirectory(prefix="twin-bench-rest-") as tmp:
        work = Path(tmp)
        script = work / "rest.lua"
        script.write_text(_WRK_SCRIPT)
        servers = {
            "twin": twin_server(work / "data", work / "twin.log", options.settings),
            "bare": bare_server(work / "bare.log"),
        }
        try:
            for server in servers.values():
                server.start()
            print(machine())
            print(f"seeding {options.twins} twins ...", flush=True)
            rate = asyncio.run(seed(servers["twin"].url, options.twins, options.connections))
            print(f"  {rate:,.0f} PUT/s")
            for name, server in servers.items():
                got, patched = response_sizes(server.url)
                print(f"  {name}: GET body {got} bytes, PATCH body {patched} bytes")
            profile = None
            if options.profile is not None:
                profile = _py_spy(servers["twin"], options.profile, options.duration)
            rounds: list[dict[tuple[str, str], Result]] = []
            for number in range(1, options.rounds + 1):
                print(
                    f"round {number}/{options.rounds} ({options.loadgen}, "
                    f"{options.connections} connections, {options.duration:g} s per phase)"
                )
                rounds.append(measure(options, servers, script, profile))
                profile = None  # one profile is enough
        finally:
            for server in servers.values():
                server.stop()
    final = {phase: median_result([r[phase] for r in rounds]) for phase in PHASES}
    summary = report(final)
    summary["options"] = {k: str(v) for k, v in asdict(options).items()}
    summary["machine"] = machine()
    return summary


def _py_spy(server: Server, out: Path, seconds: float) -> Callable[[], subprocess.Popen[bytes]]:
    """Starts ``py-spy record`` on the service for one measured phase (needs ptrace rights)."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    assert server.proc is not None
    pid = server.proc.pid
    fmt = {".json": "speedscope", ".txt": "raw"}.get(out.suffix, "flamegraph")

    def start() -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [
                py_spy,
                "record",
                "--pid",
                str(pid),
                "--duration",
                str(round(seconds)),
                "--rate",
                "250",
                "--nonblocking",
                "--threads",
                "--subprocesses",  # the SQLite writer process too
                "--format",
                fmt,
                "-o",
                str(out),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    return start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--twins", type=int, default=10_000, help="twins created before (10000)")
    parser.add_argument("--connections", type=int, default=32, help="concurrent clients (32)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per phase (10)")
    parser.add_argument("--warmup", type=float, default=3.0, help="warm-up seconds per phase (3)")
    parser.add_argument("--rounds", type=int, default=1, help="rounds; medians are reported (1)")
    parser.add_argument(
        "--loadgen",
        choices=["wrk", "python"],
        default="wrk" if shutil.which("wrk") else "python",
        help="load generator (wrk when installed, else aiohttp in a child process)",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        help="py-spy record of the service during the first twin PATCH phase "
        "(.svg flamegraph, .json speedscope, .txt collapsed stacks, the writer process "
        "included); the figures of that round are perturbed",
    )
    parser.add_argument("--json", type=Path, help="also write the results here as JSON")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="TWIN_NAME=VALUE",
        help="a setting of the service as its environment variable (repeatable)",
    )
    args = parser.parse_args(argv)
    if not all(item.startswith("TWIN_") and "=" in item for item in args.set):
        parser.error("--set takes TWIN_NAME=VALUE")
    settings = dict(item.split("=", 1) for item in args.set)
    options = Options(
        args.twins,
        args.connections,
        args.duration,
        args.warmup,
        args.rounds,
        args.loadgen,
        args.profile,
        settings,
    )
    summary = run(options)
    if args.json is not None:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    interrupt_on_sigterm()  # servers are stopped on SIGTERM too
    raise SystemExit(main())
