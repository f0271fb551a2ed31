"""End-to-end MQTT ingest and delta latency, against mosquitto and the real service process.

    .venv/bin/python bench/mqtt_ingest.py [--devices 1000] [--messages 20000] [--connections 4]

1. Bare baseline: one paho subscriber counts QoS 1 messages (no processing) from publishers.
2. Ingest: the same publishers send reported updates (QoS 1) to 1,000 twins; the rate is
   messages committed by the service (its ``/ready`` ``applied`` counter) per second.
3. Delta latency: PATCH desired of a twin over HTTP, time until the device receives the delta.
Prints figures only; nothing here asserts timings.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.servers.mosquitto import Mosquitto
from tests.service_process import ServiceProcess


def _client(port: int, name: str) -> paho.Client:
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=name, protocol=paho.MQTTv5)
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(0)
    client.connect("127.0.0.1", port)
    client.loop_start()
    return client


def _publish_all(
    port: int, topics: list[str], total: int, conns: int, payload: bytes | None
) -> float:
    """Publish ``total`` QoS 1 messages over ``conns`` connections; returns when all PUBACKed."""
    clients = [_client(port, f"bench-pub-{i}-{time.time_ns()}") for i in range(conns)]
    time.sleep(0.3)
    start = time.perf_counter()
    infos = []
    for n in range(total):
        topic = topics[n % len(topics)]
        body = payload or json.dumps({"state": {"counter": n}, "clientToken": f"b{n}"}).encode()
        infos.append(clients[n % conns].publish(topic, body, qos=1))
    for info in infos:
        info.wait_for_publish(60)
    elapsed = time.perf_counter() - start
    for c in clients:
        c.loop_stop()
        c.disconnect()
    return elapsed


def bare_rate(port: int, total: int, conns: int) -> float:
    done = threading.Event()
    count = 0
    first = [0.0]

    def on_message(_c: paho.Client, _u: object, _m: paho.MQTTMessage) -> None:
        nonlocal count
        if count == 0:
            first[0] = time.perf_counter()
        count += 1
        if count >= total:
            done.set()

    sub = paho.Client(CallbackAPIVersion.VERSION2, client_id="bench-bare", protocol=paho.MQTTv5)
    sub.on_message = on_message
    sub.connect("127.0.0.1", port)
    sub.subscribe("bare/+/reported/update", 1)
    sub.loop_start()
    time.sleep(0.3)
    start = time.perf_counter()
    _publish_all(
        port,
        [f"bare/d{n}/reported/update" for n in range(1000)],
        total,
        conns,
        b'{"state":{"counter":1}}',
    )
    done.wait(120)
    end = time.perf_counter()
    sub.loop_stop()
    sub.disconnect()
    return count / (end - start)


def ingest_rate(svc: ServiceProcess, port: int, twins: list[str], total: int, conns: int) -> float:
    def applied() -> int:
        return int(httpx.get(f"{svc.url}/ready").json()["checks"]["mqtt"]["applied"])

    before = applied()
    start = time.perf_counter()
    _publish_all(port, [f"twins/{t}/reported/update" for t in twins], total, conns, None)
    while applied() - before < total:
        time.sleep(0.02)
    return total / (time.perf_counter() - start)


async def delta_latency(
    svc: ServiceProcess, port: int, twins: list[str], rounds: int
) -> list[float]:
    loop = asyncio.get_running_loop()
    arrivals: dict[str, asyncio.Future[float]] = {}

    def on_message(_c: paho.Client, _u: object, m: paho.MQTTMessage) -> None:
        if not m.payload:
            return
        key = f"{m.topic}:{json.loads(m.payload)['desiredVersion']}"
        fut = arrivals.get(key)
        if fut is not None:
            loop.call_soon_threadsafe(lambda: fut.done() or fut.set_result(time.perf_counter()))

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
                content=json.dumps({"desired": {"target": n}}),
                headers={"Content-Type": "application/merge-patch+json"},
            )
            r.raise_for_status()
            out.append((await asyncio.wait_for(fut, 10)) - start)
    dev.loop_stop()
    dev.disconnect()
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=300)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        broker = Mosquitto(Path(tmp) / "mosquitto", max_inflight_messages=1000).start()
        port = broker.port
        assert port is not None
        svc = ServiceProcess(
            Path(tmp) / "svc",
            env={
                "TWIN_MQTT__ENABLED": "true",
                "TWIN_MQTT_URL": broker.url,
                "TWIN_MQTT__CLIENT_ID": "bench-svc",
                "TWIN_MQTT__MAX_INFLIGHT": "256",
            },
        ).start()
        try:
            twins = [f"bench:d{n:05d}" for n in range(args.devices)]
            with svc.client() as api:
                for t in twins:
                    api.put(
                        f"/api/v1/twins/{t}", json={"reported": {"counter": -1}}
                    ).raise_for_status()
            bare = bare_rate(port, args.messages, args.connections)
            ingest = ingest_rate(svc, port, twins, args.messages, args.connections)
            lat = sorted(
                x * 1000 for x in asyncio.run(delta_latency(svc, port, twins, args.rounds))
            )
            print(f"bare paho subscriber   : {bare:9.0f} QoS 1 msg/s")
            print(
                f"service ingest (commit): {ingest:9.0f} reported updates/s ({args.devices} twins)"
            )
            print(f"ratio                  : {ingest / bare:9.1%}")
            print(
                f"delta latency (ms)     : p50 {lat[len(lat) // 2]:.1f}  "
                f"p99 {lat[min(len(lat) - 1, int(len(lat) * 0.99))]:.1f}  max {lat[-1]:.1f}"
            )
        finally:
            svc.stop()
            broker.stop()


if __name__ == "__main__":
    main()
