"""Raw MQTT 3.1.1 packets, for tests and benchmarks that talk to a broker below paho."""

from __future__ import annotations


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
) -> bytes:
    """A CONNECT with a clean session and a 60 s keep-alive, with the credentials given, and
    a last will (topic, message: QoS 1, retained) if given."""
    flags = 0x02 | (0x80 if username is not None else 0) | (0x40 if password is not None else 0)
    if will is not None:
        flags |= 0x04 | 0x08 | 0x20
    body = string("MQTT") + bytes([4, flags]) + (60).to_bytes(2, "big") + string(client_id)
    if will is not None:
        body += string(will[0]) + len(will[1]).to_bytes(2, "big") + will[1]
    for field in (username, password):
        if field is not None:
            body += string(field)
    return packet(0x10, body)
