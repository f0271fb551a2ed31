"""The MQTT topic layout shared by the service and devices.

With the default prefix ``twins/{twinId}`` a twin ``org.acme:pump-1`` uses::

    device -> service   twins/org.acme:pump-1/reported/update | live/update | get | status
    service -> device   twins/org.acme:pump-1/reported/update/accepted | .../rejected
                        twins/org.acme:pump-1/get/accepted | .../rejected
                        twins/org.acme:pump-1/delta (retained)
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

DEFAULT_PREFIX = "twins/{twinId}"
_PLACEHOLDER = "{twinId}"
_FORBIDDEN_IN_TWIN_ID = frozenset("/+#\x00")


#: The topics a device publishes to, below its twin's base: the service reads these four and
#: answers on others. The brokers (the embedded one, and mosquitto through the exported ACL)
#: let a device publish here only, and read anywhere under its base.
INBOUND = ("reported/update", "live/update", "get", "status")


#: What starts a shared subscription's filter: ``$share/<group>/<filter>`` (MQTT 5).
SHARE_PREFIX = "$share/"


def is_shared(topic_filter: str) -> bool:
    return topic_filter.startswith(SHARE_PREFIX)


#: ``mqtt.shared_group``'s default: a group derived from the service's broker password.
AUTO_GROUP = "auto"
#: The group of releases before the derived one, and the one used with no password.
LEGACY_GROUP = "twin-service"
_GROUP_LABEL = b"twin-service shared subscription group"


def service_group(configured: str, password: str | None) -> str:
    """The shared-subscription group of the service's device topics.

    A group's name is all it takes to join it, and mosquitto's ACL file does not check a
    SUBSCRIBE: a device in the service's group took its turn at other devices' messages,
    which mosquitto then dropped (the device may not read them). So ``auto`` derives a name
    from the broker password the replicas share and devices do not know; with no password
    (an anonymous or certificate login) it is :data:`LEGACY_GROUP`, which anyone can guess.
    Any other value is used as is (empty: no sharing).
    """
    if configured != AUTO_GROUP:
        return configured
    if not password:
        return LEGACY_GROUP
    digest = hmac.new(password.encode(), _GROUP_LABEL, hashlib.sha256).hexdigest()
    return f"{LEGACY_GROUP}-{digest[:20]}"


def redact_group(topic_filter: str) -> str:
    """``topic_filter`` for a log line or an error: a shared subscription's group name is a
    secret (see :func:`service_group`)."""
    if not is_shared(topic_filter):
        return topic_filter
    parts = topic_filter.split("/", 2)
    return f"{SHARE_PREFIX}***/{parts[2]}" if len(parts) == 3 else f"{SHARE_PREFIX}***"


@dataclass(frozen=True)
class TopicFilter:
    """An MQTT topic filter split into levels once, matched against many topics.

    paho's ``topic_matches_sub`` builds a matcher tree on every call: with a handful of
    subscriptions that was about 6% of the service's CPU per device message.
    ``$share/<group>/`` is dropped: the broker picks the subscriber, the topic is matched
    against the filter behind it.
    """

    levels: tuple[str, ...]

    @classmethod
    def parse(cls, topic_filter: str) -> TopicFilter:
        if is_shared(topic_filter):
            parts = topic_filter.split("/", 2)
            if len(parts) == 3:
                topic_filter = parts[2]
        return cls(tuple(topic_filter.split("/")))

    def matches(self, topic: str) -> bool:
        levels = self.levels
        names = topic.split("/")
        # Wildcards at the first level never match topics starting with '$' (MQTT 4.7.2).
        if names[0].startswith("$") and levels[0] in ("+", "#"):
            return False
        for i, level in enumerate(levels):
            if level == "#":
                return True  # also matches the parent level itself: 'a/#' matches 'a'
            if i == len(names) or (level != "+" and level != names[i]):
                return False
        return len(names) == len(levels)


def fits_topics(twin_id: str) -> bool:
    """Whether ``twin_id`` can be one topic level: no ``/``, and no wildcard, which MQTT
    forbids in a topic name (a twin name may hold ``+``, a URL-safe character)."""
    return bool(twin_id) and not any(ch in _FORBIDDEN_IN_TWIN_ID for ch in twin_id)


#: Longest topic name MQTT can carry (a UTF-8 string with a two-byte length).
MAX_TOPIC_BYTES = 65_535


def is_topic_name(topic: str) -> bool:
    """Whether ``topic`` may be published to: not empty, no wildcard (MQTT forbids them in
    a topic name), no NUL, at most ``MAX_TOPIC_BYTES`` of UTF-8. A device's MQTT 5 response
    topic is only the device's word: the broker passed ``twins/<id>/#`` on, and paho's
    publish to it raised ``ValueError``."""
    return (
        bool(topic)
        and not any(ch in topic for ch in "+#\x00")
        and len(topic.encode("utf-8", "surrogatepass")) <= MAX_TOPIC_BYTES
    )


def check_twin_id_for_topics(twin_id: str) -> None:
    """Refuse twin ids that would break out of their topic level (``/``, wildcards)."""
    if not fits_topics(twin_id):
        raise ValueError(f"twin id {twin_id!r} cannot be used in an MQTT topic")


def _is_control(ch: str) -> bool:
    # C0, DEL and C1: MQTT forbids U+0000 in a topic and advises against the others.
    return ord(ch) < 0x20 or 0x7F <= ord(ch) <= 0x9F


def _prefix_problem(prefix: str) -> str | None:
    """Why ``prefix`` cannot be a topic prefix, or None. Each was accepted once and built a
    filter paho refused (``twins/x+/get``) or one the broker reads as its own (``$share/``):
    the service never subscribed, and devices' messages were acknowledged and dropped."""
    if prefix.count(_PLACEHOLDER) != 1:
        return "topic prefix must contain {twinId} exactly once"
    if any(_is_control(ch) for ch in prefix):
        return "topic prefix must not contain a control character"
    if any(ch in prefix for ch in "+#"):
        return "topic prefix must not contain wildcards (+ or #)"
    levels = prefix.split("/")
    if _PLACEHOLDER not in levels:
        return "{twinId} must be a whole topic level (as in twins/{twinId}), not part of one"
    if levels[0].startswith("$"):
        return "topic prefix must not start with '$' (brokers read $share/, $SYS/ as their own)"
    return None


