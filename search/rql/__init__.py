r"""RQL, the query language of Eclipse Ditto, over twin documents. Pure: no I/O.

Filters
    ``eq ne gt ge lt le`` (property, value); ``in(property, v1, v2, ...)``;
    ``like`` / ``ilike`` (property, "pattern"); ``exists(property)``;
    ``and(f, ...)``, ``or(f, ...)``, ``not(f)``. Whitespace is allowed around tokens.

Values
    integers, decimals (``-1.5``, ``2e10``), ``"double"`` or ``'single'`` quoted strings with
    the escapes ``\\ \" \' \/ \b \f \n \r \t \uXXXX``, ``true``, ``false``, ``null``.
    Only ``eq``, ``ne`` and ``in`` accept ``null``.

Properties
    ``twinId namespace definition revision created modified connection/status
    connection/since connection/lastSeen`` and any path under (or equal to) ``attributes``,
    ``desired``, ``reported``, ``live``, ``delta``, ``lifecycle``. Keys are separated by
    ``/``; inside a key ``~1`` stands for ``/`` and ``~0`` for ``~`` (JSON pointer). Empty
    keys cannot be addressed. A property containing ``( ) , ' "`` or whitespace is written
    as a quoted string: ``eq("attributes/a b",1)``. Array indexes are not addressable:
    paths go *through* arrays (``attributes/items/sku`` reaches ``sku`` in every element).

Semantics
    * Comparisons only hold between values of one type: numbers (``1 == 1.0``), strings
      (by code point), booleans (``false < true``); ``null`` only equals ``null``.
    * A property holding an array matches when ANY element matches (nested arrays flatten).
    * ``exists(p)`` is true when a scalar (null included) or an array (empty included) sits
      at or below ``p``. Objects holding nothing (``{}``, ``{"a": {}}``) count as absent, so
      ``exists(delta)`` is true exactly when the delta is non-empty.
    * ``ne(p, v)`` is ``and(exists(p), not(eq(p, v)))``: twins without ``p`` never match.
    * ``like`` patterns are anchored: ``*`` any run, ``?`` one character, ``\*`` ``\?``
      ``\\`` literal (note the string literal needs its own escaping: ``"a\\*"``); ``ilike``
      ignores case (Unicode simple case folding). Non-strings never match.

Options (``option`` parameter, comma separated, each at most once)
    ``sort(+p,-q)`` (a missing sign means ``+``; default ``+twinId``; ``+twinId`` is always
    appended as the final tie-break), ``size(n)`` (default 25, maximum 200, set by the
    caller), ``cursor(token)`` (opaque; only valid with the filter, sort and namespaces it was
    issued for). Sort order of types is documented in :mod:`search.rql.ordering`.

Errors
    :class:`~twin_service.errors.RqlSyntaxError` (``position`` 0-based, ``expected``) for text
    that does not parse; :class:`~twin_service.errors.RqlInvalid` for an unknown property,
    a non-string like pattern, a bad pattern escape, ``null`` with an ordering operator,
    size out of range, a malformed or foreign cursor.
"""

from __future__ import annotations

from .ast import (
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
from .evaluator import exists, matches, values_at
from .ordering import normalize_sort, order, sort_key
from .parser import Options, parse_filter, parse_options
from .paths import format_path, parse_path
from .printer import print_filter, print_sort
from .query import SearchQuery, build_query, page, parse_namespaces, selected

__all__ = [
    "And",
    "Compare",
    "Exists",
    "Filter",
    "In",
    "Like",
    "Not",
    "Options",
    "Or",
    "Path",
    "SearchQuery",
    "SortKey",
    "Value",
    "build_query",
    "exists",
    "format_path",
    "matches",
    "normalize_sort",
    "order",
    "page",
    "parse_filter",
    "parse_namespaces",
    "parse_options",
    "parse_path",
    "print_filter",
    "print_sort",
    "selected",
    "sort_key",
    "values_at",
]
