"""RQL to Elasticsearch query DSL, sort and ``search_after``, over :mod:`.mapping`. Pure.

Every condition on a path is one ``nested`` query over ``leaves`` ("some leaf at this path
satisfies it"), which is exactly the evaluator's "any value reached matches"; ``and``, ``or``
and ``not`` become ``bool`` clauses around them.

Sorting on a path uses three nested sort entries filtered to the path's non-array leaf (at
most one per twin): the type rank ``t`` (missing: -1), then ``n`` and ``s``. Within one rank
at most one of ``n``/``s`` is present, and the fixed ``missing`` values make twins without it
tie there, so the three entries order exactly like the evaluator's ``(rank, value)`` key, in
both directions. ``+twinId``/``-twinId`` uses the top-level keyword, which is unique.

Known differences from the evaluator (documented in docs/scaling.md; the differential
vocabulary never reaches them, so nothing is excluded from the generator):

* numbers are doubles: integers beyond 2**53 compare and sort approximately;
* strings longer than :data:`.mapping.MAX_INDEXED_STRING` UTF-16 code units (what the
  keyword's ``ignore_above`` counts: a character beyond U+FFFF counts twice) are not indexed
  by value. Such a value in a query is never sent as a term (Lucene refuses terms over
  32,766 bytes): ``eq``, ``in`` and ``like`` cannot match it, and range bounds are cut to a
  prefix that compares the same with every indexed string (:func:`_range_bound`);
* a path or namespace over :data:`.mapping.MAX_TERM_BYTES` cannot be in any document (the
  engine refuses such a twin), so it is never sent as a term either (:func:`indexable`): a
  condition on it matches nothing, sorting by it sorts every twin as missing, and such a
  namespace is left out of the namespaces searched;

``ilike`` matches :func:`search.rql.patterns.fold` of the pattern against the folded strings
the documents hold (Lucene's own ``case_insensitive`` folds ASCII only), so it ignores case
exactly as the evaluator does, in every script.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any, TypeAlias

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
from search.rql.ordering import MISSING, Key
from search.rql.paths import format_path

from .mapping import MAX_INDEXED_STRING, MAX_TERM_BYTES, as_double

Query: TypeAlias = dict[str, Any]

#: Placeholders sorted in for twins without a number / string at a sort path.
MISSING_NUMBER = 0.0
MISSING_STRING = ""

_RANGE = {"gt": "gt", "ge": "gte", "lt": "lt", "le": "lte"}
_MATCH_ALL: Query = {"match_all": {}}
_MATCH_NONE: Query = {"match_none": {}}


def _utf16_units(text: str) -> int:
    return len(text.encode("utf-16-le")) // 2


def searchable(text: str) -> bool:
    """Whether the keyword field indexes ``text`` (its ``ignore_above`` counts UTF-16 units)."""
    return len(text) * 2 <= MAX_INDEXED_STRING or _utf16_units(text) <= MAX_INDEXED_STRING


def indexable(term: str) -> bool:
    """Whether a keyword term fits Lucene's limit; a longer one is refused in a query too."""
    return len(term) * 4 <= MAX_TERM_BYTES or len(term.encode()) <= MAX_TERM_BYTES


def _path_term(path: Path) -> Query:
    """The leaves at ``path``: none if the path is too long to be in any document."""
    text = format_path(path)
    return {"term": {"leaves.p": text}} if indexable(text) else _MATCH_NONE


def _range_bound(text: str) -> str:
    """A bound that every indexed string compares with as with ``text``: ``text`` itself, or
    its shortest prefix longer than any indexed string (at most 24,579 UTF-8 bytes). An
    indexed string that is a prefix of ``text`` is a proper prefix of the cut one, and any
    other differs from both at the same place, before the cut."""
    if searchable(text):
        return text
    cut, units = 0, 0
    while units <= MAX_INDEXED_STRING:
        units += 2 if ord(text[cut]) > 0xFFFF else 1
        cut += 1
    return text[:cut]


