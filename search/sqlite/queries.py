"""Writing to and querying the SQLite search index, inside the caller's transaction."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Any, TypeAlias

from search.rql import patterns
from search.rql.ast import TWIN_ID_PATH, Filter, SortKey
from search.rql.ordering import Key
from search.rql.paths import format_path
from search.rql.query import SearchQuery
from twin_service.errors import RqlInvalid
from twin_service.types import JSONObject

from . import numbers
from .rows import VALUELESS_ROOT, Row, RowChanges, diff_rows, leaves, numbered
from .translate import Sql, _selectivity, bind_value, filter_sql, number_condition, valued_path


def _rql_like(pattern: str, ignore_case: int, value: Any) -> int:
    return int(isinstance(value, str) and patterns.like(pattern, bool(ignore_case), value))


def register_functions(conn: sqlite3.Connection) -> None:
    """Install the SQL functions the index queries use (done lazily by every query)."""
    try:
        conn.execute("SELECT rql_like('', 0, '')").fetchone()
    except sqlite3.OperationalError:
        conn.create_function("rql_like", 3, _rql_like, deterministic=True)


def _cursor(conn: sqlite3.Connection) -> sqlite3.Cursor:
    cur = conn.cursor()
    cur.row_factory = None
    return cur


def _query(conn: sqlite3.Connection, sql: str, params: Sequence[Any]) -> sqlite3.Cursor:
    """``sql`` run, or a 400 when it binds more values than SQLite takes in one statement
    (SQLITE_MAX_VARIABLE_NUMBER: 32,766 by default, more in some builds): several long
    ``in`` lists can pass it. It failed with "too many SQL variables", answered 503 and
    Retry-After, for a query that could never run."""
    most = conn.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
    if len(params) > most:
        raise RqlInvalid(
            f"query binds {len(params)} values (its conditions', its in lists' and its "
            f"namespaces'); the SQLite store takes at most {most} in one query: split the "
            "in lists across requests"
        )
    return _cursor(conn).execute(sql, params)


def index_twin(
    conn: sqlite3.Connection, doc: JSONObject, previous: JSONObject | None = None
) -> None:
    """Replace the index rows of ``doc["twinId"]`` with the rows of ``doc``.

    ``previous`` is the document this one replaces, as the index holds it (the caller read
    it at the revision it replaces, in this transaction's snapshot). With it, only the rows
    that differ are written, computed from the two documents alone: a typical write changes
    a few leaves (and the revision and modified rows) out of dozens, and every row costs
    two B-tree updates.
    """
    cur = _cursor(conn)
    if previous is not None:
        found = cur.execute(
            "SELECT tid FROM search_twin WHERE twin_id = ?", (doc["twinId"],)
        ).fetchone()
        if found is not None:
            _apply_changes(cur, found[0], diff_rows(previous, doc))
            return
    cur.execute(
        "INSERT INTO search_twin (twin_id, namespace) VALUES (?, ?) "
        "ON CONFLICT (twin_id) DO UPDATE SET namespace = excluded.namespace RETURNING tid",
        (doc["twinId"], doc.get("namespace", "")),
    )
    (tid,) = cur.fetchone()
    rows = cur.execute("SELECT path, seq, t, v, x, a FROM search_leaf WHERE tid = ?", (tid,))
    old = {(path, seq): (t, numbers.number(v, x), a) for path, seq, t, v, x, a in rows}
    new = keyed_rows(leaves(doc, delta_values=False))
    stale = [(tid, path, seq) for (path, seq) in old.keys() - new.keys()]
    if stale:
        cur.executemany("DELETE FROM search_leaf WHERE tid = ? AND path = ? AND seq = ?", stale)
    changed = [
        (path, seq, *row) for (path, seq), row in new.items() if _differs(old.get((path, seq)), row)
    ]
    _upsert(cur, tid, changed)


def _split(rows: list[Row]) -> tuple[list[Row], list[Row]]:
    """``rows`` as (those whose value SQLite holds as it is, those of integers beyond 64 bits).

    The latter need their ``x`` (:mod:`.numbers`), and are rare: the others are written as
    before ``x`` existed (a NULL costs a statement nothing to bind), in a pass this cheap.
    """
    big = [
        row
        for row in rows
        if row[2] == 2 and row[3].__class__ is int and not -(2**63) <= row[3] < 2**63
    ]
    return ([row for row in rows if row not in big], big) if big else (rows, big)


def _upsert(cur: sqlite3.Cursor, tid: int, rows: list[Row]) -> None:
    plain, big = _split(rows)
    if plain:
        cur.executemany(
            "INSERT INTO search_leaf (tid, path, seq, t, v, a) VALUES (?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (tid, path, seq) DO UPDATE SET t = excluded.t, v = excluded.v, "
            "x = NULL, a = excluded.a",
            [(tid, *row) for row in plain],
        )
    if big:
        cur.executemany(
            "INSERT INTO search_leaf (tid, path, seq, t, v, x, a) VALUES (?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (tid, path, seq) DO UPDATE SET t = excluded.t, v = excluded.v, "
            "x = excluded.x, a = excluded.a",
            [(tid, path, seq, t, *numbers.stored(v), a) for path, seq, t, v, a in big],
        )


def _apply_changes(cur: sqlite3.Cursor, tid: int, changes: RowChanges) -> None:
    for path in changes.subtrees:
        # '0' follows '/': the range holds exactly the paths below ``path``.
        cur.execute(
            "DELETE FROM search_leaf WHERE tid = ? AND (path = ? OR (path >= ? AND path < ?))",
            (tid, path, path + "/", path + "0"),
        )
    if changes.removed:
        cur.executemany(
            "DELETE FROM search_leaf WHERE tid = ? AND path = ? AND seq = ?",
            [(tid, path, seq) for path, seq in changes.removed],
        )
    _upsert(cur, tid, changes.rows)
    if changes.updated:
        # An UPDATE skips the failed insert an upsert starts with (one B-tree descent per row).
        plain, big = _split(changes.updated)
        found = 0
        if plain:
            cur.executemany(
                "UPDATE search_leaf SET t = ?, v = ?, x = NULL, a = ? "
                "WHERE tid = ? AND path = ? AND seq = ?",
                [(t, v, a, tid, path, seq) for path, seq, t, v, a in plain],
            )
            found += cur.rowcount
        if big:
            cur.executemany(
                "UPDATE search_leaf SET t = ?, v = ?, x = ?, a = ? "
                "WHERE tid = ? AND path = ? AND seq = ?",
                [(t, *numbers.stored(v), a, tid, path, seq) for path, seq, t, v, a in big],
            )
            found += cur.rowcount
        if found != len(changes.updated):
            # The index did not hold the previous document's rows after all: write them whole.
            _upsert(cur, tid, changes.updated)


def keyed_rows(
    rows: list[tuple[str, int, Any, int]],
) -> dict[tuple[str, int], tuple[int, Any, int]]:
    """Rows keyed by (path, position among the rows of that path): stable across writes."""
    return {(path, seq): (t, v, a) for path, seq, t, v, a in numbered(rows)}


def _differs(old: tuple[int, Any, int] | None, new: tuple[int, Any, int]) -> bool:
    # Compare types too: 1 and 1.0 are equal in Python but stored differently.
    return old is None or old != new or type(old[1]) is not type(new[1])


def unindex_twin(conn: sqlite3.Connection, twin_id: str) -> None:
    """Remove a twin from the index (no error if it is not there)."""
    cur = _cursor(conn)
    row = cur.execute("SELECT tid FROM search_twin WHERE twin_id = ?", (twin_id,)).fetchone()
    if row is not None:
        cur.execute("DELETE FROM search_leaf WHERE tid = ?", (row[0],))
        cur.execute("DELETE FROM search_twin WHERE tid = ?", (row[0],))


def _where(filter: Filter | None, namespaces: Sequence[str] | None) -> Sql:
    parts: list[str] = []
    params: list[Any] = []
    if filter is not None:
        sql, p = filter_sql(filter)
        parts.append(sql)
        params.extend(p)
    if namespaces is not None:
        # With a selective filter, "+" keeps SQLite off the (namespace, twin_id) index:
        # walking it in twin_id order and probing the filter per twin scans the whole
        # namespace when matches are rare; the filter's value-index lookup drives instead.
        # Broad filters keep the walk, which stops after one page of matches.
        selective = filter is not None and _selectivity(filter) <= 2
        column = "+t.namespace" if selective else "t.namespace"
        parts.append(f"{column} IN ({','.join('?' * len(namespaces))})")
        params.extend(namespaces)
    return " AND ".join(parts) or "1", params


def count(conn: sqlite3.Connection, filter: Filter | None, namespaces: Sequence[str] | None) -> int:
    """How many twins match ``filter`` within ``namespaces`` (None: all namespaces)."""
    register_functions(conn)
    where, params = _where(filter, namespaces)
    row = _query(conn, f"SELECT count(*) FROM search_twin t WHERE {where}", params)
    return int(row.fetchone()[0])


#: The SQL of one sort key: its rank, value and, for numbers, excess
#: (:mod:`search.sqlite.numbers`) columns.
SortExprs: TypeAlias = tuple[str, str, str]


def _keyset(sort: Sequence[SortKey], exprs: list[SortExprs], after: Sequence[Key]) -> Sql:
    """Rows strictly after the position ``after`` in the order ``sort``."""
    alternatives: list[str] = []
    params: list[Any] = []
    same: list[str] = []
    same_params: list[Any] = []
    for key, (rank, value, x), (cursor_rank, cursor_value) in zip(sort, exprs, after, strict=True):
        op = "<" if key.descending else ">"
        if key.path == TWIN_ID_PATH:
            beyond, beyond_params = f"{value} {op} ?", [cursor_value]
            equal, equal_params = f"{value} = ?", [cursor_value]
        elif cursor_rank == 2:
            assert isinstance(cursor_value, int | float)
            after_sql, after_params = number_condition(
                "lt" if key.descending else "gt", cursor_value
            )
            same_sql, same_params_ = number_condition("eq", cursor_value)
            after_sql, same_sql = (c.format(v=value, x=x) for c in (after_sql, same_sql))
            beyond = f"({rank} {op} ? OR ({rank} = ? AND {after_sql}))"
            beyond_params = [cursor_rank, cursor_rank, *after_params]
            equal, equal_params = f"{rank} = ? AND {same_sql}", [cursor_rank, *same_params_]
        else:
            bound = bind_value(cursor_value)
            beyond = f"({rank} {op} ? OR ({rank} = ? AND {value} {op} ?))"
            beyond_params = [cursor_rank, cursor_rank, bound]
            equal, equal_params = f"{rank} = ? AND {value} IS ?", [cursor_rank, bound]
        alternatives.append("(" + " AND ".join([*same, beyond]) + ")")
        params.extend([*same_params, *beyond_params])
        same.append(equal)
        same_params.extend(equal_params)
    return "(" + " OR ".join(alternatives) + ")", params


def search_ids(conn: sqlite3.Connection, query: SearchQuery) -> tuple[list[str], str | None]:
    """The twin ids of one page, in order, and the cursor of the next page (None at the end)."""
    register_functions(conn)
    joins: list[str] = []
    join_params: list[Any] = []
    exprs: list[SortExprs] = []
    for i, key in enumerate(query.sort):
        if key.path == TWIN_ID_PATH:
            exprs.append(("3", "t.twin_id", "NULL"))
            continue
        if key.path[0] == VALUELESS_ROOT:
            # The delta's rows say whether it holds the path and what type; the value is
            # desired's at the same path (search.sqlite.rows).
            joins.append(
                f"LEFT JOIN search_leaf d{i} ON d{i}.tid = t.tid AND d{i}.path = ? AND d{i}.a = 0 "
                f"LEFT JOIN search_leaf s{i} ON s{i}.tid = d{i}.tid AND s{i}.path = ? "
                f"AND s{i}.a = 0"
            )
            join_params += [format_path(key.path), format_path(valued_path(key.path))]
            exprs.append((f"coalesce(d{i}.t, -1)", f"s{i}.v", f"s{i}.x"))
            continue
        joins.append(
            f"LEFT JOIN search_leaf s{i} ON s{i}.tid = t.tid AND s{i}.path = ? AND s{i}.a = 0"
        )
        join_params.append(format_path(key.path))
        exprs.append((f"coalesce(s{i}.t, -1)", f"s{i}.v", f"s{i}.x"))
    where, params = _where(query.filter, query.namespaces)
    if query.after is not None:
        keyset, keyset_params = _keyset(query.sort, exprs, query.after)
        where = f"{where} AND {keyset}"
        params.extend(keyset_params)
    order = ", ".join(
        f"{expr} {'DESC' if key.descending else 'ASC'}"
        for key, (rank, value, x) in zip(query.sort, exprs, strict=True)
        for expr in ((rank, value, f"ifnull({x}, 0)") if key.path != TWIN_ID_PATH else (value,))
    )
    columns = ", ".join(f"{rank}, {value}, {x}" for rank, value, x in exprs)
    sql = (
        f"SELECT {columns} FROM search_twin t {' '.join(joins)} "
        f"WHERE {where} ORDER BY {order} LIMIT ?"
    )
    rows = _query(conn, sql, [*join_params, *params, query.size + 1]).fetchall()
    page = rows[: query.size]
    ids = [row[-2] for row in page]
    if len(rows) <= query.size:
        return ids, None
    last = page[-1]
    keys: list[Key] = [
        (int(last[3 * i]), numbers.number(last[3 * i + 1], last[3 * i + 2]))
        for i in range(len(exprs))
    ]
    return ids, query.next_cursor(keys)
