"""The embedded MQTT broker (amqtt, in process, on the service's event loop).

For the zero-config default only; production should run mosquitto (see
:meth:`connectivity.credentials.CredentialStore.write_mosquitto_files`). amqtt 0.12 speaks
MQTT 3.1.1 only, so clients of this broker must use ``protocol=4``; :class:`_TwinBroker`
refuses any other protocol level with CONNACK 0x01 and a warning naming the client.

Access rules, enforced by the two plugins below:

* the service account (username and password from the configuration) may use every topic;
* a device logs in with its twin id (or :func:`~connectivity.credentials.mqtt_username` of it)
  and the password from the credential store, and may publish, subscribe and receive only under
  its own twin's topic prefix;
* anonymous clients are refused unless ``allow_anonymous`` is set (then they may do anything).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import hmac
import logging
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from amqtt.adapters import StreamReaderAdapter, StreamWriterAdapter
from amqtt.broker import Broker
from amqtt.contexts import Action, BaseContext
from amqtt.errors import BrokerError
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.mqtt.puback import PubackPacket
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.session import INCOMING, OUTGOING, OutgoingApplicationMessage, Session

from connectivity.credentials import CredentialError, CredentialStore, twin_id_from_username
from connectivity.errors import MqttUnavailable
from connectivity.topics import DEFAULT_PREFIX, TopicLayout

log = logging.getLogger(__name__)


def _without_traceback(record: logging.LogRecord) -> bool:
    record.exc_info = record.exc_text = None
    return True


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


@dataclass
class _PluginConfig:
    service_username: str = ""
    service_password: str = ""
    credentials_path: str = ""
    topic_prefix: str = DEFAULT_PREFIX
    allow_anonymous: bool = False


class TwinAuthPlugin(BaseAuthPlugin):  # type: ignore[misc]  # amqtt is untyped
    """amqtt authentication: service account, device credentials, optional anonymous."""

    Config = _PluginConfig

    def __init__(self, context: BaseContext) -> None:
        super().__init__(context)
        self._cfg: _PluginConfig = self.config
        self._store = CredentialStore(Path(self._cfg.credentials_path))

    async def authenticate(self, *, session: Session) -> bool | None:
        username, password = session.username, session.password or ""
        if not username:
            return self._cfg.allow_anonymous
        if username == self._cfg.service_username:
            return hmac.compare_digest(password.encode(), self._cfg.service_password.encode())
        # Reads the file and runs PBKDF2: keep both off the event loop.
        try:
            ok = await asyncio.to_thread(self._store.verify, username, password)
        except CredentialError as exc:  # a damaged file refuses every device, loudly
            log.error("embedded broker refused login for %r: %s", username, exc)
            return False
        if not ok:
            log.info("embedded broker refused login for %r", username)
        return ok


class TwinTopicPlugin(BaseTopicPlugin):  # type: ignore[misc]  # amqtt is untyped
    """amqtt topic ACL: a device stays inside its own twin's topics."""

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
        return device_may_use(self._layout, twin_id_from_username(username), topic)


def device_may_use(layout: TopicLayout, twin_id: str, topic: str) -> bool:
    """Whether a device may publish/subscribe/receive ``topic`` (a name or a filter)."""
    try:
        base = layout.base(twin_id)
    except ValueError:
        return False
    return topic.startswith(base + "/")


#: CONNACK with return code 0x01, "unacceptable protocol version" (MQTT 3.1.1 [MQTT-3.1.2-2]);
#: paho's MQTT 5 client reads it as "Unsupported protocol version".
_CONNACK_BAD_VERSION = b"\x20\x02\x00\x01"
_VERSIONS = {3: "MQTT 3.1", 5: "MQTT 5"}


#: The device message whose delivery the broker is handling in this task (see _Handler).
_forwarding: contextvars.ContextVar[asyncio.Future[bool] | None] = contextvars.ContextVar(
    "_forwarding", default=None
)