def _min_units(pattern: str) -> int:
    """The fewest UTF-16 units of a string ``pattern`` matches (``?`` takes one or two)."""
    return sum(
        _utf16_units(token[1]) if token[0] == "=" else 1 if token == "?" else 0
        for token in patterns._tokens(pattern)
    )


def _leaf(path: Path, *conditions: Query) -> Query:
    """Twins with a leaf at ``path`` satisfying every condition."""
    return {
        "nested": {
            "path": "leaves",
            "query": {"bool": {"filter": [_path_term(path), *conditions]}},
        }
    }


def _value_terms(value: Value) -> list[Query]:
    """Conditions on one leaf for "equal to ``value``" (typed: ``1 == 1.0``, ``1 != true``)."""
    rank = type_rank(value)
    out: list[Query] = [{"term": {"leaves.t": rank}}]
    if rank in (1, 2):
        out.append({"term": {"leaves.n": as_double(value)}})
    elif rank == 3:
        assert isinstance(value, str)
        out.append({"term": {"leaves.s": value}} if searchable(value) else _MATCH_NONE)
    return out


def _eq(path: Path, value: Value) -> Query:
    return _leaf(path, *_value_terms(value))


def _in(node: In) -> Query:
    by_rank: dict[int, list[Value]] = defaultdict(list)
    for value in node.values:
        if not isinstance(value, str) or searchable(value):
            by_rank[type_rank(value)].append(value)
    if not by_rank:
        return _MATCH_NONE
    options: list[Query] = []
    for rank, values in sorted(by_rank.items()):
        if rank == 0:
            options.append({"term": {"leaves.t": 0}})
            continue
        field = "leaves.s" if rank == 3 else "leaves.n"
        terms = [v if rank == 3 else as_double(v) for v in values]
        options.append(
            {"bool": {"filter": [{"term": {"leaves.t": rank}}, {"terms": {field: terms}}]}}
        )
    if len(options) == 1:
        return _leaf(node.path, options[0])
    return _leaf(node.path, {"bool": {"should": options, "minimum_should_match": 1}})


def wildcard_pattern(pattern: str) -> str:
    """An RQL like pattern as a Lucene wildcard.

    Both use ``*`` and ``?`` and escape ``*``, ``?`` and ``\\`` with a backslash, so a valid
    RQL pattern already is the Lucene pattern; this only validates it.
    """
    patterns.validate(pattern)
    return pattern


def _like(node: Like) -> Query:
    prefix, literal = patterns.literal_prefix(node.pattern)
    if literal and (not node.ignore_case or not prefix):
        # ilike of "" too: only "" folds to "", and an empty wildcard value matches nothing.
        return _eq(node.path, prefix)
    if _min_units(node.pattern) > MAX_INDEXED_STRING:
        return _MATCH_NONE  # every string it matches is too long to be indexed
    if not node.ignore_case:
        wildcard = {"wildcard": {"leaves.s": {"value": wildcard_pattern(node.pattern)}}}
        return _leaf(node.path, {"term": {"leaves.t": 3}}, wildcard)
    # Lucene's case_insensitive folds ASCII only: match the folded pattern against the
    # folded string instead, kept in ``f`` where it differs from ``s`` (see mapping).
    folded = wildcard_pattern(patterns.fold(node.pattern))
    in_f = {"wildcard": {"leaves.f": {"value": folded}}}
    in_s = {
        "bool": {
            "filter": [{"wildcard": {"leaves.s": {"value": folded}}}],
            "must_not": [{"exists": {"field": "leaves.f"}}],
        }
    }
    either = {"bool": {"should": [in_f, in_s], "minimum_should_match": 1}}
    return _leaf(node.path, {"term": {"leaves.t": 3}}, either)


