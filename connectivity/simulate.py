"""``twin-service simulate``: N simulated devices reporting to the service, for demos and load.

Devices are multiplexed over a few MQTT connections (``--connections``), so the broker account
used must be allowed on every device's topics (the service account, or an anonymous broker).
Each device reports ``{"state": {"counter": i}, "clientToken": ...}`` at ``--rate`` messages
per second in total; ``--offline-fraction`` of the devices are announced ``offline`` and stay
silent. Progress is printed every second; the summary gives messages, acks (``accepted``),
rejects by error code and the publish-to-accepted latency percentiles.

Devices never create twins (a report to a missing one is rejected with ``twin.notfound``);
``--create`` creates the missing ones first through the REST API (``--api``, ``--token``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any, Literal

from connectivity.errors import ConnectRefused, MqttUnavailable
from connectivity.messages import InboundMessage
from connectivity.mqtt_client import MqttClient
from connectivity.options import BrokerAddress, MqttOptions
from connectivity.topics import DEFAULT_PREFIX, TopicLayout
from twin_service.cli_numbers import at_least, number
from twin_service.errors import InvalidTwinId
from twin_service.twin.ids import validate_namespace
from twin_service.urls import check_url


def add_subcommands(subparsers: Any) -> argparse.ArgumentParser:
    sim: argparse.ArgumentParser = subparsers.add_parser(
        "simulate", help="drive simulated devices against the service"
    )
    sim.add_argument("--url", default="mqtt://127.0.0.1:1883", help="broker URL with credentials")
    sim.add_argument("--devices", type=at_least(1, int), default=100)
    sim.add_argument("--rate", type=_rate, default=100.0, help="reports per second, all devices")
    sim.add_argument("--offline-fraction", type=_fraction, default=0.0, help="0 to 1")
    sim.add_argument("--duration", type=at_least(0, float), default=10.0, help="seconds")
    sim.add_argument("--namespace", type=_namespace, default="sim")
    sim.add_argument("--connections", type=at_least(1, int), default=4)
    sim.add_argument("--protocol", type=int, choices=[4, 5], default=5)
    sim.add_argument("--topic-prefix", type=_topic_prefix, default=DEFAULT_PREFIX)
    sim.add_argument(
        "--create",
        action="store_true",
        help="create the simulated twins that do not exist yet, through the REST API",
    )
    sim.add_argument(
        "--api", type=_api_url, default="http://127.0.0.1:8080", help="the service, for --create"
    )
    sim.add_argument(
        "--token",
        default=os.environ.get("TWIN_TOKEN"),
        help="a write token, for --create (default: $TWIN_TOKEN)",
    )
    sim.set_defaults(handler=cmd_simulate)
    return sim


def _rate(text: str) -> float:
    # 0 once meant publishing as fast as the loop could, which no reports-per-second says.
    value = number(text, float)
    if value <= 0:
        raise argparse.ArgumentTypeError("must be above 0 (reports per second)")
    return value


def _fraction(text: str) -> float:
    value = number(text, float)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError("must be from 0 to 1")
    return value


def _namespace(text: str) -> str:
    try:
        return validate_namespace(text)
    except InvalidTwinId:
        raise argparse.ArgumentTypeError(
            "must be dotted words starting with a letter (e.g. org.acme.plant1)"
        ) from None


def _topic_prefix(text: str) -> str:
    try:
        TopicLayout(text)  # what the service and the brokers build from mqtt.topic_prefix
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _api_url(text: str) -> str:
    try:
        check_url(text, ("http", "https"))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Simulation:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.layout = TopicLayout(args.topic_prefix)
        self.twins = [f"{args.namespace}:dev-{n:05d}" for n in range(args.devices)]
        offline = int(len(self.twins) * args.offline_fraction)
        self.offline = set(random.sample(self.twins, offline))
        self.sent: dict[str, float] = {}
        self.latencies: list[float] = []
        self.messages = self.acks = self.rejects = 0
        self.reasons: Counter[str] = Counter()
        self.clients: list[MqttClient] = []

    async def on_reply(self, msg: InboundMessage) -> None:
        try:
            body = json.loads(msg.payload)
        except ValueError:
            return
        started = self.sent.pop(str(body.get("clientToken")), None)
        if started is None:
            return  # not a report of this run, or answered already (a redelivered reply)
        if msg.topic.endswith("/rejected"):
            self.rejects += 1
            self.reasons[str(body.get("error"))] += 1
        else:
            self.acks += 1
        self.latencies.append(time.perf_counter() - started)

    async def run(self, out: Any) -> int:
        try:
            return await self._run(out)
        finally:
            for client in self.clients:
                await client.stop(grace=0)

    async def _run(self, out: Any) -> int:
        a = self.args
        protocol: Literal[4, 5] = 5 if a.protocol == 5 else 4
        for n in range(a.connections):
            client = MqttClient(
                MqttOptions(
                    url=a.url,
                    client_id=f"sim-{n}-{random.getrandbits(24):06x}",
                    protocol=protocol,
                    persistent_session=False,
                )
            )
            if n == 0:
                # One connection takes every reply: with a subscription on each, every
                # reply came once per connection and was counted as many times.
                await client.subscribe(self.layout.all_twins("reported/update/+"), 1, self.on_reply)
            self.clients.append(client)
            await client.start()
            await client.wait_connected(10)
        for i, twin in enumerate(self.twins):
            status = b"offline" if twin in self.offline else b"online"
            client = self.clients[i % len(self.clients)]
            await client.publish(self.layout.topic(twin, "status"), status, retain=True)
        online = [t for t in self.twins if t not in self.offline] or self.twins[:1]
        interval = 1.0 / a.rate if a.rate > 0 else 0.0
        deadline = time.monotonic() + a.duration
        next_report = time.monotonic() + 1
        seq = 0
        while time.monotonic() < deadline:
            twin = online[seq % len(online)]
            token = f"s{seq}"
            body = json.dumps({"state": {"counter": seq}, "clientToken": token}).encode()
            self.sent[token] = time.perf_counter()
            client = self.clients[seq % len(self.clients)]
            await client.publish(self.layout.topic(twin, "reported/update"), body, await_ack=False)
            self.messages += 1
            seq += 1
            if interval:
                await asyncio.sleep(interval)
            if time.monotonic() >= next_report:
                next_report += 1
                print(
                    f"\rsent {self.messages} acks {self.acks} rejects {self.rejects}",
                    end="",
                    file=out,
                )
        settle = time.monotonic() + 10
        while self.acks + self.rejects < self.messages and time.monotonic() < settle:
            await asyncio.sleep(0.05)
        ms = [x * 1000 for x in self.latencies]
        print(file=out)
        lost = self.messages - self.acks - self.rejects
        print(
            f"devices {len(self.twins)} (offline {len(self.offline)}) messages {self.messages} "
            f"acks {self.acks} rejects {self.rejects} unanswered {lost}",
            file=out,
        )
        print(
            f"latency ms p50 {percentile(ms, 0.5):.1f} p90 {percentile(ms, 0.9):.1f} "
            f"p99 {percentile(ms, 0.99):.1f} max {max(ms, default=float('nan')):.1f}",
            file=out,
        )
        if self.reasons:
            reasons = ", ".join(f"{code} {n}" for code, n in self.reasons.most_common())
            print(f"rejected: {reasons}", file=out)
        if self.reasons["twin.notfound"]:
            print(
                f"devices never create twins: create {self.twins[0]} to {self.twins[-1]} "
                "first, or run again with --create (--api, --token)",
                file=out,
            )
        return 0


def cmd_simulate(
    args: argparse.Namespace, data_dir: Path | None = None, out: Any = sys.stdout
) -> int:
    """``simulate --devices N --rate R --offline-fraction F``; twins must exist (else 404s).

    0 after the summary; 2 for a broker URL it cannot use; 1 when the broker cannot be
    reached or refuses (one line on stderr, never the URL: it holds the password)."""
    try:
        BrokerAddress.parse(args.url)
    except ValueError as exc:
        print(f"twin-service simulate: --url: {exc}", file=sys.stderr)
        return 2
    simulation = Simulation(args)
    if args.create:
        if not args.token:
            print("twin-service simulate: --create needs --token (or TWIN_TOKEN)", file=sys.stderr)
            return 2
        try:
            created = create_twins(args.api, args.token, simulation.twins)
        except CreateFailed as exc:
            print(f"twin-service simulate: --create: {exc}", file=sys.stderr)
            return 1
        print(f"created {created} of {len(simulation.twins)} twins", file=out)
    try:
        return asyncio.run(simulation.run(out))
    except MqttUnavailable as exc:
        detail = f" ({exc.description})" if exc.description else ""
        print(f"twin-service simulate: {exc.message}{detail}{_hint(exc, args)}", file=sys.stderr)
        return 1


def _hint(exc: MqttUnavailable, args: argparse.Namespace) -> str:
    """What to change when the broker refused the simulator's CONNECT."""
    if not isinstance(exc, ConnectRefused):
        return ""
    if "protocol version" in exc.message and args.protocol == 5:
        return "; the embedded broker speaks MQTT 3.1.1 only: pass --protocol 4"
    if "authori" in exc.message or "password" in exc.message:
        return (
            "; the simulator logs in as the service's broker account: put its user and "
            "password (mqtt.service_password) in --url"
        )
    return ""


class CreateFailed(Exception):
    pass


def create_twins(api: str, token: str, twins: list[str]) -> int:
    """Creates those of ``twins`` that do not exist (``If-None-Match: *``); returns how many."""
    created = 0
    for twin in twins:
        try:
            request = urllib.request.Request(
                f"{api.rstrip('/')}/api/v1/twins/{urllib.parse.quote(twin, safe=':')}",
                data=b"{}",
                method="PUT",
                headers={
                    "Authorization": f"Bearer {token}",
                    "Content-Type": "application/json",
                    "If-None-Match": "*",
                },
            )
        except ValueError as exc:  # no URL at all ('unknown url type'): not a URLError
            raise CreateFailed(f"the service URL {api!r} cannot be used: {exc}") from None
        try:
            with urllib.request.urlopen(request, timeout=10):
                created += 1
        except urllib.error.HTTPError as exc:
            if exc.code != 412:  # 412: it exists already
                raise CreateFailed(f"{exc.code} for {twin}: {exc.read()[:300].decode()}") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise CreateFailed(f"the service at {api} cannot be reached: {reason}") from None
    return created
