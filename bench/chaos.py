"""Delivery under faults: devices report while replicas are killed and the broker restarts.

Every report the broker acknowledged must be applied, and applied once. The run sets up what
deploy/ ships: mosquitto on deploy/mosquitto/mosquitto.conf (devices and the service on their
listeners) with per-device credentials and the ACL the service writes, N service
replicas on one SQLite file (or FerretDB, ``--store mongodb``) sharing the device topics, and
D MQTT 5 devices. Each device sends R reports (distinct keys and client tokens, W in flight,
at most ``--rate`` a second if given), and sends one again when the broker says no subscriber
took it (reason code 0x10), as ``connectivity.device`` does. Faults come at random intervals:
SIGKILL of a replica (started again after a pause), SIGKILL of a replica's SQLite writer
process (the replica starts it again), a mosquitto restart, with ``--store mongodb`` a
SIGKILL of FerretDB (``store``), or a replica killed and started again while FerretDB is
down (``cold``: it waits for the store).

``--broker embedded`` runs the quick start's setup instead: one service with its built-in
broker, which acknowledges a report only once it is committed. A SIGKILL of the service takes
the broker with it, and the devices send what was not acknowledged again when it is back.

Two phases in one run, same devices and load: without faults (the baseline), then with them.
Printed per phase: acknowledged reports, those never applied, revisions beyond one per report
(reports applied twice), and the rate at which reports were applied, from the first publish to
the last commit. The rate under faults is given as a ratio of the baseline's. Meanwhile
``--watchers`` WebSocket subscribers and ``--sse-watchers`` server-sent events readers follow
every twin (bench/chaos_watchers.py), resuming on another replica after each close. The
exit status is 1 when a report was lost or applied twice, a retained delta is stale, or a
watcher missed a change or got one twice.

    .venv/bin/python -m bench.chaos --devices 20 --reports 300 --replicas 2 --faults kill,broker
    .venv/bin/python -m bench.chaos --broker embedded --replicas 1 --faults kill,writer --rate 50
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import random
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx

from bench.chaos_watchers import SseWatcher, Watcher
from bench.common import machine
from connectivity.credentials import CredentialStore, mqtt_username
from connectivity.mqtt_client import MqttClient
from connectivity.options import MqttOptions
from connectivity.retained import read_retained
from tests.servers.ferretdb import FerretDB
from tests.servers.mosquitto import ShippedMosquitto
from tests.servers.process import free_port
from tests.service_process import ADMIN_TOKEN, ServiceProcess
from tests.sync.helpers import send_reliably, wait_mqtt_up
from tests.terminate import interrupt_on_sigterm

SERVICE_USER, SERVICE_PASSWORD = "twin-service", "chaos-service-password"


@dataclass
class Outcome:
    acked: int
    missing: int
    extra_revisions: int
    seconds: float
    faults: list[str]
    desired_changes: int = 0  # committed (the twins' desiredVersion)
    stale_deltas: int = 0
    retried: int = 0  # writes that lost a compare-and-set and were tried again
    stream_problems: list[str] = field(default_factory=list)
    stream_connections: int = 0

    @property
    def rate(self) -> float:
        return self.acked / self.seconds if self.seconds else 0.0


class Fleet:
    """The broker, the replicas and the device credentials of one run."""

    def __init__(self, root: Path, devices: int, replicas: int, store: str, broker: str) -> None:
        self.data = root / "data"
        self.data.mkdir(parents=True)
        self.ferretdb = FerretDB(root / "ferretdb").start() if store == "mongodb" else None
        stored = {}
        if self.ferretdb is not None:
            stored = {"TWIN_STORE": "mongodb", "TWIN_MONGODB_URL": self.ferretdb.url}
        credentials = CredentialStore.in_data_dir(self.data)
        self.twins = [f"chaos:d{n:04d}" for n in range(devices)]
        self.passwords = {t: credentials.add(t) for t in self.twins}
        credentials.write_mosquitto_files(
            root / "passwd",
            root / "acl",
            SERVICE_USER,
            "twins/{twinId}",
            service_password=SERVICE_PASSWORD,
            service_password_path=root / "service-passwd",
        )
        self.broker: ShippedMosquitto | None = None
        self.device_protocol: Literal[4, 5] = 5
        if broker == "mosquitto":
            self.broker = ShippedMosquitto(
                root / "mosquitto",
                password_file=root / "passwd",
                service_password_file=root / "service-passwd",
                acl_file=root / "acl",
            ).start()
            self.device_url, self.service_url = self.broker.url, self.broker.service_url
            where = {
                "TWIN_MQTT_URL": self.service_url.replace(
                    "mqtt://", f"mqtt://{SERVICE_USER}:{SERVICE_PASSWORD}@"
                )
            }
        else:  # the service's own broker, on a port it keeps across restarts
            port = free_port()
            self.device_url = self.service_url = f"mqtt://127.0.0.1:{port}"
            # amqtt speaks MQTT 3.1.1 only; it acknowledges after the commit, so no device
            # needs MQTT 5's "no subscriber" answer there.
            self.device_protocol = 4
            where = {
                "TWIN_MQTT__EMBEDDED_PORT": str(port),
                # Known, so that the run can read the retained deltas as the service.
                "TWIN_MQTT__SERVICE_USERNAME": SERVICE_USER,
                "TWIN_MQTT__SERVICE_PASSWORD": SERVICE_PASSWORD,
            }
        self.replicas = [
            ServiceProcess(
                self.data,
                env={
                    "TWIN_MQTT__ENABLED": "true",
                    "TWIN_MQTT__CLIENT_ID": f"chaos-svc-{n}",
                    "TWIN_MQTT__LASTSEEN_COALESCE_SECONDS": "100000",
                    **where,
                    **stored,
                },
            )
            for n in range(replicas)
        ]
        for replica in self.replicas:
            replica.start()
            wait_mqtt_up(replica, 30)
        with self.replicas[0].client() as api:
            for twin in self.twins:
                api.put(f"/api/v1/twins/{twin}", json={"reported": {}}).raise_for_status()

    def stop(self) -> None:
        for replica in self.replicas:
            replica.stop()
        if self.broker is not None:
            self.broker.stop()
        if self.ferretdb is not None:
            self.ferretdb.stop()

    async def retried(self) -> list[int | None]:
        """Each replica's count of retried writes (``/ready``); None for one that does not
        answer. A replica killed and started again counts from 0."""
        counts: list[int | None] = []
        for replica in self.replicas:
            try:
                async with replica.async_client() as api:
                    checks = (await api.get("/ready")).json()["checks"]
                counts.append(int(checks["store"]["writes"]["retried"]))
            except (httpx.HTTPError, KeyError, ValueError):
                counts.append(None)
        return counts

    async def documents(self) -> dict[str, dict[str, Any]]:
        """Twin id -> its document, read through a replica that answers."""
        for replica in self.replicas:
            found: dict[str, dict[str, Any]] = {}
            try:
                async with replica.async_client() as api:
                    for at in range(0, len(self.twins), 100):
                        ids = ",".join(self.twins[at : at + 100])
                        response = await api.get("/api/v1/twins", params={"ids": ids})
                        response.raise_for_status()
                        found.update((doc["twinId"], doc) for doc in response.json())
                return found
            except httpx.HTTPError:
                continue  # killed, or being started again
        raise RuntimeError("no replica answers")

    async def unexplained(self, since: dict[str, int]) -> list[str]:
        """The revisions after ``since`` (twin -> revision) that are neither a desired
        change nor a report's first write of its key: what a run's extra revisions are."""
        found: list[str] = []
        async with self.replicas[0].async_client() as api:
            for twin in self.twins:
                seen: set[str] = set()
                last_desired: dict[str, Any] = {}
                for event in await _history(api, twin, since[twin] + 1):
                    if "desired" in event["changes"]:
                        last_desired = event
                        continue
                    keys = set(event["changes"].get("reported", {}))
                    if not keys or keys & seen:
                        found.append(
                            f"{twin}: {json.dumps(event)[:300]}; the phase's last desired change "
                            f"before it: {json.dumps(last_desired)[:300]}"
                        )
                    seen |= keys
        return found

    async def revisions(self) -> dict[str, tuple[int, set[str]]]:
        """Twin -> (revision, reported keys)."""
        docs = await self.documents()
        return {t: (doc["revision"], set(doc["reported"])) for t, doc in docs.items()}

    async def change_desired(self, twin: str, value: str) -> None:
        """PATCH the twin's desired ``target`` through the first replica that takes the
        connection. Whatever comes back is left at that: a request that reached a replica
        may have committed even when its answer was an error or never came."""
        for replica in self.replicas:
            try:
                async with replica.async_client() as api:
                    await api.patch(
                        f"/api/v1/twins/{twin}",
                        json={"desired": {"target": value}},
                        headers={"Content-Type": "application/merge-patch+json"},
                    )
                return
            except httpx.ConnectError:
                continue  # killed, or being started again: nothing was sent
            except httpx.HTTPError:
                return

    async def stale_deltas(self) -> list[str]:
        """Twins whose delta retained by the broker is not the one they have now (a device
        that connects gets that message first). Empty when every one matches."""
        options = MqttOptions(
            url=self.service_url,
            client_id=f"chaos-deltas-{time.time_ns()}",
            username=SERVICE_USER,
            password=SERVICE_PASSWORD,
            protocol=self.device_protocol,
        )
        retained = await read_retained(options, "twins/+/delta")
        docs = await self.documents()
        stale = []
        for twin, doc in docs.items():
            held = retained.get(f"twins/{twin}/delta", b"")
            want = {"state": doc["delta"], "desiredVersion": doc["desiredVersion"]}
            if (json.loads(held) if held else None) != (want if doc["delta"] else None):
                stale.append(f"{twin}: retained {held[:80]!r}, twin {want}")
        return stale


async def _history(api: httpx.AsyncClient, twin: str, since: int) -> list[dict[str, Any]]:
    """The twin's history from revision ``since`` on, every page of it."""
    events: list[dict[str, Any]] = []
    while True:
        params = {"since": since, "limit": 1000}
        response = await api.get(f"/api/v1/twins/{twin}/history", params=params)
        response.raise_for_status()
        page = response.json()
        events += page["items"]
        if "nextSince" not in page:
            return events
        since = page["nextSince"]


