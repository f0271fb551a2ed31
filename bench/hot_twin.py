"""Writers crowding one twin: ``--writes`` PATCHes all at once against the same one by one.

Each setup writes one twin ``--writes`` times, first one PATCH at a time (the baseline:
what a write of that twin costs with nobody in its way), then all of them at once, spread
over the setup's service processes. The ratio concurrent/sequential is the figure: 1.0
means the crowd costs nothing beyond its writes, n/2 is what compare-and-set retries cost
when every writer re-reads after every lost round. Also prints how many attempts lost the
compare-and-set (``/ready``'s ``checks.store.writes.retried``).

Setups: SQLite, one process and two processes on one database file; with ``--mongodb``,
three replicas on FerretDB (slow per write: keep ``--writes`` near 100 there).

Run from the repository root: ``python -m bench.hot_twin`` (``--help`` for the knobs).
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
import uuid
from pathlib import Path

import httpx

from bench.common import Service, machine, markdown_table
from tests.terminate import interrupt_on_sigterm

MERGE = {"Content-Type": "application/merge-patch+json"}


async def _patches(services: list[Service], twin_id: str, count: int, at_once: bool) -> float:
    """Seconds for ``count`` PATCHes of ``twin_id``, each setting its own key."""
    clients = [
        httpx.AsyncClient(
            base_url=s.url,
            headers=s.headers,
            timeout=1200,
            limits=httpx.Limits(max_connections=count),
        )
        for s in services
    ]
    try:
        await clients[0].put(f"/api/v1/twins/{twin_id}", json={})

        async def one(i: int) -> None:
            client = clients[i % len(clients)]
            body = {"desired": {f"k{i:04d}": i}}
            response = await client.patch(f"/api/v1/twins/{twin_id}", json=body, headers=MERGE)
            response.raise_for_status()

        started = time.perf_counter()
        if at_once:
            await asyncio.gather(*(one(i) for i in range(count)))
        else:
            for i in range(count):
                await one(i)
        elapsed = time.perf_counter() - started
        twin = (await clients[0].get(f"/api/v1/twins/{twin_id}")).json()
        if twin["revision"] != count + 1 or len(twin["desired"]) != count:
            raise RuntimeError(f"lost writes: revision {twin['revision']}, {count} PATCHes")
        return elapsed
    finally:
        for client in clients:
            await client.aclose()


def _retried(services: list[Service]) -> int:
    total = 0
    for service in services:
        ready = httpx.get(f"{service.url}/ready", timeout=30).json()
        total += int(ready["checks"]["store"]["writes"]["retried"])
    return total


def _measure(name: str, services: list[Service], count: int) -> list[object]:
    tag = uuid.uuid4().hex[:8]
    sequential = asyncio.run(_patches(services, f"org.bench:seq-{tag}", count, False))
    before = _retried(services)
    concurrent = asyncio.run(_patches(services, f"org.bench:crowd-{tag}", count, True))
    retried = _retried(services) - before
    ratio = concurrent / sequential
    return [name, count, f"{sequential:.2f}", f"{concurrent:.2f}", f"{ratio:.2f}", retried]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--writes", type=int, default=300, help="PATCHes per phase")
    parser.add_argument("--mongodb", action="store_true", help="also 3 replicas on FerretDB")
    parser.add_argument("--mongodb-writes", type=int, default=100)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-hot-twin-"))
    rows: list[list[object]] = []
    started: list[Service] = []
    ferret = None
    try:
        one = Service(work / "sqlite-1").start()
        started.append(one)
        rows.append(_measure("SQLite, 1 process", [one], args.writes))
        shared = work / "sqlite-2"
        two = [Service(shared).start(), Service(shared).start()]
        started += two
        rows.append(_measure("SQLite, 2 processes, one file", two, args.writes))
        if args.mongodb:
            from tests.servers.ferretdb import FerretDB

            ferret = FerretDB(work / "ferretdb").start()
            env = {
                "TWIN_STORE": "mongodb",
                "TWIN_MONGODB_URL": ferret.url,
                "TWIN_MONGODB__DATABASE": f"bench_{uuid.uuid4().hex[:8]}",
            }
            three = [Service(work / f"mongo-{i}", env=env).start() for i in range(3)]
            started += three
            rows.append(_measure("FerretDB, 3 replicas", three, args.mongodb_writes))
    finally:
        for service in started:
            service.stop()
        if ferret is not None:
            ferret.stop()

    print(f"Machine: {machine()}; client in the same machine.\n")
    header = ["setup", "PATCHes", "one at a time s", "all at once s", "ratio", "retried"]
    print(markdown_table(header, rows))


if __name__ == "__main__":
    interrupt_on_sigterm()  # servers are stopped on SIGTERM too
    main()
