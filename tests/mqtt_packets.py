"""Raw MQTT 3.1.1 packets, for tests and benchmarks that talk to a broker below paho."""

from __future__ import annotations

import asyncio


def varint(n: int) -> bytes:
    """MQTT's variable byte integer (a remaining length): 7 bits a byte, low ones first."""
    out = bytearray()
    while True:
        n, digit = n >> 7, n & 0x7F
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def string(text: str) -> bytes:
    """A length-prefixed UTF-8 string."""
    raw = text.encode()
    return len(raw).to_bytes(2, "big") + raw


def packet(first: int, body: bytes) -> bytes:
    """A whole packet: its first byte, the remaining length, ``body``."""
    return bytes([first]) + varint(len(body)) + body


def connect(
    client_id: str,
    username: str | None = None,
    password: str | None = None,
    will: tuple[str, bytes] | None = None,
    keep_alive: int = 60,
    clean: bool = True,
) -> bytes:
    """A CONNECT with a clean session (unless not ``clean``) and a keep-alive of
    ``keep_alive`` seconds, with the credentials given, and a last will (topic, message:
    QoS 1, retained) if given."""
    flags = (0x02 if clean else 0) | (0x80 if username is not None else 0)
    flags |= 0x40 if password is not None else 0
    if will is not None:
        flags |= 0x04 | 0x08 | 0x20
    body = string("MQTT") + bytes([4, flags]) + keep_alive.to_bytes(2, "big") + string(client_id)
    if will is not None:
        body += string(will[0]) + len(will[1]).to_bytes(2, "big") + will[1]
    for field in (username, password):
        if field is not None:
            body += string(field)
    return packet(0x10, body)


def subscribe(packet_id: int, topic_filter: str, qos: int) -> bytes:
    """A SUBSCRIBE of one filter."""
    return packet(0x82, packet_id.to_bytes(2, "big") + string(topic_filter) + bytes([qos]))


def publish(topic: str, payload: bytes, qos: int, packet_id: int = 0, dup: bool = False) -> bytes:
    """A PUBLISH, not retained (a packet id only with QoS 1 or 2)."""
    first = 0x30 | (qos << 1) | (0x08 if dup else 0)
    body = string(topic) + (packet_id.to_bytes(2, "big") if qos else b"") + payload
    return packet(first, body)


def published(body: bytes) -> tuple[str, int, bytes]:
    """The topic, packet id and payload of a QoS 1 or 2 PUBLISH's body."""
    end = 2 + int.from_bytes(body[:2], "big")
    return body[2:end].decode(), int.from_bytes(body[end : end + 2], "big"), body[end + 2 :]


#: First bytes of the packets that carry only a packet id.
PUBACK, PUBREC, PUBREL, PUBCOMP = 0x40, 0x50, 0x62, 0x70


#: A whole PINGREQ.
PINGREQ = b"\xc0\x00"


def ack(first: int, packet_id: int) -> bytes:
    """A PUBACK, PUBREC, PUBREL or PUBCOMP."""
    return packet(first, packet_id.to_bytes(2, "big"))


async def read_packet(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """The next packet: its first byte and its body."""
    first = (await reader.readexactly(1))[0]
    length, shift = 0, 0
    while True:
        digit = (await reader.readexactly(1))[0]
        length |= (digit & 0x7F) << shift
        shift += 7
        if not digit & 0x80:
            return first, await reader.readexactly(length)