async def _device(fleet: Fleet, twin: str) -> MqttClient:
    client = MqttClient(
        MqttOptions(
            url=fleet.device_url,
            client_id=f"dev-{twin.replace(':', '-')}",
            username=mqtt_username(twin),
            password=fleet.passwords[twin],
            reconnect_min_delay=0.2,
            reconnect_max_delay=1.0,
            ack_timeout=600,
            protocol=fleet.device_protocol,
        )
    )
    await client.start()
    await client.wait_connected(10)
    return client


async def phase(
    fleet: Fleet,
    phase_name: str,
    reports: int,
    window: int,
    rate: float,
    desired_rate: float,
    fault_kinds: list[str],
    events: int,
    rng: random.Random,
    watchers: int,
    sse_watchers: int,
    cap: float,
) -> Outcome:
    """One round of reports with ``events`` faults; keys are ``<phase>-<n>``; a report still
    missing after ``cap`` seconds counts as never applied."""
    urls = [replica.url for replica in fleet.replicas]
    watching = [Watcher(f"watcher {n}", urls, fleet.twins, ADMIN_TOKEN) for n in range(watchers)]
    watching += [
        SseWatcher(f"sse watcher {n}", urls, fleet.twins, ADMIN_TOKEN) for n in range(sse_watchers)
    ]
    for n, watcher in enumerate(watching):
        watcher.start(first=n)  # spread over the replicas
    await asyncio.wait_for(asyncio.gather(*(w.subscribed.wait() for w in watching)), 60)
    before = await fleet.documents()
    devices = [await _device(fleet, twin) for twin in fleet.twins]
    acked = 0

    async def send_all(twin: str, client: MqttClient) -> None:
        room = asyncio.Semaphore(window)

        async def one(n: int) -> None:
            nonlocal acked
            body = {"state": {f"{phase_name}-{n}": n}, "clientToken": f"{phase_name}-{n}"}
            try:
                await send_reliably(client, f"twins/{twin}/reported/update", body, timeout=600)
                acked += 1
            finally:
                room.release()

        sending = []
        begun = time.monotonic()
        for n in range(reports):
            if rate:
                await asyncio.sleep(max(0.0, begun + n / rate - time.monotonic()))
            await room.acquire()
            sending.append(asyncio.create_task(one(n)))
        await asyncio.gather(*sending)

    async def change_desired() -> None:
        # Operators change desired state meanwhile: each change publishes a delta, which
        # must end as the twin's own on the broker whatever the faults did. Every value is
        # new: a change whose answer a fault cut off may have committed, and sent again it
        # would be a write of the same value (a revision that changes no version). New in
        # every phase too: numbers from 0 again each phase were values a twin could still
        # hold from the phase before, an extra revision the run reported as a report
        # applied twice.
        if not desired_rate:
            return
        for n in itertools.count():
            await fleet.change_desired(fleet.twins[n % len(fleet.twins)], f"{phase_name}-{n}")
            await asyncio.sleep(1 / desired_rate)

    started = time.monotonic()
    load = asyncio.gather(*(send_all(t, c) for t, c in zip(fleet.twins, devices, strict=True)))
    operators = asyncio.create_task(change_desired())
    keys = {f"{phase_name}-{n}" for n in range(reports)}
    faults: list[str] = []
    next_fault = started + rng.uniform(0.5, 2.0)
    # Retries, summed over the replicas' counters as they rise (a restarted one from 0; what
    # a killed one counted since the last look is lost). A store that keeps losing its
    # compare-and-sets shows here: on FerretDB a claim a killed replica left took about 70
    # attempts per committed write and then stopped every write of the twin.
    retried, last = 0, await fleet.retried()
    # Faults come while the service has work, until everything sent is applied: the broker
    # acknowledges each publish at once, so the devices are done long before the service.
    while True:
        after = await fleet.revisions()
        missing = sum(len(keys - after[t][1]) for t in fleet.twins)
        now = time.monotonic()
        if (load.done() and missing == 0) or now - started > cap:
            break
        if len(faults) < events and now >= next_fault:
            at = acked
            faults.append(f"{await _fault(fleet, fault_kinds, rng)} after {at} acks")
            next_fault = time.monotonic() + rng.uniform(0.5, 2.0)
        counts = await fleet.retried()
        for n, count in enumerate(counts):
            if count is not None:
                previous = last[n] or 0
                retried += count - previous if count >= previous else count  # started again
                last[n] = count
        await asyncio.sleep(0.1)
    seconds = time.monotonic() - started
    operators.cancel()
    await asyncio.gather(operators, return_exceptions=True)
    await asyncio.wait_for(load, 60)
    for client in devices:
        await client.stop(grace=0)
    # A redelivery can come after the last new report: count what it did too.
    await asyncio.sleep(2.0)
    # One revision per report: the devices' online/offline status is not written (no last
    # will here), and lastSeen writes are coalesced away; and one per desired change,
    # counted by the twins (a change whose answer a kill cut off may have committed).
    final = await fleet.documents()
    revisions = sum(final[t]["revision"] - before[t]["revision"] for t in fleet.twins)
    desired = sum(final[t]["desiredVersion"] - before[t]["desiredVersion"] for t in fleet.twins)
    extra = revisions - len(fleet.twins) * reports - desired
    # The last deltas go out after their commits (and after a reconnection, its correction
    # pass): allow them some seconds.
    for _ in range(21):
        stale = await fleet.stale_deltas()
        if not stale:
            break
        await asyncio.sleep(0.5)
    for line in stale[:5]:
        print(f"stale delta: {line}")
    since = {t: before[t]["revision"] for t in fleet.twins}
    if extra:
        for line in (await fleet.unexplained(since))[:5]:
            print(f"extra revision: {line}")
    until = {t: final[t]["revision"] for t in fleet.twins}
    deadline = time.monotonic() + 30
    while not all(w.caught_up(until) for w in watching) and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    for watcher in watching:
        await watcher.stop()
    problems = [p for w in watching for p in w.problems(since, until)]
    for line in problems[:5]:
        print(f"stream: {line}")
    connections = sum(w.connections for w in watching)
    outcome = Outcome(acked, missing, extra, seconds, faults, desired, len(stale), retried)
    outcome.stream_problems, outcome.stream_connections = problems, connections
    return outcome


