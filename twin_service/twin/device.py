"""Device session rules: duplicate client tokens, stale reports, connection state.

The service keeps a small book per twin in ``private["device"]``, written in the same
compare-and-set as the change it describes, so it survives crashes and restarts and is shared
by every replica::

    {"tokens": [["tok-1", revision, reportedVersion], ...],   # newest last, at most N
     "appliedDesiredVersion": 7}                              # highest desiredVersion reported

Rules:

- a reported update whose ``clientToken`` is in the book was already committed: it is answered
  again from the book and not applied twice (MQTT QoS 1 redelivers after a crash);
- a reported update whose ``desiredVersion`` is below ``appliedDesiredVersion`` is stale (409),
  and one above the twin's ``desiredVersion`` names a version that never existed (409);
- ``connection`` follows the ``status`` topic (``online``/``offline``) and traffic (a device
  that talks is online); ``lastSeen`` moves only when it is at least ``coalesce`` seconds old,
  so chatty devices do not turn every message into a write.

Pure: no I/O, no clock.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Final, Literal

from twin_service.errors import Conflict
from twin_service.twin.document import now_iso
from twin_service.types import JSONObject

BOOK: Final = "device"
Status = Literal["online", "offline"]


@dataclass(frozen=True)
class TokenRecord:
    """What a committed reported update produced, to answer its redeliveries."""

    token: str
    revision: int
    reported_version: int


@dataclass(frozen=True)
class DeviceBook:
    tokens: tuple[TokenRecord, ...] = ()
    applied_desired_version: int = 0

    @classmethod
    def read(cls, private: JSONObject) -> DeviceBook:
        raw = private.get(BOOK)
        if not isinstance(raw, dict):
            return cls()
        tokens = tuple(
            TokenRecord(str(t[0]), int(t[1]), int(t[2]))
            for t in raw.get("tokens", [])
            if isinstance(t, list) and len(t) == 3
        )
        return cls(tokens, int(raw.get("appliedDesiredVersion", 0)))

    def write(self, private: JSONObject) -> JSONObject:
        """``private`` with this book in it (a new dict)."""
        return {
            **private,
            BOOK: {
                "tokens": [[t.token, t.revision, t.reported_version] for t in self.tokens],
                "appliedDesiredVersion": self.applied_desired_version,
            },
        }

    def find(self, token: str | None) -> TokenRecord | None:
        if token is None:
            return None
        for record in self.tokens:
            if record.token == token:
                return record
        return None

    def check_desired_version(self, reported: int | None, twin_desired_version: int) -> None:
        """Raise 409 ``version.conflict`` for a stale or impossible ``desiredVersion``."""
        if reported is None:
            return
        if reported < self.applied_desired_version:
            raise Conflict(
                f"desiredVersion {reported} is older than {self.applied_desired_version}, "
                "which the device already reported as applied.",
                code="version.conflict",
                extra={"desiredVersion": twin_desired_version},
            )
        if reported > twin_desired_version:
            raise Conflict(
                f"desiredVersion {reported} is newer than the twin's {twin_desired_version}.",
                code="version.conflict",
                extra={"desiredVersion": twin_desired_version},
            )

    def after_report(
        self,
        token: str | None,
        desired_version: int | None,
        revision: int,
        reported_version: int,
        memory: int,
    ) -> DeviceBook:
        """The book once a report is committed at ``revision``."""
        tokens = self.tokens
        if token is not None and memory > 0:
            tokens = (*tokens, TokenRecord(token, revision, reported_version))[-memory:]
        applied = max(self.applied_desired_version, desired_version or 0)
        return DeviceBook(tokens, applied)


def next_connection(
    connection: JSONObject,
    *,
    now: datetime,
    status: Status | None,
    coalesce_seconds: float,
) -> JSONObject | None:
    """``connection`` after a status message (``status``) or traffic (``None``).

    Returns None when nothing needs writing: same status and a recent enough ``lastSeen``.
    """
    stamp = now_iso(now)
    current = connection.get("status")
    wanted: str = status or "online"
    last_seen = connection.get("lastSeen")
    if wanted == "offline":
        # The last will speaks for a device that has gone quiet: it was not seen now.
        if current == "offline":
            return None
        return {"status": "offline", "since": stamp, "lastSeen": last_seen}
    if current == wanted:
        if isinstance(last_seen, str) and _age(last_seen, now) < coalesce_seconds:
            return None
        return {**connection, "lastSeen": stamp}
    return {"status": wanted, "since": stamp, "lastSeen": stamp}


def _age(stamp: str, now: datetime) -> float:
    try:
        then = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    except ValueError:
        return float("inf")
    return (now - then).total_seconds()
