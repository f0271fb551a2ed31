"""The MQTT device-sync component: broker connection, subscriptions, replies, deltas.

Started with the app (``twin_service.api.app._components``) when ``mqtt.enabled``. It connects
to ``TWIN_MQTT_URL`` or, when unset, starts the embedded amqtt broker (MQTT 3.1.1) with a
service password generated for this process. One persistent session with QoS 1 and manual
acknowledgements: a device message is acked only after its write committed. On MQTT 5 brokers
the device topics are subscribed as ``$share/<group>/...`` so replicas split the work.

Deltas go out on a connection of their own (client id ``<client_id>-deltas-<random>``). On
the session's connection they queued behind the replies to devices: paho sends 20 QoS 1
publishes at a time and waits for their PUBACKs, so under heavy ingest a delta waited for
hundreds of replies to go first (p99 130-430 ms at 80% of the ingest rate).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from dataclasses import replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from connectivity.broker import EmbeddedBroker, EmbeddedBrokerConfig
from connectivity.credentials import CredentialStore
from connectivity.errors import MqttUnavailable, NotConnected, SessionNotRetired
from connectivity.messages import Handler, InboundMessage
from connectivity.mqtt_client import MqttClient
from connectivity.options import BrokerAddress, MqttOptions
from connectivity.retained import read_retained
from connectivity.sync_deltas import DeltaPublisher
from connectivity.sync_handlers import DeviceHandlers, HandlerSettings, ignoring_replays
from connectivity.topics import (
    AUTO_GROUP,
    INBOUND,
    LEGACY_GROUP,
    SHARE_PREFIX,
    TopicLayout,
    is_topic_name,
    service_group,
)
from twin_service.errors import Unavailable
from twin_service.tasks import stop_task
from twin_service.twin.document import now_iso
from twin_service.twin.jsonvalue import dumps
from twin_service.types import JSONObject

if TYPE_CHECKING:
    from twin_service.api.context import AppContext
    from twin_service.settings import Settings

log = logging.getLogger(__name__)

#: How long a retire waits, connected, before it touches the session: a running client with
#: that client id, thrown off by the retire's connection, connects again within its first
#: reconnection delay (the service's: MqttOptions.reconnect_min_delay, 0.5 s), and the broker
#: then closes the retire's connection.
_TAKEN_BACK_SECONDS = 3.0
#: A retire does not reconnect (see MqttSync.options).
_NO_RECONNECT_SECONDS = 24 * 3600.0


def _redact(url: str) -> str:
    addr = BrokerAddress.parse(url)
    return f"{'mqtts' if addr.tls else 'mqtt'}://{addr.host}:{addr.port}"


def service_options(
    settings: Settings,
    url: str,
    password: str | None,
    *,
    client_id: str,
    persistent_session: bool,
) -> MqttOptions:
    """How the service's own clients (device sync, the event bus) connect: as the service's
    broker user (credentials in the URL win), with its TLS files and protocol.

    They send no packet over :func:`device_packet_limit` (nor over an MQTT 5 broker's own
    Maximum Packet Size): a broker closes the connection of a client that sends one, and
    paho sends a queued QoS 1 message again after every reconnection. One twin's answer of
    2.2 MB kept the service's connection to the embedded broker down for every device."""
    m = settings.mqtt
    addr = BrokerAddress.parse(url)
    return MqttOptions(
        url=url,
        client_id=client_id,
        protocol=m.protocol if settings.mqtt_url else 4,
        persistent_session=persistent_session,
        session_expiry=m.session_expiry_seconds,
        max_in_flight=m.max_inflight,
        max_unacked_out=m.max_unacked_replies,
        max_outgoing_packet_size=device_packet_limit(settings),
        username=addr.username if addr.username is not None else m.service_username,
        password=addr.password if addr.password is not None else password,
        ca_file=m.ca_file,
        cert_file=m.cert_file,
        key_file=m.key_file,
    )


