"""The event bus: tells every service process that the journal has grown.

Events themselves are always read from the journal (in sequence order, exactly once); the bus
only carries "sequence N committed" notices so other processes look promptly instead of at
their next poll. A lost notice therefore delays an event by at most one poll interval and
never loses it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from connectivity.options import MqttOptions

log = logging.getLogger(__name__)

Notice = Callable[[int], None]


class EventBus(Protocol):
    async def start(self, on_notice: Notice) -> None: ...

    async def stop(self) -> None: ...

    async def announce(self, seq: int) -> None: ...

    def describe(self) -> dict[str, object]: ...


class InProcessBus:
    """Single process: the notice goes straight back to this process's hub."""

    def __init__(self) -> None:
        self._on_notice: Notice | None = None

    async def start(self, on_notice: Notice) -> None:
        self._on_notice = on_notice

    async def stop(self) -> None:
        self._on_notice = None

    async def announce(self, seq: int) -> None:
        if self._on_notice is not None:
            self._on_notice(seq)

    def describe(self) -> dict[str, object]:
        return {"kind": "in-process", "status": "up"}


class MqttBus:
    """Several processes: notices travel on an internal topic of the configured broker."""

    TOPIC = "twin-service/internal/journal"

    def __init__(self, options: MqttOptions, topic: str = TOPIC) -> None:
        from connectivity.mqtt_client import MqttClient

        self._origin = options.client_id
        self._topic = topic
        self._client = MqttClient(options)
        self._on_notice: Notice | None = None
        self._latest = 0  # highest sequence announced here
        self._sent = 0  # highest sequence published
        self._sender: asyncio.Task[None] | None = None

    async def start(self, on_notice: Notice) -> None:
        from connectivity.messages import InboundMessage

        self._on_notice = on_notice

        async def handle(message: InboundMessage) -> None:
            try:
                notice = json.loads(message.payload)
                seq = int(notice["seq"])
            except (ValueError, KeyError, TypeError, RecursionError):
                log.warning("ignoring malformed bus notice on %s", message.topic)
                return
            if self._on_notice is not None:
                self._on_notice(seq)

        # Its own notices coming back tell nothing, and cost a packet read, a wake-up of the
        # loop and a parse each: one per group commit, so one per report at a few hundred
        # device reports a second (8% of the CPU per report at 500/s, docs/performance.md).
        await self._client.subscribe(self._topic, 0, handle, no_local=True)
        await self._client.start()

    async def stop(self) -> None:
        self._on_notice = None
        if self._sender is not None:
            # The last notice goes out before the connection closes (bounded wait).
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._sender, 1.0)
        await self._client.stop()

    async def announce(self, seq: int) -> None:
        if self._on_notice is not None:
            self._on_notice(seq)
        # Coalesced: the writes of one group commit finish in the same turn of the event
        # loop, and one notice of the highest sequence tells the other processes as much as
        # one per write (they read the journal from where they are). Under MQTT ingest the
        # per-write notice was a third of the service's outgoing packets.
        self._latest = max(self._latest, seq)
        if self._sender is None or self._sender.done():
            self._sender = asyncio.get_running_loop().create_task(self._send_latest())

    async def _send_latest(self) -> None:
        await asyncio.sleep(0)  # the rest of this turn's writes announce first
        while self._latest > self._sent:
            if not self._client.connected:
                return  # the other processes' polling picks the events up
            seq = self._latest
            try:
                payload = json.dumps({"seq": seq, "origin": self._origin})
                await self._client.publish(self._topic, payload, qos=0)
            except Exception as exc:  # a notice is an optimisation; polling covers its loss
                log.debug("bus notice not sent: %s", exc)
                return
            self._sent = seq

    def describe(self) -> dict[str, object]:
        health = self._client.health()
        return {"kind": "mqtt", "status": "up" if health.connected else "down"}
