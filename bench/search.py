"""Search benchmark of the built-in SQLite index (issue 3). Not a test.

1. Loads ``--twins`` (default 100,000) generated twins of about 30 leaves each (attributes,
   desired and reported config, live telemetry; seeded, so every run has the same data) in
   process, through the store API (``SqliteStore.write`` with twins built by
   ``apply_change``), not through 100,000 HTTP requests. That is the same write path as the
   service's (group commit, index rows in the same transaction), minus HTTP.
2. Starts the real service on that data dir and measures searches through HTTP at
   concurrency 1 and 8: p50, p99 and req/s of each query below.
3. Stops it and measures the cost of the index on the service's write throughput: per
   round and side (order alternating), the service on a fresh copy of the data with
   ``search`` builtin or off, merge PATCHes of random twins through HTTP for
   ``--write-seconds`` at ``--write-concurrency`` (wrk when installed). The ratio of the
   median PATCH/s on/off is the target of issue 3 (>= 0.5).
4. The same cost for the store alone, in process: ``--index-writes`` merge patches through
   ``SqliteStore.write`` (group commit) with ``builtin_index=True`` and ``False`` on two
   fresh copies, per round, order alternating. With no HTTP, no request handling and no
   load generator sharing the cores, this isolates what the index rows cost SQLite.

Run from the repository root: ``python -m bench.search`` (``--help`` for the knobs).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import math
import os
import random
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import Request, Service, Summary, machine, markdown_table, run_load
from bench.rest import WRK_DONE, run_wrk
from tests.terminate import interrupt_on_sigterm
from twin_service.collector import tune_gc
from twin_service.settings import Settings
from twin_service.store.base import Write
from twin_service.store.sqlite import SqliteStore
from twin_service.twin.document import Twin, apply_change, now_iso
from twin_service.twin.jsonvalue import Limits, dumps
from twin_service.twin.operations import merge_patch_twin, replace_twin
from twin_service.types import JSONObject

NAMESPACE = "org.bench"
SITES = 50
MODELS = 20
OWNERS = 1000
VENDORS = 10
MERGE = "application/merge-patch+json"
MODES = ("auto", "eco", "boost", "manual")
TAGS = ("indoor", "outdoor", "critical", "spare", "legacy", "pilot", "atex", "backup")


def twin_id(i: int) -> str:
    return f"{NAMESPACE}:pump-{i:06d}"


def generate(i: int, rng: random.Random) -> JSONObject:
    """Twin number ``i``: 12 attribute leaves (+ tags), 4 desired, 6 reported, 7 live.

    About 10% of the twins have a reported config that differs from the desired one (so a
    non-empty delta); uptimes are uniform in [0, 10^7) seconds.
    """
    speed = rng.randrange(6)
    desired: JSONObject = {
        "mode": rng.choice(MODES),
        "setpoint": round(rng.uniform(10, 90), 1),
        "fan": {"speed": speed},
        "interval": rng.choice((1, 5, 10, 60)),
    }
    reported: JSONObject = {**desired, "fan": {"speed": speed}}
    if rng.random() < 0.1:
        reported["fan"] = {"speed": (speed + 1) % 6}
    return {
        "definition": f"acme:pump:{1 + i % 3}",
        "attributes": {
            "site": f"plant-{rng.randrange(SITES):02d}",
            "model": f"P-{100 * (1 + rng.randrange(MODELS))}",
            "owner": f"owner-{rng.randrange(OWNERS):04d}",
            "vendor": f"vendor-{rng.randrange(VENDORS)}",
            "serial": f"SN-{i:07d}",
            "firmware": f"{rng.randrange(1, 4)}.{rng.randrange(10)}.{rng.randrange(20)}",
            "installed": f"20{rng.randrange(15, 25)}-{rng.randrange(1, 13):02d}-01",
            "location": {
                "lat": round(rng.uniform(-60, 70), 5),
                "lon": round(rng.uniform(-180, 180), 5),
            },
            "ratedKw": rng.choice((1.5, 3, 5.5, 7.5, 11, 15)),
            "line": rng.randrange(1, 9),
            "active": rng.random() < 0.95,
            "tags": rng.sample(TAGS, rng.randrange(1, 4)),
        },
        "desired": {"config": desired},
        "reported": {
            "config": reported,
            "uptime": rng.randrange(10_000_000),
            "firmware": f"{rng.randrange(1, 4)}.{rng.randrange(10)}.0",
        },
        "live": {
            "telemetry": {
                "temp": round(rng.gauss(55, 10), 2),
                "pressure": round(rng.uniform(1, 9), 3),
                "rpm": rng.randrange(600, 3600),
                "vibration": round(rng.expovariate(4), 4),
                "power": round(rng.uniform(0.5, 15), 2),
                "flow": round(rng.uniform(0, 120), 1),
            },
            "ts": now_iso(),
        },
    }


# -- loading ------------------------------------------------------------------------------------


def open_store(settings: Settings) -> SqliteStore:
    return SqliteStore(
        settings.data_dir / settings.sqlite.file_name,
        settings.sqlite,
        settings.stream,
        gc_thresholds=settings.gc_thresholds,
    )


async def load_twins(settings: Settings, count: int, seed: int) -> float:
    """Write ``count`` new twins through ``SqliteStore.write``; returns twins per second."""
    store = open_store(settings)
    await store.open()
    rng = random.Random(seed)
    limits = settings.limits.to_limits()
    started = time.perf_counter()
    try:
        for start in range(0, count, 2000):
            writes = []
            for i in range(start, min(count, start + 2000)):
                writes.append(build_write(None, twin_id(i), generate(i, rng), limits))
            await asyncio.gather(*(store.write(w) for w in writes))
            if start and start % 20_000 == 0:
                rate = start / (time.perf_counter() - started)
                print(f"  loaded {start:,} twins ({rate:,.0f}/s)", flush=True)
    finally:
        await store.close()
    return count / (time.perf_counter() - started)


def build_write(current: Twin | None, tid: str, body: JSONObject, limits: Limits) -> Write:
    edit = replace_twin(body, tid) if current is None else merge_patch_twin(current, body)
    twin, event = apply_change(
        current,
        twin_id=tid,
        namespace=NAMESPACE,
        values=edit.values,
        written=edit.written,
        timestamp=now_iso(),
        origin="bench",
        limits=limits,
    )
    return Write(tid, current.revision if current else 0, twin, event, current)


# -- searches over HTTP -------------------------------------------------------------------------


def queries(count: int) -> dict[str, tuple[str, Callable[[random.Random], Request]]]:
    """Name -> (description, request factory). Parameters vary per request."""
    path = "/api/v1/search/twins"

    def search(filter: Callable[[random.Random], str]) -> Callable[[random.Random], Request]:
        return lambda rng: Request("GET", path, {"filter": filter(rng), "namespaces": NAMESPACE})

    # gt(reported/uptime, x) with x chosen so that about 1% of the twins match.
    uptime_cut = 9_900_000
    # Serials are SN-%07d below ``count``: fixing all but ``free`` digits matches 10^free twins.
    free = max(1, round(math.log10(max(count / 1000, 1))))
    prefixes = max(1, count // 10**free)
    return {
        "eq attribute (0.1%)": (
            'eq(attributes/owner,"owner-NNNN")',
            search(lambda rng: f'eq(attributes/owner,"owner-{rng.randrange(OWNERS):04d}")'),
        ),
        "range reported (1%)": (
            f"gt(reported/uptime,{uptime_cut}-x)",
            search(lambda rng: f"gt(reported/uptime,{uptime_cut - rng.randrange(1000)})"),
        ),
        "and of two eq (0.1%)": (
            'and(eq(attributes/site,"plant-NN"),eq(attributes/model,"P-N00"))',
            search(
                lambda rng: (
                    f'and(eq(attributes/site,"plant-{rng.randrange(SITES):02d}"),'
                    f'eq(attributes/model,"P-{100 * (1 + rng.randrange(MODELS))}"))'
                )
            ),
        ),
        "exists(delta) (10%)": ("exists(delta)", search(lambda rng: "exists(delta)")),
        "prefix like (0.1%)": (
            'like(attributes/serial,"SN-NNNN*")',
            search(
                lambda rng: (
                    'like(attributes/serial,"SN-'
                    + f"{rng.randrange(prefixes):0{7 - free}d}"
                    + '*")'
                )
            ),
        ),
        "count 10% match": (
            'count eq(attributes/vendor,"vendor-N")',
            lambda rng: Request(
                "GET",
                f"{path}/count",
                {"filter": f'eq(attributes/vendor,"vendor-{rng.randrange(VENDORS)}")'},
            ),
        ),
    }


def patch_request(count: int) -> Callable[[random.Random], Request]:
    def make(rng: random.Random) -> Request:
        body = {
            "reported": {"uptime": rng.randrange(10_000_000)},
            "live": {"telemetry": {"temp": round(rng.gauss(55, 10), 2)}},
        }
        return Request(
            "PATCH",
            f"/api/v1/twins/{twin_id(rng.randrange(count))}",
            body=dumps(body).encode(),
            content_type=MERGE,
        )

    return make


# -- index cost on writes, through the API --------------------------------------------------------

#: The writes of :func:`patch_request`, for wrk (arguments: method, twin count, token).
_WRK_WRITES = (
    r"""
