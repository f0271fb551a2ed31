"""Property paths: ``/``-separated keys, JSON-pointer escapes (``~1`` is ``/``, ``~0`` is ``~``)."""

from __future__ import annotations

from typing import Any

from twin_service.errors import RqlInvalid
from twin_service.twin.pointer import key_path
from twin_service.types import JSONObject

from .ast import Path

#: Single-key and fixed properties that are searchable.
FIXED_PATHS: frozenset[Path] = frozenset(
    {
        ("twinId",),
        ("namespace",),
        ("definition",),
        ("revision",),
        ("created",),
        ("modified",),
        ("connection", "status"),
        ("connection", "lastSeen"),
        ("connection", "since"),
    }
)
#: Roots under which every path is searchable (the bare root included).
TREE_ROOTS: frozenset[str] = frozenset(
    {"attributes", "desired", "reported", "live", "delta", "lifecycle"}
)


def lookup(doc: JSONObject, path: Path) -> tuple[bool, Any]:
    """``(True, node)`` at ``path`` through nested objects, ``(False, None)`` if it is absent."""
    node: Any = doc
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return False, None
        node = node[key]
    return True, node


def format_path(path: Path) -> str:
    """The escaped textual form of ``path``; also the ``path`` column of the SQLite index."""
    return key_path(path)


def _unescape(segment: str, text: str) -> str:
    out: list[str] = []
    i = 0
    while i < len(segment):
        ch = segment[i]
        if ch == "~":
            nxt = segment[i + 1 : i + 2]
            if nxt == "0":
                out.append("~")
            elif nxt == "1":
                out.append("/")
            else:
                raise RqlInvalid(f"invalid escape '~{nxt}' in property {text!r}: use ~0 or ~1")
            i += 2
        else:
            out.append(ch)
            i += 1
    return "".join(out)


def parse_path(text: str) -> Path:
    """Parse and validate an escaped property path; raises :class:`RqlInvalid`."""
    if text == "":
        raise RqlInvalid("empty property")
    segments = text.split("/")
    if any(segment == "" for segment in segments):
        raise RqlInvalid(f"empty key in property {text!r}")
    path = tuple(_unescape(segment, text) for segment in segments)
    if path in FIXED_PATHS or path[0] in TREE_ROOTS:
        return path
    raise RqlInvalid(
        f"unknown property {text!r}: expected twinId, namespace, definition, revision, created, "
        "modified, connection/status, connection/since, connection/lastSeen or a path under "
        "attributes, desired, reported, live, delta or lifecycle"
    )
