"""``twin-service simulate``: N simulated devices reporting to the service, for demos and load.

Devices are multiplexed over a few MQTT connections (``--connections``), so the broker account
used must be allowed on every device's topics (the service account, or an anonymous broker).
Each device reports ``{"state": {"counter": i}, "clientToken": ...}`` at ``--rate`` messages
per second in total, paced against the clock; ``--offline-fraction`` of the devices are
announced ``offline`` and stay silent, the others ``online``, then ``offline`` again at the
end (a connection's last will covers one topic, not its many devices: a simulator killed
outright leaves them online; a broker that stops acknowledging is given
:data:`SAY_OFFLINE_WITHIN` seconds, then the rest stay online). A broker connection lost while
they are announced, or set offline at the end (a PUBACK awaited or not), is waited for up to
:data:`RECONNECT_WITHIN` seconds and the statuses not acknowledged yet published again; one
that does not come back by then during the announcement fails the run (exit 1). The
announcements come before ``--duration`` starts and are not counted in it. Progress is printed
every second (the announcements' too); the summary gives messages, acks (``accepted``), rejects
by error code, duplicates (answered ``"duplicate": true``: not applied by this run, counted
apart; each run's clientTokens are its own), reports not sent (the broker connection was down:
the run waits for it and goes on), the rate achieved and the publish-to-accepted latency
percentiles. It is printed on Ctrl-C too. A run whose reports all went unanswered fails (exit
3) after it: a broker may grant the subscription to the replies and never deliver one
(mosquitto's ACL), so only the answers show that the service is there.

Devices never create twins (a report to a missing one is rejected with ``twin.notfound``);
``--create`` creates the missing ones first through the REST API (``--api``, ``--token``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import signal
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from connectivity.errors import ConnectRefused, MqttUnavailable, NotConnected, Refused
from connectivity.interrupt import unless_set
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
        "simulate",
        help="drive simulated devices against the service",
        epilog=f"exit status: 0 after the summary; {NONE_ANSWERED} after it when reports "
        "were sent and none was answered (no service on the broker, another --topic-prefix, "
        "or an account that cannot read the replies); 1 when the broker cannot be reached or "
        "refuses the login or the subscription; 2 for arguments it cannot use; 130 on Ctrl-C",
    )
    sim.add_argument("--url", default="mqtt://127.0.0.1:1883", help="broker URL with credentials")
    sim.add_argument("--devices", type=at_least(1, int), default=100)
    sim.add_argument("--rate", type=_rate, default=100.0, help="reports per second, all devices")
    sim.add_argument(
        "--offline-fraction",
        type=_fraction,
        default=0.0,
        help="0 to 1: that share of the devices, to the nearest whole number, stays offline",
    )
    sim.add_argument(
        "--duration",
        type=at_least(0, float),
        default=10.0,
        help="seconds of reports, after every device is announced online or offline",
    )
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


def offline_count(devices: int, fraction: float) -> int:
    """How many of ``devices`` are ``--offline-fraction`` of them: the nearest whole number,
    halves up. int() of the product undercounted: 100 * 0.29 is 28.999999999999996."""
    return math.floor(devices * fraction + 0.5)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


#: Seconds the end of a run waits for the broker's PUBACKs while it sets its devices offline
#: again (``Simulation._say_offline``): then it stops, the rest of them left online.
SAY_OFFLINE_WITHIN = 2.0
#: Seconds the announcement, and the end of a run, wait for a lost broker connection to come
#: back (a broker restart) before a device's status is published again; the reports wait until
#: the end of ``--duration``. As long as the wait for the first connection.
RECONNECT_WITHIN = 10.0
#: Device statuses published between two awaited PUBACKs. Awaiting each in turn cost a round
#: trip per device (the embedded broker acknowledges once the service has handled the status):
#: 20,000 devices took 30 s to announce.
ACK_EVERY = 100
#: Seconds between two looks at a connection while a status is published: a lost connection
#: does not end the wait for a PUBACK (``MqttClient.publish`` waits until its ack_timeout).
LOSS_CHECK_EVERY = 0.05


def awaits_ack(i: int, count: int, connections: int) -> bool:
    """Whether the ``i``-th of ``count`` statuses published in turn over ``connections``
    waits for its PUBACK: now and then, and the last of each connection (what is queued in
    paho when the client stops is lost)."""
    return i % ACK_EVERY == ACK_EVERY - 1 or i >= count - connections


@dataclass
class _Unacked:
    """The statuses published on one client since its last acknowledged one: all sent again
    after a lost connection (retained, so sending one twice is harmless), for what paho held
    for the old connection is not sent on the new one."""

    #: ``MqttClient.connections`` when all of them were out on it; None: some are not.
    connection: int | None = None
    statuses: list[tuple[str, bytes]] = field(default_factory=list)


class Simulation:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.layout = TopicLayout(args.topic_prefix)
        self.twins = [f"{args.namespace}:dev-{n:05d}" for n in range(args.devices)]
        offline = offline_count(len(self.twins), args.offline_fraction)
        self.offline = set(random.sample(self.twins, offline))
        self.sent: dict[str, float] = {}
        self.latencies: list[float] = []
        self.messages = self.acks = self.rejects = 0
        #: Reports answered ``"duplicate": true``: the service had applied that clientToken
        #: already, so not this run's report (counted apart from the acks).
        self.duplicates = 0
        #: Prefix of this run's clientTokens: with ``s<seq>`` alone, a second run on the same
        #: twins (or two simulators at once) reused tokens the service had applied, and got
        #: ``duplicate`` answers for reports it never applied.
        self.run_id = f"{random.getrandbits(32):08x}"
        #: Reports that could not be sent: the broker connection was down (a restart).
        self.failed = 0
        self.reasons: Counter[str] = Counter()
        self.clients: list[MqttClient] = []
        #: Twins announced ``online``: set ``offline`` again at the end, however it ends.
        self.announced: list[str] = []
        self.interrupted = False
        self._wake = asyncio.Event()
        self._sending_time = 0.0
        #: Seconds of the run spent waiting for a lost broker connection.
        self._outage = 0.0
        self._unacked: dict[MqttClient, _Unacked] = {}

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
        elif body.get("duplicate") is True:
            self.duplicates += 1
        else:
            self.acks += 1
        self.latencies.append(time.perf_counter() - started)

    def interrupt(self) -> None:
        """Ctrl-C: stop sending, print the summary (the command exits 130)."""
        self.interrupted = True
        self._wake.set()

    async def _pause(self, seconds: float) -> None:
        """Sleep, cut short by an interruption."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)

    async def run(self, out: Any) -> int:
        loop = asyncio.get_running_loop()
        # Our own handler: asyncio's cancels the main task, which left a traceback and no
        # summary.
        with contextlib.suppress(NotImplementedError, RuntimeError):  # no signals here
            loop.add_signal_handler(signal.SIGINT, self.interrupt)
        try:
            code = await self._run(out)
        finally:
            try:
                await self._say_offline()
                for client in self.clients:
                    await client.stop(grace=0)
            finally:
                # Kept until the clients are stopped: a Ctrl-C while the devices were set
                # offline raised KeyboardInterrupt there, the rest of them left online and
                # the connections dropped without a DISCONNECT.
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    loop.remove_signal_handler(signal.SIGINT)
        return 130 if self.interrupted else code

    async def _connect(self) -> None:
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
            self.clients.append(client)
            await client.start()
            await self._unless_interrupted(client.wait_connected(10))
            if self.interrupted:
                return
            if n == 0:
                # One connection takes every reply: with a subscription on each, every
                # reply came once per connection and was counted as many times. Subscribed
                # once connected, so that a refusal (an account not allowed on every
                # device's topics) is raised here rather than logged while every report
                # goes unanswered.
                topics = self.layout.all_twins("reported/update/+")
                await self._unless_interrupted(client.subscribe(topics, 1, self.on_reply))

    async def _unless_interrupted(self, step: Awaitable[object]) -> bool:
        """Await ``step``, cut short by Ctrl-C (then False): waiting for a broker that is not
        there, or that stopped answering while the run started, went on for the connection
        or the answer's timeout (10 s each), then exited 1."""
        return await unless_set(step, self._wake)

    async def _run(self, out: Any) -> int:
        await self._connect()
        try:
            await self._announce(out)
            if self.interrupted:
                return 0
            await self._send(out, [t for t in self.twins if t not in self.offline])
        finally:
            self._summary(out)  # after a refusal or Ctrl-C too
        if self.messages and not self._answered() and not self.interrupted:
            # A granted subscription proves nothing: mosquitto grants one its ACL never
            # delivers on (MQTT 3.1.1 has no per-message refusal), so only answers do.
            raise NoneAnswered(self.messages, self.layout.all_twins("reported/update/+"))
        return 0

    async def _announce(self, out: Any) -> None:
        """Publish every device's status (retained), ``online`` or ``offline``, before
        ``--duration`` starts; the count so far is printed at once and then every second."""
        loop = asyncio.get_running_loop()
        count = len(self.twins)
        next_report = loop.time()
        for i, twin in enumerate(self.twins):
            if self.interrupted:
                return
            if loop.time() >= next_report:
                next_report = loop.time() + 1
                print(f"\rannounced {i} of {count} devices", end="", file=out, flush=True)
            online = twin not in self.offline
            client = self.clients[i % len(self.clients)]
            if online:
                self.announced.append(twin)
            status = b"online" if online else b"offline"
            wait = awaits_ack(i, count, len(self.clients))
            # A broker restart: NotConnected went up out of the run (exit 1), and the
            # devices announced online stayed so.
            reconnect_by = loop.time() + RECONNECT_WITHIN
            sent = await self._publish_status(
                client, twin, status, wait, reconnect_by, interruptible=True
            )
            if not sent and not self.interrupted:
                raise NotConnected(
                    "the connection to the MQTT broker was lost while announcing the devices "
                    f"and did not come back within {RECONNECT_WITHIN:g} s"
                )
        print(f"\rannounced {count} of {count} devices", file=out, flush=True)

    async def _send(self, out: Any, online: list[str]) -> None:
        """Report at ``--rate`` for ``--duration`` seconds, paced against the clock: a
        report late (the loop was busy) is sent at once, to catch up. Sleeping one interval
        after each report sent about half the rate asked for at 1,000/s."""
        a = self.args
        loop = asyncio.get_running_loop()
        start = loop.time()
        deadline = start + a.duration
        next_report = start + 1
        due = start
        seq = 0
        try:
            while online and not self.interrupted:
                now = loop.time()
                # Before the deadline's check: the first line is due at the deadline of a
                # --duration 1 run, which printed none.
                if now >= next_report:
                    next_report += 1
                    print(
                        f"\rsent {self.messages} acks {self.acks} rejects {self.rejects}",
                        end="",
                        file=out,
                        flush=True,
                    )
                if now >= deadline:
                    break
                if due > now:
                    await self._pause(min(due, next_report, deadline) - now)
                    continue
                client = self.clients[seq % len(self.clients)]
                if not client.connected:
                    # A broker restart: wait for the connection, without a burst after it.
                    waited = loop.time()
                    await self._reconnected(client, deadline)
                    due = loop.time()
                    self._outage += due - waited
                    continue
                twin = online[seq % len(online)]
                token = f"{self.run_id}-{seq}"
                body = json.dumps({"state": {"counter": seq}, "clientToken": token}).encode()
                self.sent[token] = time.perf_counter()
                seq += 1
                due += 1.0 / a.rate
                try:
                    topic = self.layout.topic(twin, "reported/update")
                    await client.publish(topic, body, await_ack=False)
                except NotConnected:
                    self.sent.pop(token, None)
                    self.failed += 1
                    continue
                self.messages += 1
                await asyncio.sleep(0)  # replies are handled while catching up too
        finally:
            self._sending_time = loop.time() - start
        settle = loop.time() + 10
        while self._answered() < self.messages and loop.time() < settle:
            if self.interrupted:
                break
            await self._pause(0.05)

    def _answered(self) -> int:
        return self.acks + self.rejects + self.duplicates

    async def _reconnected(self, client: MqttClient, deadline: float) -> None:
        """Wait for ``client``'s connection until ``deadline``, Ctrl-C or a refusal (raised)."""
        loop = asyncio.get_running_loop()
        while not client.connected and not self.interrupted and loop.time() < deadline:
            with contextlib.suppress(NotConnected):
                await client.wait_connected(min(0.2, max(deadline - loop.time(), 0.0)))

    async def _publish_status(
        self,
        client: MqttClient,
        twin: str,
        status: bytes,
        wait: bool,
        reconnect_by: float,
        *,
        interruptible: bool,
        acks: asyncio.Timeout | None = None,
    ) -> bool:
        """Publish ``twin``'s ``status`` (retained), awaiting its PUBACK if ``wait``. On a
        lost connection, before or while it is published, wait for it until ``reconnect_by``
        (Ctrl-C ends the wait) and publish it again, with the statuses of ``client`` not
        acknowledged yet. ``acks``: the deadline for PUBACKs, lifted while the connection is
        waited for. ``interruptible``: Ctrl-C cuts the publication short too. False when it
        was not published: the connection did not come back, or Ctrl-C."""
        unacked = self._unacked.setdefault(client, _Unacked())
        unacked.statuses.append((self.layout.topic(twin, "status"), status))
        loop = asyncio.get_running_loop()
        while True:
            if not client.connected:
                if acks is not None:
                    acks.reschedule(None)  # a broker restart, not one that stopped answering
                await self._reconnected(client, reconnect_by)
                if not client.connected:
                    return False
            connection = client.connections
            out = unacked.statuses if unacked.connection != connection else unacked.statuses[-1:]
            unacked.connection = None
            try:
                for n, (topic, payload) in enumerate(out, 1):
                    # resend=False: paho would send it again after the reconnection too.
                    publish = client.publish(
                        topic, payload, retain=True, await_ack=wait and n == len(out), resend=False
                    )
                    if not await self._unless_lost(client, connection, publish, interruptible):
                        break
                else:
                    unacked.connection = connection
                    if wait:
                        unacked.statuses.clear()
                    return True
            except NotConnected:
                # Lost since the check: paho knew first; the client is told in a moment.
                await asyncio.sleep(LOSS_CHECK_EVERY)
            if (interruptible and self.interrupted) or loop.time() >= reconnect_by:
                return False

    async def _unless_lost(
        self, client: MqttClient, connection: int, publish: Awaitable[None], interruptible: bool
    ) -> bool:
        """Await ``publish`` on ``client``'s ``connection``-th connection; False, the
        publication cancelled, once that connection is lost or (``interruptible``) on Ctrl-C.
        Its PUBACK's waiter went on to the end of the PUBACKs' deadline, which ended the
        setting of the devices offline, thousands left online after a broker restart."""
        work = asyncio.ensure_future(publish)
        try:
            while not work.done():
                lost = not client.connected or client.connections != connection
                if lost or (interruptible and self.interrupted):
                    return False
                await asyncio.wait({work}, timeout=LOSS_CHECK_EVERY)
            work.result()
            return True
        finally:
            if not work.done():
                work.cancel()
                await asyncio.gather(work, return_exceptions=True)

    async def _say_offline(self) -> None:
        """Set the devices announced online ``offline`` again (retained): they stayed online
        for good. A connection's last will covers one topic, not its many devices: a
        simulator killed outright leaves them online."""
        announced, self.announced = self.announced, []
        index = {twin: i for i, twin in enumerate(self.twins)}
        clients = [self.clients[index[twin] % len(self.clients)] for twin in announced]
        # Each client's last status is awaited: what it has not acknowledged is sent again
        # after a lost connection, and what is queued in paho when the client stops is lost.
        last = {client: i for i, client in enumerate(clients)}
        loop = asyncio.get_running_loop()
        reconnect_by = loop.time() + RECONNECT_WITHIN
        # One deadline, moved on by each PUBACK: a broker that keeps the connection and
        # answers nothing (stopped, overloaded) cost ack_timeout (10 s) per awaited PUBACK,
        # 40 s after a Ctrl-C with 4 connections; one fixed deadline cut short a broker that
        # was answering (20,000 devices take 2 s). A lost connection lifts it while it is
        # waited for (_publish_status).
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout_at(loop.time() + SAY_OFFLINE_WITHIN) as deadline:
                for i, (twin, client) in enumerate(zip(announced, clients, strict=True)):
                    wait = i % ACK_EVERY == ACK_EVERY - 1 or last[client] == i
                    with contextlib.suppress(MqttUnavailable):
                        await self._publish_status(
                            client,
                            twin,
                            b"offline",
                            wait,
                            reconnect_by,
                            interruptible=False,
                            acks=deadline,
                        )
                        if wait:
                            deadline.reschedule(loop.time() + SAY_OFFLINE_WITHIN)
                    if deadline.when() is None:
                        deadline.reschedule(loop.time() + SAY_OFFLINE_WITHIN)

    def _summary(self, out: Any) -> None:
        a = self.args
        ms = [x * 1000 for x in self.latencies]
        print(file=out)
        lost = self.messages - self._answered()
        duplicates = f" duplicates {self.duplicates}" if self.duplicates else ""
        print(
            f"devices {len(self.twins)} (offline {len(self.offline)}) messages {self.messages} "
            f"acks {self.acks} rejects {self.rejects} unanswered {lost} not sent {self.failed}"
            f"{duplicates}",
            file=out,
        )
        achieved = self.messages / self._sending_time if self._sending_time > 0 else 0.0
        print(f"rate {achieved:.1f}/s (asked {a.rate:g}/s)", file=out)
        if self.messages and achieved < 0.9 * a.rate and not self.interrupted:
            if self._outage > 0:
                print(
                    f"below --rate: {self._outage:.1f} s of the run waited for the broker "
                    "connection",
                    file=out,
                )
            # Judged on the time connected: more simulators do not help against an outage.
            connected = self._sending_time - self._outage
            if connected <= 0 or self.messages / connected < 0.9 * a.rate:
                print(
                    "below --rate: this process could not keep up; run several simulators, "
                    "each with a part of the rate",
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


def cmd_simulate(
    args: argparse.Namespace, data_dir: Path | None = None, out: Any = sys.stdout
) -> int:
    """``simulate --devices N --rate R --offline-fraction F``; twins must exist (else 404s).

    0 after the summary; 130 after the summary on Ctrl-C; 2 for a broker URL it cannot use;
    1 when the broker cannot be reached or refuses the login or the subscription to the
    replies (one line on stderr, never the URL: it holds the password); 3 after the summary
    when reports were sent and none was answered (:data:`NONE_ANSWERED`)."""
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
        except KeyboardInterrupt:  # before the run's own Ctrl-C handler: a traceback
            print("twin-service simulate: --create: interrupted", file=sys.stderr)
            return 130
        print(f"created {created} of {len(simulation.twins)} twins", file=out)
    try:
        return asyncio.run(simulation.run(out))
    except NoneAnswered as exc:
        print(f"twin-service simulate: {exc}", file=sys.stderr)
        return NONE_ANSWERED
    except MqttUnavailable as exc:
        detail = f" ({exc.description})" if exc.description else ""
        print(f"twin-service simulate: {exc.message}{detail}{_hint(exc, args)}", file=sys.stderr)
        return 1


def _hint(exc: MqttUnavailable, args: argparse.Namespace) -> str:
    """What to change when the broker refused the simulator's CONNECT or SUBSCRIBE."""
    if isinstance(exc, Refused):
        return (
            "; the simulator needs a broker account allowed on every device's topics (the "
            "service's, mqtt.service_password), not a device's"
        )
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


#: The exit status of a run whose reports all went unanswered.
NONE_ANSWERED = 3


class NoneAnswered(Exception):
    """Reports were sent and not one was accepted or rejected by the end of the run."""

    def __init__(self, sent: int, replies: str) -> None:
        super().__init__(
            f"none of the {sent} reports was answered (accepted or rejected on {replies}): "
            "is the service running on this broker with the same --topic-prefix, and may "
            "this account read the replies?"
        )


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