class _Handler(BrokerProtocolHandler):  # type: ignore[misc]  # amqtt is untyped
    """amqtt's connection handler, with QoS 1 acknowledged end to end.

    amqtt acknowledges a PUBLISH as soon as it has read it, and keeps it only in memory until
    the subscribers have it. Here that memory is the service's process: a crash between the
    device's PUBACK and the service's commit lost the report, though the device had been told
    it was delivered. A device's PUBACK now waits until every subscriber the message went to
    acknowledged it (the service does so after the commit), so until then the device keeps
    the message and sends it again after a reconnect. This also holds each device back to
    its own in-flight window: amqtt otherwise read whatever devices sent and queued it.

    The other change: amqtt gave a subscriber 5 s for its PUBACK and then forgot the message
    (with a warning per message). The service acknowledges after its commit, which under a
    burst of reports can take longer; it now gets as long as its connection lasts.
    """

    #: The service account, whose own publishes are acknowledged at once.
    service_username: str
    #: Delivery outcome of each device message not yet handed to the broadcast, by id().
    forwards: dict[int, asyncio.Future[bool]]

    @classmethod
    def adopt(cls, handler: BrokerProtocolHandler, service_username: str) -> _Handler:
        """Makes amqtt's handler one of these: amqtt builds it in a class method of its own
        class, with no way to pass another (its ``_init_handler`` is never called)."""
        handler.__class__ = cls
        handler.service_username = service_username
        handler.forwards = {}
        return handler  # type: ignore[no-any-return]

    async def _handle_qos1_message_flow(self, app_message: Any) -> None:
        if app_message.direction == OUTGOING:
            await self._send_and_wait_for_puback(app_message)
            return
        if app_message.direction != INCOMING or self.session.username == self.service_username:
            await super()._handle_qos1_message_flow(app_message)
            return
        forwarded = asyncio.get_running_loop().create_future()
        self.forwards[id(app_message)] = forwarded
        await self.session.delivered_message_queue.put(app_message)
        if not await forwarded:
            # A subscriber's connection ended before it acknowledged: unacknowledged, the
            # device keeps the message; it sends it again once it has reconnected.
            log.warning(
                "embedded broker: a message of %r on %r was not acknowledged by every "
                "subscriber; closing the connection so that the device sends it again",
                self.session.client_id,
                app_message.topic,
            )
            with contextlib.suppress(Exception):
                await self.writer.close()
            return
        puback = PubackPacket.build(app_message.packet_id)
        await self._send_packet(puback)
        app_message.puback_packet = puback

    def _stop_waiters(self) -> None:
        # The connection ended: messages not yet broadcast stay unacknowledged, and their
        # flows end (the device sends them again after it reconnects).
        super()._stop_waiters()
        for forwarded in self.forwards.values():
            forwarded.cancel()
        self.forwards.clear()

    async def _send_and_wait_for_puback(self, app_message: Any) -> None:
        """amqtt's outgoing QoS 1 flow, without its 5 s limit on the PUBACK."""
        packet_id = app_message.packet_id
        if isinstance(app_message, OutgoingApplicationMessage):
            self.session.inflight_out.setdefault(packet_id, app_message)
        again = app_message.publish_packet is not None
        packet = app_message.build_publish_packet(dup=again)
        await self._send_packet(packet)
        app_message.publish_packet = packet
        waiter: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._puback_waiters[packet_id] = waiter
        try:
            app_message.puback_packet = await waiter
        finally:
            self._puback_waiters.pop(packet_id, None)
            self.session.inflight_out.pop(packet_id, None)


def _resolve(forwarded: asyncio.Future[bool] | None, delivered: bool) -> None:
    if forwarded is not None and not forwarded.done():
        forwarded.set_result(delivered)


def _all_acknowledged(deliveries: asyncio.Future[list[Any]]) -> bool:
    if deliveries.cancelled():
        return False
    return not any(isinstance(outcome, BaseException) for outcome in deliveries.result())


class _TaskLog(deque[asyncio.Task[Any]]):
    """amqtt's deque of delivery tasks, noting those one broadcast adds."""

    def __init__(self) -> None:
        super().__init__()
        self.noted: list[asyncio.Task[Any]] | None = None

    def append(self, task: asyncio.Task[Any]) -> None:
        super().append(task)
        if self.noted is not None:
            self.noted.append(task)


class _Snapshots(dict[str, list[Any]]):
    """amqtt's subscription table, iterated over a copy.

    amqtt walks the table to broadcast a message and awaits in that walk (the topic plugin,
    queueing for offline sessions); a client subscribing or leaving meanwhile changed it,
    "dictionary changed size during iteration" ended the broadcast, and the message was
    lost (every subscriber, the service included, missed it).
    """

    def __iter__(self) -> Iterator[str]:
        return iter(list(self.keys()))

    def items(self) -> list[tuple[str, list[Any]]]:  # type: ignore[override]
        return [(key, list(value)) for key, value in super().items()]


class _LastTaken(asyncio.Queue[dict[str, Any]]):
    """amqtt's broadcast queue, remembering the broadcast taken last."""

    last: dict[str, Any] | None = None

    async def get(self) -> dict[str, Any]:
        self.last = await super().get()
        return self.last


