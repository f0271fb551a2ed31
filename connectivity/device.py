"""A small asyncio client library for devices, on top of :class:`MqttClient`.

On every (re)connection it publishes ``online`` (retained) on its status topic, whose last
will is a retained ``offline``, and asks for the full twin with ``get`` - a device must not rely
on deltas alone after being away. Deltas arrive on :attr:`DeviceClient.deltas`; those that
come on a connection before its ``get`` has answered are held back, since a persistent session
replays deltas the service has since withdrawn (:mod:`connectivity.device_deltas`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from connectivity.credentials import mqtt_username
from connectivity.device_deltas import DeltaMessage, delta_after_get, fetch_again, older
from connectivity.errors import MqttUnavailable, NotConnected, RequestRejected
from connectivity.interrupt import unless_set
from connectivity.messages import InboundMessage
from connectivity.mqtt_client import MqttClient
from connectivity.options import LastWill, MqttOptions
from connectivity.topics import DEFAULT_PREFIX, TopicLayout

log = logging.getLogger(__name__)

_REPLIES = ("reported/update/accepted", "reported/update/rejected", "get/accepted", "get/rejected")
#: The service rejects a longer clientToken without echoing it, so no answer would match.
MAX_CLIENT_TOKEN_BYTES = 64


@dataclass(frozen=True)
class DeviceConfig:
    """How a device reaches the service. ``username`` defaults to :func:`mqtt_username`."""

    url: str
    twin_id: str
    password: str = field(repr=False)
    topic_prefix: str = DEFAULT_PREFIX
    protocol: Literal[5, 4] = 5
    client_id: str | None = None
    username: str | None = None
    keepalive: int = 30
    reconnect_min_delay: float = 0.5
    reconnect_max_delay: float = 60.0
    request_timeout: float = 10.0
    #: How long a request is sent again, with the same clientToken, after an outcome that a
    #: later attempt may change (see :func:`worth_sending_again`); 0 sends it once.
    retry_for: float = 30.0
    retry_min_delay: float = 0.25
    retry_max_delay: float = 4.0
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    #: The largest MQTT packet a request may take (bytes); a larger one raises
    #: :class:`PacketTooLarge` unsent. The shipped brokers close the connection of a device
    #: that sends more than 2 MiB. An MQTT 5 broker's own Maximum Packet Size applies too.
    max_packet_size: int | None = 2 * 1024 * 1024

    def __post_init__(self) -> None:
        # A retry_min_delay of 0 sent a request again in a busy loop while the broker was away.
        if not 0 < self.retry_min_delay <= self.retry_max_delay:
            raise ValueError(
                f"retry_min_delay ({self.retry_min_delay}) must be over 0 and at most "
                f"retry_max_delay ({self.retry_max_delay})"
            )
        if self.retry_for < 0:
            raise ValueError(f"retry_for ({self.retry_for}) must be 0 or more")


class DeviceClient:
    """One device's connection to its twin."""

    def __init__(self, config: DeviceConfig) -> None:
        self.config = config
        self.layout = TopicLayout(config.topic_prefix)
        self.base = self.layout.base(config.twin_id)
        #: The delta messages (``{"state": {...}, "desiredVersion": n}``) not yet superseded,
        #: in arrival order. A cleared delta (empty payload, nothing left to apply) empties the
        #: queue, and a delta older than the ``desiredVersion`` of the last :meth:`get` is
        #: dropped. After each (re)connection nothing is added until the twin is fetched; then
        #: the queue holds at most the twin's current delta (or a later one that came
        #: meanwhile): a persistent session first delivers the deltas it queued while the
        #: device was away, and the app must never get one the service has since withdrawn.
        self.deltas: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        #: The last ``get/accepted`` document, refreshed on every reconnection.
        self.twin: dict[str, Any] | None = None
        self._waiters: dict[str, asyncio.Future[dict[str, Any]]] = {}
        #: The connection (``MqttClient.connections``) whose twin fetch has settled; until the
        #: current one's has, deltas go to ``_held`` (None for a cleared one).
        self._settled = 0
        self._held: list[DeltaMessage] = []
        #: Set while the client is not started (stopped, or start() failed): ends a start()
        #: still connecting, and requests' retries; requests raise NotConnected(_why_down).
        self._stopping = asyncio.Event()
        self._stopping.set()
        self._why_down = "client not started: call start() first"
        self._subscribed = asyncio.Event()
        self._listening = False
        self._client = MqttClient(
            MqttOptions(
                url=config.url,
                client_id=config.client_id or config.twin_id,
                protocol=config.protocol,
                keepalive=config.keepalive,
                reconnect_min_delay=config.reconnect_min_delay,
                reconnect_max_delay=config.reconnect_max_delay,
                ack_timeout=config.request_timeout,
                username=config.username or mqtt_username(config.twin_id),
                password=config.password,
                ca_file=config.ca_file,
                cert_file=config.cert_file,
                key_file=config.key_file,
                last_will=LastWill(self.topic("status"), b"offline", qos=1, retain=True),
                max_outgoing_packet_size=config.max_packet_size,
            ),
            key=lambda _topic: config.twin_id,
        )

    def topic(self, suffix: str) -> str:
        """This device's topic ``<prefix>/<suffix>``."""
        return f"{self.base}/{suffix}"

    @property
    def mqtt(self) -> MqttClient:
        """The underlying client (health, connection state)."""
        return self._client

    async def start(self, timeout: float = 30.0) -> None:
        """Connect and subscribe; then, in the background, announce ``online`` and fetch the
        twin (:attr:`twin`).

        Raises :class:`ConnectRefused` or :class:`NotConnected` (nothing within ``timeout``)
        with the client stopped: a client left connecting in the background took the
        device's client id from the next one, and the two took turns at the session;
        :class:`NotConnected` too when :meth:`stop` is called meanwhile. A stopped client
        may be started again."""
        self._stopping.clear()
        self._subscribed.clear()
        await self._client.subscribe(self.topic("delta"), 1, self._on_delta)
        for suffix in _REPLIES:
            await self._client.subscribe(self.topic(suffix), 1, self._on_reply)
        if not self._listening:  # once: a second listener fetched the twin twice
            self._client.on_connect(self._announce)
            self._listening = True
        await self._client.start()
        try:
            await self._unless_stopped(self._client.wait_connected(timeout))
            try:
                # Connected is not yet subscribed: an answer to a request sent before the
                # broker took the subscriptions would go nowhere.
                await self._unless_stopped(asyncio.wait_for(self._subscribed.wait(), timeout))
            except TimeoutError:
                raise NotConnected(
                    f"the broker did not acknowledge the subscriptions within {timeout}s"
                ) from None
        except BaseException as exc:
            # Stopped for requests too: they took it for a lost connection and sent again for
            # retry_for (30 s) before NotConnected.
            if not self._stopping.is_set():
                cause = f": {exc}" if str(exc) else f" ({type(exc).__name__})"
                self._down(f"client stopped: start() failed{cause}")
            await self._client.stop(grace=0)
            raise

    def _down(self, why: str) -> None:
        """Mark the client not started; requests raise :class:`NotConnected` with ``why``."""
        self._why_down = why
        self._stopping.set()

    async def _unless_stopped(self, step: Awaitable[object]) -> None:
        """Await ``step``; raise :class:`NotConnected` instead once :meth:`stop` is called."""
        if not await unless_set(step, self._stopping):
            raise NotConnected(self._why_down)

    async def stop(self) -> None:
        """Publish ``offline`` (retained) and disconnect. Requests still waiting for an answer,
        and a :meth:`start` still connecting, raise :class:`NotConnected`."""
        self._down("client stopped")
        if self._client.connected:
            try:
                await self._client.publish(self.topic("status"), b"offline", retain=True)
            except Exception as exc:  # best effort: the broker's last will is not sent now
                log.warning("could not publish offline status: %s", exc)
        await self._client.stop()
        for fut in self._waiters.values():
            if not fut.done():
                fut.set_exception(NotConnected("client stopped"))

    async def get(self, timeout: float | None = None) -> dict[str, Any]:
        """Request the full twin; returns the ``get/accepted`` body."""
        body = await self._request("get", {}, timeout)
        self.twin = body
        self._keep_deltas(lambda delta: not older(delta, body))
        return body

    async def report(
        self,
        state: dict[str, Any],
        desired_version: int | None = None,
        client_token: str | None = None,
        rejected: dict[str, str] | None = None,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """Report state; returns the accepted body or raises :class:`RequestRejected`, or
        an :class:`MqttUnavailable` or ``TimeoutError`` when no answer came.
        :class:`PacketTooLarge` (nothing sent) for a report over ``config.max_packet_size``
        or the broker's limit (the report goes out as compact UTF-8 JSON); ``ValueError`` (nothing
        sent) for a ``client_token`` over 64 bytes of UTF-8 or a value JSON cannot carry (NaN).

        An outcome that a later attempt may change is retried for ``config.retry_for``
        seconds with the same clientToken, which the service applies once however often it
        arrives: a ``twin.contention`` rejection, no subscriber (MQTT 5: the service is not
        subscribed yet after a broker restart), no connection, and no answer in time; not a
        broker's refusal of the device's credentials (:class:`ConnectRefused`), raised at once.
        :class:`NotConnected` at once from a client not started, stopped, or whose
        :meth:`start` failed.

        ``desired_version`` says which desired version the device has applied; ``rejected`` maps
        JSON pointers of desired values the device refuses to apply to reasons.
        """
        body: dict[str, Any] = {"state": state}
        if desired_version is not None:
            body["desiredVersion"] = desired_version
        if rejected:
            body["rejected"] = rejected
        return await self._request("reported/update", body, timeout, client_token)

    async def update_live(self, values: dict[str, Any]) -> None:
        """Send live (not persisted as reported) values at QoS 1, without waiting for an answer.

        Raises :class:`NoSubscriber` when the broker took it with no one subscribed (MQTT 5):
        send it again."""
        await self._client.publish(
            self.topic("live/update"), encode_json(values), require_subscriber=True
        )

    async def _request(
        self, suffix: str, body: dict[str, Any], timeout: float | None, token: str | None = None
    ) -> dict[str, Any]:
        # One token for every attempt: the service applies a report once however often it
        # comes, and an answer to an earlier attempt answers this one as well.
        token = token or uuid.uuid4().hex
        if len(token.encode()) > MAX_CLIENT_TOKEN_BYTES:
            raise ValueError(
                f"clientToken is {len(token.encode())} bytes of UTF-8, over the service's "
                f"{MAX_CLIENT_TOKEN_BYTES}"
            )
        body = {**body, "clientToken": token}
        payload = encode_json(body)
        if self._stopping.is_set():
            raise NotConnected(self._why_down)
        loop = asyncio.get_running_loop()
        give_up = loop.time() + self.config.retry_for
        delay = self.config.retry_min_delay
        while True:
            try:
                return await self._send(suffix, token, payload, timeout)
            except Exception as exc:
                again = worth_sending_again(exc) and not self._stopping.is_set()
                if not again or loop.time() + delay > give_up:
                    raise
                log.info("sending %s again in %.2f s: %s", suffix, delay, exc)
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, self.config.retry_max_delay)

    async def _send(
        self, suffix: str, token: str, payload: bytes, timeout: float | None
    ) -> dict[str, Any]:
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiters[token] = fut
        try:
            # No subscriber (the service's subscription not back yet after a broker restart):
            # the broker dropped it, and NoSubscriber says so now rather than a timeout later.
            # Not resent by paho: _request sends it again itself, or gives up on it for good.
            await self._client.publish(
                self.topic(suffix),
                payload,
                require_subscriber=True,
                resend=False,
            )
            wait = self.config.request_timeout if timeout is None else timeout
            return await asyncio.wait_for(fut, wait)
        finally:
            self._waiters.pop(token, None)

    async def _announce(self) -> None:
        # The client runs its connect listeners once its subscriptions are acknowledged.
        connection = self._client.connections
        self._subscribed.set()
        twin = None
        try:
            await self._client.publish(self.topic("status"), b"online", retain=True)
            twin = await self.get()
            if fetch_again(self._held, twin):
                # A cleared delta held may have withdrawn the answer's: ask once more.
                twin = None
                twin = await self.get()
        except (MqttUnavailable, RequestRejected, TimeoutError) as exc:
            # The app gets the newest delta held; the next connection fetches the twin again.
            log.warning("could not fetch the twin after connecting: %s", exc)
        finally:
            self._settle(connection, twin)

    def _settle(self, connection: int, twin: dict[str, Any] | None) -> None:
        """Hand the app the one delta the deltas held since ``connection`` began and the
        twin fetched on it (None: not fetched) leave standing; nothing when a later
        connection has begun meanwhile: its own fetch decides."""
        if connection != self._client.connections:
            return
        held, self._held = self._held, []
        self._settled = connection
        if twin is None and not held:
            return  # nothing new: the queue stands
        delta = delta_after_get(held, twin)
        # A delta is the whole delta: the current one outdates everything queued before it.
        self._keep_deltas(lambda _delta: False)
        if delta is not None and not (self.twin is not None and older(delta, self.twin)):
            self.deltas.put_nowait(delta)

    async def _on_delta(self, msg: InboundMessage) -> None:
        body = _json(msg) if msg.payload else None
        if msg.payload and body is None:
            return
        if self._settled != self._client.connections:
            # Maybe replayed by the persistent session and withdrawn since: held until the
            # twin fetched on this connection says (the app waiting in deltas.get() took the
            # first of them before the cleared delta that followed could withdraw it).
            self._held.append(body)
        elif body is None:
            # The service cleared the delta: every earlier one is withdrawn.
            self._keep_deltas(lambda _delta: False)
        elif not (self.twin is not None and older(body, self.twin)):
            self.deltas.put_nowait(body)

    def _keep_deltas(self, keep: Callable[[dict[str, Any]], bool]) -> None:
        """Drop the queued deltas ``keep`` refuses, keeping the others in order."""
        queued = [self.deltas.get_nowait() for _ in range(self.deltas.qsize())]
        for delta in queued:
            if keep(delta):
                self.deltas.put_nowait(delta)

    async def _on_reply(self, msg: InboundMessage) -> None:
        body = _json(msg)
        if body is None:
            return
        fut = self._waiters.get(str(body.get("clientToken")))
        if fut is None or fut.done():
            return  # a reply to someone else's request, or one we stopped waiting for
        if msg.topic.endswith("/rejected"):
            fut.set_exception(RequestRejected(body))
        else:
            fut.set_result(body)


def worth_sending_again(exc: BaseException) -> bool:
    """Whether a request that ended in ``exc`` may get another outcome if sent again."""
    if isinstance(exc, RequestRejected):
        # The twin was busy; every other rejection is about the request itself.
        return exc.code == "twin.contention"
    if isinstance(exc, MqttUnavailable):
        return exc.retry_after_seconds is not None  # not a refusal by the broker's ACL
    return isinstance(exc, TimeoutError)


def encode_json(body: dict[str, Any]) -> bytes:
    """``body`` as compact UTF-8 JSON: json.dumps' defaults escape every non-ASCII character
    (an emoji took 12 bytes, not 4) against the packet limits, and write ``NaN``, not JSON.

    Raises ``ValueError`` for a value JSON cannot carry (NaN, infinity, a non-JSON type)."""
    try:
        text = json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"not JSON: {exc}") from None
    return text.encode()


def _json(msg: InboundMessage) -> dict[str, Any] | None:
    try:
        body = json.loads(msg.payload)
    except ValueError:
        log.warning("ignoring non-JSON message on %s", msg.topic)
        return None
    return body if isinstance(body, dict) else None
