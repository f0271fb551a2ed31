"""Value types handed to and returned by :class:`connectivity.mqtt_client.MqttClient`."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class InboundMessage:
    """One PUBLISH received from the broker."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    #: The broker's DUP flag: it may have delivered this message before. Cleared for a
    #: message this client had first-hand and dropped unhandled when its connection was lost.
    duplicate: bool
    #: MQTT 5 request/response properties, None when absent (always None on 3.1.1).
    response_topic: str | None = None
    correlation_data: bytes | None = None
    user_properties: tuple[tuple[str, str], ...] = field(default=())


#: ``async def handler(msg) -> None``; a QoS 1 message is acked only after it returns.
Handler = Callable[[InboundMessage], Awaitable[None]]


@dataclass(frozen=True)
class Health:
    """A snapshot of the client's state for health endpoints."""

    connected: bool
    last_error: str | None
    reconnect_count: int
    handler_failures: int
    pending_acks: int
    #: Messages received since the start (handled, parked or refused).
    received: int = 0
    #: When ``last_error`` happened (Unix time).
    last_error_at: float | None = None