class _TwinBroker(Broker):  # type: ignore[misc]  # amqtt is untyped
    """amqtt's broker, with what it lacks for devices of a twin service:

    * a first packet bounded in size and time, and any packet in size (see _Replay);
    * a device's QoS 1 message acknowledged only once the service has it (see _Handler);
    * retained messages only for a session's own filters;
    * a CONNECT of another protocol level than 3.1.1 refused with a reason.

    On the last: amqtt reads every CONNECT as 3.1.1. An MQTT 5 one has properties before the
    client id: amqtt misreads the lengths and waits for bytes that never come, so the device
    gets no CONNACK (it gives up at its keep-alive), and the log a bare amqtt line without the
    client id, only then. amqtt's plugin events come after that parse, too late to help.
    """

    def __init__(self, amqtt_config: dict[str, Any], config: EmbeddedBrokerConfig) -> None:
        super().__init__(amqtt_config)
        self._config = config
        self._retained_sends: set[asyncio.Task[None]] = set()
        self.devices_admitted = asyncio.Event()
        if config.admit_devices_at_start:
            self.devices_admitted.set()
        # Replaced before the broadcast loop starts, which reads them from here on.
        self._tasks_queue = _TaskLog()
        self._broadcast_queue = _LastTaken()
        self._subscriptions = _Snapshots()

    async def _initialize_client_session(self, *args: Any) -> tuple[_Handler, Session]:
        handler, session = await super()._initialize_client_session(*args)
        return _Handler.adopt(handler, self._config.service_username), session

    async def _handle_message_delivery(
        self, client_session: Session, handler: Any, wait_deliver: asyncio.Future[Any]
    ) -> bool:
        """Passes a device message's delivery outcome on to its broadcast (see _Handler)."""
        forwards: dict[int, asyncio.Future[bool]] = getattr(handler, "forwards", {})
        forwarded = forwards.pop(id(wait_deliver.result()), None)
        token = _forwarding.set(forwarded)
        try:
            carry_on: bool = await super()._handle_message_delivery(
                client_session, handler, wait_deliver
            )
            # Still set when the message was not broadcast (a topic the device may not use):
            # there is nothing to wait for, and MQTT 3.1.1 cannot refuse it in the PUBACK.
            _resolve(_forwarding.get(), True)
        except BaseException:
            _resolve(forwarded, False)
            raise
        finally:
            _forwarding.reset(token)
        return carry_on

    async def _broadcast_message(
        self,
        session: Session | None,
        topic: str | None,
        data: bytes | bytearray | None,
        force_qos: int | None = None,
    ) -> None:
        forwarded = _forwarding.get()
        if forwarded is None:
            await super()._broadcast_message(session, topic, data, force_qos)
            return
        _forwarding.set(None)  # the broadcast resolves it now
        broadcast: dict[str, Any] = {"session": session, "topic": topic, "data": data}
        if force_qos is not None:
            broadcast["qos"] = force_qos
        broadcast["forwarded"] = forwarded
        await self._broadcast_queue.put(broadcast)

    async def _run_broadcast(self, running_tasks: deque[asyncio.Task[Any]]) -> None:
        """One broadcast; a device message's outcome once its deliveries are done."""
        log_ = self._tasks_queue
        log_.noted = []
        try:
            await super()._run_broadcast(running_tasks)
        except Exception:
            _resolve(self._taken_forward(), False)
            raise
        finally:
            sent, log_.noted = log_.noted, None
        forwarded = self._taken_forward()
        if forwarded is None:
            return
        if not sent:  # no subscriber, or kept for offline sessions
            _resolve(forwarded, True)
            return
        deliveries = asyncio.gather(*sent, return_exceptions=True)
        deliveries.add_done_callback(lambda done: _resolve(forwarded, _all_acknowledged(done)))

    def _taken_forward(self) -> asyncio.Future[bool] | None:
        """The delivery outcome the broadcast taken last carries, if any; once."""
        broadcast, self._broadcast_queue.last = self._broadcast_queue.last, None
        return broadcast.get("forwarded") if broadcast else None

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
        subscribed; sending from a task leaves that iteration nothing to wait for.
        """
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
        send = super()._publish_retained_messages_for_subscription((topic_filter, granted), session)
        task = asyncio.create_task(send)
        self._retained_sends.add(task)
        task.add_done_callback(self._retained_sent)

    def _retained_sent(self, task: asyncio.Task[None]) -> None:
        self._retained_sends.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("embedded broker: retained messages not sent: %s", task.exception())

    async def close_to_devices(self) -> None:
        self.devices_admitted.clear()
        for session, handler in list(self._sessions.values()):
            if session.username == self._config.service_username or handler.writer is None:
                continue
            with contextlib.suppress(Exception):  # already closing
                await handler.writer.close()

    async def _until_devices_admitted(self, connect: bytes) -> None:
        """Holds a client other than the service until devices are admitted (bounded by
        connect_timeout, so that a service that never subscribes shuts no one out)."""
        if self.devices_admitted.is_set():
            return
        if _connect_username(connect) == self._config.service_username:
            return
        try:
            await asyncio.wait_for(self.devices_admitted.wait(), self._config.connect_timeout)
        except TimeoutError:
            log.warning(
                "embedded broker: devices were not admitted within %.0f s; letting one in",
                self._config.connect_timeout,
            )

    async def stream_connected(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, listener_name: str
    ) -> None:
        # Before anyone is authenticated, so bounded in time and size: a connection that
        # never sent its CONNECT was held for good, and one that announced 200 MB had it
        # read into memory (the process held 600 MB after it).
        try:
            packet = await asyncio.wait_for(_first_packet(reader), self._config.connect_timeout)
        except (TimeoutError, _ConnectTooLarge) as exc:
            peer = writer.get_extra_info("peername")
            reason = "no CONNECT in time" if isinstance(exc, TimeoutError) else str(exc)
            log.warning("embedded broker closed a connection from %s: %s", peer, reason)
            writer.close()
            return
        if not packet:
            # Closed before a byte was sent: a TCP health check (a Kubernetes tcpSocket
            # probe, a load balancer). amqtt warned twice about each one.
            log.debug("embedded broker: a connection closed before sending anything")
            writer.close()
            return
        refused = _other_protocol_level(packet)
        if refused is None:
            await self._until_devices_admitted(packet)
            # amqtt parses the CONNECT itself, from its first byte.
            peer = writer.get_extra_info("peername")
            replay = _Replay(reader, packet, self._config.max_packet_size, peer)
            await self.external_connected(replay, StreamWriterAdapter(writer), listener_name)
            return
        level, client_id = refused
        log.warning(
            "embedded broker refused client %r: it connects with %s, and the embedded broker "
            "speaks MQTT 3.1.1 only; connect with MQTT 3.1.1 or configure an external broker "
            "(TWIN_MQTT_URL)",
            client_id,
            _VERSIONS.get(level, f"MQTT protocol level {level}"),
        )
        writer.write(_CONNACK_BAD_VERSION)
        with contextlib.suppress(ConnectionError):  # the device may be gone already
            await writer.drain()
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


#: A CONNECT carries a client id, credentials and a last will: small. Beyond this it is
#: refused unread.
MAX_CONNECT_BYTES = 65_536


class _ConnectTooLarge(Exception):
    pass


async def _first_packet(reader: asyncio.StreamReader) -> bytes:
    """The bytes of the first MQTT packet, or as many as came before the stream ended."""
    data = bytearray()
    try:
        data += await reader.readexactly(1)
        length = shift = 0
        while True:  # the remaining length: 1 to 4 bytes of 7 bits, low ones first
            byte = await reader.readexactly(1)
            data += byte
            length |= (byte[0] & 0x7F) << shift
            shift += 7
            if not byte[0] & 0x80 or shift == 28:
                break
        if length > MAX_CONNECT_BYTES:
            raise _ConnectTooLarge(
                f"a first packet of {length} bytes (a CONNECT may have {MAX_CONNECT_BYTES})"
            )
        data += await reader.readexactly(length)
    except asyncio.IncompleteReadError as exc:
        data += exc.partial
    except ConnectionError:
        pass  # amqtt meets the same end of the stream and says so
    return bytes(data)


def _varint(data: bytes, i: int) -> tuple[int, int]:
    """An MQTT variable byte integer at ``data[i:]``: its value and the index after it."""
    value = shift = 0
    while True:
        byte = data[i]
        value |= (byte & 0x7F) << shift
        i, shift = i + 1, shift + 7
        if not byte & 0x80 or shift == 28:
            return value, i


def _connect_username(packet: bytes) -> str | None:
    """The username of an MQTT 3.1.1 CONNECT, or None (none given, or cut short)."""
    try:
        _, i = _varint(packet, 1)
        i += 2 + int.from_bytes(packet[i : i + 2])  # the protocol name
        flags = packet[i + 1]
        i += 4  # level, flags, keep alive
        fields = 1 + (2 if flags & 0x04 else 0)  # client id, then will topic and message
        for _ in range(fields):
            i += 2 + int.from_bytes(packet[i : i + 2])
        if not flags & 0x80 or i + 2 > len(packet):
            return None
        end = i + 2 + int.from_bytes(packet[i : i + 2])
        return packet[i + 2 : end].decode(errors="replace")
    except IndexError:
        return None


def _other_protocol_level(packet: bytes) -> tuple[int, str] | None:
    """(protocol level, client id) of a CONNECT that is not MQTT 3.1.1, else None."""
    if packet[:1] != b"\x10":
        return None  # not a CONNECT: amqtt refuses it
    try:
        _, i = _varint(packet, 1)
        i += 2 + int.from_bytes(packet[i : i + 2])  # the protocol name
        level = packet[i]
    except IndexError:
        return None  # cut short: amqtt reports it
    if level == 4:
        return None
    client_id = "?"
    with contextlib.suppress(IndexError):
        i += 4  # level, flags, keep alive
        if level == 5:
            properties, i = _varint(packet, i)
            i += properties
        end = i + 2 + int.from_bytes(packet[i : i + 2])
        client_id = packet[i + 2 : end].decode(errors="replace")
    return level, client_id


class _Replay(StreamReaderAdapter):  # type: ignore[misc]  # amqtt is untyped
    """A stream with the bytes already read from it put back in front, that ends the
    connection at a packet larger than ``max_packet``.

    amqtt reads any packet whole, whatever its size: a logged-in device that announced
    100 MB had it read into memory, and handed on to the service. This follows the packets
    as amqtt reads them (each begins with a type byte and its remaining length) and refuses
    one whose length is too large before its body is read, as mosquitto's
    ``max_packet_size`` does.
    """

    def __init__(
        self, reader: asyncio.StreamReader, head: bytes, max_packet: int, peer: object
    ) -> None:
        super().__init__(reader)
        self._head = head
        self._max_packet = max_packet
        self._peer = peer
        self._length = self._shift = 0
        self._in_length = False
        self._body_left = 0

    async def read(self, n: int = -1) -> bytes:
        if not self._head:
            data: bytes = await super().read(n)
        else:
            if n < 0:
                n = len(self._head)
            data, self._head = self._head[:n], self._head[n:]
            if len(data) < n:
                data += await super().read(n - len(data))
        self._follow(data)
        return data

    def _follow(self, data: bytes) -> None:
        i = 0
        while i < len(data):
            if self._body_left:
                step = min(self._body_left, len(data) - i)
                self._body_left -= step
                i += step
            elif not self._in_length:  # a packet's type byte
                self._in_length, self._length, self._shift = True, 0, 0
                i += 1
            else:  # its remaining length: 1 to 4 bytes of 7 bits, low ones first
                byte = data[i]
                i += 1
                self._length |= (byte & 0x7F) << self._shift
                self._shift += 7
                if byte & 0x80 and self._shift < 28:
                    continue
                self._in_length = False
                if self._length > self._max_packet:
                    log.warning(
                        "embedded broker closed a connection from %s: a packet of %d bytes "
                        "(at most %d)",
                        self._peer,
                        self._length,
                        self._max_packet,
                    )
                    # What amqtt meets when a client goes away: it ends the session so.
                    raise ConnectionResetError("packet too large")
                self._body_left = self._length


class EmbeddedBroker:
    """An amqtt broker running on the current event loop."""

    def __init__(self, config: EmbeddedBrokerConfig) -> None:
        self.config = config
        self._broker: Broker | None = None

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
        amqtt_log.addFilter(_without_traceback)  # the reason is in the error raised below
        try:
            await broker.start()
        except BrokerError as exc:  # the port taken, an address not of this host...
            reason = exc.__cause__ or exc
            raise MqttUnavailable(f"The embedded MQTT broker cannot start: {reason}") from exc
        finally:
            amqtt_log.removeFilter(_without_traceback)
        self._broker = broker

    async def stop(self) -> None:
        """Close every connection and the listener. Sessions and retained messages are lost."""
        broker, self._broker = self._broker, None
        if broker is not None:
            await broker.shutdown()

    def admit_devices(self) -> None:
        """Lets devices log in (see EmbeddedBrokerConfig.admit_devices_at_start)."""
        if self._broker is not None:
            self._broker.devices_admitted.set()

    async def close_to_devices(self) -> None:
        """Disconnects every device and holds new logins: for the service's shutdown, before
        it disconnects. A device message that came after that went to the service's offline
        session, was acknowledged to the device, and was lost when the broker stopped."""
        if self._broker is not None:
            await self._broker.close_to_devices()

    @property
    def ready(self) -> bool:
        """True once started and listening (amqtt binds its listeners inside ``start``)."""
        return self._broker is not None and self._broker.transitions.state == "started"
