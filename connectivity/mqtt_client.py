"""An asyncio adapter over paho-mqtt (callback API v2) with manual, ordered acknowledgements.

Why paho's own network thread (``loop_start``) and not ``add_reader``/``add_writer``: paho's
``connect``/``reconnect`` resolve DNS, open the TCP socket and run the TLS handshake
synchronously; in the socket-callback mode those would run on the event loop and block it for
as long as the network stalls. In the thread they cannot. paho's thread also owns keepalive and
the exponential reconnect backoff, so we do not re-implement them. Every paho callback is
marshalled onto the event loop with ``call_soon_threadsafe`` (which keeps arrival order), and
everything else - handlers, bookkeeping, acks - happens on the loop. paho's ``publish``,
``subscribe`` and ``ack`` only enqueue a packet under paho's lock and wake its thread, so
calling them from the loop does not block.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import socket
import time
import weakref
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from connectivity.dispatch import KeyedDispatcher
from connectivity.errors import (
    ConnectRefused,
    InvalidTopic,
    MqttUnavailable,
    NoSubscriber,
    NotConnected,
    PacketTooLarge,
    PublishTimeout,
    Refused,
)
from connectivity.messages import Handler, Health, InboundMessage
from connectivity.options import MqttOptions
from connectivity.topics import TopicFilter, TopicLayout, is_shared, redact_group

log = logging.getLogger(__name__)

#: CONNACK reasons that retrying cannot fix (MQTT 5 codes; paho maps 3.1.1 return codes to them).
_FATAL_CONNACK = frozenset({0x84, 0x85, 0x86, 0x87, 0x8A, 0x8C})
#: MQTT 5 PUBACK reason: accepted, but no subscription matched (the broker dropped it).
_NO_MATCHING_SUBSCRIBERS = 0x10
#: MQTT 5 DISCONNECT reason: another client connected with this client id.
_SESSION_TAKEN_OVER = 0x8E
#: A connection the broker closes sooner than this after accepting it is cut short;
#: ``_CUT_SHORT_TO_NAME`` of them in a row are named in the log and ``/ready``.
_CUT_SHORT_SECONDS = 10.0
#: How soon a caller that started the client raises its fatal refusal, or it is logged.
_REFUSAL_GRACE_SECONDS = 1.0
_CUT_SHORT_TO_NAME = 3
#: At most this many dropped-unhandled messages are remembered (their hashes).
_DROPPED_UNHANDLED_KEPT = 65536
#: How far apart two clients' lost connections may be to count as one event of the broker.
_SIBLING_NEWS_SECONDS = 1.0
#: The started clients of this process (to tell a broker restart from a taken-over session).
_LIVE_CLIENTS: weakref.WeakSet[MqttClient] = weakref.WeakSet()


def _copy_key(msg: InboundMessage) -> int:
    """What identifies a message and the broker's copy of it (``_dropped_unhandled``)."""
    return hash((msg.topic, msg.payload))


@dataclass
class _Subscription:
    qos: int
    handler: Handler
    filter: TopicFilter
    no_local: bool = False


@dataclass(frozen=True)
class _AckToken:
    mid: int
    qos: int
    connection: int


def default_key(topic: str) -> str:
    """Ordering key of the default layout: the twin id, or the whole topic outside it."""
    return TopicLayout().twin_id(topic) or topic


def _properties(packet_type: int) -> Properties:
    return Properties(packet_type)  # type: ignore[no-untyped-call]


def _varint_length(n: int) -> int:
    """Bytes of MQTT's variable byte integer for ``n``."""
    return 1 if n < 128 else 2 if n < 16_384 else 3 if n < 2_097_152 else 4


def publish_packet_size(
    topic: str, payload: bytes, qos: int, protocol: int, properties: Properties | None = None
) -> int:
    """Bytes of the PUBLISH packet for these fields, fixed header included: what a broker's
    packet size limit (mosquitto's ``max_packet_size``, MQTT 5 Maximum Packet Size) counts."""
    rest = 2 + len(topic.encode()) + (2 if qos else 0) + len(payload)
    if protocol == 5:
        rest += len(properties.pack()) if properties is not None else 1  # type: ignore[no-untyped-call]
    return 1 + _varint_length(rest) + rest


