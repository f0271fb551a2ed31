"""The twin document, its change events, and the one transition that commits a change.

Invariants kept by :func:`apply_change`:
- ``revision`` increases by exactly 1 on every committed change (creation is revision 1);
  a twin created again after a delete goes on from its :class:`Tombstone`, so no revision
  (and no ETag) of an id is ever used twice (a SQLite database restored from a backup
  raises every revision and version once, outside this module: store/restore.py);
- ``desiredVersion`` / ``reportedVersion`` increase by 1 when that section's value changes
  (they too go on from the tombstone);
- ``metadata`` stamps every leaf of desired, reported and live with when and at which
  revision it was last written;
- limits (size, depth, keys) hold for the committed document, checked after the change.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from functools import cached_property
from typing import Any, Literal

from twin_service.errors import BadRequest
from twin_service.twin.delta import compute_delta
from twin_service.twin.jsonvalue import Limits, check_size, check_structure, dumps_bytes
from twin_service.twin.metadata import stamp
from twin_service.twin.patch import diff_merge_patch, json_equal
from twin_service.types import JSON, JSONObject

SECTIONS: tuple[str, ...] = ("attributes", "desired", "reported", "live")
STAMPED: tuple[str, ...] = ("desired", "reported", "live")
WRITABLE: tuple[str, ...] = ("definition", *SECTIONS)
READ_ONLY: tuple[str, ...] = (
    "twinId",
    "namespace",
    "delta",
    "connection",
    "revision",
    "desiredVersion",
    "reportedVersion",
    "created",
    "modified",
    "metadata",
    "lifecycle",
)
Action = Literal["created", "modified", "deleted"]
#: Key of :attr:`Twin.incarnation` in ``private``.
INCARNATION = "incarnation"
#: Written leaf paths per section; ``None`` means the whole section was written.
Written = dict[str, set[tuple[str, ...]] | None]


def now_iso(moment: datetime | None = None) -> str:
    """UTC ISO 8601 with millisecond precision and a ``Z`` suffix."""
    moment = (moment or datetime.now(UTC)).astimezone(UTC)
    # Not strftime: glibc's %Y does not zero-pad years before 1000.
    return (
        f"{moment.year:04d}-{moment.month:02d}-{moment.day:02d}T{moment.hour:02d}:"
        f"{moment.minute:02d}:{moment.second:02d}.{moment.microsecond // 1000:03d}Z"
    )


@dataclass(frozen=True)
class Tombstone:
    """What a deleted twin leaves behind for the next twin of its id.

    A client may hold ``ETag: "rev:5"`` of the deleted twin, and a device the desired
    version it applied. Were they to start again at 1, a new twin reaching revision 5 would
    pass that client's ``If-Match`` with a change computed from another twin, and the device
    would drop the new twin's deltas as older than what it has. So the next twin goes on
    from here (AWS shadows keep their version across a delete too, for 48 hours).
    """

    #: The deletion's revision: the next twin of the id starts one above.
    revision: int
    desired_version: int = 0
    reported_version: int = 0


@dataclass(frozen=True)
class Twin:
    """A committed twin. Sections are plain JSON objects and must be treated as immutable."""

    twin_id: str
    namespace: str
    revision: int
    created: str
    modified: str
    definition: str | None = None
    attributes: JSONObject = field(default_factory=dict)
    desired: JSONObject = field(default_factory=dict)
    reported: JSONObject = field(default_factory=dict)
    live: JSONObject = field(default_factory=dict)
    connection: JSONObject = field(default_factory=dict)
    desired_version: int = 0
    reported_version: int = 0
    metadata: JSONObject = field(default_factory=dict)
    lifecycle: JSONObject = field(default_factory=dict)
    #: Service-private bookkeeping (recent client tokens...), never shown in the API.
    private: JSONObject = field(default_factory=dict)

    @property
    def incarnation(self) -> str:
        """What tells this twin apart from an earlier one of the same id.

        Revisions go on after a delete (:class:`Tombstone`), but they restarted at 1 for
        twins deleted before there were tombstones, so the stores' compare-and-set checks
        this too. A random token from the creation; twins created before there was one fall
        back to their creation time, which is the same only if the two creations fell in
        the same millisecond.
        """
        token = self.private.get(INCARNATION)
        return token if isinstance(token, str) else self.created

    @cached_property
    def delta(self) -> JSONObject:
        # Cached: a twin is immutable, and the delta is read for the response, the index,
        # the journal and the device path of the same write.
        return compute_delta(self.desired, self.reported)

    def section(self, name: str) -> JSON:
        return {
            "definition": self.definition,
            "attributes": self.attributes,
            "desired": self.desired,
            "reported": self.reported,
            "live": self.live,
        }[name]

    def writable(self) -> JSONObject:
        """The user-writable view: definition and the four sections."""
        view: JSONObject = {name: self.section(name) for name in SECTIONS}
        if self.definition is not None:
            view = {"definition": self.definition, **view}
        return view

    def to_document(self) -> JSONObject:
        """The API representation (read-only fields included); a new dict on every call."""
        return dict(self._document)

    @cached_property
    def _document(self) -> JSONObject:
        # Built once: one write reads it for storage, the index, the journal and the
        # response, and the next write diffs its index rows against it.
        doc: JSONObject = {"twinId": self.twin_id, "namespace": self.namespace}
        if self.definition is not None:
            doc["definition"] = self.definition
        doc.update(
            attributes=self.attributes,
            desired=self.desired,
            reported=self.reported,
            live=self.live,
            delta=self.delta,
            connection=self.connection,
            lifecycle=self.lifecycle,
            revision=self.revision,
            desiredVersion=self.desired_version,
            reportedVersion=self.reported_version,
            created=self.created,
            modified=self.modified,
            metadata=self.metadata,
        )
        return doc

    @cached_property
    def document_json(self) -> bytes:
        """:meth:`to_document` encoded as UTF-8 JSON, encoded once per twin (it is immutable
        and may be served from a cache many times)."""
        return dumps_bytes(self._document)

    def to_storage(self) -> JSONObject:
        """What the stores persist: the document without the derived delta, plus private."""
        doc = self.to_document()
        del doc["delta"]
        doc["_private"] = self.private
        return doc

    @classmethod
    def from_storage(cls, doc: JSONObject) -> Twin:
        return cls(
            twin_id=doc["twinId"],
            namespace=doc["namespace"],
            definition=doc.get("definition"),
            attributes=doc.get("attributes", {}),
            desired=doc.get("desired", {}),
            reported=doc.get("reported", {}),
            live=doc.get("live", {}),
            connection=doc.get("connection", {}),
            revision=doc["revision"],
            desired_version=doc.get("desiredVersion", 0),
            reported_version=doc.get("reportedVersion", 0),
            created=doc["created"],
            modified=doc["modified"],
            metadata=doc.get("metadata", {}),
            lifecycle=doc.get("lifecycle", {}),
            private=doc.get("_private", {}),
        )


def document_from_storage(stored: JSONObject) -> JSONObject:
    """What ``Twin.from_storage(stored).to_document()`` holds (keys in another order),
    made from ``stored`` in place without building the twin."""
    stored.pop("_private", None)
    stored["delta"] = compute_delta(stored.get("desired", {}), stored.get("reported", {}))
    return stored


@dataclass(frozen=True)
class ChangeEvent:
    """Exactly one per committed write; ``changes`` maps a section to the merge patch applied."""

    twin_id: str
    revision: int
    timestamp: str
    origin: str
    action: Action
    changes: JSONObject

    def to_json(self) -> JSONObject:
        return {
            "twinId": self.twin_id,
            "revision": self.revision,
            "timestamp": self.timestamp,
            "origin": self.origin,
            "action": self.action,
            "changes": self.changes,
        }

    @classmethod
    def from_json(cls, doc: JSONObject) -> ChangeEvent:
        return cls(
            twin_id=doc["twinId"],
            revision=doc["revision"],
            timestamp=doc["timestamp"],
            origin=doc["origin"],
            action=doc["action"],
            changes=doc["changes"],
        )


def validate_writable(values: JSONObject, limits: Limits, old: Twin | None = None) -> None:
    """Type and structure checks for user-supplied sections (400 on failure).

    Subtrees shared with ``old`` (already validated when they were written) are skipped.
    """
    for name, value in values.items():
        if name == "definition":
            if value is not None and not isinstance(value, str):
                raise BadRequest("'definition' must be a string.", code="twin.invalid")
            continue
        if name not in SECTIONS:
            raise BadRequest(f"Unknown or read-only field {name!r}.", code="twin.invalid")
        if not isinstance(value, dict):
            raise BadRequest(f"'{name}' must be a JSON object.", code="twin.invalid")
        previous = old.section(name) if old is not None else None
        check_structure(value, limits, where=f"/{name}", depth=1, checked=previous)


def apply_change(
    old: Twin | None,
    *,
    twin_id: str,
    namespace: str,
    values: JSONObject,
    written: Written,
    timestamp: str,
    origin: str,
    limits: Limits,
    connection: JSONObject | None = None,
    lifecycle: JSONObject | None = None,
    private: JSONObject | None = None,
    incarnation: str | None = None,
    tombstone: Tombstone | None = None,
) -> tuple[Twin, ChangeEvent]:
    """Commit ``values`` (a subset of WRITABLE) onto ``old``, producing the next revision.

    A creation (``old`` None) records ``incarnation``, a token unique to it (see
    :attr:`Twin.incarnation`); the caller draws it, so this stays pure. It goes on from
    ``tombstone``, what a deleted twin of the same id left, when there is one.
    Sections not in ``values`` keep their old content. Raises before producing anything if the
    result breaks a limit, so nothing invalid can ever reach a store.
    """
    validate_writable(values, limits, old)
    base = old or Twin(
        twin_id=twin_id,
        namespace=namespace,
        revision=tombstone.revision if tombstone else 0,
        desired_version=tombstone.desired_version if tombstone else 0,
        reported_version=tombstone.reported_version if tombstone else 0,
        created=timestamp,
        modified=timestamp,
        connection={"status": "unknown", "since": timestamp, "lastSeen": None},
    )
    merged: dict[str, Any] = {name: values.get(name, base.section(name)) for name in WRITABLE}
    check_size(dumps_bytes({k: v for k, v in merged.items() if v is not None}), limits)
    revision = base.revision + 1
    metadata = dict(base.metadata)
    for name in STAMPED:
        if name in values:
            section_meta = stamp(
                base.metadata.get(name, {}),
                base.section(name),
                merged[name],
                written.get(name),
                timestamp,
                revision,
            )
            if section_meta:
                metadata[name] = section_meta
            else:
                metadata.pop(name, None)
    desired_changed = "desired" in values and not json_equal(base.desired, merged["desired"])
    reported_changed = "reported" in values and not json_equal(base.reported, merged["reported"])
    new_private = private if private is not None else base.private
    if old is None and incarnation is not None:
        new_private = {**new_private, INCARNATION: incarnation}
    new = replace(
        base,
        definition=merged["definition"],
        # No copies: sections are immutable by contract, so the new twin shares every
        # subtree the change did not touch with the old one (and with the caller's values).
        attributes=merged["attributes"],
        desired=merged["desired"],
        reported=merged["reported"],
        live=merged["live"],
        revision=revision,
        modified=timestamp,
        desired_version=base.desired_version + (1 if desired_changed or old is None else 0),
        reported_version=base.reported_version + (1 if reported_changed or old is None else 0),
        metadata=metadata,
        connection=connection if connection is not None else base.connection,
        lifecycle=lifecycle if lifecycle is not None else base.lifecycle,
        private=new_private,
    )
    if old is not None and new.desired is old.desired and new.reported is old.reported:
        # Same sections, same delta: share it (and let the index diff skip it by identity).
        new.__dict__["delta"] = old.delta
    event = ChangeEvent(
        twin_id=twin_id,
        revision=revision,
        timestamp=timestamp,
        origin=origin,
        action="created" if old is None else "modified",
        changes=describe_changes(old, new),
    )
    return new, event


def describe_changes(old: Twin | None, new: Twin) -> JSONObject:
    """Per section, the merge patch that turns ``old`` into ``new``."""
    changes: JSONObject = {}
    if old is None:
        changes = {k: copy.deepcopy(v) for k, v in new.writable().items() if v != {}}
        changes["connection"] = copy.deepcopy(new.connection)
        if new.lifecycle:
            changes["lifecycle"] = copy.deepcopy(new.lifecycle)
        return changes
    if old.definition != new.definition:
        changes["definition"] = new.definition
    for name in (*SECTIONS, "connection", "lifecycle"):
        before = old.connection if name == "connection" else getattr(old, name)
        after = new.connection if name == "connection" else getattr(new, name)
        patch = diff_merge_patch(before, after)
        if patch:
            changes[name] = patch
    return changes


def tombstone_of(deleted: Twin) -> Tombstone:
    """What the deletion of ``deleted`` (see :func:`deletion_event`) leaves behind."""
    return Tombstone(deleted.revision + 1, deleted.desired_version, deleted.reported_version)


def deletion_event(old: Twin, *, timestamp: str, origin: str) -> ChangeEvent:
    return ChangeEvent(
        twin_id=old.twin_id,
        revision=old.revision + 1,
        timestamp=timestamp,
        origin=origin,
        action="deleted",
        changes={},
    )
