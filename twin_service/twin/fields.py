"""The ``fields`` selector: ``attributes,desired/fan`` picks parts of a document."""

from __future__ import annotations

from twin_service.errors import BadRequest
from twin_service.types import JSONObject


def parse_fields(fields: str | None) -> list[list[str]] | None:
    if fields is None:
        return None
    paths = [[p for p in part.strip().split("/")] for part in fields.split(",")]
    if any(not path or any(not p for p in path) for path in paths):
        raise BadRequest(f"Invalid fields selector {fields!r}.", code="fields.invalid")
    return paths


def select(doc: JSONObject, paths: list[list[str]] | None) -> JSONObject:
    """The parts of ``doc`` named by ``paths``, keeping their nesting; missing ones are skipped."""
    if paths is None:
        return doc
    out: JSONObject = {}
    # Objects built here, as opposed to subtrees of ``doc`` placed whole: those are shared
    # with the twin (which may be cached) and must never be written into.
    built = {id(out)}
    for path in paths:
        node: object = doc
        for part in path:
            if not isinstance(node, dict) or part not in node:
                break
            node = node[part]
        else:
            target = out
            for part in path[:-1]:
                existing = target.get(part)
                if isinstance(existing, dict) and id(existing) not in built:
                    break  # an enclosing path was selected whole: this one is in already
                if not isinstance(existing, dict):
                    existing = {}
                    built.add(id(existing))
                    target[part] = existing
                target = existing
            else:
                target[path[-1]] = node
    return out
