"""End-to-end MQTT ingest and delta latency, against mosquitto and the real service process.

    .venv/bin/python -m bench.mqtt_ingest [--devices 1000] [--messages 20000] [--connections 2]

1. Bare baseline: one paho subscriber counts QoS 1 messages (no processing) from publishers;
   the rate is from the publishers' start to the last message received.
2. Ingest: the same publishers send reported updates (QoS 1) to 1,000 twins; the rate is
   messages committed by the service (its ``/ready`` ``applied`` counter) per second.

The publishers are ``--connections`` separate processes writing pre-built MQTT 3.1.1 QoS 1
PUBLISH packets on raw sockets (at most ``--window`` unacknowledged each), so they cost a few
microseconds per message and do not limit either rate; their own rate is printed as well.
3. Delta latency: PATCH desired of a twin over HTTP, time until the device receives the delta;
   then the same while devices report steadily at ``--load-share`` of the rate of step 2.
Prints figures only; nothing here asserts timings.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import machine, process_cpu_seconds
from tests.mqtt_packets import connect, packet, string
from tests.servers.mosquitto import Mosquitto
from tests.service_process import ServiceProcess
from tests.terminate import interrupt_on_sigterm


def _publish_packet(topic: str, packet_id: int, payload: bytes) -> bytes:
    """An MQTT 3.1.1 QoS 1 PUBLISH."""
    return packet(0x32, string(topic) + packet_id.to_bytes(2, "big") + payload)


def _payload(n: int, constant: bytes | None) -> bytes:
    return constant or json.dumps({"state": {"counter": n}, "clientToken": f"b{n}"}).encode()


def _publisher(
    port: int,
    name: str,
    packets: list[bytes],
    window: int,
    ready: Any,
    go: Any,
    results: Any,
    rate: float = 0.0,
) -> None:
    """One publisher process: pre-built QoS 1 PUBLISH packets over a raw MQTT 3.1.1 socket.

    At most ``window`` messages wait for their PUBACK; the cost per message is a slice of a
    ``sendall`` and 4 bytes of PUBACK, so the publishers do not limit the figures (paho's
    ``publish`` costs tens of microseconds of Python per message, and with the publishers in
    the subscriber's process they shared its GIL).
    """
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(connect(name))
    connack = b""
    while len(connack) < 4:
        connack += sock.recv(4 - len(connack))
    if connack[0] != 0x20 or connack[3] != 0:
        raise RuntimeError(f"CONNACK refused: {connack!r}")
    ready.put(name)
    go.wait()
    started = time.perf_counter()
    sent = acked = 0
    pending = b""
    total = len(packets)
    while acked < total:
        room = min(acked + window - sent, total - sent)
        if rate:  # no more than is due by now: a steady load, not a burst
            room = min(room, int((time.perf_counter() - started) * rate) + 1 - sent)
        if room > 0:
            chunk = min(room, 256)
            sock.sendall(b"".join(packets[sent : sent + chunk]))
            sent += chunk
            flags = socket.MSG_DONTWAIT if sent - acked < window and sent < total else 0
        elif rate and sent < total and sent - acked < window:
            flags = socket.MSG_DONTWAIT
            time.sleep(0.001)  # the next message is not due yet
        else:
            flags = 0
        try:
            data = sock.recv(65536, flags)
        except BlockingIOError:
            continue
        if not data:
            raise RuntimeError("broker closed the publisher's connection")
        pending += data
        acked += len(pending) // 4  # PUBACK: 0x40 0x02 id id
        pending = pending[len(pending) // 4 * 4 :]
    elapsed = time.perf_counter() - started
    sock.sendall(b"\xe0\x00")
    sock.close()
    results.put(elapsed)


def _publish_all(
    port: int,
    topics: list[str],
    total: int,
    conns: int,
    payload: bytes | None,
    window: int,
    rate: float = 0.0,
    first: int = 0,
) -> tuple[float, float]:
    """Publish ``total`` QoS 1 messages from ``conns`` processes (``rate`` messages/s in all,
    0: as fast as they go); message ``n`` goes to ``topics[n % len(topics)]``. Returns (start
    time, slowest publisher's seconds until its last PUBACK); the packets are built and the
    connections open before the start."""
    ctx = multiprocessing.get_context("fork")
    ready, results, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    procs = []
    for c in range(conns):
        packets = [
            _publish_packet(topics[n % len(topics)], n % 65535 + 1, _payload(first + n, payload))
            for n in range(c, total, conns)
        ]
        name = f"bench-pub-{c}-{time.time_ns()}"
        proc = ctx.Process(
            target=_publisher,
            args=(port, name, packets, window, ready, go, results, rate / conns),
            daemon=True,
        )
        proc.start()
        procs.append(proc)
    for _ in procs:
        ready.get(timeout=30)
    start = time.perf_counter()
    go.set()
    elapsed = max(results.get(timeout=300) for _ in procs)
    for proc in procs:
        proc.join(10)
    return start, elapsed


def bare_rate(port: int, total: int, conns: int, window: int) -> tuple[float, float]:
    """(messages/s received by a bare paho subscriber, publishers' own messages/s)."""
    done = threading.Event()
    count = 0
    last = [0.0]

    def on_message(_c: paho.Client, _u: object, _m: paho.MQTTMessage) -> None:
        nonlocal count
        count += 1
        if count >= total:
            last[0] = time.perf_counter()
            done.set()

    sub = paho.Client(CallbackAPIVersion.VERSION2, client_id="bench-bare", protocol=paho.MQTTv5)
    sub.on_message = on_message
    sub.max_inflight_messages_set(1000)
    sub.connect("127.0.0.1", port)
    sub.subscribe("bare/+/reported/update", 1)
    sub.loop_start()
    time.sleep(0.5)
    start, elapsed = _publish_all(
        port,
        [f"bare/d{n}/reported/update" for n in range(1000)],
        total,
        conns,
        b'{"state":{"counter":1}}',
        window,
    )
    if not done.wait(120):
        last[0] = time.perf_counter()
    sub.loop_stop()
    sub.disconnect()
    return count / (last[0] - start), total / elapsed


def ingest_rate(
    services: list[ServiceProcess],
    port: int,
    twins: list[str],
    total: int,
    conns: int,
    window: int,
    rate: float = 0.0,
    first: int = 0,
) -> tuple[float, float, float]:
    """``total`` reports to the twins, as fast as they go or ``rate`` a second (steadily):
    (reports committed per second, publishers' messages/s, service CPU µs per report), over
    all ``services`` (replicas sharing the device topics). A burst fills group commits and
    amortises every wake-up of the service's threads; a steady trickle pays them per report.
    """
    before = _applied(services)
    cpu = _cpu_seconds(services)
    start, elapsed = _publish_all(
        port,
        [f"twins/{t}/reported/update" for t in twins],
        total,
        conns,
        None,
        window,
        rate,
        first,
    )
    while _applied(services) - before < total:
        time.sleep(0.02)
    cpu = _cpu_seconds(services) - cpu
    return total / (time.perf_counter() - start), total / elapsed, cpu / total * 1e6


def _applied(services: list[ServiceProcess]) -> int:
    """Device messages the services applied (their ``/ready`` counters)."""
    return sum(
        int(httpx.get(f"{svc.url}/ready").json()["checks"]["mqtt"]["applied"]) for svc in services
    )


def _cpu_seconds(services: list[ServiceProcess]) -> float:
    return sum(process_cpu_seconds(svc.proc.pid) for svc in services if svc.proc)


def _resolve(fut: asyncio.Future[float], value: float) -> None:
    if not fut.done():
        fut.set_result(value)


async def delta_latency(
    svc: ServiceProcess, port: int, twins: list[str], rounds: int, first: int = 0
) -> list[float]:
    """PATCH desired of one twin at a time (values from ``first`` on, so that every PATCH is a
    change) and time until the device receives its delta."""
    loop = asyncio.get_running_loop()
    arrivals: dict[str, asyncio.Future[float]] = {}

    def on_message(_c: paho.Client, _u: object, m: paho.MQTTMessage) -> None:
        if not m.payload:
            return
        key = f"{m.topic}:{json.loads(m.payload)['desiredVersion']}"
        fut = arrivals.get(key)
        if fut is not None:
            # Stamped on arrival in paho's thread, not when the event loop gets to it.
            loop.call_soon_threadsafe(_resolve, fut, time.perf_counter())

    dev = paho.Client(CallbackAPIVersion.VERSION2, client_id="bench-dev", protocol=paho.MQTTv5)
    dev.on_message = on_message
    dev.connect("127.0.0.1", port)
    dev.subscribe("twins/+/delta", 1)
    dev.loop_start()
    await asyncio.sleep(1)
    out: list[float] = []
    async with svc.async_client() as api:
        for n in range(rounds):
            twin = twins[n % len(twins)]
            current = (await api.get(f"/api/v1/twins/{twin}")).json()["desiredVersion"]
            fut: asyncio.Future[float] = loop.create_future()
            arrivals[f"twins/{twin}/delta:{current + 1}"] = fut
            start = time.perf_counter()
            r = await api.patch(
                f"/api/v1/twins/{twin}",
                content=json.dumps({"desired": {"target": first + n}}),
                headers={"Content-Type": "application/merge-patch+json"},
            )
            r.raise_for_status()
            out.append((await asyncio.wait_for(fut, 10)) - start)
    dev.loop_stop()
    dev.disconnect()
    return out


async def delta_latency_under_load(
    services: list[ServiceProcess],
    port: int,
    twins: list[str],
    rounds: int,
    rate: float,
    conns: int,
    window: int,
    first: int,
) -> tuple[list[float], float, float]:
    """Delta latency sampled while devices report at ``rate`` a second (steadily, not in a
    burst): the deltas then share the service with the reports and their replies. Returns the
    samples, the rate at which reports were committed meanwhile, and the service's CPU µs per
    report (the samples' HTTP requests included: a few hundred against thousands of
    reports)."""
    seconds = 5.0 + rounds * 0.01  # the samples start after 1 s and take a few ms each
    load = asyncio.create_task(
        asyncio.to_thread(
            ingest_rate, services, port, twins, int(rate * seconds), conns, window, rate, first
        )
    )
    await asyncio.sleep(1.0)
    samples = await delta_latency(services[0], port, twins, rounds, first=rounds)
    committed, _, cpu_each = await load
    return samples, committed, cpu_each


async def device_round_trip(port: int, twins: list[str], rounds: int) -> list[float]:
    """A device's ``get`` to its ``get/accepted``, one at a time: the service's answer path
    with nothing else going on."""
    loop = asyncio.get_running_loop()
    answers: dict[str, asyncio.Future[float]] = {}

    def on_message(_c: paho.Client, _u: object, m: paho.MQTTMessage) -> None:
        fut = answers.get(json.loads(m.payload).get("clientToken", ""))
        if fut is not None:
            loop.call_soon_threadsafe(_resolve, fut, time.perf_counter())

    def no_delay(_c: paho.Client, _u: object, sock: Any) -> None:  # paho: a SocketLike
        # As connectivity.device does; paho's own default would add the Nagle delay here.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    dev = paho.Client(CallbackAPIVersion.VERSION2, client_id="bench-rtt", protocol=paho.MQTTv5)
    dev.on_message = on_message
    dev.on_socket_open = no_delay
    dev.connect("127.0.0.1", port)
    dev.subscribe("twins/+/get/accepted", 1)
    dev.loop_start()
    await asyncio.sleep(1)
    out: list[float] = []
    for n in range(rounds):
        token = f"rtt-{n}"
        fut: asyncio.Future[float] = loop.create_future()
        answers[token] = fut
        start = time.perf_counter()
        dev.publish(f"twins/{twins[n % len(twins)]}/get", json.dumps({"clientToken": token}), 1)
        out.append((await asyncio.wait_for(fut, 10)) - start)
    dev.loop_stop()
    dev.disconnect()
    return out


def _percentiles(samples: list[float]) -> str:
    ms = sorted(x * 1000 for x in samples)
    p99 = ms[min(len(ms) - 1, int(len(ms) * 0.99))]
    return f"p50 {ms[len(ms) // 2]:.1f}  p99 {p99:.1f}  max {ms[-1]:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=1000, help="twins / device topics")
    parser.add_argument("--messages", type=int, default=20000, help="messages per phase")
    parser.add_argument(
        "--connections", type=int, default=2, help="publisher processes, one connection each"
    )
    parser.add_argument("--window", type=int, default=500, help="unacked QoS 1 per publisher")
    parser.add_argument("--rounds", type=int, default=300, help="delta latency samples")
    parser.add_argument(
        "--load-share",
        type=float,
        default=0.5,
        help="delta latency is also sampled while devices report at this share of the "
        "measured ingest rate (0: skip)",
    )
    parser.add_argument(
        "--steady",
        default="",
        metavar="RATES",
        help="comma-separated reports/s: the CPU per report when devices report steadily "
        "at each rate for 8 s (after the delta latency)",
    )
    parser.add_argument(
        "--replicas",
        type=int,
        default=1,
        help="service processes on one database, sharing the device topics (MQTT 5 shared "
        "subscription); the ingest rate and CPU are their sums (1)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="TWIN_NAME=VALUE",
        help="a setting of the service as its environment variable (repeatable), for A/B runs",
    )
    args = parser.parse_args()
    if not all(item.startswith("TWIN_") and "=" in item for item in args.set):
        parser.error("--set takes TWIN_NAME=VALUE")
    extra = dict(item.split("=", 1) for item in args.set)
    print(f"Machine: {machine()}; load average {os.getloadavg()[0]:.2f}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        broker = Mosquitto(Path(tmp) / "mosquitto", max_inflight_messages=1000).start()
        port = broker.port
        assert port is not None
        services: list[ServiceProcess] = []
        try:
            for n in range(args.replicas):
                replica = ServiceProcess(
                    Path(tmp) / "svc",
                    env={
                        "TWIN_MQTT__ENABLED": "true",
                        "TWIN_MQTT_URL": broker.url,
                        "TWIN_MQTT__CLIENT_ID": f"bench-svc-{n}",
                        "TWIN_MQTT__MAX_INFLIGHT": "256",
                        **extra,
                    },
                )
                services.append(replica)
                replica.start()
            svc = services[0]
            twins = [f"bench:d{n:05d}" for n in range(args.devices)]
            with svc.client() as api:
                for t in twins:
                    api.put(
                        f"/api/v1/twins/{t}", json={"reported": {"counter": -1}}
                    ).raise_for_status()
            bare, bare_pub = bare_rate(port, args.messages, args.connections, args.window)
            print(f"bare paho subscriber   : {bare:9.0f} QoS 1 msg/s", flush=True)
            ingest, ingest_pub, cpu_us = ingest_rate(
                services, port, twins, args.messages, args.connections, args.window
            )
            print(
                f"service ingest (commit): {ingest:9.0f} reported updates/s ({args.devices} twins, "
                f"{args.replicas} service process(es))",
                flush=True,
            )
            print(f"service CPU per report : {cpu_us:9.0f} us (all threads)", flush=True)
            lat = asyncio.run(delta_latency(svc, port, twins, args.rounds))
            trips = asyncio.run(device_round_trip(port, twins, args.rounds))
            loaded: tuple[list[float], float, float] | None = None
            if args.load_share > 0:
                loaded = asyncio.run(
                    delta_latency_under_load(
                        services,
                        port,
                        twins,
                        args.rounds,
                        ingest * args.load_share,
                        args.connections,
                        args.window,
                        first=args.messages,
                    )
                )
            print(
                f"publishers alone       : {bare_pub:9.0f} msg/s PUBACKed during the bare run, "
                f"{ingest_pub:.0f} during ingest ({args.connections} processes)"
            )
            print(f"ratio ingest/bare      : {ingest / bare:9.1%}")
            print(f"delta latency (ms)     : {_percentiles(lat)}")
            if loaded is not None:
                print(
                    f"  under {ingest * args.load_share:.0f} reports/s: {_percentiles(loaded[0])} "
                    f"({loaded[1]:.0f} reports/s committed meanwhile, {loaded[2]:.0f} us CPU "
                    "per report)"
                )
            print(f"device get round trip  : {_percentiles(trips)} (ms)")
            first = 10_000_000  # client tokens beyond those of the phases before
            for rate in [float(r) for r in args.steady.split(",") if r]:
                total = int(rate * 8)
                committed, _, cpu_each = ingest_rate(
                    services, port, twins, total, args.connections, args.window, rate, first
                )
                first += total
                print(
                    f"steady {rate:6.0f} reports/s: {committed:6.0f} committed/s, "
                    f"{cpu_each:5.0f} us CPU per report"
                )
            print(f"load average at the end: {os.getloadavg()[0]:.2f}")
        finally:
            for replica in services:
                replica.stop()
            broker.stop()


if __name__ == "__main__":
    interrupt_on_sigterm()  # servers are stopped on SIGTERM too
    main()