#: MQTT's largest packet (its remaining length is at most four bytes of seven bits).
MQTT_MAX_PACKET = 2**28 - 1


def device_packet_limit(settings: Settings) -> int:
    """The largest MQTT packet the service takes from devices, and sends: room for a whole
    twin, as the shipped mosquitto's limit (2 MiB, or twice ``limits.max_twin_bytes`` when
    that is larger), but no more than MQTT allows (paho refused to announce more to an MQTT 5
    broker, and the start failed)."""
    wanted = max(EmbeddedBrokerConfig.max_packet_size, 2 * settings.limits.max_twin_bytes)
    return min(wanted, MQTT_MAX_PACKET)


class MqttSync:
    """``Component``: reconciles twins with devices over MQTT."""

    def __init__(self, *, retiring: bool = False) -> None:
        """``retiring``: started only to :meth:`retire` its client id's session. It then
        subscribes to nothing (it handles what the session queued), and no delta republish
        and correction pass runs: the deltas are the remaining replicas' to keep."""
        self.client: MqttClient | None = None
        #: Publishes the deltas (see the module's docstring).
        self.delta_client: MqttClient | None = None
        self.broker: EmbeddedBroker | None = None
        self.deltas: DeltaPublisher | None = None
        self.handlers: DeviceHandlers | None = None
        self.layout = TopicLayout()
        self._url = ""
        self._background: set[asyncio.Task[Any]] = set()
        self._filters: dict[str, Handler] = {}
        #: The filters of the group releases before the derived one used (LEGACY_GROUP).
        self._legacy_filters: list[str] = []
        self._options: MqttOptions | None = None
        self._republishing: asyncio.Task[None] | None = None
        self._retiring = retiring

    def options(self, settings: Settings, url: str, password: str | None) -> MqttOptions:
        options = service_options(
            settings, url, password, client_id=settings.mqtt.client_id, persistent_session=True
        )
        # A device message larger than this cannot be accepted anyway (413). Announced, an
        # MQTT 5 broker never sends it: one that allows 256 MB (HiveMQ) had the service read
        # whatever a device sent, and a redelivered one could exhaust memory at every restart.
        return replace(
            options,
            max_packet_size=device_packet_limit(settings),
            # amqtt does not send unacknowledged messages again after a reconnection.
            broker_redelivers=bool(settings.mqtt_url),
        )
        if not self._retiring:
            return options
        # A retire's connection the broker closed was most likely taken back by a running
        # client with that id: reconnecting took the session from it again, back and forth
        # every half second, until the retire ended the session the client was using.
        return replace(
            options,
            reconnect_min_delay=_NO_RECONNECT_SECONDS,
            reconnect_max_delay=_NO_RECONNECT_SECONDS,
        )

    async def start(self, ctx: AppContext) -> None:
        settings = ctx.settings
        m = settings.mqtt
        self.layout = TopicLayout(m.topic_prefix)
        password = m.service_password
        if settings.mqtt_url:
            url = settings.mqtt_url
        else:
            password = password or secrets.token_urlsafe(24)
            self.broker = EmbeddedBroker(
                EmbeddedBrokerConfig(
                    service_username=m.service_username,
                    service_password=password,
                    credentials_path=CredentialStore.in_data_dir(settings.data_dir).path,
                    host=m.embedded_host,
                    port=m.embedded_port,
                    topic_prefix=m.topic_prefix,
                    session_expiry=m.session_expiry_seconds,
                    max_packet_size=device_packet_limit(settings),
                    max_devices=m.embedded_max_devices,
                    max_connecting=m.embedded_max_connecting,
                    max_queued=m.embedded_max_queued,
                    max_sessions_per_device=m.embedded_max_sessions_per_device,
                    max_subscriptions=m.embedded_max_subscriptions,
                    max_inflight=m.embedded_max_inflight,
                    max_keep_alive=m.embedded_max_keep_alive_seconds,
                    admit_devices_at_start=False,
                )
            )
            await self.broker.start()
            url = self.broker.url
        self._url = url
        options = self.options(settings, url, password)
        self._options = options
        layout = self.layout
        client = MqttClient(options, key=lambda topic: layout.twin_id(topic) or topic)
        self.client = client
        # It subscribes to nothing, and a publish a lost connection left unacknowledged is
        # sent again by paho after the reconnection: no session to keep, so an id of this
        # process alone. With one derived from the configured id, replicas given the same id
        # had two pairs of clients taking sessions from each other, losing their connections
        # together as in a broker restart, and the main client no longer named the cause
        # (MqttClient._siblings_lost_at).
        self.delta_client = MqttClient(
            replace(
                options,
                client_id=f"{options.client_id}-deltas-{secrets.token_hex(4)}",
                persistent_session=False,
            )
        )
        self.handlers = DeviceHandlers(
            ctx.service,
            layout,
            HandlerSettings(
                max_payload_bytes=settings.limits.max_twin_bytes,
                client_token_memory=m.client_token_memory,
                lastseen_coalesce_seconds=m.lastseen_coalesce_seconds,
                redelivery_depth=settings.stream.journal_max_per_twin,
            ),
            self._reply,
        )
        self.deltas = DeltaPublisher(self._publish_delta, layout, ctx.store)
        group = service_group(m.shared_group, options.password)
        shared = options.protocol == 5 and bool(group)
        if shared and m.shared_group == AUTO_GROUP and group == LEGACY_GROUP:
            log.warning(
                "mqtt.shared_group: the service logs in without a password, so its shared "
                "group is the guessable %r: a device with broker credentials that subscribes "
                "to $share/%s/... makes the broker drop a share of other devices' messages. "
                "Set mqtt.shared_group to a secret value, or have the broker refuse $share "
                "subscriptions to devices.",
                LEGACY_GROUP,
                LEGACY_GROUP,
            )
        handlers = {
            "reported/update": ignoring_replays(self.handlers.on_reported),
            "live/update": ignoring_replays(self.handlers.on_live),
            "get": ignoring_replays(self.handlers.on_get),
            # A retained status is the design: the device's last word, and its last will.
            "status": self.handlers.on_status,
        }
        for suffix in INBOUND:
            topic_filter = layout.all_twins(suffix)
            if shared:
                topic_filter = f"{SHARE_PREFIX}{group}/{topic_filter}"
            self._filters[topic_filter] = handlers[suffix]
            # A retire handles only what the session queued (routed in retire()): one of a
            # client id with no session joined the shared group and took a share of the new
            # messages meanwhile.
            if not self._retiring:
                await client.subscribe(topic_filter, 1, handlers[suffix])
        if shared and group != LEGACY_GROUP:
            # A session of an older release may still be in the old group too: the broker
            # would send this client every device message twice, once for each group.
            self._legacy_filters = [
                f"{SHARE_PREFIX}{LEGACY_GROUP}/{layout.all_twins(suffix)}" for suffix in INBOUND
            ]
            client.on_connect(self._leave_legacy_group)
        if self.broker is not None:
            # After the SUBACK: from here on every device message has its subscriber.
            client.on_connect(self._admit_devices)
        # Every (re)connection of the deltas' own client may have missed some: see _republish.
        self.delta_client.on_connect(self._on_connect)
        ctx.service.add_listener(self.deltas.on_change)
        ctx.service.add_doubt_listener(self.deltas.on_doubt)
        ctx.readiness["mqtt"] = self.health
        ctx.components["mqtt"] = self
        await self.delta_client.start()
        await client.start()
        try:
            await asyncio.gather(
                client.wait_connected(m.connect_timeout_seconds),
                self.delta_client.wait_connected(m.connect_timeout_seconds),
            )
        except NotConnected as exc:
            # Keep starting: paho keeps retrying and /ready reports the broker as down.
            log.warning("MQTT broker %s not reachable yet: %s", _redact(url), exc)

    async def _leave_legacy_group(self) -> None:
        """Unsubscribe the old group's filters; harmless when the session has none. After
        every connection: one lost before its UNSUBACK came left them in place."""
        assert self.client is not None
        try:
            for topic_filter in self._legacy_filters:
                await self.client.unsubscribe(topic_filter)
        except MqttUnavailable as exc:
            # Not connected: a lost connection (the next one leaves the group) or a stopped
            # client (a retire's mistyped client id: its own error says it all).
            if self.client.connected:
                log.warning("leaving the shared group %r failed: %s", LEGACY_GROUP, exc)

    async def _admit_devices(self) -> None:
        assert self.broker is not None and self.client is not None
        self.broker.admit_devices(keeper=self.client.options.client_id)

    async def stop(self) -> None:
        # First what runs after a connection (republish, correction): it queues publishes.
        await asyncio.gather(*(stop_task(task) for task in list(self._background)))
        if self.broker is not None:
            # Unacknowledged (the service's PUBACK did not come), device messages the service
            # is handling now are sent again after the restart (see AckingHandler).
            await self.broker.close_to_devices()
        if self.client is not None:
            await self.client.stop()
        if self.deltas is not None:
            await self.deltas.stop()
        if self.delta_client is not None:
            await self.delta_client.stop()
        if self.broker is not None:
            await self.broker.stop()

    async def retire(self, connect_timeout: float, quiet_seconds: float) -> int:
        """End this client id's broker session for good, losing nothing it holds: for a
        replica removed by scaling down.

        Its session stays a member of the shared subscriptions after the replica is gone, and
        the broker goes on queueing a share of the device messages there. This leaves the
        subscriptions (new messages go to the other replicas), handles what the session had
        queued until none has come for ``quiet_seconds``, and ends the session. Returns the
        number of messages handled.

        Raises :class:`SessionNotRetired` when the broker had no session for the client id
        (a mistyped one): the session the connection made is ended at once. Raises it too,
        the session left as it was, when the broker closes the connection: a running client
        with that client id took it back (see :data:`_TAKEN_BACK_SECONDS`).
        """
        client = self.client
        assert client is not None, "start() first"
        assert self._retiring, "construct with MqttSync(retiring=True)"
        await client.wait_connected(connect_timeout)
        client_id = client.options.client_id
        if not client.session_present:
            # "Ended after handling 0 queued messages", exit 0, said a mistyped client id,
            # while the removed replica's session went on taking its share.
            await client.stop(end_session=True)
            raise SessionNotRetired(f"no session {client_id} on the broker: nothing to retire")
        # Nothing handled, nothing unsubscribed yet: what the session delivers meanwhile
        # waits unacknowledged, and goes back to the running client, if one takes it back.
        loop = asyncio.get_running_loop()
        until = loop.time() + _TAKEN_BACK_SECONDS
        while loop.time() < until:
            await asyncio.sleep(0.1)
            await self._still_connected(client)
        for topic_filter, handler in self._filters.items():
            client.route(topic_filter, handler)
            await client.unsubscribe(topic_filter)
        received, since = client.health().received, loop.time()
        while True:
            await asyncio.sleep(min(0.1, quiet_seconds))
            await self._still_connected(client)
            health = client.health()
            if health.received != received:
                received, since = health.received, loop.time()
            elif loop.time() - since >= quiet_seconds and not health.pending_acks:
                break
        await client.stop(end_session=True)
        return received

    @staticmethod
    async def _still_connected(client: MqttClient) -> None:
        """Stop the retire, the session kept, once the broker closed its connection."""
        if client.connected:
            return
        await client.stop()
        raise SessionNotRetired(
            f"client id {client.options.client_id} is in use by a running client: not retired "
            "(the broker closed the connection, as it does when another client connects "
            "with that client id, or when it restarts)"
        )

    def health(self) -> JSONObject:
        client = self.client
        if client is None:
            return {"status": "down", "error": "not started"}
        h = client.health()
        deltas_connected = self.delta_client is not None and self.delta_client.health().connected
        body: JSONObject = {
            # Down as well when the deltas' connection is: devices would not get their deltas.
            "status": "up" if h.connected and deltas_connected else "down",
            "deltaConnection": "up" if deltas_connected else "down",
            "broker": "embedded" if self.broker else "external",
            "url": _redact(self._url),
            "reconnects": h.reconnect_count,
            "pendingAcks": h.pending_acks,
            "handlerFailures": h.handler_failures,
        }
        if self.broker is not None:
            body["devices"] = self.broker.devices
            body["maxDevices"] = self.broker.config.max_devices
        if h.last_error:
            body["lastError"] = h.last_error
        if h.last_error_at is not None:
            body["lastErrorAt"] = now_iso(datetime.fromtimestamp(h.last_error_at, UTC))
        if self.deltas is not None:
            body["deltasPublished"] = self.deltas.published
        if self.handlers is not None:
            body["applied"] = self.handlers.applied
            body["duplicates"] = self.handlers.duplicates
            body["rejected"] = self.handlers.rejected
        return body

    # -- internals -----------------------------------------------------------------------

    async def _on_connect(self) -> None:
        if self.deltas is None or self._retiring:
            return
        # A pass still running from the connection before is superseded by this one (two
        # would read the retained deltas with one client id, taking turns at the session).
        # The new pass stops it first; handing over here, without an await, keeps two quick
        # reconnections from both stopping the same old pass and then running side by side.
        superseded = self._republishing
        task = self._republishing = asyncio.create_task(self._republish(superseded))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _republish(self, superseded: asyncio.Task[None] | None) -> None:
        """Republish and correct the deltas, again until it succeeds while the store or the
        broker cannot serve (the next connection's pass supersedes this one). Given up after
        one failure, a delta the broker lost or holds stale stayed so until the next
        reconnection, however long that took."""
        await stop_task(superseded)
        delay = 1.0
        while True:
            try:
                await self._republish_once()
                return
            except Unavailable as exc:
                log.warning("republishing deltas failed, again in %.0f s: %s", delay, exc)
            except Exception:
                log.exception("republishing deltas failed")
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)

    async def _republish_once(self) -> None:
        assert self.deltas is not None and self._options is not None
        count = await self.deltas.republish()
        log.info("republishing %d deltas after connecting", count)
        topic_filter = self.layout.all_twins("delta")
        retained = await read_retained(self._options, topic_filter)
        held = {
            twin_id: payload
            for topic, payload in retained.items()
            if (twin_id := self.layout.twin_id(topic)) is not None
        }
        corrected = await self.deltas.correct(held)
        log.info("correcting %d of the %d deltas the broker retains", corrected, len(held))

    async def _publish_delta(self, topic: str, payload: bytes) -> None:
        assert self.delta_client is not None
        await self.delta_client.publish(topic, payload, qos=1, retain=True)

    async def _reply(
        self, request: InboundMessage, twin_id: str, suffix: str, body: JSONObject
    ) -> None:
        """Answer on ``<base>/<suffix>``, or on the MQTT 5 response topic when one is given.

        A response topic outside the device's own subtree is ignored, so a device cannot make
        the service publish into another twin's topics; so is one no publish can go to (a
        wildcard in it, which the broker let through: the handler failed, unanswered), and
        one the service reads itself (an answer on ``live/update`` was written into the
        twin's live state).

        Raises :class:`PacketTooLarge`, nothing sent, for an answer over the broker's packet
        size limit (the handler answers a 413 instead).
        """
        assert self.client is not None
        topic = self.layout.topic(twin_id, suffix)
        correlation: bytes | None = None
        response = request.response_topic
        if response and is_topic_name(response):
            below = self.layout.below(twin_id, response)
            if below is not None and below not in INBOUND:
                topic, correlation = response, request.correlation_data
        try:
            await self.client.publish(
                topic, dumps(body).encode(), qos=1, correlation_data=correlation, await_ack=False
            )
        except MqttUnavailable as exc:
            log.info("reply to %s lost (the device will retry): %s", twin_id, exc)
