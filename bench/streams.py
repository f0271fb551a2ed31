"""Change-stream latency and write throughput under many WebSocket subscribers (issue 5).

Starts the real service (``python -m twin_service serve``, one process) on a temporary data
dir, creates ``--twins`` twins spread over ``NAMESPACES`` namespaces and ``SITES`` sites, then
runs three phases of the same paced write load (``--rate`` writes/s for ``--warmup`` +
``--seconds`` s, at most ``--concurrency`` requests in flight), each in a fresh writer process:

1. writes only, no subscriber;
2. the same writes with 10 subscribers (latency baseline);
3. the same writes with ``--subscribers`` subscribers, spread over ``--processes`` processes.

Writes alternate ``PATCH /twins/{id}/reported`` (merge patch) and
``PUT /twins/{id}/reported/bench``; each body carries the writer's ``time.time()`` just before
the request is sent. A subscriber ``j`` is, by ``j % 3``: every twin of one namespace (no
filter), ``eq(attributes/site,"sK")`` over all namespaces (1 twin in ``SITES``), or
``twins=[...]`` with three twins. On receipt of an ``event`` a client records two latencies:
from the embedded send stamp (includes the HTTP write itself) and from the event's commit
``timestamp`` (millisecond resolution, truncated). Only writes sent after the warm-up count.
Every process reports its CPU time, so the split of the two cores is visible.

Run from the repository root: ``python -m bench.streams`` (``--help`` for the knobs).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from array import array
from collections.abc import Coroutine
from datetime import datetime
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from bench.common import BENCH_TOKEN, Service, machine, markdown_table, percentile
from tests.terminate import interrupt_on_sigterm

NAMESPACES = 10
SITES = 10
TWINS_PER_SUBSCRIBER = 3
BASELINE_SUBSCRIBERS = 10
MERGE = "application/merge-patch+json"
#: Targets of issue 5.
TARGET_P99_MS = 50.0
TARGET_DROP = 0.30

Spec = dict[str, Any]


def twin_id(index: int) -> str:
    return f"bench.ns{index % NAMESPACES}:pump-{index:05d}"


def site_of(index: int) -> str:
    return f"s{(index // NAMESPACES) % SITES}"


def subscriber_spec(j: int, twins: int) -> Spec:
    """The subscribe message of subscriber ``j`` (a third each of the three kinds)."""
    kind = j % 3
    if kind == 0:
        return {"id": f"s{j}", "namespaces": [f"bench.ns{j % NAMESPACES}"]}
    if kind == 1:
        return {"id": f"s{j}", "filter": f'eq(attributes/site,"s{j % SITES}")'}
    rng = random.Random(j)
    return {"id": f"s{j}", "twins": [twin_id(rng.randrange(twins)) for _ in range(3)]}


def matching_subscribers(specs: list[Spec], twins: int) -> list[int]:
    """For every twin index, how many of ``specs`` receive an event when it is written."""
    counts = [0] * twins
    for spec in specs:
        if "namespaces" in spec:
            ns = spec["namespaces"][0]
            hits = [i for i in range(twins) if twin_id(i).partition(":")[0] == ns]
        elif "filter" in spec:
            site = spec["filter"].split('"')[1]
            hits = [i for i in range(twins) if site_of(i) == site]
        else:
            wanted = set(spec["twins"])
            hits = [i for i in range(twins) if twin_id(i) in wanted]
        for i in hits:
            counts[i] += 1
    return counts


def cpu_self() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of all CPUs from ``/proc/stat``; zeros elsewhere."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except OSError:
        return 0.0, 0.0
    idle = fields[3] + fields[4]
    return float(sum(fields) - idle), float(sum(fields))


def run_loop(main: Coroutine[Any, Any, Any]) -> Any:
    try:
        import uvloop

        return uvloop.run(main)
    except ImportError:
        return asyncio.run(main)


# -- writer process ------------------------------------------------------------------------------


async def write_load(
    url: str, twins: int, rate: float, seconds: float, concurrency: int, seed: int
) -> dict[str, Any]:
    """Paced open-loop writes (closed loop when ``rate`` is 0) until ``seconds`` have passed."""
    import aiohttp

    stamps, latencies, indexes, good = array("d"), array("d"), array("l"), array("b")
    headers = {"Authorization": f"Bearer {BENCH_TOKEN}"}
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=30)
    rng = random.Random(seed)
    slots = asyncio.Semaphore(concurrency)
    cpu0 = cpu_self()
    async with aiohttp.ClientSession(
        url, connector=connector, headers=headers, timeout=timeout
    ) as session:

        async def one(k: int, index: int) -> None:
            stamp = time.time()
            mark = {"t": stamp, "w": k}
            try:
                if k % 2:
                    request = session.put(
                        f"/api/v1/twins/{twin_id(index)}/reported/bench", json=mark
                    )
                else:
                    body = json.dumps({"bench": mark})
                    request = session.patch(
                        f"/api/v1/twins/{twin_id(index)}/reported",
                        data=body,
                        headers={"Content-Type": MERGE},
                    )
                async with request as response:
                    await response.read()
                    ok = response.status < 400
            except (aiohttp.ClientError, TimeoutError):
                ok = False
            finally:
                slots.release()
            stamps.append(stamp)
            latencies.append(time.time() - stamp)
            indexes.append(index)
            good.append(ok)

        started = time.time()
        deadline = started + seconds
        tasks: set[asyncio.Task[None]] = set()
        k = 0
        while True:
            due = started + k / rate if rate > 0 else time.time()
            if due >= deadline:
                break
            delay = due - time.time()
            if delay > 0:
                await asyncio.sleep(delay)
            await slots.acquire()
            if time.time() >= deadline:
                slots.release()
                break
            task = asyncio.create_task(one(k, rng.randrange(twins)))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            k += 1
        if tasks:
            await asyncio.wait(tasks, timeout=30)
    return {
        "started": started,
        "stamps": stamps,
        "latencies": latencies,
        "indexes": indexes,
        "good": good,
        "cpu": cpu_self() - cpu0,
    }


def writer_main(conn: Connection, url: str, options: dict[str, Any]) -> None:
    conn.send(run_loop(write_load(url, **options)))
    conn.close()


# -- subscriber processes ------------------------------------------------------------------------


def commit_time(timestamp: str) -> float:
    return datetime.fromisoformat(timestamp.replace("Z", "+00:00")).timestamp()


class Subscriber(asyncio.Protocol):
    """One WebSocket subscriber on websockets' sans-I/O client protocol.

    The asyncio client of websockets costs a future and a task switch per message; with
    30,000+ messages/s shared by two client processes on the server's machine, that load
    generator overhead competed with the server for the CPU. This client does the same
    protocol work (handshake, deflate if negotiated, pongs, close) in ``data_received`` and
    keeps each message with its receipt time; the JSON is decoded after the run.
    """

    def __init__(self, protocol: Any, headers: dict[str, str]) -> None:
        self.protocol = protocol
        self.headers = headers
        self.received: list[tuple[float, bytes]] = []
        self.transport: Any = None
        self.pending: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.closed: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()
        self.setup = True
        self.fragments: list[bytes] = []

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        request = self.protocol.connect()
        for name, value in self.headers.items():
            request.headers[name] = value
        self.protocol.send_request(request)
        self.flush()

    def flush(self) -> None:
        data = self.protocol.data_to_send()
        if data and self.transport is not None:
            if data[-1] == b"":  # end of stream requested by the protocol
                data = data[:-1]
                self.transport.write(b"".join(data))
                self.transport.close()
                return
            self.transport.write(b"".join(data))

    def send(self, message: Spec) -> None:
        self.protocol.send_text(json.dumps(message).encode())
        self.flush()

    def data_received(self, data: bytes) -> None:
        from websockets.frames import Opcode
        from websockets.http11 import Response

        now = time.time()
        self.protocol.receive_data(data)
        for event in self.protocol.events_received():
            if isinstance(event, Response):
                if event.status_code != 101 and not self.pending.done():
                    self.pending.set_exception(RuntimeError(f"handshake {event.status_code}"))
                continue
            if event.opcode not in (Opcode.TEXT, Opcode.CONT):
                continue
            self.fragments.append(event.data)
            if not event.fin:
                continue
            text = b"".join(self.fragments)
            self.fragments = []
            if self.setup:
                if not self.pending.done():
                    self.pending.set_result(json.loads(text))
            else:
                self.received.append((now, text))
        self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.pending.done():
            self.pending.set_exception(ConnectionError("connection lost"))
            self.pending.exception()  # an awaiting set-up sees it; nobody else needs to
        if not self.closed.done():
            received = self.protocol.close_rcvd
            self.closed.set_result(received.code if received is not None else None)

    async def next_message(self, timeout: float) -> Any:
        message = await asyncio.wait_for(self.pending, timeout)
        self.pending = asyncio.get_running_loop().create_future()
        return message

    def close(self) -> None:
        from websockets.protocol import State

        if self.protocol.state is State.OPEN:
            self.protocol.send_close(1000)
            self.flush()
        elif self.transport is not None:
            self.transport.close()


async def subscribe_load(
    conn: Connection, url: str, specs: list[Spec], deflate: bool, max_seconds: float
) -> dict[str, Any]:
    """Connect and subscribe every spec, report ready, record events until told to stop."""
    from websockets.client import ClientProtocol
    from websockets.extensions.permessage_deflate import ClientPerMessageDeflateFactory
    from websockets.uri import parse_uri

    ws_url = url.replace("http://", "ws://") + "/api/v1/ws"
    uri = parse_uri(ws_url)
    headers = {"Authorization": f"Bearer {BENCH_TOKEN}"}
    stamps, sent_lat, commit_lat = array("d"), array("d"), array("d")
    counts = {"event": 0, "left": 0, "other": 0, "unstamped": 0, "out_of_order": 0}
    closes: dict[str, int] = {}
    commit_times: dict[str, float] = {}
    gate = asyncio.Semaphore(50)
    failed = 0
    loop = asyncio.get_running_loop()

    def record(received: list[tuple[float, bytes]]) -> None:
        last = 0
        for now, raw in received:
            message = json.loads(raw)
            kind = message.get("type")
            if kind != "event":
                counts["left" if kind == "left" else "other"] += 1
                continue
            counts["event"] += 1
            if message["seq"] <= last:
                counts["out_of_order"] += 1
            last = message["seq"]
            event = message["event"]
            mark = event["changes"].get("reported", {}).get("bench")
            if not isinstance(mark, dict) or "t" not in mark:
                counts["unstamped"] += 1
                continue
            timestamp = event["timestamp"]
            committed = commit_times.get(timestamp)
            if committed is None:
                committed = commit_times[timestamp] = commit_time(timestamp)
            stamps.append(mark["t"])
            sent_lat.append(now - mark["t"])
            commit_lat.append(now - committed)

    async def open_one(spec: Spec) -> Subscriber | None:
        nonlocal failed
        async with gate:
            try:
                protocol = ClientProtocol(
                    uri,
                    extensions=[ClientPerMessageDeflateFactory()] if deflate else None,
                )
                _, client = await asyncio.wait_for(
                    loop.create_connection(
                        lambda: Subscriber(protocol, headers), uri.host, uri.port
                    ),
                    60,
                )
                welcome = await client.next_message(30)
                assert welcome["type"] == "welcome", welcome
                client.send({"type": "subscribe", **spec})
                reply = await client.next_message(30)
                assert reply["type"] == "subscribed", reply
                client.setup = False
            except Exception:
                failed += 1
                return None
            return client

    opened = await asyncio.gather(*(open_one(spec) for spec in specs))
    clients = [client for client in opened if client is not None]
    conn.send({"ready": len(clients), "failed": failed})
    cpu0, wall0 = cpu_self(), time.monotonic()
    deadline = time.monotonic() + max_seconds
    while time.monotonic() < deadline and not conn.poll():
        await asyncio.sleep(0.1)
    cpu = (cpu_self() - cpu0) / max(time.monotonic() - wall0, 1e-9)
    for client in clients:
        if client.closed.done():
            code = str(client.closed.result() or "none")
            closes[code] = closes.get(code, 0) + 1
        client.setup = True  # ignore what arrives while closing
        client.close()
    await asyncio.wait([asyncio.ensure_future(c.closed) for c in clients] or [], timeout=10)
    for client in clients:
        record(client.received)
        client.received = []
    return {
        "stamps": stamps,
        "sent_lat": sent_lat,
        "commit_lat": commit_lat,
        "counts": counts,
        "closes": closes,
        "cpu": cpu,
    }


def subscriber_main(
    conn: Connection, url: str, specs: list[Spec], deflate: bool, max_seconds: float
) -> None:
    conn.send(run_loop(subscribe_load(conn, url, specs, deflate, max_seconds)))
    conn.close()


# -- phases --------------------------------------------------------------------------------------


def receive_from(conn: Connection, timeout: float, what: str) -> Any:
    if not conn.poll(timeout):
        raise RuntimeError(f"no answer from the {what} process in {timeout:.0f} s")
    return conn.recv()


def py_spy(service: Service, out: Path, seconds: float) -> subprocess.Popen[bytes]:
    """``py-spy record`` of the service for ``seconds`` (needs ptrace rights)."""
    executable = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    assert service.proc is not None
    formats = {".json": "speedscope", ".txt": "raw"}
    argv = [executable, "record", "--pid", str(service.proc.pid), "--duration"]
    argv += [str(round(seconds)), "--rate", "250", "--nonblocking", "--threads"]
    argv += ["--format", formats.get(out.suffix, "flamegraph"), "-o", str(out)]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def run_phase(
    service: Service, args: argparse.Namespace, subscribers: int, profile: bool = False
) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    specs = [subscriber_spec(j, args.twins) for j in range(subscribers)]
    processes = min(args.processes, subscribers) if subscribers else 0
    total_seconds = args.warmup + args.seconds
    children: list[tuple[Any, Connection]] = []
    try:
        for p in range(processes):
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=subscriber_main,
                args=(child, service.url, specs[p::processes], args.deflate, total_seconds + 300),
                daemon=True,
            )
            proc.start()
            children.append((proc, parent))
        ready = [receive_from(conn, 300, "subscriber") for _, conn in children]
        connected = sum(r["ready"] for r in ready)
        failed = sum(r["failed"] for r in ready)
        time.sleep(1.0)  # let the connection storm settle before measuring

        parent, child = ctx.Pipe()
        options = {
            "twins": args.twins,
            "rate": args.rate,
            "seconds": total_seconds,
            "concurrency": args.concurrency,
            "seed": args.seed,
        }
        writer = ctx.Process(target=writer_main, args=(child, service.url, options), daemon=True)
        server_cpu0 = service.cpu_seconds()
        busy0 = machine_busy()
        load0 = os.getloadavg()[0]
        wall0 = time.monotonic()
        writer.start()
        recorder = py_spy(service, args.profile, args.seconds) if profile else None
        written = receive_from(parent, total_seconds + 120, "writer")
        writer.join(30)
        if recorder is not None:
            recorder.wait(60)
        server_cpu = service.cpu_seconds() - server_cpu0
        wall = time.monotonic() - wall0
        busy1 = machine_busy()
        time.sleep(args.grace)
        for _, conn in children:
            conn.send("stop")
        results = [receive_from(conn, 120, "subscriber") for _, conn in children]
    finally:
        for proc, _ in children:
            proc.join(10)
            if proc.is_alive():
                proc.terminate()

    window0 = written["started"] + args.warmup
    window1 = window0 + args.seconds
    in_window = [
        (lat, idx)
        for stamp, lat, idx, ok in zip(
            written["stamps"],
            written["latencies"],
            written["indexes"],
            written["good"],
            strict=True,
        )
        if window0 <= stamp < window1 and ok
    ]
    errors = sum(
        1
        for stamp, ok in zip(written["stamps"], written["good"], strict=True)
        if window0 <= stamp < window1 and not ok
    )
    write_lat = sorted(lat for lat, _ in in_window)
    matches = matching_subscribers(specs, args.twins)
    expected = sum(matches[idx] for _, idx in in_window)
    sent_lat: list[float] = []
    commit_lat: list[float] = []
    counts: dict[str, int] = {}
    closes: dict[str, int] = {}
    for result in results:
        for stamp, sent, committed in zip(
            result["stamps"], result["sent_lat"], result["commit_lat"], strict=True
        ):
            if window0 <= stamp < window1:
                sent_lat.append(sent)
                commit_lat.append(committed)
        for key, value in result["counts"].items():
            counts[key] = counts.get(key, 0) + value
        for key, value in result["closes"].items():
            closes[key] = closes.get(key, 0) + value
    sent_lat.sort()
    commit_lat.sort()
    elapsed_busy = busy1[1] - busy0[1]
    ms = 1000.0
    return {
        "subscribers": subscribers,
        "processes": processes,
        "connected": connected,
        "connect_failed": failed,
        "writes_per_s": len(in_window) / args.seconds,
        "write_errors": errors,
        "write_p50_ms": percentile(write_lat, 50) * ms,
        "write_p99_ms": percentile(write_lat, 99) * ms,
        "events": len(sent_lat),
        "events_expected": expected,
        "events_per_s": len(sent_lat) / args.seconds,
        "p50_ms": percentile(sent_lat, 50) * ms,
        "p99_ms": percentile(sent_lat, 99) * ms,
        "max_ms": (sent_lat[-1] * ms) if sent_lat else 0.0,
        "commit_p50_ms": percentile(commit_lat, 50) * ms,
        "commit_p99_ms": percentile(commit_lat, 99) * ms,
        "counts": counts,
        "closes": closes,
        "cpu_server": server_cpu / wall,
        "server_ms_per_write": server_cpu / len(written["stamps"]) * ms
        if written["stamps"]
        else 0.0,
        "server_cpu_s": server_cpu,
        "writes_total": len(written["stamps"]),
        "cpu_writer": written["cpu"] / wall,
        "cpu_subscribers": sum(r["cpu"] for r in results),
        "cpu_machine": (
            (busy1[0] - busy0[0]) / elapsed_busy * (os.cpu_count() or 1) if elapsed_busy else 0.0
        ),
        "loadavg_1m": load0,
    }


# -- set-up and report ---------------------------------------------------------------------------


async def seed_twins(url: str, twins: int) -> None:
    import aiohttp

    headers = {"Authorization": f"Bearer {BENCH_TOKEN}"}
    async with aiohttp.ClientSession(url, headers=headers) as session:
        gate = asyncio.Semaphore(32)

        async def put(index: int) -> None:
            body = {
                "attributes": {"site": site_of(index), "model": "P-100", "floor": index % 4},
                "desired": {"fan": {"speed": index % 5}, "mode": "auto"},
                "reported": {"fan": {"speed": index % 5}, "bench": {"t": 0.0, "w": -1}},
            }
            async with gate, session.put(f"/api/v1/twins/{twin_id(index)}", json=body) as r:
                if r.status >= 300:
                    raise RuntimeError(f"seeding {twin_id(index)}: {r.status} {await r.text()}")

        await asyncio.gather(*(put(i) for i in range(twins)))


def report(args: argparse.Namespace, phases: list[dict[str, Any]]) -> str:
    header = [
        "phase", "subscribers", "writes/s", "write p99 ms", "events/s", "delivered %",
        "p50 ms", "p99 ms", "max ms", "commit p50 ms", "commit p99 ms",
        "CPU server", "CPU writer", "CPU subscribers", "CPU machine", "load 1m",
    ]  # fmt: skip
    names = ["writes only", "baseline", "full"]
    rows = []
    for name, phase in zip(names, phases, strict=False):
        streamed = phase["subscribers"] > 0
        expected = phase["events_expected"]
        rows.append(
            [
                name,
                f"{phase['connected']:,}/{phase['subscribers']:,}",
                phase["writes_per_s"],
                phase["write_p99_ms"],
                phase["events_per_s"] if streamed else "-",
                (100.0 * phase["events"] / expected if expected else 0.0) if streamed else "-",
                phase["p50_ms"] if streamed else "-",
                phase["p99_ms"] if streamed else "-",
                phase["max_ms"] if streamed else "-",
                phase["commit_p50_ms"] if streamed else "-",
                phase["commit_p99_ms"] if streamed else "-",
                f"{phase['cpu_server']:.0%}",
                f"{phase['cpu_writer']:.0%}",
                f"{phase['cpu_subscribers']:.0%}" if streamed else "-",
                f"{phase['cpu_machine']:.0%}",
                phase["loadavg_1m"],
            ]
        )
    lines = [
        f"Machine: {machine()}",
        f"{args.twins:,} twins, {args.rate:g} writes/s target (0 = unpaced), "
        f"{args.concurrency} in flight at most, {args.seconds:g} s measured after "
        f"{args.warmup:g} s warm-up, per-message deflate offered by the clients "
        f"{'yes' if args.deflate else 'no'}, accepted by the service "
        f"{'yes' if args.server_deflate else 'no'}; "
        f"subscribers in {args.processes} process(es). CPU columns: cores used (100% = one core).",
        "",
        markdown_table(header, rows),
        "",
    ]
    for name, phase in zip(names, phases, strict=False):
        if phase["subscribers"]:
            lines.append(
                f"{name}: messages {phase['counts']}, closes {phase['closes'] or 'none'}, "
                f"connect failures {phase['connect_failed']}, write errors "
                f"{phase['write_errors']}"
            )
    alone_ms = phases[0]["server_ms_per_write"]
    for name, phase in zip(names, phases, strict=False):
        per_write = phase["server_ms_per_write"]
        line = (
            f"{name}: server CPU {per_write:.2f} ms per write "
            f"(one core would sustain {1000 / per_write if per_write else 0:,.0f} writes/s)"
        )
        delivered = phase["counts"].get("event", 0) if phase["subscribers"] else 0
        if delivered:
            extra = phase["server_cpu_s"] - phase["writes_total"] * alone_ms / 1000
            line += f", {extra / delivered * 1e6:.0f} us per delivered event beyond the write"
        lines.append(line)
    if len(phases) == 3:
        alone, full = phases[0]["writes_per_s"], phases[2]["writes_per_s"]
        ratio = full / alone if alone else 0.0
        p99 = phases[2]["p99_ms"]
        lines += [
            f"write throughput with/without subscribers: {ratio:.2f} "
            f"(drop {1 - ratio:.1%}; target < {TARGET_DROP:.0%}: "
            f"{'met' if 1 - ratio < TARGET_DROP else 'NOT met'})",
            f"event p99 with {phases[2]['subscribers']:,} subscribers: {p99:.1f} ms "
            f"(target < {TARGET_P99_MS:g} ms: {'met' if p99 < TARGET_P99_MS else 'NOT met'})",
        ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subscribers", type=int, default=1000)
    parser.add_argument(
        "--rate", type=float, default=500.0, help="writes/s; 0 = as fast as possible"
    )
    parser.add_argument("--seconds", type=float, default=20.0, help="measured seconds per phase")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds per phase")
    parser.add_argument("--grace", type=float, default=2.0, help="wait for late events")
    parser.add_argument("--twins", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=64, help="writes in flight at most")
    parser.add_argument("--processes", type=int, default=2, help="subscriber processes")
    parser.add_argument(
        "--deflate", action=argparse.BooleanOptionalAction, default=True,
        help="offer per-message deflate like browsers do (default on)",
    )  # fmt: skip
    parser.add_argument(
        "--server-deflate", action="store_true",
        help="let the service accept deflate (TWIN_STREAM__WEBSOCKET_DEFLATE; off by default)",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument(
        "--profile", type=Path,
        help="py-spy record of the service during the full phase (.svg flamegraph, "
        ".json speedscope, .txt collapsed stacks); perturbs that phase's figures",
    )  # fmt: skip
    args = parser.parse_args()

    phases: list[dict[str, Any]] = []
    server_env = {"TWIN_STREAM__WEBSOCKET_DEFLATE": "true"} if args.server_deflate else {}
    with (
        tempfile.TemporaryDirectory(prefix="twin-bench-streams-") as tmp,
        Service(Path(tmp) / "data", env=server_env) as service,
    ):
        run_loop(seed_twins(service.url, args.twins))
        for subscribers in (0, BASELINE_SUBSCRIBERS, args.subscribers):
            print(f"phase: {subscribers} subscribers ...", flush=True)
            full = subscribers == args.subscribers and args.profile is not None
            phases.append(run_phase(service, args, subscribers, profile=full))
    print(report(args, phases))
    if args.json:
        args.json.write_text(
            json.dumps(
                {"args": vars(args) | {"json": None}, "phases": phases}, indent=2, default=str
            )
        )
    return 0


if __name__ == "__main__":
    interrupt_on_sigterm()  # servers are stopped on SIGTERM too
    raise SystemExit(main())
