"""Typed errors raised by the MQTT connectivity layer.

Every paho or socket failure is translated once, here in the package, into one of these::

    twin_service.errors.Unavailable (503)
    └── MqttUnavailable               mqtt.unavailable
        ├── NotConnected              mqtt.notconnected   no session with the broker right now
        ├── PublishTimeout            mqtt.timeout        no PUBACK/SUBACK within the deadline
        ├── ConnectRefused            mqtt.connect.refused  CONNACK with a failure reason
        ├── Refused                   mqtt.refused        SUBACK or MQTT 5 PUBACK failure reason
        ├── NoSubscriber              mqtt.nosubscriber   MQTT 5 PUBACK 0x10: no one took it
        └── SessionNotRetired         mqtt.notretired     ``mqtt retire`` left the session alone

    twin_service.errors.BadRequest (400)
    ├── RequestRejected           (code from the service)  a ``.../rejected`` answer to a device
    └── InvalidTopic              mqtt.topic.invalid  no message can be published to that topic

    twin_service.errors.PayloadTooLarge (413)
    └── PacketTooLarge            mqtt.packet.toolarge  over the broker's packet size limit
"""

from __future__ import annotations

from typing import Any

from twin_service.errors import BadRequest, PayloadTooLarge, Unavailable


class MqttUnavailable(Unavailable):
    """The broker could not carry out a request."""

    default_code = "mqtt.unavailable"


class NotConnected(MqttUnavailable):
    """There is no connection to the broker at the moment."""

    default_code = "mqtt.notconnected"


class PublishTimeout(MqttUnavailable):
    """The broker did not acknowledge in time; the message may still be delivered later."""

    default_code = "mqtt.timeout"


class ConnectRefused(MqttUnavailable):
    """The broker refused the CONNECT (bad credentials, not authorised, bad protocol...)."""

    default_code = "mqtt.connect.refused"
    retry_after_seconds = None  # credentials or the ACL must change first


class Refused(MqttUnavailable):
    """The broker refused a SUBSCRIBE or (MQTT 5) a PUBLISH, usually because of its ACL."""

    default_code = "mqtt.refused"
    retry_after_seconds = None


class NoSubscriber(MqttUnavailable):
    """The broker had no subscriber for a message (MQTT 5 PUBACK reason code 0x10, "No
    matching subscribers"): it acknowledged the message and dropped it. Send it again."""

    default_code = "mqtt.nosubscriber"


class SessionNotRetired(MqttUnavailable):
    """``twin-service mqtt retire`` ended no session: the broker had none for the client id,
    or a running client uses it."""

    default_code = "mqtt.notretired"
    retry_after_seconds = None


class RequestRejected(BadRequest):
    """The service answered a device request on a ``.../rejected`` topic."""

    default_code = "request.rejected"

    def __init__(self, body: dict[str, Any]) -> None:
        super().__init__(
            str(body.get("message") or "request rejected"),
            code=str(body.get("error") or self.default_code),
            extra={"clientToken": body.get("clientToken"), "statusCode": body.get("code")},
        )
        self.body = body


class InvalidTopic(BadRequest):
    """A publish to a topic name MQTT does not allow (a wildcard, NUL, too long): paho's
    ``ValueError``, typed."""

    default_code = "mqtt.topic.invalid"


class PacketTooLarge(PayloadTooLarge):
    """A message over the broker's packet size limit, refused before it was sent: the
    broker would close the connection (mosquitto) or drop it unanswered."""

    default_code = "mqtt.packet.toolarge"
