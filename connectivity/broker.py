"""The embedded MQTT broker (amqtt, in process, on the service's event loop).

For the zero-config default only; production should run mosquitto (see
:meth:`connectivity.credentials.CredentialStore.write_mosquitto_files`). amqtt 0.12 speaks
MQTT 3.1.1 only, so clients of this broker must use ``protocol=4``; :class:`_TwinBroker`
refuses any other protocol level with CONNACK 0x01 and a warning naming the client.

Access rules, checked before amqtt reads a CONNECT (see :meth:`_TwinBroker.stream_connected`)
and enforced by the two plugins below:

* the service account (username and password from the configuration) may use every topic;
* a device logs in with its twin id (or :func:`~connectivity.credentials.mqtt_username` of it)
  and the password from the credential store, and may subscribe and receive only under its own
  twin's topic prefix, and publish only to the four topics the service reads there
  (:data:`~connectivity.topics.INBOUND`);
* anonymous clients are refused unless ``allow_anonymous`` is set (then they may do anything);
* a client id belongs to the login holding its session, and a device holds at most
  ``max_sessions_per_device`` sessions (see :meth:`_TwinBroker._session_rules`).

The broker keeps everything in memory and dies with the service, so a device's QoS 1 or 2
message is acknowledged only once the service has acknowledged it, after its commit
(:mod:`connectivity.broker_delivery`). Packets are bounded in size
(:mod:`connectivity.broker_packets`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

from amqtt.contexts import Action, BaseContext
from amqtt.errors import BrokerError
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.session import Session

from connectivity.broker_delivery import (
    AckingHandler,
    EndToEndAcks,
    LastWill,
    hold_until_done,
    keep_newest,
    take_will,
)
from connectivity.broker_log import Tally, log
from connectivity.broker_packets import (
    ConnectTooLarge,
    PacketReader,
    PacketWriter,
    ReadLimits,
    connect_login,
    first_packet,
    other_protocol_level,
)
from connectivity.credentials import CredentialError, CredentialStore, twin_id_from_username
from connectivity.errors import MqttUnavailable
from connectivity.topics import DEFAULT_PREFIX, INBOUND, TopicLayout


def _below_warning(record: logging.LogRecord) -> bool:
    """amqtt's warnings and errors at start come with the error it raises, which the
    service reports in its own line (``Broker startup failed`` once came before it)."""
    return record.levelno < logging.WARNING


@dataclass(frozen=True)
class EmbeddedBrokerConfig:
    """Where the embedded broker listens and whom it lets in."""

    service_username: str
    service_password: str = field(repr=False)
    credentials_path: Path
    host: str = "127.0.0.1"
    port: int = 1883
    topic_prefix: str = DEFAULT_PREFIX
    allow_anonymous: bool = False
    #: Seconds an offline persistent session (and its queued QoS 1 messages) is kept.
    session_expiry: int | None = 7 * 24 * 3600
    #: Seconds a new connection may take to send its whole CONNECT before it is closed.
    connect_timeout: float = 10.0
    #: Largest packet (its remaining length) a client may send; a larger one ends its
    #: connection. The shipped mosquitto configuration has the same limit.
    max_packet_size: int = 2 * 1024 * 1024
    #: Whether devices may log in from the start. The service sets False and calls
    #: EmbeddedBroker.admit_devices once it has subscribed: a device that got in first
    #: had its QoS 1 reports acknowledged with no subscriber, and lost.
    admit_devices_at_start: bool = True
    #: Seconds between two looks at the credentials file: a device whose credentials were
    #: removed or replaced since it logged in is disconnected.
    credentials_check_seconds: float = 2.0
    #: Device connections held at once (the service's own are not counted); one more is
    #: refused. Each costs about 54 KB and a descriptor, and amqtt has no bound of its own
    #: (its listener's max_connections makes the next connection wait, unanswered).
    max_devices: int = 2000
    #: Connections still sending their CONNECT at once (up to connect_timeout and 64 KiB
    #: each); one more is closed at once. A device's CONNECT is a few hundred bytes, read
    #: as soon as it comes: even a fleet reconnecting at once has few of them at a time.
    max_connecting: int = 200
    #: Messages kept for one offline persistent session (queued, or sent and not
    #: acknowledged before it went away); past it the oldest go. amqtt's queue grew without
    #: end: a device away for a month while its desired state changed every second would
    #: come back to millions of deltas, all held in memory meanwhile.
    #: Also the messages sent to a connected device and not acknowledged that the broker
    #: holds; one more is dropped.
    max_queued: int = 1000
    #: Sessions (client ids) one device may hold at once, connected or offline and
    #: persistent. A login past it ends the device's session that has been offline longest,
    #: or is refused when they are all connected. amqtt kept as many as a device made: with
    #: one credential, a new client id at each login held up to ``max_queued`` messages each
    #: for ``session_expiry``, or every one of the ``max_devices`` connections.
    max_sessions_per_device: int = 4
    #: Topic filters one session may subscribe to (the service's are not bounded); one more
    #: gets the SUBACK failure code 0x80. A device needs a handful. amqtt took as many as
    #: came: 200,000 filters from one device held 83 MB, and each message is matched
    #: against every filter.
    max_subscriptions: int = 100
    #: Messages one device connection may have in flight (read, and not yet acknowledged
    #: by the service, or handed to it for QoS 0); at it, the broker reads nothing more
    #: from the connection until one is. paho keeps 20 in flight unless told otherwise.
    max_inflight: int = 100
    #: The longest keep-alive (seconds) the broker holds a device to. MQTT lets a client
    #: ask for none (0) or for up to 18 hours; such a device, once its network is gone
    #: without a FIN, would stay online for that long or for good. A device asking for more,
    #: or for none, is ended after one and a half times this much silence instead (as AWS
    #: IoT does, whose limit is 1200 s; MQTT 3.1.1 has no way to tell the device).
    max_keep_alive: int = 1200


@dataclass
class _PluginConfig:
    service_username: str = ""
    service_password: str = ""
    credentials_path: str = ""
    topic_prefix: str = DEFAULT_PREFIX
    allow_anonymous: bool = False


#: Logins _TwinBroker let in before amqtt read them, for TwinAuthPlugin to take instead of
#: checking them again (PBKDF2 twice per login): (credentials file, username, password) to
#: the stored hash a device's credentials matched (None for the service and anonymous).
_accepted_logins: dict[tuple[str, str, str], str | None] = {}


async def _check_login(
    cfg: _PluginConfig | EmbeddedBrokerConfig,
    store: CredentialStore,
    username: str | None,
    password: str | None,
) -> tuple[bool, str | None]:
    """Whether a login is let in, and the stored hash a device's credentials matched."""
    password = password or ""
    if not username:
        return cfg.allow_anonymous, None
    if username == cfg.service_username:
        return hmac.compare_digest(password.encode(), cfg.service_password.encode()), None
    # Reads the file and runs PBKDF2: keep both off the event loop.
    try:
        matched = await asyncio.to_thread(store.verified_hash, username, password)
    except CredentialError as exc:  # a damaged file refuses every device, loudly
        log.error("embedded broker refused login for %r: %s", username, exc)
        return False, None
    if matched is None:
        log.info("embedded broker refused login for %r", username)
    return matched is not None, matched