def _send_at_once(_client: paho.Client, _userdata: Any, sock: Any) -> None:
    """Turn Nagle's algorithm off on the broker connection (paho leaves it on).

    MQTT is request and answer in small packets: with Nagle, an answer written right after
    the PUBACK of its request waits for the broker's delayed ACK of that PUBACK (40 ms on
    Linux), so every device round trip through the service took over 40 ms more.
    """
    with contextlib.suppress(OSError, AttributeError):  # a socket without TCP options
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class MqttClient:
    """One MQTT session, kept alive for the life of the service.

    Reconnects forever with exponential backoff (paho's), resubscribes when the broker has lost
    the session, and acknowledges each QoS 1 message only after its handler returned, in the
    order the messages arrived. Messages with the same ``key(topic)`` are handled in arrival
    order; different keys run concurrently up to ``options.max_in_flight`` handlers.
    """

    def __init__(self, options: MqttOptions, *, key: Callable[[str], str] = default_key) -> None:
        self.options = options
        self._key = key
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: paho.Client | None = None
        self._subs: dict[str, _Subscription] = {}
        #: Filters handled but not subscribed (:meth:`route`).
        self._routes: dict[str, _Subscription] = {}
        self._received = 0
        #: Message ids of QoS 1 publishes not acknowledged yet (``options.max_unacked_out``).
        self._unacked_out: set[int] = set()
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._stopping: asyncio.Future[None] | None = None
        # Messages first delivered to this process (no DUP flag) whose jobs a lost connection
        # dropped unrun: the broker sends them again flagged as redeliveries, but nobody has
        # handled them, so they are handed over unflagged (a handler may look a flagged one
        # up at length: for a whole backlog after a broker restart, that halved the intake).
        self._dropped_unhandled: OrderedDict[int, bool] = OrderedDict()
        self._dispatcher: KeyedDispatcher[_AckToken] | None = None
        self._connected = False
        self._session_present = False
        self._changed = asyncio.Event()
        self._refusal: ConnectRefused | None = None
        #: MQTT 5: the Maximum Packet Size of the broker's last CONNACK (None: not announced).
        self._broker_max_packet: int | None = None
        #: Callers in wait_connected, which raise a refusal themselves.
        self._waiting = 0
        #: A fatal refusal no caller has raised yet (see _on_connected).
        self._unsaid: ConnectRefused | None = None
        self._last_error: str | None = None
        self._last_error_at: float | None = None  # Unix time
        self._connects = 0
        self._connected_at: float | None = None
        #: Connections in a row the broker closed within _CUT_SHORT_SECONDS.
        self._cut_short = 0
        self._lost_at: float | None = None  # when the last connection ended (monotonic)
        self._named = False  # this run of cut-short connections named a shared client id
        # Incremented on paho's thread at every CONNACK; an ack token from an older connection
        # carries a packet id the broker has reassigned, so it must not be sent.
        self._paho_connection = 0
        self._background: set[asyncio.Task[None]] = set()
        self._parked: list[tuple[InboundMessage, int, int]] = []
        self._connect_listeners: list[Callable[[], Awaitable[None]]] = []
        # Calls from paho's thread, run on the loop in arrival order (see ``_to_loop``).
        self._inbox: deque[tuple[Callable[..., None], tuple[Any, ...]]] = deque()
        self._inbox_woken = False

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Start connecting in the background; see :meth:`wait_connected`."""
        if self._client is not None:
            raise RuntimeError("client already started")
        self._loop = asyncio.get_running_loop()
        self._dispatcher = KeyedDispatcher(self.options.max_in_flight, self._send_ack)
        opts = self.options
        addr = opts.address
        v5 = opts.protocol == 5
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=opts.client_id,
            clean_session=None if v5 else not opts.persistent_session,
            protocol=MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311,
            manual_ack=True,
        )
        if addr.username is not None:
            client.username_pw_set(addr.username, addr.password)
        if addr.tls:
            # Reads certificate files: keep it off the loop.
            await asyncio.to_thread(
                client.tls_set,
                ca_certs=opts.ca_file,
                certfile=opts.cert_file,
                keyfile=opts.key_file,
            )
        if opts.last_will is not None:
            w = opts.last_will
            client.will_set(w.topic, w.payload, w.qos, w.retain)
        # paho types these as int, but only compares and sleeps with them.
        client.reconnect_delay_set(opts.reconnect_min_delay, opts.reconnect_max_delay)  # type: ignore[arg-type]
        client.on_socket_open = _send_at_once
        client.on_connect = self._paho_on_connect
        client.on_connect_fail = self._paho_on_connect_fail
        client.on_disconnect = self._paho_on_disconnect
        client.on_message = self._paho_on_message
        client.on_publish = self._paho_on_publish
        client.on_subscribe = self._paho_on_sub_or_unsuback
        client.on_unsubscribe = self._paho_on_sub_or_unsuback
        properties: Properties | None = None
        clean_start: bool = not opts.persistent_session
        if v5:
            properties = _properties(PacketTypes.CONNECT)
            if opts.persistent_session:
                properties.SessionExpiryInterval = opts.session_expiry
            if opts.max_packet_size is not None:
                properties.MaximumPacketSize = opts.max_packet_size
        self._client = client
        client.connect_async(
            addr.host, addr.port, opts.keepalive, clean_start=clean_start, properties=properties
        )
        client.loop_start()
        _LIVE_CLIENTS.add(self)

    async def stop(self, grace: float = 5.0, *, end_session: bool = False) -> None:
        """Let running handlers finish (up to ``grace`` s), disconnect cleanly and stop.

        Handlers still running after ``grace`` are cancelled; their messages stay unacked and
        the broker redelivers them to the next session with the same client id.
        ``end_session`` (MQTT 5) has the broker discard the session at the disconnect, with
        its subscriptions and whatever it still queues: for a client id that will not come
        back.

        A cancellation of the caller does not cut the stop short: it goes on to the end
        without it. A client left half-stopped stayed connected and reconnected for good;
        with one client id per purpose, it took turns at the session with its successor
        (the retained deltas' reader, whose pass is cancelled at every reconnection).
        """
        if self._stopping is None:
            self._stopping = asyncio.ensure_future(self._stop(grace, end_session))
            self._stopping.add_done_callback(self._stopped)
        await asyncio.shield(self._stopping)

    def _stopped(self, stopping: asyncio.Future[None]) -> None:
        self._stopping = None
        if not stopping.cancelled() and stopping.exception() is not None:
            log.error("stopping the MQTT client failed", exc_info=stopping.exception())

    async def _stop(self, grace: float, end_session: bool) -> None:
        client, dispatcher = self._client, self._dispatcher
        if client is None or dispatcher is None:
            return
        # Messages of a lost connection still waiting for a reconnection's verdict: none comes
        # now, and a kept session has the broker send them to the next process.
        dispatcher.resumed(self._broker_resends_unacked)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(dispatcher.join(), grace)
        await dispatcher.cancel()
        properties: Properties | None = None
        if end_session and self.options.protocol == 5:
            properties = _properties(PacketTypes.DISCONNECT)
            properties.SessionExpiryInterval = 0
        # Not connected from the DISCONNECT on: paho sends nothing more, and a caller that
        # ran while loop_stop was awaited took its refusal for a lost connection (a retire's
        # leaving of the old shared group warned that it failed).
        self._set_connected(False)
        client.disconnect(properties=properties)
        await asyncio.to_thread(client.loop_stop)
        for task in list(self._background):
            task.cancel()
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(NotConnected("client stopped"))
        self._pending.clear()
        self._unacked_out.clear()
        self._set_connected(False)
        self._client = None
        _LIVE_CLIENTS.discard(self)

    @property
    def connected(self) -> bool:
        """Whether a session with the broker is established right now."""
        return self._connected

    @property
    def connections(self) -> int:
        """How many connections the broker has accepted since this client was made (across
        stops and starts): a connect listener tells its connection from a later one by it."""
        return self._connects

    @property
    def session_present(self) -> bool:
        """Whether the broker had a session for this client id at the last connection
        (the CONNACK's session-present flag)."""
        return self._session_present

    async def wait_connected(self, timeout: float) -> None:
        """Wait for a session; raise ConnectRefused if the broker refused us, else NotConnected."""
        self._waiting += 1
        try:
            async with asyncio.timeout(timeout):
                while not self._connected:
                    if self._refusal is not None:
                        self._unsaid = None  # the caller says it its own way
                        raise self._refusal
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            raise NotConnected(
                f"no MQTT session within {timeout}s", description=self._last_error
            ) from None
        finally:
            self._waiting -= 1

    def health(self) -> Health:
        """Connection state, last error and counters."""
        d = self._dispatcher
        return Health(
            connected=self._connected,
            last_error=self._last_error,
            last_error_at=self._last_error_at,
            reconnect_count=max(self._connects - 1, 0),
            handler_failures=d.failures if d else 0,
            pending_acks=d.pending_acks if d else 0,
            received=self._received,
        )

    # -- subscribe / publish -------------------------------------------------------------

    def on_connect(self, listener: Callable[[], Awaitable[None]]) -> None:
        """Run ``listener`` (as a task) after every successful (re)connection."""
        self._connect_listeners.append(listener)

    async def subscribe(
        self, topic_filter: str, qos: int, handler: Handler, *, no_local: bool = False
    ) -> None:
        """Route messages matching ``topic_filter`` to ``handler`` (kept across reconnects).

        ``no_local`` (MQTT 5; not on a shared subscription): the broker does not send back
        what this client publishes itself.

        Call it before :meth:`start` for filters the service always needs: a persistent session
        replays queued messages right after CONNACK. Messages that arrive before a matching
        handler exists are held unacked and handed over when it is subscribed.

        ``$share/<group>/<filter>`` makes a shared subscription (MQTT 5 brokers). When
        connected, waits for the SUBACK and raises :class:`Refused` if the broker said no.
        """
        self._subs[topic_filter] = _Subscription(
            qos, handler, TopicFilter.parse(topic_filter), no_local
        )
        self._routes.pop(topic_filter, None)  # one route per filter: never handled twice
        if self._dispatcher is not None:
            self._release_parked()
        if self._connected:
            await self._send_subscribe([topic_filter])

    def route(self, topic_filter: str, handler: Handler) -> None:
        """Hand messages matching ``topic_filter`` to ``handler`` without subscribing to it:
        the messages a session had queued, which the broker still delivers after an
        UNSUBSCRIBE."""
        self._routes[topic_filter] = _Subscription(1, handler, TopicFilter.parse(topic_filter))
        if self._dispatcher is not None:
            self._release_parked()

    async def unsubscribe(self, topic_filter: str) -> None:
        """Tell the broker, when connected, that ``topic_filter`` is no longer wanted (waits
        for its UNSUBACK): it sends nothing new for the filter, and a shared subscription's
        messages go to the group's other members. The filter is not subscribed again after a
        reconnection; a :meth:`route` for it stays."""
        self._subs.pop(topic_filter, None)
        client = self._client
        if client is None or not self._connected:
            return
        rc, mid = client.unsubscribe(topic_filter)
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
            raise NotConnected(f"unsubscribe failed: {paho.error_string(rc)}")
        fut = self._new_waiter(mid)
        try:
            await asyncio.wait_for(fut, self.options.ack_timeout)
        except TimeoutError:
            raise PublishTimeout(
                f"no UNSUBACK for {redact_group(topic_filter)} within the timeout"
            ) from None
        finally:
            self._pending.pop(mid, None)

    async def publish(
        self,
        topic: str,
        payload: bytes | str,
        qos: int = 1,
        retain: bool = False,
        response_topic: str | None = None,
        correlation_data: bytes | None = None,
        timeout: float | None = None,
        await_ack: bool = True,
        require_subscriber: bool = False,
        resend: bool = True,
    ) -> None:
        """Publish; for QoS 1 return only once the broker sent PUBACK (unless ``await_ack=False``).

        Raises NotConnected when there is no session (ConnectRefused when the broker refused
        the last attempt to get one), PublishTimeout when no PUBACK came within ``timeout``
        (default ``options.ack_timeout``; the message may still be delivered), and Refused
        when an MQTT 5 broker answered with a failure reason code. With
        ``require_subscriber``, NoSubscriber when an MQTT 5 broker said that no one subscribed
        to it (reason code 0x10): the broker dropped it, so the caller should send it again.
        PacketTooLarge, before anything is sent, for a packet over the broker's Maximum
        Packet Size (MQTT 5 CONNACK) or ``options.max_outgoing_packet_size``.

        ``resend=False``: a message this call gives up on (no PUBACK in time, cancelled) is
        taken out of paho's queue, which would otherwise send it again after every
        reconnection, for good: for a caller that sends again itself, or not at all.
        """
        client = self._client
        if client is None or not self._connected:
            # A broker that refused the last CONNECT (credentials removed or rotated) will
            # go on refusing: say that, not a passing loss of the connection.
            raise self._refusal or NotConnected("not connected to the MQTT broker")
        data = payload.encode() if isinstance(payload, str) else payload
        properties: Properties | None = None
        if self.options.protocol == 5 and (response_topic or correlation_data is not None):
            properties = _properties(PacketTypes.PUBLISH)
            if response_topic:
                properties.ResponseTopic = response_topic
            if correlation_data is not None:
                properties.CorrelationData = correlation_data
        self._check_size(topic, data, qos, properties)
        try:
            info = client.publish(topic, data, qos, retain, properties=properties)
        except ValueError as exc:  # paho's checks of the topic and the payload's size
            raise InvalidTopic(f"cannot publish to {topic[:200]!r}: {exc}") from None
        if info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN:
            # paho keeps QoS>0 messages queued for resend; drop our waiter, the caller is told.
            if not resend:
                self._forget(info.mid)
            raise NotConnected("not connected to the MQTT broker")
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise MqttUnavailable(f"publish failed: {paho.error_string(info.rc)}")
        if qos == 0:
            return
        self._unacked_out.add(info.mid)
        if not await_ack and len(self._unacked_out) <= self.options.max_unacked_out:
            return
        # Registered before any await: paho's PUBACK callback reaches us via call_soon_threadsafe,
        # so it cannot run before this line.
        fut = self._new_waiter(info.mid)
        wait = self.options.ack_timeout if timeout is None else timeout
        try:
            reason = await asyncio.wait_for(fut, wait)
        except TimeoutError:
            if not resend:
                self._forget(info.mid)
            if not await_ack:
                return  # still queued in paho: it goes out when the broker takes it
            raise PublishTimeout(f"no PUBACK for {topic!r} within {wait}s") from None
        except asyncio.CancelledError:
            if not resend:
                self._forget(info.mid)
            raise
        finally:
            self._pending.pop(info.mid, None)
        if require_subscriber and reason == _NO_MATCHING_SUBSCRIBERS:
            raise NoSubscriber(f"the broker had no subscriber for {topic!r} and dropped it")

    def _check_size(
        self, topic: str, payload: bytes, qos: int, properties: Properties | None
    ) -> None:
        """Refuse a packet the broker would not take. mosquitto closes the connection of a
        client that sends one, and paho sends it again after every reconnection: one report
        too large left a device reconnecting for good, every later request failing."""
        limits = [self._broker_max_packet, self.options.max_outgoing_packet_size]
        limit = min((n for n in limits if n is not None), default=None)
        if limit is None:
            return
        size = publish_packet_size(topic, payload, qos, self.options.protocol, properties)
        if size > limit:
            whose = (
                "the broker's Maximum Packet Size"
                if limit == self._broker_max_packet
                else "max_outgoing_packet_size"
            )
            raise PacketTooLarge(
                f"a message of {size} bytes to {topic[:200]!r} is over {limit} bytes "
                f"({whose}); not sent",
                extra={"size": size, "limit": limit},
            )

    def _forget(self, mid: int) -> None:
        """Take message ``mid`` out of paho's queue, so it is never sent again.

        paho has no call for one message (``drop_out_messages`` drops all): this does what
        its PUBACK handling does, under the same lock."""
        client = self._client
        if client is None:
            return
        self._unacked_out.discard(mid)
        with client._out_message_mutex:
            msg = client._out_messages.pop(mid, None)
            if msg is None or msg.qos == 0:
                return
            if msg.state != paho.mqtt_ms_queued:  # counted in flight
                client._inflight_messages -= 1
                if client._max_inflight_messages > 0 and self._connected:
                    client._update_inflight()

    # -- internals on the event loop -----------------------------------------------------

    def _new_waiter(self, mid: int) -> asyncio.Future[Any]:
        assert self._loop is not None
        fut: asyncio.Future[Any] = self._loop.create_future()
        self._pending[mid] = fut
        return fut

    async def _send_subscribe(self, filters: list[str]) -> None:
        client = self._client
        if client is None:
            raise NotConnected("client not started")
        topics: list[tuple[str, int | SubscribeOptions]] = [
            (f, self._subscribe_options(self._subs[f])) for f in filters
        ]
        rc, mid = client.subscribe(topics)  # type: ignore[arg-type]
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
            raise NotConnected(f"subscribe failed: {paho.error_string(rc)}")
        fut = self._new_waiter(mid)
        try:
            codes: list[ReasonCode] = await asyncio.wait_for(fut, self.options.ack_timeout)
        except TimeoutError:
            named = [redact_group(f) for f in filters]
            raise PublishTimeout(f"no SUBACK for {named} within the timeout") from None
        finally:
            self._pending.pop(mid, None)
        refused = [f for f, code in zip(filters, codes, strict=False) if code.is_failure]
        if refused:
            raise Refused(f"broker refused subscription to {[redact_group(f) for f in refused]}")

    def _subscribe_options(self, sub: _Subscription) -> int | SubscribeOptions:
        if sub.no_local and self.options.protocol == 5:
            return SubscribeOptions(qos=sub.qos, noLocal=True)
        return sub.qos

    def _say_refusal(self, refusal: ConnectRefused, code: str) -> None:
        if self._unsaid is refusal:
            self._unsaid = None
            log.warning("MQTT connect refused: %s", code)

    def _set_connected(self, value: bool) -> None:
        self._connected = value
        self._changed.set()

    def _on_connected(
        self, session_present: bool, code: ReasonCode, max_packet: int | None = None
    ) -> None:
        if code.is_failure:
            self._record_error(f"CONNACK refused: {code}")
            fatal = code.value in _FATAL_CONNACK
            if not fatal:
                log.warning("MQTT connect refused: %s", code)
            else:
                # A caller waiting for the connection raises a fatal refusal and says it its
                # own way (the simulator printed this line, then its own, for one refusal).
                # One that starts the client and then waits may only begin waiting after
                # the refusal came (on a busy machine): it is logged only if no caller has
                # raised it a moment later.
                self._refusal = self._unsaid = ConnectRefused(
                    f"broker refused the connection: {code}"
                )
                log.debug("MQTT connect refused: %s", code)
                if not self._waiting and self._loop is not None:
                    self._loop.call_later(
                        _REFUSAL_GRACE_SECONDS, self._say_refusal, self._unsaid, str(code)
                    )
            self._changed.set()
            return
        self._connects += 1
        self._broker_max_packet = max_packet
        self._connected_at = time.monotonic()
        if self._dispatcher is not None:
            self._dispatcher.resumed(session_present and self._broker_resends_unacked)
        self._refusal = None
        self._session_present = session_present
        self._set_connected(True)
        log.info(
            "MQTT connected as %s (session present: %s)", self.options.client_id, session_present
        )
        if self._subs and not (session_present and self._connects > 1 and not self._shared()):
            # A new process cannot know which filters an old session held, so it subscribes to
            # all of them once; later, only a lost session needs it again. And a session with
            # shared subscriptions: mosquitto 2.0 restores a session after its own restart but
            # not its shared subscriptions, and until they are back a device's message has no
            # subscriber (acknowledged and dropped; MQTT 5 says so with reason code 0x10). All
            # in one SUBSCRIBE, before anything else, to keep that window short.
            self._spawn(self._after_connect(resubscribe=True))
        else:
            self._spawn(self._after_connect(resubscribe=False))

    @property
    def _broker_resends_unacked(self) -> bool:
        """Whether a session the broker kept brings back what we left unacknowledged."""
        return self.options.persistent_session and self.options.broker_redelivers

    def _shared(self) -> bool:
        return any(is_shared(topic_filter) for topic_filter in self._subs)

    async def _after_connect(self, resubscribe: bool) -> None:
        if resubscribe:
            await self._resubscribe()
        for listener in self._connect_listeners:
            try:
                await listener()
            except Exception:
                log.exception("MQTT on_connect listener failed")

    async def _resubscribe(self) -> None:
        try:
            await self._send_subscribe(list(self._subs))
        except MqttUnavailable as exc:
            if self._client is None:
                return  # stopped meanwhile (a start that failed later on, a quick shutdown)
            self._record_error(f"resubscribe failed: {exc}")
            log.error("MQTT resubscribe failed: %s", exc)

    def _on_disconnected(self, code: ReasonCode | None) -> None:
        connected_at, self._connected_at = self._connected_at, None
        if code is not None and code.is_failure:
            lost_at = self._lost_at = time.monotonic()
            if self._refusal is None:  # paho's disconnect after a refused CONNACK says less
                self._record_error(f"disconnected: {code}")
            if connected_at is not None:
                self._note_closed_by_broker(code, connected_at, lost_at)
        if self._dispatcher is not None:
            self._dispatcher.reset_acks()
        self._parked.clear()
        self._set_connected(False)

    def _note_closed_by_broker(self, code: ReasonCode, connected_at: float, lost_at: float) -> None:
        """Name the likely cause when the broker keeps closing the connection just after
        accepting it. Two clients with one client id take the session from each other
        that way, forever, and each reconnects at once; MQTT 5 brokers say so (reason
        0x8E), but mosquitto 2.0 closes without a reason, so the pattern is what tells."""
        if lost_at - connected_at >= _CUT_SHORT_SECONDS:
            self._cut_short, self._named = 0, False
            return
        self._cut_short += 1
        if code.value == _SESSION_TAKEN_OVER or self._named:
            self._name_shared_client_id(code)
        elif self._cut_short >= _CUT_SHORT_TO_NAME:
            # A broker restarting (a crash loop) closes every connection just as soon, and
            # is back before the first reconnection attempt: then this process's other
            # clients of that broker lose theirs in the same moment, which a taken-over
            # client id does not do. Their news comes through the loop a little later.
            def name_unless_the_broker_went() -> None:
                still = self._cut_short >= _CUT_SHORT_TO_NAME and not self._named
                if still and not self._siblings_lost_at(lost_at):
                    self._name_shared_client_id(code)

            assert self._loop is not None
            self._loop.call_later(_SIBLING_NEWS_SECONDS, name_unless_the_broker_went)

    def _name_shared_client_id(self, code: ReasonCode) -> None:
        self._record_error(
            f"the broker closed {self._cut_short} connection(s) in a row within "
            f"{_CUT_SHORT_SECONDS:g} s of accepting them ({code}): another client may be "
            f"using client id {self.options.client_id!r} (each service replica needs its "
            "own mqtt.client_id), or see the broker's log"
        )
        if not self._named:  # once per run of cut-short connections
            log.error("MQTT: %s", self._last_error)
        self._named = True

    def _siblings_lost_at(self, moment: float) -> bool:
        """Whether another client of this process (another client id) lost its connection
        to the same broker within ``_SIBLING_NEWS_SECONDS`` of ``moment``."""
        here = self.options.address
        return any(
            other.options.client_id != self.options.client_id
            and other._lost_at is not None
            and abs(other._lost_at - moment) <= _SIBLING_NEWS_SECONDS
            and (other.options.address.host, other.options.address.port) == (here.host, here.port)
            for other in list(_LIVE_CLIENTS)
        )

    def _on_message(self, msg: InboundMessage, mid: int, connection: int) -> None:
        self._received += 1
        unhandled = self._dropped_unhandled
        if msg.duplicate and unhandled and unhandled.pop(_copy_key(msg), False):
            msg = dataclasses.replace(msg, duplicate=False)
        handlers = self._handlers_for(msg.topic)
        if not handlers:
            # A persistent session can replay messages before the application subscribed its
            # handler again; keep them (unacked) until a matching subscribe() arrives.
            log.info("MQTT message on %r has no handler yet; parked unacked", msg.topic)
            self._parked.append((msg, mid, connection))
            return
        self._dispatch(msg, mid, connection, handlers)

    def _handlers_for(self, topic: str) -> list[Handler]:
        handlers = [s.handler for s in self._subs.values() if s.filter.matches(topic)]
        if self._routes:
            handlers += [s.handler for s in self._routes.values() if s.filter.matches(topic)]
        return handlers

    def _dispatch(
        self, msg: InboundMessage, mid: int, connection: int, handlers: list[Handler]
    ) -> None:
        assert self._dispatcher is not None
        token = _AckToken(mid, msg.qos, connection) if msg.qos > 0 else None

        async def job() -> None:
            for handler in handlers:
                await handler(msg)

        dropped = None
        if token is not None and not msg.duplicate:
            key = _copy_key(msg)

            def dropped() -> None:
                self._dropped_unhandled[key] = True
                if len(self._dropped_unhandled) > _DROPPED_UNHANDLED_KEPT:
                    self._dropped_unhandled.popitem(last=False)

        self._dispatcher.submit(self._key(msg.topic), job, token, dropped)

    def _release_parked(self) -> None:
        parked, self._parked = self._parked, []
        for msg, mid, connection in parked:
            if connection != self._paho_connection:
                continue  # the broker redelivers it on this connection anyway
            handlers = self._handlers_for(msg.topic)
            if handlers:
                self._dispatch(msg, mid, connection, handlers)
            else:
                self._parked.append((msg, mid, connection))

    def _send_ack(self, token: _AckToken) -> None:
        client = self._client
        if client is not None and token.connection == self._paho_connection:
            client.ack(token.mid, token.qos)

    def _resolve(self, mid: int, result: Any, error: Exception | None) -> None:
        fut = self._pending.get(mid)
        if fut is None or fut.done():
            return
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(result)

    def _spawn(self, coro: Any) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _to_loop(self, fn: Callable[..., None], *args: Any) -> None:
        """Run ``fn(*args)`` on the loop (called on paho's thread).

        Under load, messages arrive faster than the loop turns: one wake-up (a write to the
        loop's self-pipe) serves every call queued until the loop gets to it, instead of
        one per message.
        """
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        self._inbox.append((fn, args))
        if not self._inbox_woken:
            self._inbox_woken = True
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._drain_inbox)

    def _drain_inbox(self) -> None:
        # Cleared before draining: a call queued from here on sees False and wakes the loop
        # again, so nothing is left behind. Only what is queued now runs in this turn, so a
        # steady stream of messages cannot keep the loop from everything else.
        self._inbox_woken = False
        inbox = self._inbox
        for _ in range(len(inbox)):
            fn, args = inbox.popleft()
            try:
                fn(*args)
            except Exception:  # one bad callback must not strand the calls behind it
                log.exception("MQTT callback %r failed", fn)

    # -- paho callbacks: run on paho's thread, only marshal to the loop --------------------

    def _paho_on_connect(
        self,
        _c: paho.Client,
        _u: Any,
        flags: paho.ConnectFlags,
        code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if not code.is_failure:
            self._paho_connection += 1
        max_packet = getattr(properties, "MaximumPacketSize", None) if properties else None
        self._to_loop(self._on_connected, flags.session_present, code, max_packet)

    def _paho_on_connect_fail(self, _c: paho.Client, _u: Any) -> None:
        self._to_loop(self._on_unreachable)

    def _on_unreachable(self) -> None:
        # A broker that is down (restarting) is no client taking the session over: a
        # taken-over client gets back in at its first attempt.
        self._cut_short, self._named = 0, False
        self._record_error("could not reach the broker")

    def _record_error(self, text: str) -> None:
        self._last_error = text
        # When: a connection that has been up for an hour since reads the same otherwise.
        self._last_error_at = time.time()
        self._changed.set()

    def _paho_on_disconnect(
        self, _c: paho.Client, _u: Any, _f: paho.DisconnectFlags, code: ReasonCode, _p: Any
    ) -> None:
        self._to_loop(self._on_disconnected, code)

    def _paho_on_message(self, _c: paho.Client, _u: Any, m: paho.MQTTMessage) -> None:
        props = getattr(m, "properties", None)
        response_topic = getattr(props, "ResponseTopic", None) if props else None
        correlation = getattr(props, "CorrelationData", None) if props else None
        user_props = tuple(getattr(props, "UserProperty", ()) or ()) if props else ()
        msg = InboundMessage(
            topic=m.topic,
            payload=bytes(m.payload),
            qos=m.qos,
            retain=bool(m.retain),
            duplicate=bool(m.dup),
            response_topic=response_topic,
            correlation_data=bytes(correlation) if correlation is not None else None,
            user_properties=tuple((str(k), str(v)) for k, v in user_props),
        )
        self._to_loop(self._on_message, msg, m.mid, self._paho_connection)

    def _paho_on_publish(
        self, _c: paho.Client, _u: Any, mid: int, code: ReasonCode, _p: Any
    ) -> None:
        error = Refused(f"broker refused the publish: {code}") if code.is_failure else None
        self._to_loop(self._on_published, mid, code.value, error)

    def _on_published(self, mid: int, reason: int, error: Exception | None) -> None:
        self._unacked_out.discard(mid)  # paho calls this for QoS 0 sends too
        self._resolve(mid, reason, error)

    def _paho_on_sub_or_unsuback(
        self, _c: paho.Client, _u: Any, mid: int, codes: list[ReasonCode], _p: Any
    ) -> None:
        self._to_loop(self._resolve, mid, list(codes), None)