local count, token

function init(args)
  count, token = tonumber(args[2]), args[3]
  math.randomseed(os.time() + tonumber(tostring({}):sub(8), 16) % 100000)
end

function request()
  local path = string.format("/api/v1/twins/org.bench:pump-%06d", math.random(0, count - 1))
  local headers = {["Authorization"] = "Bearer " .. token,
                   ["Content-Type"] = "application/merge-patch+json"}
  local body = string.format('{"reported":{"uptime":%d},"live":{"telemetry":{"temp":%d.%02d}}}',
    math.random(0, 9999999), math.random(30, 80), math.random(0, 99))
  return wrk.format("PATCH", path, headers, body)
end
"""
    + WRK_DONE
)

#: ``search`` of the service for each side of the comparison.
SIDES = {"on": "builtin", "off": "off"}


def http_index_cost(
    data_dir: Path, count: int, rounds: int, seconds: float, connections: int
) -> dict[str, list[Summary]]:
    """HTTP merge PATCHes (:func:`patch_request`) per second with the index on and off.

    Per round and side, in alternating order: a fresh copy of the database (flushed to
    disk), the service started on it with ``search`` builtin or off, a 3 s warm-up, then
    ``seconds`` of load at ``connections``. wrk when installed (a C client: the load
    generator's share of the two cores stays small), else the aiohttp client.
    """
    db = data_dir / Settings().sqlite.file_name
    script = data_dir / "index-cost-writes.lua"
    script.write_text(_WRK_WRITES)
    use_wrk = shutil.which("wrk") is not None
    runs: dict[str, list[Summary]] = {"on": [], "off": []}
    for r in range(rounds):
        for side in SIDES if r % 2 == 0 else reversed(SIDES):
            copy_dir = data_dir / f"http-index-{side}"
            shutil.rmtree(copy_dir, ignore_errors=True)
            copy_dir.mkdir()
            copy_database(db, copy_dir / db.name)
            os.sync()
            try:
                with Service(copy_dir, env={"TWIN_SEARCH": SIDES[side]}) as service:
                    if use_wrk:
                        run_wrk(script, service.url, "PATCH", count, connections, 3)
                        result = run_wrk(script, service.url, "PATCH", count, connections, seconds)
                        summary = Summary(
                            requests=result.requests,
                            errors=result.errors,
                            seconds=result.seconds,
                            p50_ms=result.p50_ms,
                            p99_ms=result.p99_ms,
                            max_ms=math.nan,  # wrk's done() does not report it
                        )
                    else:
                        make = patch_request(count)
                        run_load(
                            service.url, service.headers, make, concurrency=connections, seconds=3
                        )
                        summary = run_load(
                            service.url,
                            service.headers,
                            make,
                            concurrency=connections,
                            seconds=seconds,
                        )
            finally:
                shutil.rmtree(copy_dir, ignore_errors=True)
            check(summary, f"PATCH index {side}")
            runs[side].append(summary)
            client = "wrk" if use_wrk else "aiohttp"
            print(f"  round {r + 1}: index {side:3} {fmt(summary)} ({client})", flush=True)
    return runs


# -- index cost on writes, in process -----------------------------------------------------------


def stored_twins(db: Path) -> int:
    with sqlite3.connect(db) as conn:
        try:
            return int(conn.execute("SELECT count(*) FROM twins").fetchone()[0])
        except sqlite3.OperationalError:
            return 0


def open_store_at(settings: Settings, path: Path, builtin_index: bool) -> SqliteStore:
    return SqliteStore(
        path,
        settings.sqlite,
        settings.stream,
        builtin_index=builtin_index,
        gc_thresholds=settings.gc_thresholds,
    )


async def store_writes(
    settings: Settings, path: Path, writes: list[Write], builtin_index: bool
) -> float:
    """``writes`` through ``SqliteStore.write`` (group commit), all in flight at once."""
    store = open_store_at(settings, path, builtin_index)
    await store.open()
    try:
        started = time.perf_counter()
        await asyncio.gather(*(store.write(w) for w in writes))
        return len(writes) / (time.perf_counter() - started)
    finally:
        await store.close()


def copy_database(source: Path, target: Path) -> None:
    """A consistent copy of ``source`` (WAL content included), through SQLite's backup API."""
    for suffix in ("", "-wal", "-shm"):
        Path(f"{target}{suffix}").unlink(missing_ok=True)
    src, dst = sqlite3.connect(source), sqlite3.connect(target)
    try:
        src.backup(dst)
    finally:
        dst.close()
        src.close()


async def next_writes(settings: Settings, count: int, n: int, seed: int) -> list[Write]:
    """``n`` merge patches of distinct random twins, built on their current revision."""
    rng = random.Random(seed)
    ids = [twin_id(i) for i in rng.sample(range(count), n)]
    store = open_store(settings)
    await store.open()
    try:
        current = {t.twin_id: t for t in await store.get_many(ids)}
    finally:
        await store.close()
    writes = []
    for i in ids:
        twin = current[i]
        # Both leaves really change (uptime grows, the temperature moves), as telemetry does:
        # random values alone repeat when the same seed already wrote them to this database,
        # and a write that changes nothing but the revision costs the index half as much.
        uptime = twin.reported.get("uptime")
        temp = twin.live.get("telemetry", {}).get("temp")
        body: JSONObject = {
            "reported": {
                "uptime": (uptime if isinstance(uptime, int) else 0) + rng.randrange(1, 3600)
            },
            "live": {
                "telemetry": {
                    "temp": round(
                        (temp if isinstance(temp, float) else 55.0)
                        + rng.choice((-1, 1)) * rng.uniform(0.01, 2.0),
                        2,
                    )
                }
            },
        }
        writes.append(build_write(twin, i, body, Limits()))
    return writes


def index_cost(settings: Settings, count: int, n: int, rounds: int) -> dict[str, float]:
    """Median writes/s of ``SqliteStore(builtin_index=True)`` and ``(builtin_index=False)``.

    Each round builds ``n`` merge patches on the current revisions and applies them to two
    fresh copies of the database (SQLite backup API), one with the index on and one with it
    off, in alternating order, after flushing the copies to disk. Both start from the same
    physical state: running the "on"
    side on the long-lived original instead (as this benchmark once did) charged it for the
    fragmentation and WAL left by earlier rounds. The copies are thrown away.
    """
    path = settings.data_dir / settings.sqlite.file_name
    # The store runs as it does under ``serve``: with the collector's default thresholds,
    # this process (holding 20,000 writes) ran full collections of up to 0.6 s inside the
    # timed runs, more of them in the longer "on" runs.
    tune_gc(settings.gc_thresholds)
    copies = {
        "on": settings.data_dir / "index-on-copy.sqlite",
        "off": settings.data_dir / "index-off-copy.sqlite",
    }
    runs: dict[str, list[float]] = {"on": [], "off": []}
    try:
        for r in range(rounds):
            writes = asyncio.run(next_writes(settings, count, n, seed=100 + r))
            for copy in copies.values():
                copy_database(path, copy)
            # The copies leave gigabytes of dirty pages that the kernel writes back for a
            # while: flush them first, or whichever side runs first pays for it.
            os.sync()
            order = [("on", True), ("off", False)]
            for name, builtin in order if r % 2 == 0 else reversed(order):
                gc.collect()
                rate = asyncio.run(store_writes(settings, copies[name], writes, builtin))
                runs[name].append(rate)
                print(f"  round {r + 1}: index {name:3} {rate:8,.0f} writes/s", flush=True)
    finally:
        for copy in copies.values():
            for suffix in ("", "-wal", "-shm"):
                Path(f"{copy}{suffix}").unlink(missing_ok=True)
    return {k: sorted(v)[len(v) // 2] for k, v in runs.items()}


# -- main ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--twins", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--requests", type=int, default=3000, help="most requests per query")
    parser.add_argument("--seconds", type=float, default=8.0, help="most seconds per query")
    parser.add_argument(
        "--write-seconds", type=float, default=10.0, help="seconds per side and round (HTTP)"
    )
    parser.add_argument("--write-concurrency", type=int, default=32)
    parser.add_argument("--index-writes", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--data-dir", type=Path, help="keep the data here (default: temporary)")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON here")
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="with --data-dir: keep the twins already there when there are --twins of them "
        "(the index-cost rounds write to copies)",
    )
    parser.add_argument(
        "--skip-queries", action="store_true", help="measure only the index cost on writes"
    )
    args = parser.parse_args(argv)

    data_dir = args.data_dir or Path(tempfile.mkdtemp(prefix="twin-bench-search-"))
    settings = Settings(data_dir=data_dir)
    figures: dict[str, Any] = {"machine": machine(), "twins": args.twins}
    try:
        db = data_dir / settings.sqlite.file_name
        if args.reuse and db.exists() and stored_twins(db) == args.twins:
            print(f"Reusing the {args.twins:,} twins in {data_dir}", flush=True)
        else:
            print(f"Loading {args.twins:,} twins in process into {data_dir} ...", flush=True)
            figures["load_per_s"] = asyncio.run(load_twins(settings, args.twins, args.seed))
            print(f"  {figures['load_per_s']:,.0f} twins/s", flush=True)
        with sqlite3.connect(db) as conn:
            leaves = conn.execute("SELECT count(*) FROM search_leaf").fetchone()[0]
        figures["index_rows"] = leaves
        print(f"  {leaves / args.twins:.1f} index rows/twin", flush=True)

        rows: list[list[object]] = []
        searches = {} if args.skip_queries else queries(args.twins)
        with Service(data_dir) if searches else contextlib.nullcontext() as service:
            for name, (text, make) in searches.items():
                assert service is not None
                for concurrency in (1, 8):
                    result = run_load(
                        service.url,
                        service.headers,
                        make,
                        concurrency=concurrency,
                        count=args.requests,
                        seconds=args.seconds,
                        warmup=20,
                    )
                    check(result, name)
                    rows.append([name, concurrency, result.p50_ms, result.p99_ms, result.rps])
                    figures[f"search {name} c{concurrency}"] = summary_json(result)
                    print(f"  {name:24} c={concurrency}: {fmt(result)}  {text}", flush=True)

        print("Index cost on writes, through HTTP ...", flush=True)
        http = http_index_cost(
            data_dir, args.twins, args.rounds, args.write_seconds, args.write_concurrency
        )
        http_median = {side: _median(runs) for side, runs in http.items()}
        for side, result in http_median.items():
            figures[f"http patch index {side}"] = summary_json(result)
            rows.append(
                [
                    f"PATCH (index {side})",
                    args.write_concurrency,
                    result.p50_ms,
                    result.p99_ms,
                    result.rps,
                ]
            )

        print("Index cost on writes, in process ...", flush=True)
        cost = index_cost(settings, args.twins, min(args.index_writes, args.twins), args.rounds)
        figures["in process writes/s"] = cost
        print()
        print(f"Search, {args.twins:,} twins ({machine()}):")
        print()
        print(markdown_table(["query", "concurrency", "p50 ms", "p99 ms", "req/s"], rows))
        print()
        print(
            markdown_table(
                ["SqliteStore.write, in process (median of rounds)", "writes/s"],
                [
                    ["builtin_index=True (index rows in the same transaction)", cost["on"]],
                    ["builtin_index=False (no index rows)", cost["off"]],
                ],
            )
        )
        http_ratio = http_median["on"].rps / http_median["off"].rps
        ratio = cost["on"] / cost["off"]
        figures["http index on/off ratio"] = http_ratio
        figures["http index on/off ratio per round"] = [
            on.rps / off.rps for on, off in zip(http["on"], http["off"], strict=True)
        ]
        figures["index on/off ratio"] = ratio
        print()
        print(
            f"index on / index off, HTTP PATCH/s (the service's write throughput): "
            f"{http_ratio:.2f} (target of issue 3: >= 0.50, "
            f"{'met' if http_ratio >= 0.5 else 'not met'}; rounds "
            + ", ".join(f"{x:.2f}" for x in figures["http index on/off ratio per round"])
            + ")"
        )
        print(f"index on / index off, SqliteStore.write alone, in process: {ratio:.2f}")
        if args.json:
            args.json.write_text(json.dumps(figures, indent=2))
    finally:
        if args.data_dir is None:
            shutil.rmtree(data_dir, ignore_errors=True)
    return 0


def check(result: Summary, name: str) -> None:
    if result.errors:
        raise RuntimeError(f"{name}: {result.errors} of {result.requests} requests failed")


def _median(runs: list[Summary]) -> Summary:
    """The run with the median throughput (its latencies with it)."""
    return sorted(runs, key=lambda r: r.rps)[len(runs) // 2]


def fmt(result: Summary) -> str:
    return (
        f"{result.requests:6} req, p50 {result.p50_ms:7.2f} ms, p99 {result.p99_ms:7.2f} ms, "
        f"{result.rps:8.1f} req/s"
    )


def summary_json(result: Summary) -> dict[str, float]:
    return {
        "requests": result.requests,
        "p50_ms": result.p50_ms,
        "p99_ms": result.p99_ms,
        "rps": result.rps,
    }


if __name__ == "__main__":
    interrupt_on_sigterm()  # servers are stopped on SIGTERM too
    raise SystemExit(main())
