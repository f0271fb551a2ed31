"""Search requests as values, built from HTTP parameters, and the in-memory reference pager."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from twin_service.errors import RqlInvalid
from twin_service.types import JSONObject

from .ast import Filter, SortKey
from .cursor import decode_cursor, encode_cursor, fingerprint
from .evaluator import matches
from .ordering import Key, Row, compare_positions, normalize_sort, row_sort_key, sort_keys
from .parser import parse_filter, parse_options

DEFAULT_SORT: tuple[SortKey, ...] = normalize_sort(())
#: Most distinct namespaces of one search: Elasticsearch refuses a longer terms list
#: (``index.max_terms_count``), as it does a longer ``in``.
MAX_NAMESPACES = 65_536


@dataclass(frozen=True)
class SearchQuery:
    """One page request. ``sort`` is normalized (ends with twinId); ``cursor`` is validated."""

    filter: Filter | None = None
    sort: tuple[SortKey, ...] = DEFAULT_SORT
    size: int = 25
    cursor: str | None = None
    namespaces: tuple[str, ...] | None = None
    after: tuple[Key, ...] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sort", normalize_sort(self.sort))
        if self.size < 1:
            raise RqlInvalid(f"size must be at least 1, got {self.size}")
        if self.cursor is not None:
            keys = decode_cursor(self.cursor, self.fingerprint, self.sort)
            object.__setattr__(self, "after", tuple(keys))
        else:
            object.__setattr__(self, "after", None)

    @property
    def fingerprint(self) -> str:
        """The hash a cursor of this query carries."""
        return fingerprint(self.filter, self.sort, self.namespaces)

    def next_cursor(self, keys: list[Key]) -> str:
        """The cursor that continues after a twin with these sort keys."""
        return encode_cursor(keys, self.fingerprint)


def parse_namespaces(namespaces: str | None) -> tuple[str, ...] | None:
    """The comma-separated ``namespaces`` parameter; None when it lists none ("not given",
    as for every blank search parameter)."""
    if namespaces is None:
        return None
    # Once each, in order: a repeated namespace is no other, and would take a terms slot.
    return tuple(dict.fromkeys(p.strip() for p in namespaces.split(",") if p.strip())) or None


def build_query(
    filter: str | None,
    option: str | None,
    namespaces: tuple[str, ...] | None,
    *,
    default_size: int = 25,
    max_size: int = 200,
) -> SearchQuery:
    """A :class:`SearchQuery` from the ``filter`` and ``option`` parameters, within
    ``namespaces`` (None: all; see :func:`parse_namespaces`).

    Blank parameters mean "not given".
    """
    parsed = parse_filter(filter) if filter and filter.strip() else None
    options = parse_options(option or "")
    size = default_size if options.size is None else options.size
    if not 1 <= size <= max_size:
        raise RqlInvalid(f"size must be between 1 and {max_size}, got {size}")
    if namespaces is not None and len(namespaces) > MAX_NAMESPACES:
        raise RqlInvalid(f"namespaces lists more than {MAX_NAMESPACES} namespaces")
    return SearchQuery(
        filter=parsed,
        sort=options.sort or (),
        size=size,
        cursor=options.cursor,
        namespaces=namespaces,
    )


def selected(doc: JSONObject, filter: Filter | None, namespaces: Iterable[str] | None) -> bool:
    """Whether ``doc`` is in the result set of a filter and namespace restriction."""
    if namespaces is not None and doc.get("namespace") not in set(namespaces):
        return False
    return filter is None or matches(filter, doc)


def page(docs: Iterable[JSONObject], query: SearchQuery) -> tuple[list[JSONObject], str | None]:
    """One page of ``docs`` for ``query``, and the cursor of the next page (None at the end)."""
    rows: list[Row] = [
        (sort_keys(doc, query.sort), doc)
        for doc in docs
        if selected(doc, query.filter, query.namespaces)
    ]
    if query.after is not None:
        after = list(query.after)
        rows = [r for r in rows if compare_positions(r[0], after, query.sort) > 0]
    rows.sort(key=row_sort_key(query.sort))
    chosen = rows[: query.size]
    more = len(rows) > query.size
    return [doc for _, doc in chosen], query.next_cursor(chosen[-1][0]) if more else None