async def _fault(fleet: Fleet, kinds: list[str], rng: random.Random) -> str:
    kind = rng.choice(kinds)
    if kind == "broker":
        assert fleet.broker is not None, "main() allows broker faults only on mosquitto"
        await fleet.broker.arestart()
        return "broker restart"
    if kind == "store":
        # A crash of the database server itself: writes fail until it is back; the service
        # keeps trying each device message meanwhile and acknowledges it after its commit.
        assert fleet.ferretdb is not None, "main() allows store faults only on --store mongodb"
        fleet.ferretdb.kill()
        down = rng.uniform(0.5, 3.0)
        await asyncio.sleep(down)
        await fleet.ferretdb.astart()
        return f"SIGKILL of FerretDB, back after {down:.1f} s"
    n = rng.randrange(len(fleet.replicas))
    if kind == "cold":
        # A replica restarted while the database server is down: it waits for the store,
        # answering 503, and starts when it answers; its devices' messages wait at the broker.
        assert fleet.ferretdb is not None, "main() allows cold faults only on --store mongodb"
        fleet.ferretdb.kill()
        fleet.replicas[n].kill()
        await asyncio.to_thread(fleet.replicas[n].start)
        down = rng.uniform(1.0, 4.0)
        await asyncio.sleep(down)
        await fleet.ferretdb.astart()
        await asyncio.to_thread(wait_mqtt_up, fleet.replicas[n], 60)
        return f"SIGKILL of FerretDB and replica {n}, restarted first, FerretDB {down:.1f} s later"
    if kind == "writer":
        os.kill(await asyncio.to_thread(fleet.replicas[n].writer_pid), signal.SIGKILL)
        return f"SIGKILL of replica {n}'s writer"
    fleet.replicas[n].kill()
    await asyncio.sleep(rng.uniform(0.0, 0.5))
    await asyncio.to_thread(fleet.replicas[n].start)
    await asyncio.to_thread(wait_mqtt_up, fleet.replicas[n], 30)
    return f"SIGKILL of replica {n}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=20)
    parser.add_argument("--reports", type=int, default=300, help="per device and phase")
    parser.add_argument("--window", type=int, default=10, help="reports in flight per device")
    parser.add_argument(
        "--rate", type=float, default=0.0, help="reports a second per device (0: no limit)"
    )
    parser.add_argument(
        "--desired-rate",
        type=float,
        default=10.0,
        help="desired changes a second over HTTP during each phase (0: none; keep it low on "
        "--store mongodb, whose FerretDB takes 10-30 writes a second)",
    )
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--broker", choices=["mosquitto", "embedded"], default="mosquitto")
    parser.add_argument(
        "--faults",
        default="kill,broker",
        help="kill, writer, broker, store (FerretDB) and/or cold (a replica restarted while "
        "FerretDB is down)",
    )
    parser.add_argument("--events", type=int, default=3, help="faults in the second phase")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workdir", help="a new directory for the run, kept (logs)")
    parser.add_argument(
        "--watchers",
        type=int,
        default=2,
        help="WebSocket subscribers of every twin, resuming on another replica after a close",
    )
    parser.add_argument(
        "--sse-watchers",
        type=int,
        default=1,
        help="the same as server-sent events, resuming with Last-Event-ID",
    )
    parser.add_argument(
        "--store", choices=["sqlite", "mongodb"], default="sqlite", help="mongodb: on FerretDB"
    )
    parser.add_argument(
        "--cap",
        type=float,
        default=900.0,
        help="seconds a phase may take before what is still missing counts as never applied "
        "(raise it on a loaded machine to tell a lost report from a late one)",
    )
    args = parser.parse_args()
    kinds = [k for k in args.faults.split(",") if k]
    if not kinds or set(kinds) - {"kill", "writer", "broker", "store", "cold"}:
        parser.error("--faults takes kill, writer, broker, store and/or cold")
    if args.broker == "embedded" and (args.replicas != 1 or "broker" in kinds):
        parser.error("--broker embedded: one replica (the broker is in it), no broker faults")
    if args.store == "mongodb" and "writer" in kinds:
        parser.error("--faults writer: the SQLite writer process, not on --store mongodb")
    if args.store != "mongodb" and {"store", "cold"} & set(kinds):
        parser.error("--faults store, cold: a kill of FerretDB, only on --store mongodb")
    print(f"Machine: {machine()}; load average {os.getloadavg()[0]:.2f}", flush=True)
    rng = random.Random(args.seed)
    with contextlib.ExitStack() as kept:
        if args.workdir is None:
            tmp = kept.enter_context(tempfile.TemporaryDirectory(prefix="bench-chaos-"))
        else:
            tmp = args.workdir  # kept, with the replicas' logs
        fleet = Fleet(Path(tmp), args.devices, args.replicas, args.store, args.broker)
        try:
            load = (args.reports, args.window, args.rate, args.desired_rate, kinds)
            watchers = (args.watchers, args.sse_watchers)
            base = asyncio.run(phase(fleet, "base", *load, 0, rng, *watchers, args.cap))
            hurt = asyncio.run(phase(fleet, "faults", *load, args.events, rng, *watchers, args.cap))
        finally:
            fleet.stop()
    print(
        f"{args.devices} devices x {args.reports} reports, {args.window} in flight each, "
        f"{args.replicas} replica(s), {args.store} store, {args.broker} broker"
    )
    for name, o in (("no faults (baseline)", base), ("with faults", hurt)):
        print(
            f"{name:21}: acked {o.acked}, never applied {o.missing}, applied twice "
            f"{o.extra_revisions}, {o.rate:.0f} reports/s applied; {o.desired_changes} "
            f"desired changes, {o.stale_deltas} stale deltas; {o.retried} writes retried; "
            f"{args.watchers} + {args.sse_watchers} SSE watchers over "
            f"{o.stream_connections} connections, "
            f"{len(o.stream_problems)} stream problems"
        )
    print(f"faults: {'; '.join(hurt.faults) or 'none (the load ended first)'}")
    print(f"rate with faults / baseline: {hurt.rate / base.rate:.2f}")
    failed = any(
        o.missing or o.extra_revisions or o.stale_deltas or o.stream_problems for o in (base, hurt)
    )
    return 1 if failed else 0


if __name__ == "__main__":
    interrupt_on_sigterm()  # servers are stopped on SIGTERM too
    sys.exit(main())
