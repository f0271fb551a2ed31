"""The ``fields`` selector: ``attributes,desired/fan`` picks parts of a document.

As in Eclipse Ditto, parentheses group paths under a common prefix:
``attributes(model,site),desired/fan`` is ``attributes/model,attributes/site,desired/fan``,
and groups nest (``desired(fan(speed,mode),light)``). Keys are JSON pointer tokens, as in
RQL and pointer URLs: ``lifecycle/fan~1speed`` is the lifecycle entry keyed ``fan/speed``.
"""

from __future__ import annotations

from twin_service.errors import BadRequest, InvalidPointer
from twin_service.twin.patch import split_pointer
from twin_service.types import JSONObject

#: What the selector is, for the API's description of its ``fields`` parameters.
DESCRIPTION = (
    "Comma-separated paths to include, e.g. attributes,desired/fan; "
    "parentheses group paths under a prefix, e.g. attributes(model,site); "
    "~1 is '/' and ~0 is '~' inside a key, e.g. lifecycle/fan~1speed"
)
#: Groups nest at most this deep (a document is at most ``limits.max_depth`` deep anyway).
MAX_GROUP_DEPTH = 32


def parse_fields(fields: str | None) -> list[list[str]] | None:
    if fields is None:
        return None
    paths, end = _selector(fields, 0, 0)
    if end != len(fields) or not paths:
        raise _invalid(fields)
    return paths


def _selector(text: str, at: int, depth: int) -> tuple[list[list[str]], int]:
    """The comma-separated items from ``at`` up to a closing parenthesis or the end."""
    if depth > MAX_GROUP_DEPTH:
        raise _invalid(text)
    paths: list[list[str]] = []
    while True:
        item, at = _item(text, at, depth)
        paths += item
        if at < len(text) and text[at] == ",":
            at += 1
            continue
        return paths, at


def _item(text: str, at: int, depth: int) -> tuple[list[list[str]], int]:
    """One path, and the paths of its group when parentheses follow it."""
    start = at
    while at < len(text) and text[at] not in ",()":
        at += 1
    try:
        prefix = split_pointer("/" + text[start:at].strip())
    except InvalidPointer:
        raise _invalid(text) from None  # a "~" that is not ~0 or ~1
    if any(not segment for segment in prefix):
        raise _invalid(text)
    if at < len(text) and text[at] == "(":
        group, at = _selector(text, at + 1, depth + 1)
        if at >= len(text) or text[at] != ")":
            raise _invalid(text)
        return [prefix + path for path in group], at + 1
    return [prefix], at


def _invalid(fields: str) -> BadRequest:
    return BadRequest(f"Invalid fields selector {fields!r}.", code="fields.invalid")


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
