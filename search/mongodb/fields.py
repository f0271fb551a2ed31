"""The derived search fields of a twin document (``e`` values and ``k`` sort keys). Pure."""

from __future__ import annotations

from typing import Any

from search.rql.evaluator import present, type_rank
from search.rql.ordering import ARRAY, OBJECT
from search.rql.paths import FIXED_PATHS, TREE_ROOTS, format_path, lookup
from twin_service.twin.pointer import escape_token
from twin_service.types import JSON, JSONObject

from .encoding import encode_value, field_key

#: ``{field_key(path): {"t<rank>": [encodings]}}``
Values = dict[str, dict[str, Any]]


def _values(node: JSON, path: str, out: Values) -> None:
    """Every node at or below ``path``, arrays elided (their elements keep the path)."""
    slot = field_key(path)
    if isinstance(node, dict):
        if present(node):
            out.setdefault(slot, {})[f"t{OBJECT}"] = True
        for key, child in node.items():
            _values(child, f"{path}/{escape_token(key)}", out)
    elif isinstance(node, list):
        out.setdefault(slot, {})[f"t{ARRAY}"] = True
        for element in node:
            _values(element, path, out)
    else:
        ranks = out.setdefault(slot, {})
        encoded = encode_value(node)
        values: list[str] = ranks.setdefault(f"t{type_rank(node)}", [])
        if encoded not in values:
            values.append(encoded)


def _sort_keys(node: JSON, path: str, out: dict[str, str]) -> None:
    """Sort keys of every node reached without going through an array."""
    if isinstance(node, dict):
        if present(node):
            out[field_key(path)] = str(OBJECT)
            for key, child in node.items():
                _sort_keys(child, f"{path}/{escape_token(key)}", out)
    elif isinstance(node, list):
        out[field_key(path)] = str(ARRAY)
    else:
        out[field_key(path)] = encode_value(node)


def index_fields(doc: JSONObject) -> dict[str, Any]:
    """``{"e": {...}, "k": {...}}`` for a twin document (the API form, with ``delta``).

    ``e`` groups a path's value encodings by rank, so every range condition has a single
    bound (FerretDB evaluates the bounds of a scalar ``$elemMatch`` on different elements).
    """
    values: Values = {}
    keys: dict[str, str] = {}
    for fixed in FIXED_PATHS:
        found, node = lookup(doc, fixed)
        if found:
            _values(node, format_path(fixed), values)
            _sort_keys(node, format_path(fixed), keys)
    for root in TREE_ROOTS:
        if root in doc:
            _values(doc[root], escape_token(root), values)
            _sort_keys(doc[root], escape_token(root), keys)
    return {"e": values, "k": keys}