class TwinAuthPlugin(BaseAuthPlugin):  # type: ignore[misc]  # amqtt is untyped
    """amqtt authentication: service account, device credentials, optional anonymous."""

    Config = _PluginConfig

    def __init__(self, context: BaseContext) -> None:
        super().__init__(context)
        self._cfg: _PluginConfig = self.config
        self._store = CredentialStore(Path(self._cfg.credentials_path))
        self._layout = TopicLayout(self._cfg.topic_prefix)

    async def authenticate(self, *, session: Session) -> bool | None:
        username, password = session.username, session.password or ""
        key = (self._cfg.credentials_path, username or "", password)
        if key in _accepted_logins:
            accepted, matched = True, _accepted_logins.pop(key)
        else:  # not through _TwinBroker.stream_connected
            accepted, matched = await _check_login(self._cfg, self._store, username, password)
        if matched is not None:
            # What this session logged in with: _TwinBroker ends it once that is gone.
            session.credential_hash = matched
            self._keep_will_inside(session)
        return accepted

    def _keep_will_inside(self, session: Session) -> None:
        """Drop a device's last will on a topic it may not publish to, as mosquitto does (it
        checks a will against the ACL when it would publish it). amqtt published a will
        wherever it said: a device could report for another twin, retained, by hanging up."""
        topic = session.will_topic
        if not session.will_flag or topic is None:
            return
        twin_id = twin_id_from_username(session.username)
        if device_may_publish(self._layout, twin_id, topic):
            return
        log.warning(
            "embedded broker dropped the last will of %r: it may not publish to %r",
            session.username,
            topic,
        )
        session.will_flag = False
        session.will_topic = session.will_message = None


class TwinTopicPlugin(BaseTopicPlugin):  # type: ignore[misc]  # amqtt is untyped
    """amqtt topic ACL: a device reads inside its own twin's topics and publishes only to
    the ones the service reads."""

    Config = _PluginConfig

    def __init__(self, context: BaseContext) -> None:
        super().__init__(context)
        self._cfg: _PluginConfig = self.config
        self._layout = TopicLayout(self._cfg.topic_prefix)

    async def topic_filtering(
        self,
        *,
        session: Session | None = None,
        topic: str | None = None,
        action: Action | None = None,
    ) -> bool | None:
        if session is None or topic is None:
            return False
        username = session.username
        if not username:
            return self._cfg.allow_anonymous
        if username == self._cfg.service_username:
            return True
        twin_id = twin_id_from_username(username)
        if action == Action.PUBLISH:
            return device_may_publish(self._layout, twin_id, topic)
        return device_may_read(self._layout, twin_id, topic)


