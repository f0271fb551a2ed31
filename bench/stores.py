"""PATCH and GET throughput on the MongoDB store (one and two replicas) against SQLite.

Starts real service processes: one on the SQLite default, one and then two on the MongoDB
store sharing one database on a MongoDB-wire server (the FerretDB test server unless
``--mongodb-url`` is given), creates ``--twins`` twins, and runs the aiohttp load loop of
:mod:`bench.common` against each setup, bounded by a request count and a time budget, with
the connections split evenly over the replicas. Prints a Markdown table and the ratios
MongoDB/SQLite and two replicas/one replica.

Run from the repository root: ``python -m bench.stores`` (``--help`` for the knobs).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx

from bench.common import Request, Service, Summary, load, machine, markdown_table
from tests.terminate import interrupt_on_sigterm

MERGE = "application/merge-patch+json"


@dataclass(frozen=True)
class Setup:
    name: str
    replicas: list[Service]


def _ids(count: int) -> list[str]:
    return [f"org.bench:t{i:05d}" for i in range(count)]


async def _create(service: Service, ids: list[str]) -> None:
    async with httpx.AsyncClient(base_url=service.url, headers=service.headers) as client:
        sem = asyncio.Semaphore(32)

        async def one(twin_id: str) -> None:
            async with sem:
                body = {"attributes": {"site": "s1"}, "desired": {"speed": 1}}
                response = await client.put(f"/api/v1/twins/{twin_id}", json=body, timeout=60)
                response.raise_for_status()

        await asyncio.gather(*(one(twin_id) for twin_id in ids))


async def _measure(setup: Setup, ids: list[str], kind: str, args: argparse.Namespace) -> Summary:
    def make(rng: object) -> Request:
        twin_id = ids[rng.randrange(len(ids))]  # type: ignore[attr-defined]
        if kind == "GET":
            return Request("GET", f"/api/v1/twins/{twin_id}")
        body = json.dumps({"reported": {"speed": rng.randrange(100)}}).encode()  # type: ignore[attr-defined]
        return Request("PATCH", f"/api/v1/twins/{twin_id}", body=body, content_type=MERGE)

    share = max(1, args.concurrency // len(setup.replicas))
    runs = await asyncio.gather(
        *(
            load(
                replica.url,
                replica.headers,
                make,
                concurrency=share,
                count=args.requests // len(setup.replicas),
                seconds=args.seconds,
                warmup=20,
                seed=n + 1,
            )
            for n, replica in enumerate(setup.replicas)
        )
    )
    latencies_ms = sorted(r.p50_ms for r in runs)
    return Summary(
        requests=sum(r.requests for r in runs),
        errors=sum(r.errors for r in runs),
        seconds=max(r.seconds for r in runs),
        p50_ms=latencies_ms[len(latencies_ms) // 2],
        p99_ms=max(r.p99_ms for r in runs),
        max_ms=max(r.max_ms for r in runs),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--twins", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--requests", type=int, default=4000, help="per setup and kind")
    parser.add_argument("--seconds", type=float, default=15.0, help="time budget per run")
    parser.add_argument("--mongodb-url", help="an existing server (default: start FerretDB)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-stores-"))
    ferret = None
    url = args.mongodb_url
    if url is None:
        from tests.servers.ferretdb import FerretDB

        ferret = FerretDB(work / "ferretdb").start()
        url = ferret.url
    mongo_env = {
        "TWIN_STORE": "mongodb",
        "TWIN_MONGODB_URL": url,
        "TWIN_MONGODB__DATABASE": f"bench_{uuid.uuid4().hex[:8]}",
    }
    ids = _ids(args.twins)
    results: dict[tuple[str, str], Summary] = {}
    started: list[Service] = []
    try:
        sqlite = Service(work / "sqlite").start()
        started.append(sqlite)
        mongo_a = Service(work / "mongo-a", env=mongo_env).start()
        started.append(mongo_a)
        asyncio.run(_create(sqlite, ids))
        asyncio.run(_create(mongo_a, ids))
        setups = [Setup("SQLite, 1 replica", [sqlite]), Setup("MongoDB-wire, 1 replica", [mongo_a])]
        for setup in setups:
            for kind in ("PATCH", "GET"):
                results[(setup.name, kind)] = asyncio.run(_measure(setup, ids, kind, args))
        mongo_b = Service(work / "mongo-b", env=mongo_env).start()
        started.append(mongo_b)
        two = Setup("MongoDB-wire, 2 replicas", [mongo_a, mongo_b])
        for kind in ("PATCH", "GET"):
            results[(two.name, kind)] = asyncio.run(_measure(two, ids, kind, args))
    finally:
        for service in started:
            service.stop()
        if ferret is not None:
            ferret.stop()

    print(f"Machine: {machine()}; server: {'FerretDB (SQLite)' if ferret else url}")
    print(
        f"{args.twins} twins, {args.concurrency} connections, bounded by {args.requests} "
        f"requests or {args.seconds} s per run; client in the same machine.\n"
    )
    rows = [
        [name, kind, s.requests, s.errors, s.rps, s.p50_ms, s.p99_ms]
        for (name, kind), s in results.items()
    ]
    print(
        markdown_table(
            ["setup", "request", "requests", "errors", "req/s", "p50 ms", "p99 ms"], rows
        )
    )
    print()
    for kind in ("PATCH", "GET"):
        base = results[("SQLite, 1 replica", kind)].rps
        one = results[("MongoDB-wire, 1 replica", kind)].rps
        two_rps = results[("MongoDB-wire, 2 replicas", kind)].rps
        print(
            f"{kind}: MongoDB-wire/SQLite {one / base:.2f}, 2 replicas/1 replica "
            f"{two_rps / one:.2f}, 2 replicas/SQLite {two_rps / base:.2f}"
        )


if __name__ == "__main__":
    interrupt_on_sigterm()  # servers are stopped on SIGTERM too
    main()
