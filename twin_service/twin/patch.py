"""JSON Merge Patch (RFC 7396), JSON Patch (RFC 6902) and JSON Pointer (RFC 6901) edits.

All functions are pure: they return new values and never mutate their inputs.
"""

from __future__ import annotations

import copy
from typing import Any

import jsonpointer

from twin_service.errors import (
    InvalidPatch,
    InvalidPointer,
    LimitExceeded,
    NotFound,
    PreconditionFailed,
)
from twin_service.twin.jsonvalue import MAX_NESTING, Limits, check_size, dumps_bytes
from twin_service.twin.pointer import escape_token
from twin_service.types import JSON, JSONObject


def merge_patch(target: JSON, patch: JSON) -> JSON:
    """Apply an RFC 7396 merge patch; ``null`` in the patch deletes the key."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result: JSONObject = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def diff_merge_patch(old: JSON, new: JSON) -> JSON:
    """The merge patch that turns ``old`` into ``new`` (``{}`` when they are equal).

    Only valid for object roots; used to describe what a change did in change events.
    """
    if old is new:
        return {}
    if not isinstance(old, dict) or not isinstance(new, dict):
        return copy.deepcopy(new)
    patch: JSONObject = {}
    for key in old:
        if key not in new:
            patch[key] = None
    for key, value in new.items():
        if key not in old:
            patch[key] = copy.deepcopy(value)
        elif isinstance(value, dict) and isinstance(old[key], dict):
            sub = diff_merge_patch(old[key], value)
            if sub:
                patch[key] = sub
        elif not json_equal(old[key], value):
            patch[key] = copy.deepcopy(value)
    return patch


def json_equal(a: JSON, b: JSON) -> bool:
    """JSON value equality: numbers by value (1 == 1.0), booleans never equal numbers."""
    if a is b:
        return True
    # Exact types first: parsed JSON holds only dict, list, str, int, float, bool and None
    # (bool is not int here), and every write compares whole sections.
    ta, tb = type(a), type(b)
    if ta is tb:
        if ta is dict:
            if a.keys() != b.keys():
                return False
            # Loops, not all() over generators: a generator frame per object costs more.
            for key, value in a.items():  # noqa: SIM110
                if not json_equal(value, b[key]):
                    return False
            return True
        if ta is list:
            if len(a) != len(b):
                return False
            for x, y in zip(a, b, strict=True):  # noqa: SIM110
                if not json_equal(x, y):
                    return False
            return True
        if ta in _SCALARS:
            return bool(a == b)
    elif ta in _NUMBERS and tb in _NUMBERS:
        return bool(a == b)
    return _json_equal_slow(a, b)


_SCALARS = frozenset({str, int, float, bool, type(None)})
_NUMBERS = frozenset({int, float})


def _json_equal_slow(a: JSON, b: JSON) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(json_equal(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(json_equal(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


def split_pointer(pointer: str) -> list[str]:
    """Parse an RFC 6901 pointer (``""`` is the whole document) into unescaped tokens."""
    try:
        return list(jsonpointer.JsonPointer(pointer).parts)
    except jsonpointer.JsonPointerException as exc:
        raise InvalidPointer(f"Invalid JSON pointer {pointer!r}: {exc}") from exc


def join_pointer(parts: list[str]) -> str:
    return "".join("/" + escape_token(p) for p in parts)


def get_at(doc: JSON, parts: list[str]) -> JSON:
    """The value at ``parts``; :class:`NotFound` when any step is missing."""
    node = doc
    for i, part in enumerate(parts):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and _is_index(part) and int(part) < len(node):
            node = node[int(part)]
        else:
            raise NotFound(f"Nothing at {join_pointer(parts[: i + 1])}.", code="pointer.notfound")
    return node


def has_at(doc: JSON, parts: list[str]) -> bool:
    """Whether there is a value at ``parts`` (a PUT there replaces one, else creates one)."""
    try:
        get_at(doc, parts)
    except NotFound:
        return False
    return True


def set_at(doc: JSON, parts: list[str], value: JSON) -> JSON:
    """A copy of ``doc`` with a copy of ``value`` at ``parts``, creating missing parent
    objects."""
    return _place(doc, parts, copy.deepcopy(value))


def check_pointer_depth(parts: list[str]) -> None:
    """Refuse a write's pointer of more than ``MAX_NESTING`` tokens (400 limits.exceeded),
    before anything looks there: nothing nests that deep, so such a write can never succeed,
    and each token is a level of recursion in :func:`set_at` and :func:`remove_at`."""
    if len(parts) > MAX_NESTING:
        raise LimitExceeded(
            f"The pointer has {len(parts)} tokens: nothing nests deeper than {MAX_NESTING}.",
            extra={"limit": MAX_NESTING},
        )


def _place(doc: JSON, parts: list[str], value: JSON) -> JSON:
    """:func:`set_at` placing ``value`` itself, not a copy."""
    check_pointer_depth(parts)
    if not parts:
        return value
    head, rest = parts[0], parts[1:]
    if isinstance(doc, list):
        if head == "-" and not rest:
            return [*doc, value]
        if not _is_index(head) or int(head) >= len(doc):
            raise NotFound(f"Array index {head!r} is out of range.", code="pointer.notfound")
        result_list = list(doc)
        result_list[int(head)] = _place(doc[int(head)], rest, value)
        return result_list
    result: JSONObject = dict(doc) if isinstance(doc, dict) else {}
    if doc is not None and not isinstance(doc, dict):
        raise InvalidPointer(f"Cannot set {head!r} inside a non-object value.")
    result[head] = _place(result.get(head), rest, value)
    return result


def remove_at(doc: JSON, parts: list[str]) -> JSON:
    """A copy of ``doc`` without the value at ``parts``; :class:`NotFound` if absent."""
    if not parts:
        raise InvalidPointer("Cannot remove the root.")
    get_at(doc, parts)
    head, rest = parts[0], parts[1:]
    if isinstance(doc, list):
        idx = int(head)
        if not rest:
            return doc[:idx] + doc[idx + 1 :]
        result_list = list(doc)
        result_list[idx] = remove_at(doc[idx], rest)
        return result_list
    assert isinstance(doc, dict)
    result = dict(doc)
    if not rest:
        del result[head]
    else:
        result[head] = remove_at(doc[head], rest)
    return result


#: More digits than any list index can have (no list in a twin comes near 10**18 items).
_MAX_INDEX_DIGITS = 18


def _is_index(part: str) -> bool:
    # ASCII only: str.isdigit() also accepts '²' and other Unicode digits (RFC 6901 section 4).
    # Bounded: past 4,300 digits int() raises ValueError, and the callers convert it.
    return (
        part.isascii()
        and part.isdigit()
        and (part == "0" or not part.startswith("0"))
        and len(part) <= _MAX_INDEX_DIGITS
    )


def apply_json_patch(doc: JSON, operations: JSON, limits: Limits | None = None) -> JSON:
    """Apply an RFC 6902 JSON Patch atomically: either every operation applies or none.

    With ``limits``, the size limit holds after every operation, not only at the end
    (:class:`PayloadTooLarge`, as :func:`check_size` words it): a copy doubles what it
    copies, so a patch of a few dozen operations would otherwise build gigabytes before a
    last operation made the document small again. A patch's work is then bounded by its
    operations times the limit, and so are its operations (``limits.max_patch_operations``).
    """
    if not isinstance(operations, list):
        raise InvalidPatch("A JSON Patch must be an array of operations.")
    if limits is not None and len(operations) > limits.max_patch_operations:
        raise LimitExceeded(
            f"The JSON Patch has {len(operations)} operations; the limit is "
            f"{limits.max_patch_operations}.",
            extra={"limit": limits.max_patch_operations},
        )
    result = copy.deepcopy(doc)
    size = _SizeBound(result, limits) if limits is not None else None
    for index, op in enumerate(operations):
        try:
            result, written = _apply_operation(result, op)
        except (InvalidPatch, InvalidPointer, NotFound) as exc:
            raise InvalidPatch(
                f"Operation {index} failed: {exc.message}", code=_patch_code(exc)
            ) from exc
        if size is not None and written is not None:
            size.written(result, *written)
    return result


class _SizeBound:
    """A running upper bound of a document's compact JSON size as operations write to it.

    Each written value adds its own size and its key's (removals are not subtracted); only
    when the bound passes the limit is the document measured, exactly, and refused if it is
    really over. A patch of small values to a large twin thus never measures the twin.
    """

    def __init__(self, doc: JSON, limits: Limits) -> None:
        self.limits = limits
        self.bound = len(dumps_bytes(doc))

    def written(self, after: JSON, path: list[str], value: JSON) -> None:
        key = len(dumps_bytes(path[-1])) if path else 0
        self.bound += len(dumps_bytes(value)) + key + 2  # the key's colon and a comma
        if self.bound > self.limits.max_twin_bytes:
            encoded = dumps_bytes(after)
            check_size(encoded, self.limits)
            self.bound = len(encoded)


def _patch_code(exc: Exception) -> str:
    if isinstance(exc, NotFound):
        return "patch.path.notfound"
    if isinstance(exc, InvalidPointer):
        return "pointer.invalid"
    return "patch.invalid"


#: What an operation wrote, for the size bound: where, and the value (None: it wrote nothing).
_Written = tuple[list[str], JSON] | None


def _apply_operation(doc: JSON, op: Any) -> tuple[JSON, _Written]:
    if not isinstance(op, dict) or not isinstance(op.get("op"), str):
        raise InvalidPatch("Each operation must be an object with an 'op' string.")
    name = op["op"]
    path = _pointer_member(op, "path")
    if name in ("add", "replace"):
        if name == "replace":
            get_at(doc, path)
        value = copy.deepcopy(_value_member(op))
        placed = _add(doc, path, value) if name == "add" else _place(doc, path, value)
        return placed, (path, value)
    if name == "remove":
        return remove_at(doc, path), None
    if name in ("move", "copy"):
        # The value is shared, not copied: no edit ever changes a value in place (each
        # makes new containers along its path), and a deep copy cost every copy the
        # value's size in Python, thousands of times a large twin's in one request.
        source = _pointer_member(op, "from")
        value = get_at(doc, source)
        if name == "move":
            if path[: len(source)] == source and len(path) > len(source):
                raise InvalidPatch("Cannot move a value into one of its own children.")
            if source == path:  # removed, then added where it was: no change, list or not
                return doc, (path, value)  # still a write, for the size bound
            doc = remove_at(doc, source)
        return _add(doc, path, value), (path, value)
    if name == "test":
        if not json_equal(get_at(doc, path), _value_member(op)):
            raise PreconditionFailed(
                f"Test at {join_pointer(path)} failed.", code="patch.test.failed"
            )
        return doc, None
    raise InvalidPatch(f"Unknown operation {name!r}.")


def _add(doc: JSON, path: list[str], value: JSON) -> JSON:
    """``value`` itself added at ``path`` (the caller copies it if it must)."""
    if not path:
        return value
    parent = get_at(doc, path[:-1])
    last = path[-1]
    if isinstance(parent, list):
        if last == "-":
            index = len(parent)
        elif _is_index(last) and int(last) <= len(parent):
            index = int(last)
        else:
            raise NotFound(f"Array index {last!r} is out of range.", code="pointer.notfound")
        new_parent = [*parent[:index], value, *parent[index:]]
        return _place(doc, path[:-1], new_parent)
    if not isinstance(parent, dict):
        raise InvalidPatch(f"Cannot add {last!r} inside a non-container value.")
    return _place(doc, path, value)


def _pointer_member(op: JSONObject, member: str) -> list[str]:
    pointer = op.get(member)
    if not isinstance(pointer, str):
        raise InvalidPatch(f"Operation {op.get('op')!r} needs a string {member!r}.")
    if pointer and not pointer.startswith("/"):
        raise InvalidPointer(f"JSON pointer {pointer!r} must start with '/'.")
    return split_pointer(pointer)


def _value_member(op: JSONObject) -> JSON:
    if "value" not in op:
        raise InvalidPatch(f"Operation {op.get('op')!r} needs a 'value'.")
    return op["value"]