@dataclass(frozen=True)
class TopicLayout:
    """Builds and parses topics under a prefix template containing ``{twinId}`` once."""

    prefix: str = DEFAULT_PREFIX

    def __post_init__(self) -> None:
        problem = _prefix_problem(self.prefix)
        if problem is not None:
            raise ValueError(problem)

    def base(self, twin_id: str) -> str:
        """The topic prefix of one twin, e.g. ``twins/org.acme:pump-1``."""
        check_twin_id_for_topics(twin_id)
        return self.prefix.replace(_PLACEHOLDER, twin_id)

    def topic(self, twin_id: str, suffix: str) -> str:
        """A topic of one twin, e.g. ``topic(t, "reported/update")``."""
        return f"{self.base(twin_id)}/{suffix}"

    def below(self, twin_id: str, topic: str) -> str | None:
        """What ``topic`` has below the twin's base (``reported/update``), or None when it
        is not under it: the inverse of :meth:`topic`."""
        base = self.base(twin_id) + "/"
        return topic[len(base) :] if topic.startswith(base) else None

    def all_twins(self, suffix: str) -> str:
        """A filter matching ``suffix`` for every twin, e.g. ``twins/+/reported/update``."""
        return f"{self.prefix.replace(_PLACEHOLDER, '+')}/{suffix}"

    def twin_id(self, topic: str) -> str | None:
        """The twin id in ``topic``, or None when the topic is not under the layout."""
        head, _, tail = self.prefix.partition(_PLACEHOLDER)
        if not topic.startswith(head):
            return None
        rest = topic[len(head) :]
        twin, sep, after = rest.partition("/")
        if not twin:
            return None
        if tail:
            # The prefix continues after {twinId}: the remainder must start with it.
            tail_body = tail.lstrip("/")
            if not (sep and (after == tail_body or after.startswith(tail_body + "/"))):
                return None
        return twin

    def suffix(self, topic: str) -> str | None:
        """What follows the twin's prefix, e.g. ``reported/update``."""
        twin = self.twin_id(topic)
        if twin is None:
            return None
        base = self.base(twin) + "/"
        return topic[len(base) :] if topic.startswith(base) else None
