"""QoS 1 and 2 acknowledged end to end on the embedded broker (amqtt 0.12).

amqtt acknowledges a PUBLISH as soon as it has read it and keeps it in memory, which here is
the service's process: a crash lost reports the devices had been told were delivered. With
:class:`EndToEndAcks`, a device's message is acknowledged once every subscriber it went to
has acknowledged it (the service does after its commit); see :class:`AckingHandler`.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
from collections import deque
from collections.abc import Coroutine, Iterator
from typing import Any

from amqtt.broker import Broker, RetainedApplicationMessage
from amqtt.mqtt.constants import QOS_1, QOS_2
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.mqtt.puback import PubackPacket
from amqtt.mqtt.pubcomp import PubcompPacket
from amqtt.mqtt.pubrec import PubrecPacket
from amqtt.session import (
    INCOMING,
    OUTGOING,
    IncomingApplicationMessage,
    OutgoingApplicationMessage,
    Session,
)

from connectivity.broker_log import Tally, log
from connectivity.broker_packets import InFlight, PacketReader


def hold_until_done(
    tasks: set[asyncio.Task[None]], task: asyncio.Task[None], failed: str, level: int
) -> None:
    """Keeps a fire-and-forget ``task`` referenced in ``tasks`` until it is done (the loop
    holds only weak references to tasks) and logs how it failed, if it did, at ``level``."""
    tasks.add(task)

    def done(task: asyncio.Task[None]) -> None:
        tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.log(level, "embedded broker: %s: %r", failed, task.exception())

    task.add_done_callback(done)


#: QoS 2 messages of one session delivered and waiting for their PUBREL, with the messages
#: of its connection being delivered; one more ends the connection. A client sends PUBREL
#: as soon as it has the PUBREC: one that does not would have the broker keep an entry for
#: each of 65,535 packet ids (amqtt kept each message whole: 20,000 held 75 MB).
MAX_UNRELEASED = 1000


#: The device message whose delivery the broker is handling in this task (see AckingHandler).
_forwarding: contextvars.ContextVar[asyncio.Future[bool] | None] = contextvars.ContextVar(
    "_forwarding", default=None
)
#: The sequence number of the broadcast whose deliveries this task is making (see
#: EndToEndAcks.published); None outside the broadcast loop.
_broadcasting: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "_broadcasting", default=None
)
#: Whether a device waits for the outcome of the broadcast whose deliveries this task makes
#: (its PUBACK or PUBREC does: see AckingHandler).
_awaited: contextvars.ContextVar[bool] = contextvars.ContextVar("_awaited", default=False)


class RetainedSent:
    """The retained copies sent to one session for new subscriptions while the broadcast loop
    had not yet delivered every older broadcast of their topics: topic -> the copy's broadcast
    sequence number, and the largest of them.

    The broker retains a message when it queues its broadcast, and the broadcast loop may lag
    far behind (a publisher's PUBACK does not wait for it): a client subscribing then got the
    newest delta retained, then the older ones live, which the device protocol forbids (a
    test saw 174 of 180 subscriptions so). Those older broadcasts are not delivered to the
    session: they were published before the subscription was made, and the retained copy
    holds what they said. The retained copy itself is never older than a live message that
    went out before it (it is read when the subscription is made, and retaining happens with
    the queueing), so it is always sent.

    Kept with the session, not its connection: the connection may end before the older
    broadcasts are delivered, and they were then queued for the offline session and sent,
    after the retained copy, when it resumed (a test saw delta 65 retained, then 4 to 64).
    """

    def __init__(self) -> None:
        self.newest: dict[str, int] = {}
        self.newest_max = 0

    def sent(self, topic: str, seq: int) -> None:
        """Notes the retained copy of broadcast ``seq`` sent for ``topic``."""
        self.newest[topic] = max(seq, self.newest.get(topic, 0))
        self.newest_max = max(seq, self.newest_max)

    def supersedes(self, topic: str, seq: int) -> bool:
        """Whether broadcast ``seq`` is older than the retained copy sent for its topic (the
        session is not to get it). Asked of every broadcast to the session, in order."""
        if not self.newest:
            return False
        if seq > self.newest_max:  # broadcasts come in order: no older one is left
            self.newest.clear()
            return False
        kept = self.newest.get(topic)
        if kept is None:
            return False
        if seq < kept:
            return True
        del self.newest[topic]
        return False


def retained_sent_to(session: Session) -> RetainedSent:
    """The session's :class:`RetainedSent`."""
    record: RetainedSent | None = getattr(session, "retained_sent", None)
    if record is None:
        record = session.retained_sent = RetainedSent()
    return record


class AckingHandler(BrokerProtocolHandler):  # type: ignore[misc]  # amqtt is untyped
    """amqtt's connection handler, with QoS 1 and 2 acknowledged end to end.

    amqtt acknowledges a PUBLISH as soon as it has read it, and keeps it only in memory until
    the subscribers have it. Here that memory is the service's process: a crash between the
    device's PUBACK and the service's commit lost the report, though the device had been told
    it was delivered. A device's PUBACK now waits until every subscriber the message went to
    acknowledged it (the service does so after the commit), so until then the device keeps
    the message and sends it again after a reconnect. This also holds each device back to
    its own in-flight window: amqtt otherwise read whatever devices sent and queued it.

    The other change: amqtt gave a subscriber 5 s for its PUBACK and then forgot the message
    (with a warning per message). The service acknowledges after its commit, which under a
    burst of reports can take longer; it now gets as long as its connection lasts. A device
    gets as long too, for at most ``max_unacked_out`` messages: past that, what the broker
    would send it is dropped (a device that never acknowledged had every answer and delta
    held for it, a task each, as long as it stayed connected). And a QoS 1 message still
    unacknowledged when the connection ends stays with a persistent session, and is sent
    again (DUP set, the same packet id) when it resumes (see :meth:`_retry_deliveries`); what
    was held for it (see :meth:`mqtt_publish`), or is delivered once its connection has
    ended, waits in its queue (see :meth:`_kept`).
    """

    #: The service account, whose own publishes are acknowledged at once.
    service_username: str
    #: Delivery outcome of each device message not yet handed to the broadcast, by id().
    forwards: dict[int, asyncio.Future[bool]]
    #: Whether this handler closed its connection (the flows under way then end quietly).
    hung_up: bool
    #: Messages sent to a device and not acknowledged that the broker holds; one more is
    #: dropped, and noted in ``dropped_out``. Also (``max_queued``) what an offline session
    #: of a device keeps; past it the oldest go, noted in ``dropped_kept``.
    max_unacked_out: int
    dropped_out: Tally
    dropped_kept: Tally
    #: While not None, deliveries wait here (see :meth:`mqtt_publish`): what to send,
    #: whether a device waits for its outcome, and the future that gets the task sending it.
    held: list[tuple[_Publish, bool, asyncio.Future[asyncio.Task[Any]]]] | None
    #: Whether the connection has ended (its flows are stopped): a delivery made now is
    #: not sent, and waits in the session for its resume.
    ended: bool
    #: Sends of what a resumed session had in flight (see :meth:`_retry_deliveries`).
    retries: set[asyncio.Task[None]]

    @classmethod
    def adopt(
        cls,
        handler: BrokerProtocolHandler,
        service_username: str,
        max_unacked_out: int,
        dropped_out: Tally,
        dropped_kept: Tally,
    ) -> AckingHandler:
        """Makes amqtt's handler one of these: amqtt builds it in a class method of its own
        class, with no way to pass another (its ``_init_handler`` is never called)."""
        handler.__class__ = cls
        handler.service_username = service_username
        handler.forwards = {}
        handler.hung_up = False
        handler.max_unacked_out = max_unacked_out
        handler.dropped_out = dropped_out
        handler.dropped_kept = dropped_kept
        handler.held = []
        handler.ended = False
        handler.retries = set()
        return handler  # type: ignore[no-any-return]

    def mqtt_publish(
        self, topic: str, data: bytes | bytearray, qos: int | None, retain: bool
    ) -> Coroutine[Any, Any, Any]:
        """amqtt's, held back until :meth:`let_through` while the session's queue is sent.

        The session is connected (and deliveries come here) before the broker sends what it
        queued for it: a delivery made meanwhile overtook the whole backlog, and a device
        resuming its session got the newest delta, then older ones. Each send writes its
        PUBLISH in the order its task starts, which is the order the tasks are made: so the
        held ones are made by let_through, after the backlog's, and the rest here, when amqtt
        calls this to make the task. MQTT asks for this order (4.6).

        A broadcast older than the retained copy already sent for its topic to the session is
        not sent (see :class:`RetainedSent`). One
        made once the connection has ended waits in the session's queue for its resume, as
        if the session were offline (see :meth:`_kept`): amqtt sees the session connected
        until its message loop has handled the end.
        """
        seq = _broadcasting.get()
        if seq is not None and retained_sent_to(self.session).supersedes(topic, seq):
            return _nothing()
        publish = (topic, data, qos, retain)
        if self.ended:
            return _nothing() if self._kept(publish, _awaited.get()) else _not_sent()
        if self.held is None:
            return self.mqtt_publish_now(*publish)
        started: asyncio.Future[asyncio.Task[Any]] = asyncio.get_running_loop().create_future()
        self.held.append((publish, _awaited.get(), started))
        return _outcome(started)

    async def mqtt_publish_now(
        self, topic: str, data: bytes | bytearray, qos: int | None, retain: bool
    ) -> Any:
        """amqtt's mqtt_publish, not held back."""
        return await super().mqtt_publish(topic, data, qos, retain)

    def let_through(self, backlog: list[_Publish]) -> list[asyncio.Task[Any]]:
        """Starts sending ``backlog``, then what was held, in order; sends the rest as it
        comes from now on. The backlog's tasks."""
        sends = [asyncio.ensure_future(self.mqtt_publish_now(*publish)) for publish in backlog]
        held, self.held = self.held or [], None
        for publish, _, started in held:
            if not started.done():
                started.set_result(asyncio.ensure_future(self.mqtt_publish_now(*publish)))
        return sends

    def _kept(self, publish: _Publish, awaited: bool) -> bool:
        """Puts a delivery this connection will not send on its session's queue, behind
        what is queued there, as the broker queues one for an offline session
        (``Broker._run_broadcast``); whether it did.

        Those held while the session's queue was to be sent were lost when the connection
        ended then, though the queue itself was kept. Queued, they keep their order: those
        still queued go before them, and whatever comes later after. A device's session
        keeps the newest ``max_queued`` (see :func:`keep_newest`).

        Not kept: anything for a clean or anonymous session, or at QoS 0 (as amqtt queues
        nothing of these for an offline session); nor a message a device waits on for a
        session of the service, which, kept only in this process, would be acknowledged to
        the device: it is not, and the device sends it again (as EndToEndAcks does for the
        keeper).
        """
        session = self.session
        topic, data, qos, _ = publish
        device = self._is_device()
        if session.clean_session or session.is_anonymous or qos not in (QOS_1, QOS_2):
            return False
        if awaited and not device:
            return False
        session.retained_messages.put_nowait(RetainedApplicationMessage(None, topic, data, qos))
        dropped = keep_newest(session, self.max_unacked_out) if device else 0
        if dropped:
            self.dropped_kept.note(self.max_unacked_out, session.client_id, count=dropped)
        return True

    def _is_device(self) -> bool:
        """Whether this is a device's connection (the service account's flows are amqtt's)."""
        return bool(self.session.username != self.service_username)

    def _from_device(self, app_message: Any) -> bool:
        """Whether ``app_message`` is one a device sent in."""
        return app_message.direction == INCOMING and self._is_device()

    async def _handle_qos1_message_flow(self, app_message: Any) -> None:
        if app_message.direction == OUTGOING:
            await self._send_and_wait_for_puback(app_message)
            return
        if not self._from_device(app_message):
            await super()._handle_qos1_message_flow(app_message)
            return
        if not await self._forwarded(app_message):
            return
        puback = PubackPacket.build(app_message.packet_id)
        await self._send_packet(puback)
        app_message.puback_packet = puback

    async def _handle_qos2_message_flow(self, app_message: Any) -> None:
        """A device's QoS 2 message gets its PUBREC once every subscriber acknowledged it,
        as a QoS 1 one gets its PUBACK.

        amqtt sent PUBREC on receipt and delivered after the PUBREL: a crash of the service
        before its commit lost a message the device had been told the broker owned. A
        PUBLISH with a packet id whose PUBREL has not come yet (sent again after its PUBREC
        was lost with a connection), and amqtt's own retry of the exchange after a
        reconnect, get their PUBREC again and are not delivered twice [MQTT-4.3.3-2].
        """
        if not self._from_device(app_message):
            await super()._handle_qos2_message_flow(app_message)
            return
        packet_id = app_message.packet_id
        unreleased = self.session.inflight_in
        if packet_id not in unreleased:
            in_flight = self._in_flight()
            forwarding = 0 if in_flight is None else in_flight.count
            if len(unreleased) + forwarding >= MAX_UNRELEASED:
                if self.hung_up:  # another flow of this connection met the bound first
                    return
                log.warning(
                    "embedded broker closed the connection of %r: %d messages wait for "
                    "their PUBREL or are being delivered (at most %d)",
                    self.session.client_id,
                    len(unreleased) + forwarding,
                    MAX_UNRELEASED,
                )
                await self._hang_up()
                return
            if not await self._forwarded(app_message):
                return
            # Kept until its PUBREL for the packet id only: not the payload.
            unreleased[packet_id] = IncomingApplicationMessage(
                packet_id, app_message.topic, app_message.qos, b"", retain=False
            )
        pubrec = PubrecPacket.build(packet_id)
        await self._send_packet(pubrec)
        app_message.pubrec_packet = pubrec
        if packet_id in self._pubrel_waiters:
            return  # the exchange already waiting for this PUBREL completes it
        waiter: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pubrel_waiters[packet_id] = waiter
        try:
            await waiter
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            return  # the connection ended (_stop_waiters): handle_pubrel answers the next
        finally:
            self._pubrel_waiters.pop(packet_id, None)
        await self._complete(packet_id)

    async def handle_pubrel(self, pubrel: Any) -> None:
        """Completes a QoS 2 exchange; with PUBCOMP also when none waits for this PUBREL
        here. amqtt only warned then, and the device's exchange stayed open for good: its
        PUBREC came on an earlier connection, or amqtt's retry after a reconnect gave up."""
        waiter = self._pubrel_waiters.get(pubrel.packet_id)
        if waiter is not None and not waiter.done():
            waiter.set_result(pubrel)
            return
        await self._complete(pubrel.packet_id)

    async def _complete(self, packet_id: int) -> None:
        self.session.inflight_in.pop(packet_id, None)
        await self._send_packet(PubcompPacket.build(packet_id))

    async def _handle_qos0_message_flow(self, app_message: Any) -> None:
        """A device's QoS 0 message counts in its connection's in-flight window until it is
        delivered: amqtt read them as fast as they came, and a device that sent 20,000 of
        1 KB had them all held at once (+117 MB)."""
        if not self._from_device(app_message):
            await super()._handle_qos0_message_flow(app_message)
            return
        await self._delivered(app_message)  # nothing to send again if it was not

    async def _delivered(self, app_message: Any) -> bool:
        """Hands a device message to the broadcast; whether every subscriber it went to
        acknowledged it. It counts in the connection's in-flight window meanwhile."""
        forwarded = asyncio.get_running_loop().create_future()
        self.forwards[id(app_message)] = forwarded
        in_flight = self._in_flight()
        if in_flight is not None:
            in_flight.take()
        try:
            await self.session.delivered_message_queue.put(app_message)
            return bool(await forwarded)
        finally:
            if in_flight is not None:
                in_flight.give()

    async def _forwarded(self, app_message: Any) -> bool:
        """:meth:`_delivered`; if a subscriber did not acknowledge the message (its
        connection ended first), closes the device's connection: unacknowledged, the device
        keeps the message and sends it again once it has reconnected."""
        if await self._delivered(app_message):
            return True
        log.warning(
            "embedded broker: a message of %r on %r was not acknowledged by every "
            "subscriber; closing the connection so that the device sends it again",
            self.session.client_id,
            app_message.topic,
        )
        await self._hang_up()
        return False

    def _in_flight(self) -> InFlight | None:
        """The count of device messages being delivered, which the reader bounds."""
        return self.reader.in_flight if isinstance(self.reader, PacketReader) else None

    async def _hang_up(self) -> None:
        self.hung_up = True
        with contextlib.suppress(Exception):  # closing already
            await self.writer.close()

    def _stop_waiters(self) -> None:
        # The connection ended: messages not yet broadcast stay unacknowledged, and their
        # flows end (the device sends them again after it reconnects).
        self.ended = True
        super()._stop_waiters()
        held, self.held = self.held or [], None
        for publish, awaited, started in held:  # never sent
            if self._kept(publish, awaited):
                started.set_result(asyncio.ensure_future(_nothing()))
            else:
                started.cancel()
        for forwarded in self.forwards.values():
            forwarded.cancel()
        self.forwards.clear()

    async def _retry_deliveries(self) -> None:
        """Starts sending again, in order, what the resumed session has in flight.

        MQTT (3.1.1 and 5, section 4.4) has a server send a resumed session's unacknowledged
        PUBLISH packets again, DUP set and with the same packet ids, in their order and
        before anything newer. These sends start first, and the session's queue and what
        was held follow them (writes go out in the order their tasks start: see
        :meth:`mqtt_publish`). amqtt awaited them here, for up to 10 s, before it sent the
        queue or handled anything the client sent, and then dropped what was still not
        acknowledged; each now waits as long as the connection lasts.
        """
        session = self.session
        for message in [*session.inflight_in.values(), *session.inflight_out.values()]:
            task = asyncio.ensure_future(self._handle_message_flow(message))
            # Ending with the connection is the usual way for these: debug only.
            hold_until_done(self.retries, task, "a delivery sent again ended", logging.DEBUG)

    async def _send_and_wait_for_puback(self, app_message: Any) -> None:
        """amqtt's outgoing QoS 1 flow, without its 5 s limit on the PUBACK, and with at most
        ``max_unacked_out`` messages a device has not acknowledged.

        The message stays in the session's ``inflight_out`` until its PUBACK: a connection
        that ends first leaves it there for a persistent session to get it again when it
        resumes (amqtt dropped it). A clean session's ends with it.
        """
        packet_id = app_message.packet_id
        session = self.session
        unacked = session.inflight_out
        if self._is_device() and packet_id not in unacked and len(unacked) >= self.max_unacked_out:
            self.dropped_out.note(self.max_unacked_out, session.client_id)
            return
        if isinstance(app_message, OutgoingApplicationMessage):
            unacked.setdefault(packet_id, app_message)
        acknowledged = False
        try:
            if self.ended:  # a delivery made as the connection ended: for the resume
                return
            again = app_message.publish_packet is not None
            packet = app_message.build_publish_packet(dup=again)
            await self._send_packet(packet)
            app_message.publish_packet = packet
            if self.ended:  # no PUBACK can come: the waiters are stopped already
                return
            waiter: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            self._puback_waiters[packet_id] = waiter
            app_message.puback_packet = await waiter
            acknowledged = True
        finally:
            self._puback_waiters.pop(packet_id, None)
            if acknowledged or session.clean_session:
                unacked.pop(packet_id, None)


#: What mqtt_publish sends: topic, payload, QoS, retain flag.
_Publish = tuple[str, bytes | bytearray, int | None, bool]


async def _nothing() -> None:
    """The send of a delivery not made."""


async def _not_sent() -> None:
    """The send of a delivery made once its connection had ended, and not kept."""
    raise ConnectionResetError("the connection has ended")


def keep_newest(session: Session, max_queued: int) -> int:
    """Drops the oldest of what an offline session keeps, past ``max_queued``: those it was
    sent and has not acknowledged first (they are the oldest), then those queued. How many
    went."""
    queue, unacked = session.retained_messages, session.inflight_out
    excess: int = queue.qsize() + len(unacked) - max_queued
    for _ in range(excess):
        if unacked:
            unacked.popitem(last=False)
        else:
            queue.get_nowait()
    return max(excess, 0)


async def _outcome(started: asyncio.Future[asyncio.Task[Any]]) -> Any:
    """What the send of a held delivery returns, once it was let through and is done."""
    return await (await started)


def _resolve(forwarded: asyncio.Future[bool] | None, delivered: bool) -> None:
    if forwarded is not None and not forwarded.done():
        forwarded.set_result(delivered)


def _all_acknowledged(deliveries: asyncio.Future[list[Any]]) -> bool:
    if deliveries.cancelled():
        return False
    return not any(isinstance(outcome, BaseException) for outcome in deliveries.result())


#: A last will: topic, message, QoS, retain flag.
LastWill = tuple[str, bytes, int | None, bool]


def take_will(session: Session) -> LastWill | None:
    """``session``'s last will, taken from it: amqtt does not publish it any more."""
    if not session.will_flag or session.will_topic is None:
        return None
    will = (session.will_topic, session.will_message or b"", session.will_qos, session.will_retain)
    session.will_flag = False
    return will


class _TaskLog(deque[asyncio.Task[Any]]):
    """amqtt's deque of delivery tasks, noting those one broadcast adds, and holding each
    only until it is done.

    amqtt dropped done tasks from the front only: one delivery still waiting (a device that
    never acknowledged a message: the broker waits as long as its connection lasts) kept
    every later one, done, with its message, for as long as it waited (20,000 answers
    after one such message held 120 MB).
    """

    def __init__(self) -> None:
        super().__init__()
        self.noted: list[asyncio.Task[Any]] | None = None

    def append(self, task: asyncio.Task[Any]) -> None:
        super().append(task)
        task.add_done_callback(self._done)
        if self.noted is not None:
            self.noted.append(task)

    def _done(self, task: asyncio.Task[Any]) -> None:
        try:
            self.remove(task)  # most finish in order: near the front
        except ValueError:
            return  # amqtt took it from the front, and logged what it raised
        if not task.cancelled() and task.exception() is not None:
            # A connection that ended with deliveries under way (amqtt logged a traceback
            # for each): what it was not sent is its session's, or lost with a clean one.
            log.debug("embedded broker: a delivery ended: %r", task.exception())


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
    """amqtt's broadcast queue, remembering the broadcast taken last (and, for the task
    delivering it, its sequence number)."""

    last: dict[str, Any] | None = None

    async def get(self) -> dict[str, Any]:
        self.last = await super().get()
        _broadcasting.set(self.last.get("seq"))
        _awaited.set("forwarded" in self.last)
        return self.last


class _Dropped:
    """The state machine of a session let go of (see EndToEndAcks._let_go)."""

    state = "disconnected"

    def is_connected(self) -> bool:
        return False


_DROPPED = _Dropped()


class EndToEndAcks(Broker):  # type: ignore[misc]  # amqtt is untyped
    """amqtt's broker, handing each device message's delivery outcome to the device's flow.

    Also walks its subscription table over a copy: amqtt awaited while walking it, and a
    client subscribing or leaving meanwhile raised RuntimeError and lost the message.
    """

    def __init__(
        self, amqtt_config: dict[str, Any], service_username: str, max_unacked_out: int
    ) -> None:
        super().__init__(amqtt_config)
        self._service_username = service_username
        self._max_unacked_out = max_unacked_out
        self._dropped_out = Tally(
            "embedded broker dropped %d message(s) to devices that had "
            "mqtt.embedded_max_queued (%d) unacknowledged already (one of them: %r)"
        )
        self.dropped_kept = Tally(
            "embedded broker dropped %d message(s) queued for offline sessions past "
            "mqtt.embedded_max_queued (%d), the oldest of each (one of them: %r)"
        )
        #: Client id of the service session that takes the device messages, once known.
        self.keeper: str | None = None
        #: Sequence number of the last broadcast queued, and of the last one delivered
        #: (its deliveries made); the broadcast loop takes them in order.
        self.published = 0
        self.dispatched = 0
        #: Topic -> sequence number of the broadcast of the message retained on it.
        self._retained_seq: dict[str, int] = {}
        # Replaced before the broadcast loop starts, which reads them from here on.
        self._tasks_queue = _TaskLog()
        self._broadcast_queue = _LastTaken()
        self._subscriptions = _Snapshots()

    async def _client_connected(self, listener_name: str, reader: Any, writer: Any) -> None:
        try:
            await super()._client_connected(listener_name, reader, writer)
        finally:  # the connection has ended
            if isinstance(reader, PacketReader):
                reader.close()

    async def _handle_client_session(
        self, reader: Any, writer: Any, session: Session, *args: Any
    ) -> None:
        try:
            await super()._handle_client_session(reader, writer, session, *args)
        finally:  # the connection has ended
            self._let_go(session)

    async def _cleanup_session(self, client_id: str) -> None:
        session, _ = self._sessions.get(client_id, (None, None))
        await super()._cleanup_session(client_id)
        self._let_go(session)

    async def _delete_session(self, client_id: str) -> None:
        session, _ = self._sessions.get(client_id, (None, None))
        await super()._delete_session(client_id)
        self._let_go(session)

    def _let_go(self, session: Session | None) -> None:
        """Takes apart the state machine of a session the broker no longer holds, once its
        connection has ended.

        The machine (of the ``transitions`` library) is its own model, and calls back into
        the session: reference cycles, 60 objects and more than 20 KB a session, freed only
        by a full garbage collection, which the service makes rare (see tune_gc). One
        device reconnecting with a clean session left one at each connection. What may
        still look at the session (a broadcast that listed its subscriptions before they
        went) sees it disconnected.
        """
        if session is None or isinstance(session.transitions, _Dropped):
            return
        if self._sessions.get(session.client_id, (None, None))[0] is session:
            return  # held: resumed by a later connection, or offline and persistent
        if session.transitions.state == "connected":
            return  # taken over: its connection ends it, and lets go then
        machine, session.transitions = session.transitions, _DROPPED
        vars(machine).clear()

    async def _initialize_client_session(self, *args: Any) -> tuple[AckingHandler, Session]:
        handler, session = await super()._initialize_client_session(*args)
        adopted = AckingHandler.adopt(
            handler,
            self._service_username,
            self._max_unacked_out,
            self._dropped_out,
            self.dropped_kept,
        )
        # PacketReader ends a silent connection. amqtt's own timer only interrupted the
        # read of a packet's header (cutting the header in two if it came in pieces), and
        # did nothing more.
        session.keep_alive = 0
        return adopted, session

    async def _handle_message_delivery(
        self, client_session: Session, handler: Any, wait_deliver: asyncio.Future[Any]
    ) -> bool:
        """Passes a device message's delivery outcome on to its broadcast (see AckingHandler)."""
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
        broadcast: dict[str, Any] = {"session": session, "topic": topic, "data": data}
        if force_qos is not None:
            broadcast["qos"] = force_qos
        forwarded = _forwarding.get()
        if forwarded is not None:
            _forwarding.set(None)  # the broadcast resolves it now
            broadcast["forwarded"] = forwarded
        self.published += 1
        broadcast["seq"] = self.published
        await self._broadcast_queue.put(broadcast)

    async def publish_will(self, session: Session, will: LastWill) -> asyncio.Future[bool]:
        """Publishes ``session``'s last will (taken by :func:`take_will`), retained if it
        says so, as amqtt does when a connection ends without a DISCONNECT. Returns its
        outcome, as a device message's: True once every subscriber acknowledged it (the
        service does after its commit)."""
        topic, data, qos, retain = will
        outcome: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        token = _forwarding.set(outcome)
        try:
            await self._broadcast_message(session, topic, data, qos)
        finally:
            _forwarding.reset(token)
        if retain:
            await self.retain_message(session, topic, data, qos)
        return outcome

    async def retain_message(
        self,
        source_session: Session | None,
        topic_name: str | None,
        data: bytes | bytearray | None,
        qos: int | None = None,
    ) -> None:
        """amqtt's, noting the broadcast of the message retained (amqtt retains a message
        right after queueing its broadcast), for :meth:`send_retained`."""
        await super().retain_message(source_session, topic_name, data, qos)
        if topic_name is None:
            return
        if topic_name in self._retained_messages:
            self._retained_seq[topic_name] = self.published
        else:
            self._retained_seq.pop(topic_name, None)

    def send_retained(
        self, topic_filter: str, qos: int, session: Session
    ) -> list[asyncio.Task[Any]]:
        """Starts sending the messages retained under ``topic_filter`` for a subscription
        just made, at QoS at most ``qos``: the sends' tasks.

        As amqtt does, except that a delivery of an older broadcast still to come for the
        same topic is not made to the session (see :class:`RetainedSent`).
        """
        handler = self._get_handler(session)
        if not isinstance(handler, AckingHandler):
            return []
        sends = []
        for topic, retained in list(self._retained_messages.items()):
            if not self._matches(topic, topic_filter):
                continue
            seq = self._retained_seq.get(topic, 0)
            if seq > self.dispatched:
                retained_sent_to(session).sent(topic, seq)
            send = handler.mqtt_publish_now(
                topic, retained.data, min(qos, retained.qos or qos), retain=True
            )
            sends.append(asyncio.ensure_future(send))
        return sends

    async def _retain_broadcast_message(
        self, broadcast: dict[str, Any], qos: int, target_session: Session
    ) -> None:
        """amqtt queues a message for an offline persistent session; not a device message for
        the service's own session while it is away, nor one older than a retained copy the
        session was sent (see :class:`RetainedSent`).

        Queued, the message was acknowledged to the device at once (no delivery to wait for)
        and kept only in this process's memory until the service reconnected: a crash
        meanwhile lost it. Refused, the device keeps it and sends it again after a
        reconnect, which the admission gate holds until the service is back.
        """
        forwarded = broadcast.get("forwarded")
        if forwarded is not None and target_session.client_id == self.keeper:
            _resolve(forwarded, False)
            return
        if retained_sent_to(target_session).supersedes(broadcast["topic"], broadcast["seq"]):
            return
        await super()._retain_broadcast_message(broadcast, qos, target_session)

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
        self.dispatched = _broadcasting.get() or self.dispatched
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