def _compare(node: Compare) -> Query:
    if node.op == "eq":
        return _eq(node.path, node.value)
    if node.op == "ne":
        return {"bool": {"filter": [_leaf(node.path)], "must_not": [_eq(node.path, node.value)]}}
    rank = type_rank(node.value)
    field = "leaves.s" if rank == 3 else "leaves.n"
    bound: Any = _range_bound(node.value) if isinstance(node.value, str) else as_double(node.value)
    return _leaf(
        node.path, {"term": {"leaves.t": rank}}, {"range": {field: {_RANGE[node.op]: bound}}}
    )


def filter_query(node: Filter) -> Query:
    """A query matching exactly the twins :func:`search.rql.matches` accepts."""
    if isinstance(node, Compare):
        return _compare(node)
    if isinstance(node, In):
        return _in(node)
    if isinstance(node, Like):
        return _like(node)
    if isinstance(node, Exists):
        return _leaf(node.path)
    if isinstance(node, And):
        return {"bool": {"filter": [filter_query(op) for op in node.operands]}}
    if isinstance(node, Or):
        return {
            "bool": {
                "should": [filter_query(op) for op in node.operands],
                "minimum_should_match": 1,
            }
        }
    assert isinstance(node, Not)
    return {"bool": {"must_not": [filter_query(node.operand)]}}


def search_query(filter: Filter | None, namespaces: Sequence[str] | None) -> Query:
    """The whole query: the filter within the namespaces (None: all namespaces)."""
    clauses: list[Query] = []
    if filter is not None:
        clauses.append(filter_query(filter))
    if namespaces is not None:
        terms = [n for n in namespaces if indexable(n)]
        clauses.append({"terms": {"namespace": terms}} if terms else _MATCH_NONE)
    if not clauses:
        return _MATCH_ALL
    return clauses[0] if len(clauses) == 1 else {"bool": {"filter": clauses}}


def _nested_sort(field: str, path: Path, order: str, missing: Any) -> Query:
    return {
        f"leaves.{field}": {
            "order": order,
            "missing": missing,
            "nested": {
                "path": "leaves",
                "filter": {
                    "bool": {
                        "filter": [
                            _path_term(path),
                            {"term": {"leaves.a": False}},
                        ]
                    }
                },
            },
        }
    }


def sort_clause(sort: Sequence[SortKey]) -> list[Query]:
    """The ES ``sort`` of a normalized RQL sort (it ends with twinId): 3 entries per path."""
    out: list[Query] = []
    for key in sort:
        order = "desc" if key.descending else "asc"
        if key.path == TWIN_ID_PATH:
            out.append({"twinId": {"order": order}})
            continue
        out.append(_nested_sort("t", key.path, order, MISSING))
        out.append(_nested_sort("n", key.path, order, MISSING_NUMBER))
        out.append(_nested_sort("s", key.path, order, MISSING_STRING))
    return out


def search_after(sort: Sequence[SortKey], keys: Sequence[Key]) -> list[Any]:
    """The ``search_after`` values of a position given as evaluator keys (from a cursor)."""
    out: list[Any] = []
    for key, (rank, value) in zip(sort, keys, strict=True):
        if key.path == TWIN_ID_PATH:
            out.append(value)
            continue
        out.append(rank)
        out.append(as_double(value) if rank in (1, 2) and value is not None else MISSING_NUMBER)
        out.append(value if rank == 3 else MISSING_STRING)
    return out


def keys_from_hit(sort: Sequence[SortKey], values: Sequence[Any]) -> list[Key]:
    """The evaluator keys of a hit from its ES sort values (inverse of :func:`search_after`)."""
    keys: list[Key] = []
    i = 0
    for key in sort:
        if key.path == TWIN_ID_PATH:
            keys.append((3, str(values[i])))
            i += 1
            continue
        rank, number, string = int(values[i]), values[i + 1], values[i + 2]
        i += 3
        if rank == 1:
            keys.append((1, int(number)))
        elif rank == 2:
            num = float(number)
            keys.append((2, int(num) if num.is_integer() and abs(num) < 2**53 else num))
        elif rank == 3:
            keys.append((3, str(string)))
        else:
            keys.append((rank, None))
    return keys
