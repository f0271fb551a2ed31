"""Device session rules: duplicate client tokens, stale reports, connection state.

The service keeps a small book per twin in ``private["device"]``, written in the same
compare-and-set as the change it describes, so it survives crashes and restarts and is shared
by every replica::

    {"tokens": [["tok-1", revision, reportedVersion], ...],   # newest last, at most N
     "appliedDesiredVersion": 7}                              # highest desiredVersion reported

Rules:

- a reported update whose ``clientToken`` is in the book was already committed: it is answered
  again from the book and not applied twice (MQTT QoS 1 redelivers after a crash); for a
  redelivery the books of earlier revisions, kept by the journal, are looked at too
  (:func:`earlier_books`);
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
from typing import Final, Literal, NamedTuple

from twin_service.errors import Conflict
from twin_service.twin.document import now_iso
from twin_service.types import JSON, JSONObject

BOOK: Final = "device"
Status = Literal["online", "offline"]


class TokenRecord(NamedTuple):
    """What a committed reported update produced, to answer its redeliveries."""

    token: str
    revision: int
    reported_version: int


def _record(entry: object) -> TokenRecord | None:
    """The record an entry of the stored book holds, or None for a malformed entry."""
    if isinstance(entry, list) and len(entry) == 3:
        token, revision, reported_version = entry
        if isinstance(token, str) and type(revision) is int and type(reported_version) is int:
            return TokenRecord(token, revision, reported_version)
    return None


@dataclass(frozen=True)
class DeviceBook:
    """The book as stored: its token entries stay the JSON lists they were read as.

    Every reported update reads the book and writes it back, with up to
    ``client_token_memory`` (32) entries: turning each into a record and back held the
    interpreter lock about a tenth of a report's time under ingest, so entries are
    decoded only when their token matches.
    """

    entries: tuple[list[JSON], ...] = ()
    applied_desired_version: int = 0

    @classmethod
    def read(cls, private: JSONObject) -> DeviceBook:
        raw = private.get(BOOK)
        if not isinstance(raw, dict):
            return cls()
        entries = raw.get("tokens")
        applied = raw.get("appliedDesiredVersion", 0)
        return cls(
            tuple(entries) if isinstance(entries, list) else (),
            applied if type(applied) is int else 0,
        )

    @property
    def tokens(self) -> tuple[TokenRecord, ...]:
        """The well-formed records, oldest first."""
        return tuple(r for r in map(_record, self.entries) if r is not None)

    def write(self, private: JSONObject) -> JSONObject:
        """``private`` with this book in it (a new dict)."""
        return {
            **private,
            BOOK: {
                "tokens": list(self.entries),
                "appliedDesiredVersion": self.applied_desired_version,
            },
        }

    def find(self, token: str | None) -> TokenRecord | None:
        if token is None:
            return None
        for entry in self.entries:
            try:
                if entry[0] != token:
                    continue
            except (LookupError, TypeError):  # a malformed entry: never a match
                continue
            record = _record(entry)
            if record is not None:
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
        entries = self.entries
        if token is not None and memory > 0:
            entries = (*entries, [token, revision, reported_version])[-memory:]
        applied = max(self.applied_desired_version, desired_version or 0)
        return DeviceBook(entries, applied)


def earlier_books(revision: int, memory: int, depth: int) -> range:
    """The revisions whose books, with the one at ``revision``, hold every token committed in
    the ``depth`` revisions up to it: each book holds the last ``memory`` tokens, so it covers
    the ``memory`` revisions up to its own, and one book every ``memory`` revisions going back
    covers them all (newest first; none when tokens are not kept)."""
    return range(revision - memory, max(revision - depth, 0), -memory) if memory > 0 else range(0)


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
