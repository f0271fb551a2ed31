"""Reading what a broker retains under a topic filter.

MQTT has no request for "the retained messages": a subscription gets them, right after its
SUBACK, and nothing marks the last one. So a client of its own subscribes, takes messages
flagged retained until none has come for a quiet spell, and disconnects. It uses a clean
session: the subscription must not outlive the read (a persistent session keeps it across a
crash, and every later publish on those topics would come back).
"""

from __future__ import annotations

import asyncio
import dataclasses

from connectivity.messages import InboundMessage
from connectivity.mqtt_client import MqttClient
from connectivity.options import MqttOptions


async def read_retained(
    options: MqttOptions,
    topic_filter: str,
    *,
    quiet_seconds: float = 1.0,
    max_seconds: float = 300.0,
) -> dict[str, bytes]:
    """Topic -> payload of every message the broker retains under ``topic_filter``.

    ``options`` are those of an account that may subscribe to the filter; the client id gets
    a ``-retained`` suffix, so the caller's own session is left alone. Raises
    :class:`connectivity.errors.MqttUnavailable` when the broker cannot be reached.
    """
    reader = dataclasses.replace(
        options,
        client_id=f"{options.client_id}-retained",
        persistent_session=False,
        last_will=None,
    )
    client = MqttClient(reader)
    held: dict[str, bytes] = {}
    loop = asyncio.get_running_loop()
    last = loop.time()

    async def take(message: InboundMessage) -> None:
        nonlocal last
        last = loop.time()
        if message.retain:  # not one published meanwhile
            held[message.topic] = message.payload

    await client.start()
    try:
        await client.wait_connected(options.ack_timeout)
        await client.subscribe(topic_filter, 0, take)
        last = started = loop.time()
        while loop.time() - last < quiet_seconds and loop.time() - started < max_seconds:
            await asyncio.sleep(quiet_seconds / 4)
    finally:
        await client.stop(grace=0)
    return held
