"""Strict JSON decoding and the structural limits every stored document obeys.

Python's ``json`` accepts NaN, Infinity and duplicate keys; a twin must never hold them, so
decoding goes through :func:`loads_strict`. Limits are checked on the whole document *after*
a change is applied, because a small patch can still make a twin too large.
"""

from __future__ import annotations

import json
import math
import re
import sys
from dataclasses import dataclass
from typing import Any

import orjson

from twin_service.errors import BadRequest, InvalidJson, LimitExceeded, PayloadTooLarge
from twin_service.twin.pointer import escape_token
from twin_service.types import JSON


def _reject_constant(name: str) -> Any:
    raise InvalidJson(f"Non-finite number {name} is not valid JSON.")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise InvalidJson(f"Duplicate key {key!r} in JSON object.")
        result[key] = value
    return result


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise InvalidJson(f"Number {text} is out of range.")
    return value


# JSON has no leading zeros, so the digit count bounds the magnitude; checking it first also
# keeps int() away from Python's 4300-digit conversion limit (a bare ValueError).
_MAX_INT_DIGITS = len(str(int(sys.float_info.max)))


def _finite_int(text: str) -> int:
    """Integers beyond the double range overflow like ``1e999`` does."""
    if len(text.lstrip("-")) > _MAX_INT_DIGITS:
        raise InvalidJson(f"Number {text[:20]}... is out of range.")
    value = int(text)
    if abs(value) > sys.float_info.max:
        raise InvalidJson(f"Number {text} is out of range.")
    return value


# Lone surrogates (from "\ud800" escapes) decode fine but cannot be encoded as UTF-8 again.
_MAYBE_SURROGATE = re.compile(r"[\ud800-\udfff]|\\u[dD][89a-fA-F]")
_SURROGATE = re.compile(r"[\ud800-\udfff]")


def _refuse_surrogates(value: JSON) -> None:
    if isinstance(value, str):
        if _SURROGATE.search(value):
            raise InvalidJson("String holds a lone UTF-16 surrogate, which is not valid Unicode.")
    elif isinstance(value, dict):
        for key, child in value.items():
            _refuse_surrogates(key)
            _refuse_surrogates(child)
    elif isinstance(value, list):
        for child in value:
            _refuse_surrogates(child)


#: Deeper than any accepted value can be (``limits.max_depth`` is at most 64, and a request
#: wraps its value in a few levels). The functions that copy, merge and compare values
#: recurse, some with more than one frame per level: a value nested a few hundred levels
#: deep, which the decoder still reads, would hit Python's recursion limit in them.
MAX_NESTING = 128


def _deeper_than(value: JSON, limit: int) -> bool:
    """Whether ``value`` nests more than ``limit`` objects or arrays (without recursing)."""
    stack: list[tuple[JSON, int]] = [(value, 1)] if isinstance(value, dict | list) else []
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        children = node.values() if isinstance(node, dict) else node
        stack.extend((c, depth + 1) for c in children if isinstance(c, dict | list))
    return False


#: One decoder for every call: ``json.loads`` with hooks builds a new one each time.
_DECODER = json.JSONDecoder(
    object_pairs_hook=_no_duplicates,
    parse_constant=_reject_constant,
    parse_float=_finite_float,
    parse_int=_finite_int,
)


def loads_strict(data: bytes | str) -> JSON:
    """Decode JSON, refusing invalid UTF-8, duplicate keys and non-finite numbers."""
    if isinstance(data, bytes):
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidJson(f"Body is not valid UTF-8 (byte {exc.start}).") from exc
    else:
        text = data
    try:
        value = _DECODER.decode(text)
        # Counting brackets (strings included) is cheap, and bounds the depth from above.
        if text.count("[") + text.count("{") > MAX_NESTING and _deeper_than(value, MAX_NESTING):
            raise LimitExceeded(
                f"JSON is nested deeper than {MAX_NESTING} levels.", extra={"limit": MAX_NESTING}
            )
        if _MAYBE_SURROGATE.search(text):
            _refuse_surrogates(value)
    except json.JSONDecodeError as exc:
        raise InvalidJson(
            f"Malformed JSON: {exc.msg} at line {exc.lineno} column {exc.colno}.",
            extra={"position": exc.pos},
        ) from exc
    except RecursionError as exc:  # deeper than the decoder goes (about 1,000 levels)
        raise LimitExceeded(
            f"JSON is nested deeper than {MAX_NESTING} levels.", extra={"limit": MAX_NESTING}
        ) from exc
    return value


