"""RQL filters, sorts and keyset cursors to MongoDB query documents. Pure.

Filters test the ``e`` field of :mod:`search.mongodb.fields`: ``eq`` and ``in`` are exact
matches in the array of one path and rank, ranges a single bound on it (any element), ``exists``
the presence of the path, ``like`` an anchored regular expression written in the syntax PCRE
(MongoDB) and RE2 (FerretDB) share.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from search.rql import patterns
from search.rql.ast import (
    TWIN_ID_PATH,
    And,
    Compare,
    Exists,
    Filter,
    In,
    Like,
    Not,
    Or,
    Path,
    SortKey,
    Value,
)
from search.rql.evaluator import type_rank
from search.rql.ordering import Key
from search.rql.query import SearchQuery

from .encoding import encode_key, encode_value, path_field, sort_field, value_field

Query = dict[str, Any]

#: Matches no document.
NOTHING: Query = {"_id": {"$in": []}}

_RANGE = {"gt": "$gt", "ge": "$gte", "lt": "$lt", "le": "$lte"}


def _regex_literal(text: str) -> str:
    """``text`` as a regular expression literal valid in both PCRE and RE2."""
    out: list[str] = []
    for ch in text:
        if ch.isascii() and ch.isalnum():
            out.append(ch)
        elif ch.isascii() and ch.isprintable() and ch != " ":
            out.append("\\" + ch)
        elif ch.isascii() or not ch.isprintable():
            out.append(f"\\x{{{ord(ch):x}}}")
        else:
            out.append(ch)
    return "".join(out)


def like_regex(pattern: str, ignore_case: bool) -> str:
    """An anchored regular expression for ``like`` on string encodings (``"3" + text``)."""
    body: list[str] = []
    # The tokenizer is the evaluator's own, so escapes mean exactly the same here.
    for token in patterns._tokens(pattern):
        if token == "*":
            body.append(".*")
        elif token == "?":
            body.append(".")
        else:
            body.append(_regex_literal(token[1]))
    flags = "is" if ignore_case else "s"
    return f"^3(?{flags}:{''.join(body)})\\z"


def _equal(path: Path, value: Value) -> Query:
    return {value_field(path, type_rank(value)): encode_value(value)}


def filter_query(node: Filter) -> Query:
    """A MongoDB filter equivalent to :func:`search.rql.matches` on the ``e`` field."""
    if isinstance(node, And):
        return {"$and": [filter_query(op) for op in node.operands]}
    if isinstance(node, Or):
        return {"$or": [filter_query(op) for op in node.operands]}
    if isinstance(node, Not):
        return {"$nor": [filter_query(node.operand)]}
    if isinstance(node, Exists):
        return {path_field(node.path): {"$exists": True}}
    if isinstance(node, In):
        # Duplicates are dropped by (is boolean, value): Python takes True == 1, so keying by
        # value alone lost one of in(p, true, 1). (1 and 1.0 are one number, also in RQL.)
        distinct = {(isinstance(v, bool), v): v for v in node.values}
        alternatives = [_equal(node.path, v) for v in distinct.values()]
        return alternatives[0] if len(alternatives) == 1 else {"$or": alternatives}
    if isinstance(node, Like):
        patterns.validate(node.pattern)
        literal, whole = patterns.literal_prefix(node.pattern)
        if whole and not node.ignore_case:
            return _equal(node.path, literal)
        regex = like_regex(node.pattern, node.ignore_case)
        return {value_field(node.path, 3): {"$regex": regex}}
    assert isinstance(node, Compare)
    if node.op == "eq":
        return _equal(node.path, node.value)
    if node.op == "ne":
        field = value_field(node.path, type_rank(node.value))
        return {path_field(node.path): {"$exists": True}, field: {"$ne": encode_value(node.value)}}
    if node.value is None:
        return NOTHING
    return {
        value_field(node.path, type_rank(node.value)): {_RANGE[node.op]: encode_value(node.value)}
    }


def search_filter(filter: Filter | None, namespaces: Sequence[str] | None) -> Query:
    """The filter of live twins matching ``filter`` within ``namespaces`` (None: all)."""
    parts: list[Query] = [{"rev": {"$gt": 0}}]
    if namespaces is not None:
        parts.append({"ns": {"$in": list(namespaces)}})
    if filter is not None:
        parts.append(filter_query(filter))
    return parts[0] if len(parts) == 1 else {"$and": parts}


def _field(key: SortKey) -> str:
    return "_id" if key.path == TWIN_ID_PATH else sort_field(key.path)


def sort_spec(sort: Sequence[SortKey]) -> list[tuple[str, int]]:
    """The MongoDB sort of a normalized RQL sort (a missing key sorts like null: first)."""
    return [(_field(key), -1 if key.descending else 1) for key in sort]


def _beyond(field: str, key: Key, descending: bool) -> Query | None:
    """Documents strictly after ``key`` on one sort field, or None for "none are"."""
    encoded = encode_key(key)
    if not descending:
        if encoded is None:
            return {field: {"$exists": True}}
        return {field: {"$gt": encoded}}
    if encoded is None:
        return None
    return {"$or": [{field: {"$lt": encoded}}, {field: {"$exists": False}}]}


def _same(field: str, key: Key) -> Query:
    encoded = encode_key(key)
    return {field: {"$exists": False}} if encoded is None else {field: encoded}


def after_filter(query: SearchQuery) -> Query | None:
    """The keyset condition "after the cursor position" of ``query``, if it has a cursor."""
    if query.after is None:
        return None
    alternatives: list[Query] = []
    same: list[Query] = []
    for key, position in zip(query.sort, query.after, strict=True):
        field = _field(key)
        if key.path == TWIN_ID_PATH:
            value = position[1]
            beyond: Query | None = {field: {"$lt" if key.descending else "$gt": value}}
            equal: Query = {field: value}
        else:
            beyond = _beyond(field, position, key.descending)
            equal = _same(field, position)
        if beyond is not None:
            alternatives.append({"$and": [*same, beyond]} if same else beyond)
        same.append(equal)
    return {"$or": alternatives} if alternatives else NOTHING
