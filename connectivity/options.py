"""Connection options for :class:`connectivity.mqtt_client.MqttClient`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import unquote, urlsplit

from twin_service.urls import check_url


@dataclass(frozen=True)
class LastWill:
    """Message the broker publishes for us when the connection dies without a DISCONNECT."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


@dataclass(frozen=True)
class BrokerAddress:
    """The parts of a broker URL ``mqtt[s]://[user[:password]@]host[:port]``."""

    host: str
    port: int
    tls: bool
    username: str | None = None
    password: str | None = None

    @classmethod
    def parse(cls, url: str) -> BrokerAddress:
        """Parse a broker URL; user and password may be percent-encoded."""
        try:
            check_url(url, ("mqtt", "mqtts"))
        except ValueError as exc:
            raise ValueError(f"broker URL {exc}") from None  # not the URL: it may hold a password
        parts = urlsplit(url)
        tls = parts.scheme == "mqtts"
        assert parts.hostname is not None  # checked above
        return cls(
            host=parts.hostname,
            port=parts.port or (8883 if tls else 1883),
            tls=tls,
            username=unquote(parts.username) if parts.username is not None else None,
            password=unquote(parts.password) if parts.password is not None else None,
        )


@dataclass(frozen=True)
class MqttOptions:
    """Everything needed to open (and keep open) one MQTT session.

    ``persistent_session`` keeps subscriptions and unacknowledged QoS 1 messages on the broker
    while we are away: MQTT 5 uses ``clean_start=False`` plus ``session_expiry`` seconds, 3.1.1
    uses ``clean_session=False``. It needs a stable ``client_id``.
    """

    url: str
    client_id: str
    protocol: Literal[5, 4] = 5
    persistent_session: bool = True
    session_expiry: int = 3600
    keepalive: int = 30
    reconnect_min_delay: float = 0.5
    reconnect_max_delay: float = 30.0
    max_in_flight: int = 32
    #: Publishes not awaited (``await_ack=False``) that may wait for their PUBACK before a
    #: new one waits too: bounds what queues in paho behind a slow broker or a busy process.
    max_unacked_out: int = 1000
    ack_timeout: float = 10.0
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    last_will: LastWill | None = None
    #: MQTT 5: the largest packet the broker may send this client (Maximum Packet Size);
    #: the broker drops a larger message for it instead. ``None``: no limit announced.
    max_packet_size: int | None = None
    #: The largest packet this client sends; a larger publish raises PacketTooLarge. Under
    #: MQTT 5 the broker's own Maximum Packet Size (CONNACK) applies too. ``None``: only
    #: the broker's.
    max_outgoing_packet_size: int | None = None
    #: Whether the broker sends a kept session's unacknowledged messages again after a
    #: reconnection, as MQTT requires (amqtt 0.12, the embedded broker, does not): then the
    #: lost connection's messages not handled yet are dropped instead of handled twice.
    broker_redelivers: bool = True

    def __post_init__(self) -> None:
        if self.protocol not in (4, 5):
            raise ValueError("protocol must be 5 (MQTT 5) or 4 (MQTT 3.1.1)")
        if self.persistent_session and not self.client_id:
            raise ValueError("a persistent session needs a stable client_id")
        if self.max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        if not 0 < self.reconnect_min_delay <= self.reconnect_max_delay:
            raise ValueError("need 0 < reconnect_min_delay <= reconnect_max_delay")
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")
        BrokerAddress.parse(self.url)

    @property
    def address(self) -> BrokerAddress:
        """The parsed broker URL; explicit ``username``/``password`` win over the URL's."""
        addr = BrokerAddress.parse(self.url)
        return BrokerAddress(
            host=addr.host,
            port=addr.port,
            tls=addr.tls,
            username=self.username if self.username is not None else addr.username,
            password=self.password if self.password is not None else addr.password,
        )