def dumps_bytes(value: JSON) -> bytes:
    """Compact UTF-8 JSON, as stored, measured and sent (no NaN possible after validation).

    orjson encodes a twin about 15x faster than ``json``; what it refuses (integers beyond
    64 bits, which JSON and this service allow) goes through ``json`` with the same compact
    form.
    """
    try:
        return orjson.dumps(value)
    except orjson.JSONEncodeError:
        return _std_dumps(value).encode()


def dumps(value: JSON) -> str:
    """:func:`dumps_bytes` as text."""
    return dumps_bytes(value).decode()


def _std_dumps(value: JSON) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


@dataclass(frozen=True)
class Limits:
    """Structural limits; the values come from Settings."""

    max_twin_bytes: int = 64 * 1024
    max_depth: int = 16
    max_key_length: int = 256
    max_patch_operations: int = 1000


def check_structure(
    value: JSON,
    limits: Limits,
    *,
    where: str = "",
    depth: int = 0,
    checked: JSON = None,
    in_array: bool = False,
) -> None:
    """Validate depth, key length, forbidden keys and null members of a twin section's value
    (recursively).

    A section is merge-patch based: ``null`` deletes there, in a merge patch and in the
    ``changes`` of a change event, so it is never a stored value of an object member (an
    array, replaced whole by a merge patch, may hold one). A null the previous version
    already held at the same place is let be, so a twin stored before this rule still
    takes writes.

    ``checked`` is a value already validated at the same place (the previous version of a
    section): subtrees that are the very same objects are skipped, so a small patch of a
    large twin only pays for what it changed.
    """
    if checked is not None and value is checked:
        return
    if depth > limits.max_depth:
        raise LimitExceeded(
            f"Nesting at {where or '/'} is deeper than the limit of {limits.max_depth} levels.",
            extra={"limit": limits.max_depth},
        )
    if isinstance(value, dict):
        known = checked if isinstance(checked, dict) else {}
        for key, child in value.items():
            if key not in known:
                check_key(key, limits, where=where)
            # A JSON pointer, as the client would write it to reach the value (RFC 6901).
            at = f"{where}/{escape_token(key)}"
            if child is None and not in_array and not (key in known and known[key] is None):
                raise BadRequest(
                    f"The value at {at} is null: null deletes in a merge patch, so a "
                    "twin holds none. Use DELETE (or null in a merge patch) to remove it.",
                    code="twin.invalid",
                )
            check_structure(
                child,
                limits,
                where=at,
                depth=depth + 1,
                checked=known.get(key),
                in_array=in_array,
            )
    elif isinstance(value, list):
        for index, child in enumerate(value):
            check_structure(child, limits, where=f"{where}/{index}", depth=depth + 1, in_array=True)
    elif isinstance(value, float) and not math.isfinite(value):
        raise InvalidJson(f"Non-finite number at {where or '/'}.")


def check_key(key: str, limits: Limits, *, where: str = "") -> None:
    """Refuse empty keys, keys with control characters, and over-long keys."""
    if key == "":
        raise LimitExceeded(f"Empty key under {where or '/'} is not allowed.")
    if len(key) > limits.max_key_length:
        raise LimitExceeded(
            f"Key under {where or '/'} is {len(key)} characters long; the limit is "
            f"{limits.max_key_length}.",
            extra={"limit": limits.max_key_length},
        )
    # Unicode category Cc: C0 controls, DEL and the C1 controls.
    if any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in key):
        raise LimitExceeded(f"Key {key!r} under {where or '/'} contains control characters.")


def check_size(encoded: bytes, limits: Limits) -> None:
    """Refuse a document whose compact JSON exceeds the size limit (413)."""
    size = len(encoded)
    if size > limits.max_twin_bytes:
        raise PayloadTooLarge(
            f"The twin would be {size} bytes of JSON after this change; the limit is "
            f"{limits.max_twin_bytes} bytes.",
            extra={"size": size, "limit": limits.max_twin_bytes},
        )