def device_may_read(layout: TopicLayout, twin_id: str, topic: str) -> bool:
    """Whether a device may subscribe to or receive ``topic`` (a name or a filter): anything
    under its own base, where the service answers it (MQTT 5 response topics included)."""
    try:
        return layout.below(twin_id, topic) is not None
    except ValueError:  # a twin id no topic can hold
        return False


def device_may_publish(layout: TopicLayout, twin_id: str, topic: str) -> bool:
    """Whether a device may publish to ``topic``: one of its own :data:`INBOUND` topics.
    Anywhere else under its base a device could only mislead itself (a delta, an answer)
    or, retained, hold the broker's memory; the service reads none of it."""
    try:
        return layout.below(twin_id, topic) in INBOUND
    except ValueError:  # a twin id no topic can hold
        return False


#: CONNACK with return code 0x01, "unacceptable protocol version" (MQTT 3.1.1 [MQTT-3.1.2-2]);
#: paho's MQTT 5 client reads it as "Unsupported protocol version".
_CONNACK_BAD_VERSION = b"\x20\x02\x00\x01"
#: CONNACK with return code 0x03, "server unavailable": paho retries it as a lost connection.
_CONNACK_UNAVAILABLE = b"\x20\x02\x00\x03"
#: CONNACK with return code 0x02, "identifier rejected": the client id is another login's.
_CONNACK_ID_REJECTED = b"\x20\x02\x00\x02"
#: CONNACK with return code 0x05, "not authorized", as amqtt answers a refused login.
_CONNACK_NOT_AUTHORIZED = b"\x20\x02\x00\x05"
_VERSIONS = {3: "MQTT 3.1", 5: "MQTT 5"}
#: A SUBACK's return code for a filter refused.
_SUBACK_FAILURE = 0x80


class _Holder(NamedTuple):
    """Who a login is, for the rules on sessions: the service by its username, a device by
    its twin id (it may log in with the twin id or its :func:`mqtt_username`).

    Two kinds, never equal to each other: by name alone, a device whose twin id was the
    service's username (``service:main``, logging in as ``service%3Amain``) held the
    service's client id and took its session over.
    """

    kind: Literal["service", "device"]
    name: str


