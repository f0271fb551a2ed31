"""MQTT packets as the embedded broker reads them before and beside amqtt: the first one
(bounded, and looked into for the protocol level, the credentials and the keep-alive), and
every later one's size and timing (see :class:`PacketReader`); and the writes that meet
a connection already ended (see :class:`PacketWriter`)."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import NamedTuple, NoReturn

from amqtt.adapters import StreamReaderAdapter, StreamWriterAdapter

from connectivity.broker_log import Tally, log

#: A CONNECT carries a client id, credentials and a last will: small. Beyond this it is
#: refused unread.
MAX_CONNECT_BYTES = 65_536


class ConnectTooLarge(Exception):
    pass


async def first_packet(reader: asyncio.StreamReader) -> bytes:
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
            raise ConnectTooLarge(
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


def _level_at(packet: bytes) -> int:
    """Where a CONNECT's protocol level is: after the fixed header and the protocol name.
    The connect flags and the keep-alive follow it, then the payload."""
    _, i = _varint(packet, 1)
    return i + 2 + int.from_bytes(packet[i : i + 2])


def _string_at(packet: bytes, i: int) -> tuple[str, int]:
    """The length-prefixed string at ``packet[i:]`` (as much of it as there is) and the
    index after it."""
    end = i + 2 + int.from_bytes(packet[i : i + 2])
    return packet[i + 2 : end].decode(errors="replace"), end


class ConnectLogin(NamedTuple):
    """What an MQTT 3.1.1 CONNECT says of who connects (None where not given)."""

    client_id: str
    username: str | None
    password: str | None
    #: Seconds; 0 for none.
    keep_alive: int


def connect_login(packet: bytes) -> ConnectLogin | None:
    """What a CONNECT says of who connects, or None when the packet is cut short."""
    try:
        i = _level_at(packet)
        flags = packet[i + 1]
        keep_alive = int.from_bytes(packet[i + 2 : i + 4])
        client_id, i = _string_at(packet, i + 4)
        if flags & 0x04:  # the will's topic and message
            _, i = _string_at(packet, i)
            _, i = _string_at(packet, i)
        username = password = None
        if flags & 0x80:
            username, i = _string_at(packet, i)
        if flags & 0x40:
            password, i = _string_at(packet, i)
    except IndexError:
        return None
    return None if i > len(packet) else ConnectLogin(client_id, username, password, keep_alive)


def other_protocol_level(packet: bytes) -> tuple[int, str] | None:
    """(protocol level, client id) of a CONNECT that is not MQTT 3.1.1, else None."""
    if packet[:1] != b"\x10":
        return None  # not a CONNECT: amqtt refuses it
    try:
        i = _level_at(packet)
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
        client_id = _string_at(packet, i)[0]
    return level, client_id


class InFlight:
    """The messages a connection has in flight (read, not yet acknowledged), up to a bound:
    at it, :class:`PacketReader` reads nothing more until one is acknowledged."""

    def __init__(self, bound: int) -> None:
        self.bound = bound
        self.count = 0
        self._room = asyncio.Event()
        self._room.set()

    def take(self) -> None:
        self.count += 1
        if self.count >= self.bound:
            self._room.clear()

    def give(self) -> None:
        self.count -= 1
        if self.count < self.bound:
            self._room.set()

    async def room(self) -> None:
        await self._room.wait()


#: A PUBLISH's topic, with its length: the most of a body :meth:`PacketReader._watch_topic`
#: keeps.
_MAX_TOPIC_START = 2 + 0xFFFF


@dataclass(frozen=True)
class ReadLimits:
    """What the embedded broker bounds in the reading of each connection."""

    #: Bytes of one packet (mosquitto's ``max_packet_size``).
    max_packet: int
    #: Messages read and not yet acknowledged (mosquitto's ``max_inflight_messages``).
    max_inflight: int
    #: Connections ended for their silence, logged.
    silent: Tally


class PacketReader(StreamReaderAdapter):  # type: ignore[misc]  # amqtt is untyped
    """A stream with the bytes already read from it put back in front, that ends the
    connection at a packet larger than ``max_packet``, waits before a packet while the
    connection has ``max_inflight`` messages in flight, and ends a connection that has sent
    nothing for one and a half keep-alive periods.

    amqtt reads any packet whole, whatever its size: a logged-in device that announced
    100 MB had it read into memory, and handed on to the service. This follows the packets
    as amqtt reads them (each begins with a type byte and its remaining length) and refuses
    one whose length is too large before its body is read, as mosquitto's
    ``max_packet_size`` does.

    And amqtt reads every packet as it comes, starting a task for each: a device that sent
    20,000 QoS 1 messages without waiting for their PUBACKs had them all held at once
    (+183 MB), and 20,000 QoS 0 ones the same (+117 MB). The connection's handler counts
    its messages in :attr:`in_flight` until they are delivered (QoS 0) or acknowledged
    (QoS 1 and 2); at the bound the next packet waits, and TCP holds the device back, as
    mosquitto's ``max_inflight_messages`` does for QoS 1 and 2.

    And amqtt's broker never ended a silent connection: a device whose network went away
    without closing TCP (a power cut, a NAT that forgot it) stayed connected, online to the
    service, its last will never sent. MQTT (3.1.2.10) has the broker end it after one and
    a half keep-alive periods without a packet, as if the network had failed, so its will
    goes out. Only the time a read waits for the device counts: not the time the in-flight
    bound holds the reader back (the device's pings wait unread then), nor the time the
    broker takes between two reads.
    """

    def __init__(
        self,
        reader: asyncio.StreamReader,
        head: bytes,
        login: ConnectLogin,
        peer: object,
        transport: asyncio.WriteTransport,
        limits: ReadLimits,
    ) -> None:
        super().__init__(reader)
        self._head = head
        self._client_id = login.client_id
        self._peer = peer
        self._transport = transport
        self._limits = limits
        self._length = self._shift = 0
        self._in_length = False
        self._body_left = 0
        self._after_publish = False
        self._ended = False
        #: The start of the PUBLISH being read, until its topic is whole.
        self._topic: bytearray | None = None
        self.in_flight = InFlight(limits.max_inflight)
        # Timed by one timer a connection, moved on as reads come and go, rather than a
        # timer for each read: amqtt reads a packet in three reads or more.
        self._loop = asyncio.get_running_loop()
        self._silence = 1.5 * login.keep_alive
        self._waiting_since: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        if self._silence > 0:
            self._timer = self._loop.call_later(self._silence, self._check_silence)

    async def read(self, n: int = -1) -> bytes:
        if self._ended:
            return b""
        if not self._body_left and not self._in_length:  # before a packet
            if self._after_publish:
                # amqtt started a task for that PUBLISH; once it runs, the handler has
                # counted it. Without this, a buffer full of packets was read first.
                self._after_publish = False
                await asyncio.sleep(0)
            await self.in_flight.room()
        self._waiting_since = self._loop.time()
        try:
            if not self._head:
                data: bytes = await super().read(n)
            else:
                if n < 0:
                    n = len(self._head)
                data, self._head = self._head[:n], self._head[n:]
                if len(data) < n:
                    data += await super().read(n - len(data))
        finally:
            self._waiting_since = None
        self._follow(data)
        return data

    def close(self) -> None:
        """Lets go of the connection, once it has ended (amqtt's handler has stopped).

        Its keep-alive timer held it (the reader, amqtt's handler, the session: 43 KB a
        connection) until it fired, up to one and a half ``max_keep_alive`` (30 minutes)
        after a connection ended by a reset. And the error a stream ended with stays in it,
        its traceback holding the frames it was raised through (the reads, amqtt's handler
        closing the writer), which hold the stream: a cycle, freed only by a full garbage
        collection, which the service makes rare (see tune_gc).
        """
        if self._timer is not None:
            self._timer.cancel()
        error = self._reader.exception()
        if error is not None:
            error.with_traceback(None)

    def _check_silence(self) -> None:
        if self._transport.is_closing():
            return  # the connection ended: nothing more to watch
        now, since = self._loop.time(), self._waiting_since
        if since is None:  # not waiting for the device now
            since = now
        elif now - since >= self._silence:
            # Bytes that came with this timer (both ready at once after the loop was held
            # up) wake the read first: their callback was queued before this one.
            self._loop.call_soon(self._end_if_silent, since)
            return
        self._timer = self._loop.call_at(since + self._silence, self._check_silence)

    def _end_if_silent(self, since: float) -> None:
        if self._waiting_since != since or self._transport.is_closing():
            self._check_silence()  # the device was heard after all
            return
        self._limits.silent.note(self._client_id, self._peer, self._silence)
        self._transport.abort()  # as if the network had failed: the will goes out

    def _watch_topic(self, chunk: bytes) -> None:
        """Look at a PUBLISH's topic as it is read, and end the connection if it holds a
        wildcard. amqtt refuses such a PUBLISH once it has read the topic, and reads on,
        taking the rest of its body for the next packets: hidden in a payload, they passed
        max_packet_size (5 MiB packets reached the service), the in-flight bound and the
        framing followed here, whose packet was the outer one."""
        topic = self._topic
        assert topic is not None
        topic += chunk[: _MAX_TOPIC_START - len(topic)]
        end = 2 + int.from_bytes(topic[:2]) if len(topic) >= 2 else _MAX_TOPIC_START
        if len(topic) < end:
            return  # not whole yet
        self._topic = None
        name = topic[2:end]
        if b"+" in name or b"#" in name:
            log.warning(
                "embedded broker closed a connection from %s: a PUBLISH to a topic with a "
                "wildcard (client %r)",
                self._peer,
                self._client_id,
            )
            self._end("wildcard in a PUBLISH topic")

    def _end(self, reason: str) -> NoReturn:
        """End the connection: nothing more is read from it, not even what is buffered
        (amqtt takes a failed read inside a packet for missing data, and reads on)."""
        self._ended = True
        self._transport.abort()
        # What amqtt meets when a client goes away: it ends the session so.
        raise ConnectionResetError(reason)

    def _follow(self, data: bytes) -> None:
        i = 0
        while i < len(data):
            if self._body_left:
                step = min(self._body_left, len(data) - i)
                if self._topic is not None:
                    self._watch_topic(data[i : i + step])
                self._body_left -= step
                i += step
            elif not self._in_length:  # a packet's type byte
                self._in_length, self._length, self._shift = True, 0, 0
                self._after_publish = data[i] >> 4 == 3
                i += 1
            else:  # its remaining length: 1 to 4 bytes of 7 bits, low ones first
                byte = data[i]
                i += 1
                self._length |= (byte & 0x7F) << self._shift
                self._shift += 7
                if byte & 0x80 and self._shift < 28:
                    continue
                self._in_length = False
                if self._length > self._limits.max_packet:
                    log.warning(
                        "embedded broker closed a connection from %s: a packet of %d bytes "
                        "(at most %d)",
                        self._peer,
                        self._length,
                        self._limits.max_packet,
                    )
                    self._end("packet too large")
                self._body_left = self._length
                self._topic = bytearray() if self._after_publish and self._length else None


class PacketWriter(StreamWriterAdapter):  # type: ignore[misc]  # amqtt is untyped
    """amqtt's stream writer, meeting a write to a connection that has ended with the
    ConnectionResetError amqtt expects there.

    On uvloop (as the service runs) such a write raises RuntimeError ("unable to perform
    operation on <TCPTransport closed=True ...>; the handler is closed"): a message the
    broker sent a device whose connection had just reset logged "Unhandled exception" and
    failed its delivery. amqtt takes a reset met while sending for the end of the
    connection, quietly; asyncio's own transports drop the bytes.
    """

    def write(self, data: bytes) -> None:
        if self._writer.transport.is_closing():
            raise ConnectionResetError("the connection has ended")
        super().write(data)