class _TwinBroker(EndToEndAcks):
    """amqtt's broker, with what it lacks for devices of a twin service:

    * a first packet bounded in size and time, any packet in size, and a connection's
      silence to one and a half keep-alive periods (see PacketReader);
    * a device's QoS 1 message acknowledged only once the service has it (EndToEndAcks);
    * retained messages only for a session's own filters;
    * a CONNECT of another protocol level than 3.1.1 refused with a reason;
    * at most ``max_devices`` device connections at once, ``max_connecting`` still sending
      their CONNECT, and ``max_queued`` messages for an offline session;
    * a device's messages retained only on its status topic;
    * a client id only for the login holding its session, and ``max_sessions_per_device``;
    * at most ``max_subscriptions`` topic filters for a session not the service's.

    On the last: amqtt reads every CONNECT as 3.1.1. An MQTT 5 one has properties before the
    client id: amqtt misreads the lengths and waits for bytes that never come, so the device
    gets no CONNACK (it gives up at its keep-alive), and the log a bare amqtt line without the
    client id, only then. amqtt's plugin events come after that parse, too late to help.
    """

    def __init__(self, amqtt_config: dict[str, Any], config: EmbeddedBrokerConfig) -> None:
        super().__init__(amqtt_config, config.service_username, config.max_queued)
        self._config = config
        self._retained_sends: set[asyncio.Task[None]] = set()
        #: Client ids of sessions resumed and not yet reading (their queue is being sent).
        self._resuming: set[str] = set()
        self.devices_admitted = asyncio.Event()
        self._closing = asyncio.Event()
        self._watcher: asyncio.Task[None] | None = None
        self._credentials = CredentialStore(config.credentials_path)
        self._layout = TopicLayout(config.topic_prefix)
        #: Device connections held now, and connections whose CONNECT is still arriving.
        self.devices = 0
        self.arriving = 0
        self._refused = Tally(
            "embedded broker refused %d device connection(s) (CONNACK 3, server unavailable): "
            "it holds mqtt.embedded_max_devices (%d) already; raise it, or run an external "
            "broker (TWIN_MQTT_URL) for a fleet this size"
        )
        self._refused_arriving = Tally(
            "embedded broker closed %d connection(s) at once: as many as "
            "mqtt.embedded_max_connecting (%d) were still sending their CONNECT"
        )
        #: The topic filters each bounded session holds (by client id, as amqtt matches
        #: subscriptions to sessions).
        self._filters: dict[str, set[str]] = {}
        self._refused_filters = Tally(
            "embedded broker refused %d subscription(s) (SUBACK 0x80): a session held "
            "mqtt.embedded_max_subscriptions (%d) topic filters already (one of them: %r)"
        )
        #: Client ids whose login is under way (checked, not yet a session of amqtt's),
        #: with who logs in (see _holder): the rules on sessions count them as held.
        self._claims: dict[str, list[_Holder | None]] = {}
        self._refused_id = Tally(
            "embedded broker refused %d login(s) (CONNACK 2, identifier rejected): the "
            "client id is held by another login (one of them: %r as %r)"
        )
        self._ended_sessions = Tally(
            "embedded broker ended %d offline session(s) of devices at "
            "mqtt.embedded_max_sessions_per_device (%d), the longest offline of each "
            "(one of them: %r)"
        )
        self._refused_sessions = Tally(
            "embedded broker refused %d device login(s) (CONNACK 3, server unavailable): "
            "each device had mqtt.embedded_max_sessions_per_device (%d) sessions "
            "connected already (one of them: %r)"
        )
        self._not_retained = Tally(
            "embedded broker retained none of %d message(s) devices published with the "
            "retain flag outside their status topic (one of them: %r)"
        )
        self._read_limits = ReadLimits(
            config.max_packet_size,
            config.max_inflight,
            Tally(
                "embedded broker closed %d connection(s) that sent nothing for one and a half "
                "keep-alive periods, as if their network had failed (one of them: %r from %s, "
                "after %g s)"
            ),
        )
        if config.admit_devices_at_start:
            self.devices_admitted.set()

    async def retain_message(
        self,
        source_session: Session | None,
        topic_name: str | None,
        data: bytes | bytearray | None,
        qos: int | None = None,
    ) -> None:
        """Retain what a device publishes with the retain flag only on its status topic.

        That is the one retained message of the device protocol. amqtt kept any: a device
        could hold memory with a retained message on each of as many topics of its own as
        it liked (up to the packet bound each), or replace or clear the retained delta the
        service keeps for it. The message itself is delivered as ever.
        """
        username = source_session.username if source_session is not None else None
        if username and username != self._config.service_username and topic_name is not None:
            status = self._layout.topic(twin_id_from_username(username), "status")
            if topic_name != status:
                self._not_retained.note(topic_name)
                return
        await super().retain_message(source_session, topic_name, data, qos)

    async def add_subscription(self, subscription: tuple[str, int], session: Session) -> int:
        """amqtt's, with at most ``max_subscriptions`` topic filters for a session that is
        not the service's."""
        topic_filter = subscription[0]
        client_id = session.client_id
        bounded = session.username != self._config.service_username
        if bounded:
            held = self._filters.get(client_id, set())
            if topic_filter not in held and len(held) >= self._config.max_subscriptions:
                self._refused_filters.note(self._config.max_subscriptions, client_id)
                return _SUBACK_FAILURE
        granted: int = await super().add_subscription(subscription, session)
        if bounded and granted != _SUBACK_FAILURE:
            self._filters.setdefault(client_id, set()).add(topic_filter)
        return granted

    def _del_subscription(self, a_filter: str, session: Session) -> int:
        deleted: int = super()._del_subscription(a_filter, session)
        held = self._filters.get(session.client_id)
        if deleted and held is not None:
            held.discard(a_filter)
            if not held:
                del self._filters[session.client_id]
        return deleted

    async def _retain_broadcast_message(
        self, broadcast: dict[str, Any], qos: int, target_session: Session
    ) -> None:
        """Queue a message for an offline device session, keeping the newest ``max_queued``,
        counting those it was sent and had not acknowledged (kept to be sent again).

        The oldest go, not the newest (mosquitto drops the newest): a delta supersedes the
        ones before it, and a device whose request went unanswered sends it again. The
        unacknowledged ones are the oldest: they were sent before it went away. The
        service's sessions are not trimmed: what they are sent are device messages, none of
        which may be lost.
        """
        await super()._retain_broadcast_message(broadcast, qos, target_session)
        if target_session.username == self._config.service_username:
            return
        dropped = keep_newest(target_session, self._config.max_queued)
        if dropped:
            self.dropped_kept.note(self._config.max_queued, target_session.client_id, count=dropped)

    async def _publish_session_retained_messages(self, session: Session) -> None:
        """Send what was queued for a session while it was away, with the retain flag clear.

        MQTT 3.1.1 (3.3.1.3) sets the flag only on a message sent for a new subscription;
        amqtt set it on every queued one, and the service ignores a request that comes
        flagged (a replay from the broker's retained store: ``ignoring_replays``). Then
        amqtt sent the retained messages of every filter the session held, again: a
        resumed device got its newest delta twice. Its filters are not new subscriptions,
        and whatever was published meanwhile is in its queue, so nothing is sent for them.

        The queue goes first, in order: what was delivered to the session since it connected
        waited (AckingHandler.mqtt_publish), and goes after it. amqtt sent it as it came: the
        newest delta, then the older ones.
        """
        self._resuming.add(session.client_id)
        handler = self._get_handler(session)
        if not isinstance(handler, AckingHandler) or handler.ended:
            return  # the connection has ended already: the queue waits for the next resume
        # In order, and before anything delivered since the session connected (held).
        backlog = [
            (queued.topic, queued.data, queued.qos, False)
            for queued in _drained(session.retained_messages)
        ]
        sends = handler.let_through(backlog)
        if sends:
            await asyncio.wait(sends)

    async def _client_message_loop(self, session: Session, handler: Any) -> None:
        # From here on, a call for retained messages is for a new subscription.
        self._resuming.discard(session.client_id)
        await super()._client_message_loop(session, handler)

    async def _publish_retained_messages_for_subscription(
        self, subscription: tuple[str, int], session: Any
    ) -> None:
        """Retained messages for a filter only if this session holds it, and in a task.

        amqtt calls this at every connection for every filter that *any* client holds, and
        never asks the topic plugin: each device was sent the retained deltas and statuses
        of other twins (the service's own ``twins/+/status`` matches them all). It awaits
        the sends while it iterates the broker's subscription table, which a client
        subscribing meanwhile changes: "dictionary changed size during iteration" dropped
        the new connection. A filter a session holds passed the topic plugin when it
        subscribed; sending from tasks leaves that iteration nothing to wait for.
        """
        if session.client_id in self._resuming:
            return  # a resumed session's filters (see _publish_session_retained_messages)
        topic_filter = subscription[0]
        granted = next(
            (
                qos
                for holder, qos in self._subscriptions.get(topic_filter, ())
                if holder.client_id == session.client_id
            ),
            None,
        )
        if granted is None:
            return
        for task in self.send_retained(topic_filter, granted, session):
            hold_until_done(
                self._retained_sends, task, "retained messages not sent", logging.WARNING
            )

    async def _stop_handler(self, handler: Any) -> None:
        # The keeper's connection ended: devices logging in now would have nothing to take
        # their messages; they wait until the service is back and admits them again.
        session = getattr(handler, "session", None)
        if self.keeper is not None and session is not None and session.client_id == self.keeper:
            self.devices_admitted.clear()
        await super()._stop_handler(handler)

    async def close_to_devices(self, grace: float) -> None:
        """Closes every device connection and publishes the last will of each one that was
        connected, as MQTT asks of a server that closes a connection (3.1.2.5); waits up to
        ``grace`` seconds for the service to have them.

        The wills were not published (amqtt would have, once each connection's loop saw
        the end, after the service had gone), and this broker keeps nothing across a
        restart: a device that did not come back stayed ``online`` for good.
        """
        self.devices_admitted.clear()
        wills: list[tuple[Session, LastWill]] = []
        for session, handler in list(self._sessions.values()):
            if session.username == self._config.service_username:
                continue
            will = take_will(session) if session.transitions.is_connected() else None
            await _close_connection(handler)
            if will is not None:  # after the close: it is the device's last word
                wills.append((session, will))
        outcomes = [await self.publish_will(session, will) for session, will in wills]
        if not outcomes:
            return
        done, _ = await asyncio.wait(outcomes, timeout=grace)
        taken = sum(1 for outcome in done if outcome.result())
        if taken < len(outcomes):
            log.warning(
                "embedded broker: the service took %d of the %d last wills of the devices "
                "it disconnected at shutdown within %g s; the other twins stay online "
                "until their devices come back",
                taken,
                len(outcomes),
                grace,
            )

    async def _until_devices_admitted(self) -> bool:
        """Holds a device until devices are admitted (bounded by connect_timeout, so that a
        service that never subscribes shuts no one out); False when the broker shuts down
        meanwhile."""
        if self.devices_admitted.is_set():
            return True
        admitted = asyncio.ensure_future(self.devices_admitted.wait())
        closing = asyncio.ensure_future(self._closing.wait())
        try:
            done, _ = await asyncio.wait(
                (admitted, closing),
                timeout=self._config.connect_timeout,
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            admitted.cancel()
            closing.cancel()
        if closing in done:
            return False
        if not done:
            log.warning(
                "embedded broker: devices were not admitted within %.0f s; letting one in",
                self._config.connect_timeout,
            )
        return True

    async def start(self) -> None:
        await super().start()
        self._watcher = asyncio.create_task(self._watch_credentials())

    async def shutdown(self) -> None:
        # Connections held at the gate end now: they waited out connect_timeout after the
        # broker had stopped, and a loop closing meanwhile logged each as an error.
        self._closing.set()
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        await super().shutdown()

    async def _watch_credentials(self) -> None:
        """Disconnects a device whose credentials were removed or replaced since it logged
        in. Checked at login only, a revoked device stayed connected as long as it liked;
        mosquitto re-checks its connected clients when it reloads the password file.

        A removed device's sessions end too, once offline: they stayed for good (about
        46 KB each, with their dead connection), so a fleet that retires devices grew
        without end. A device whose credentials were replaced keeps its offline sessions:
        it resumes them with its new password."""
        seen = _file_state(self._credentials.path)
        hashes: dict[str, str] = {}
        #: Sessions of removed devices, ended once their connection has closed.
        removed: set[str] = set()
        while True:
            await asyncio.sleep(self._config.credentials_check_seconds)
            # A failure is logged, and the watch goes on: a RecursionError from a damaged
            # file once ended it silently, and removed devices stayed connected for good.
            try:
                state = _file_state(self._credentials.path)
                if state != seen:
                    seen = state
                    hashes = await self._disconnect_revoked(removed)
                await self._end_removed(removed, hashes)
            except CredentialError as exc:  # logins are refused meanwhile; the rest stay
                log.error("embedded broker: %s", exc)
            except Exception:
                log.exception("embedded broker: checking the device credentials failed")

    async def _disconnect_revoked(self, removed: set[str]) -> dict[str, str]:
        """Disconnect the devices whose credentials are not the ones they logged in with;
        add the client ids of removed devices' sessions to ``removed``. The stored hashes."""
        hashes = await asyncio.to_thread(self._credentials.hashes)
        for client_id, (session, handler) in list(self._sessions.items()):
            held = getattr(session, "credential_hash", None)
            current = hashes.get(twin_id_from_username(session.username))
            if held is None or current == held:
                continue
            if current is None:
                removed.add(client_id)
            if session.transitions.state == "connected":
                log.warning(
                    "embedded broker disconnected %r: its credentials were removed or replaced",
                    session.username,
                )
                await _close_connection(handler)
        return hashes

    async def _end_removed(self, removed: set[str], hashes: dict[str, str]) -> None:
        """End the offline sessions in ``removed`` (client ids), unless their device is
        back (added again and logged in: the session holds its new credentials)."""
        for client_id in list(removed):
            session = self._sessions.get(client_id, (None, None))[0]
            back = session is not None and twin_id_from_username(session.username) in hashes
            if session is None or back:
                removed.discard(client_id)
            elif session.transitions.state != "connected" and client_id not in self._claims:
                removed.discard(client_id)
                await self._cleanup_session(client_id)

    async def stream_connected(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, listener_name: str
    ) -> None:
        # Before anyone is authenticated, so bounded in time and size: a connection that
        # never sent its CONNECT was held for good, and one that announced 200 MB had it
        # read into memory (the process held 600 MB after it). And in number: 3,000
        # connections each sending 60 KB of a CONNECT held 143 MB, and descriptors.
        if self.arriving >= self._config.max_connecting:
            self._refused_arriving.note(self._config.max_connecting)
            writer.close()
            return
        self.arriving += 1
        try:
            packet = await asyncio.wait_for(first_packet(reader), self._config.connect_timeout)
        except (TimeoutError, ConnectTooLarge) as exc:
            peer = writer.get_extra_info("peername")
            reason = "no CONNECT in time" if isinstance(exc, TimeoutError) else str(exc)
            log.warning("embedded broker closed a connection from %s: %s", peer, reason)
            writer.close()
            return
        finally:
            self.arriving -= 1
        if not packet:
            # Closed before a byte was sent: a TCP health check (a Kubernetes tcpSocket
            # probe, a load balancer). amqtt warned twice about each one.
            log.debug("embedded broker: a connection closed before sending anything")
            writer.close()
            return
        refused = other_protocol_level(packet)
        if refused is not None:
            level, client_id = refused
            log.warning(
                "embedded broker refused client %r: it connects with %s, and the embedded "
                "broker speaks MQTT 3.1.1 only; connect with MQTT 3.1.1 or configure an "
                "external broker (TWIN_MQTT_URL)",
                client_id,
                _VERSIONS.get(level, f"MQTT protocol level {level}"),
            )
            await _answer_and_close(writer, _CONNACK_BAD_VERSION)
            return
        login = connect_login(packet)
        if login is None:
            peer = writer.get_extra_info("peername")
            log.warning("embedded broker closed a connection from %s: a CONNECT cut short", peer)
            writer.close()
            return
        client_id, username, password, _ = login
        device = username != self._config.service_username
        if device and self.devices >= self._config.max_devices:
            self._refused.note(self._config.max_devices)
            await _answer_and_close(writer, _CONNACK_UNAVAILABLE)
            return
        self.devices += 1 if device else 0
        accepted_as = (str(self._config.credentials_path), username or "", password or "")
        try:
            # amqtt acts on a CONNECT's client id before it checks the credentials: it took
            # a connected device's session over (the device, unaware, got nothing more),
            # and deleted or rewrote an offline one, for anyone who knew the client id.
            accepted, matched = await _check_login(
                self._config, self._credentials, username, password
            )
            if not accepted:
                await _answer_and_close(writer, _CONNACK_NOT_AUTHORIZED)
                return
            holder = self._holder(username)
            refusal, ended = self._session_rules(client_id, holder, device)
            if refusal is not None:
                await _answer_and_close(writer, refusal)
                return
            with self._claimed(client_id, holder):
                await self._end_sessions(ended)
                _accepted_logins[accepted_as] = matched  # TwinAuthPlugin takes it
                if device and not await self._until_devices_admitted():
                    writer.close()
                    return
                await self._close_taken_over(client_id)
                # amqtt parses the CONNECT itself, from its first byte.
                peer = writer.get_extra_info("peername")
                if device and not 0 < login.keep_alive <= self._config.max_keep_alive:
                    login = login._replace(keep_alive=self._config.max_keep_alive)
                replay = PacketReader(
                    reader, packet, login, peer, writer.transport, self._read_limits
                )
                await self.external_connected(replay, PacketWriter(writer), listener_name)
        finally:
            self.devices -= 1 if device else 0
            _accepted_logins.pop(accepted_as, None)  # not taken: amqtt refused the CONNECT

    def _holder(self, username: str | None) -> _Holder | None:
        """Who a login is (None: anonymous)."""
        if not username:
            return None
        if username == self._config.service_username:
            return _Holder("service", username)
        return _Holder("device", twin_id_from_username(username))

    def _session_rules(
        self, client_id: str, holder: _Holder | None, device: bool
    ) -> tuple[bytes | None, list[str]]:
        """The CONNACK refusing a login that passed its password, if the rules on sessions
        refuse it, and the client ids of the sessions to end for it.

        A session belongs to whoever holds it: amqtt let any login take a session over by
        its client id (MQTT 5.4.2 says a broker should check that a client may use one, and
        mosquitto does not either), so one device could disconnect the service or another
        device, over and over, and take their queued messages. And a device holds at most
        ``max_sessions_per_device``. Synchronous, so that nothing else logs in between the
        count and the claim that follows it.
        """
        holders = set(self._claims.get(client_id, ()))
        if (session := self._sessions.get(client_id)) is not None:
            holders.add(self._holder(session[0].username))
        if client_id and holders - {holder}:  # amqtt makes an id up for an empty one
            self._refused_id.note(holder and holder.name, client_id)
            return _CONNACK_ID_REJECTED, []
        if not device or holder is None:  # anonymous logins (a test broker) are not bounded
            return None, []
        held = {cid for cid, claims in self._claims.items() if holder in claims}
        held.update(
            cid for cid, (s, _) in self._sessions.items() if self._holder(s.username) == holder
        )
        held.discard(client_id)
        excess = len(held) + 1 - self._config.max_sessions_per_device
        if excess <= 0:
            return None, []
        offline = sorted(
            (s.last_disconnect_time or 0, cid)
            for cid in held - self._claims.keys()
            if (s := self._sessions[cid][0]).transitions.state != "connected"
        )
        if len(offline) < excess:
            self._refused_sessions.note(self._config.max_sessions_per_device, holder.name)
            return _CONNACK_UNAVAILABLE, []
        ended = [cid for _, cid in offline[:excess]]
        self._ended_sessions.note(self._config.max_sessions_per_device, ended[0], count=excess)
        return None, ended

    @contextlib.contextmanager
    def _claimed(self, client_id: str, holder: _Holder | None) -> Iterator[None]:
        """Counts a login under way or connected as holding ``client_id`` (amqtt makes its
        session only once it has read the CONNECT). An empty one is no session's."""
        if not client_id:
            yield
            return
        claims = self._claims.setdefault(client_id, [])
        claims.append(holder)
        try:
            yield
        finally:
            claims.remove(holder)
            if not claims:
                del self._claims[client_id]

    async def _end_sessions(self, client_ids: list[str]) -> None:
        """Ends offline sessions chosen by _session_rules, unless their device came back."""
        for client_id in client_ids:
            held = self._sessions.get(client_id)
            if held is None or client_id in self._claims:
                continue
            if held[0].transitions.state != "connected":
                await self._cleanup_session(client_id)

    async def _close_taken_over(self, client_id: str) -> None:
        """Close the connection of a session that a new login with its client id takes over.

        amqtt moves the session to the new connection but leaves the old one open, its
        client connected as far as it could tell and receiving nothing until its keep-alive
        ran out; mosquitto closes it, and so does this.
        """
        session, handler = self._sessions.get(client_id, (None, None))
        if session is not None and session.transitions.state == "connected":
            await _close_connection(handler)


async def _answer_and_close(writer: asyncio.StreamWriter, connack: bytes) -> None:
    """Refuse a client with ``connack`` (its CONNECT has been read whole) and close."""
    writer.write(connack)
    with contextlib.suppress(ConnectionError):  # the device may be gone already
        await writer.drain()
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()


async def _close_connection(handler: Any) -> None:
    """Ends a client's connection, if it still has one."""
    if handler is not None and handler.writer is not None:
        with contextlib.suppress(Exception):  # already closing
            await handler.writer.close()


def _drained(queue: asyncio.Queue[Any]) -> list[Any]:
    """Everything in ``queue``, oldest first, taken out."""
    items = []
    while not queue.empty():
        items.append(queue.get_nowait())
    return items


def _file_state(path: Path) -> tuple[int, int, int] | None:
    """What tells a changed file (the store replaces it whole: a new inode)."""
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


class EmbeddedBroker:
    """An amqtt broker running on the current event loop."""

    def __init__(self, config: EmbeddedBrokerConfig) -> None:
        self.config = config
        self._broker: _TwinBroker | None = None

    @property
    def url(self) -> str:
        """``mqtt://host:port`` of the listener (without credentials)."""
        return f"mqtt://{self.config.host}:{self.config.port}"

    async def start(self) -> None:
        """Bind the listener and start accepting clients."""
        if self._broker is not None:
            raise RuntimeError("embedded broker already started")
        cfg = self.config
        plugin_cfg: dict[str, Any] = {
            "service_username": cfg.service_username,
            "service_password": cfg.service_password,
            "credentials_path": str(cfg.credentials_path),
            "topic_prefix": cfg.topic_prefix,
            "allow_anonymous": cfg.allow_anonymous,
        }
        broker = _TwinBroker(
            {
                "listeners": {"default": {"type": "tcp", "bind": f"{cfg.host}:{cfg.port}"}},
                "session_expiry_interval": cfg.session_expiry,
                "plugins": {
                    f"{__name__}.TwinAuthPlugin": plugin_cfg,
                    f"{__name__}.TwinTopicPlugin": plugin_cfg,
                },
            },
            cfg,
        )
        amqtt_log = logging.getLogger("amqtt.broker")
        amqtt_log.addFilter(_below_warning)
        try:
            await broker.start()
        except BrokerError as exc:  # the port taken, an address not of this host...
            reason = exc.__cause__ or exc
            raise MqttUnavailable(f"The embedded MQTT broker cannot start: {reason}") from exc
        finally:
            amqtt_log.removeFilter(_below_warning)
        self._broker = broker

    async def stop(self) -> None:
        """Close every connection and the listener. Sessions and retained messages are lost."""
        broker, self._broker = self._broker, None
        if broker is not None:
            await broker.shutdown()

    def admit_devices(self, keeper: str | None = None) -> None:
        """Lets devices log in (see EmbeddedBrokerConfig.admit_devices_at_start).

        ``keeper`` is the client id of the service session that takes the device messages.
        While that session is away, device logins are held again (until it is back, or
        ``connect_timeout``), and a device message that would wait in its offline queue is
        not acknowledged: the device keeps it and sends it again (see EndToEndAcks).
        """
        if self._broker is not None:
            if keeper is not None:
                self._broker.keeper = keeper
            self._broker.devices_admitted.set()

    async def close_to_devices(self, grace: float = 5.0) -> None:
        """Disconnects every device and holds new logins: for the service's shutdown, before
        it disconnects. A device message that came after that went to the service's offline
        session, was acknowledged to the device, and was lost when the broker stopped.

        Publishes their last wills, and waits up to ``grace`` seconds for the service to
        have acknowledged them (after its commit): their twins go ``offline``."""
        if self._broker is not None:
            await self._broker.close_to_devices(grace)

    @property
    def devices(self) -> int:
        """Device connections held now (bounded by ``max_devices``)."""
        return 0 if self._broker is None else self._broker.devices

    @property
    def arriving(self) -> int:
        """Connections still sending their CONNECT (bounded by ``max_connecting``)."""
        return 0 if self._broker is None else self._broker.arriving

    @property
    def ready(self) -> bool:
        """True once started and listening (amqtt binds its listeners inside ``start``)."""
        return self._broker is not None and self._broker.transitions.state == "started"
