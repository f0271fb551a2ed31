"""RQL filters to SQL over ``search_twin t`` (an expression on ``t.tid``). Pure."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any, TypeAlias

from search.rql import patterns
from search.rql.ast import And, Compare, Exists, Filter, In, Like, Not, Or, Path, Value
from search.rql.evaluator import type_rank
from search.rql.paths import format_path

from . import numbers
from .rows import VALUELESS_ROOT

Sql: TypeAlias = tuple[str, list[Any]]

_OPS = {"eq": "=", "gt": ">", "ge": ">=", "lt": "<", "le": "<="}
_MAX_CHAR = chr(0x10FFFF)


@dataclass(frozen=True)
class _Branch:
    """Leaves at ``path`` satisfying ``condition``, written with ``{t}``, ``{v}`` and ``{x}``
    columns; with ``present``, only those of twins that also have a row at ``present``."""

    path: str
    condition: str = ""
    params: tuple[Any, ...] = ()
    present: str | None = None

    def sql(self, t: str, v: str) -> Sql:
        cond = " AND " + self.condition.format(t=t, v=v, x="x") if self.condition else ""
        if self.present is None:
            return f"path = ?{cond}", [self.path, *self.params]
        # Correlated with the unaliased ``search_leaf`` each caller selects from.
        presence = (
            " AND EXISTS (SELECT 1 FROM search_leaf p WHERE p.tid = search_leaf.tid AND p.path = ?)"
        )
        return f"path = ?{cond}{presence}", [self.path, *self.params, self.present]


LeafSet: TypeAlias = list[_Branch]


def bind_value(value: Value) -> Any:
    """A literal other than a number as bound to SQLite: booleans as 0/1."""
    return int(value) if isinstance(value, bool) else value


def number_condition(op: str, value: int | float) -> Sql:
    """``{v}`` and ``{x}`` hold a number that is ``op`` (eq, lt, le, gt, ge) ``value``,
    exactly (:mod:`search.sqlite.numbers`): ``x`` is only looked at when numbers beyond
    64-bit integers may share the ``v`` of ``value``."""
    v, x = numbers.stored(value)
    if not numbers.shares_v(v):
        return f"{{v}} {_OPS[op]} ?", [v]
    excess = numbers.excess_key(x)
    if op == "eq":
        return "{v} = ? AND ifnull({x}, 0) = ?", [v, excess]
    strict = _OPS[op][0]
    # The range on v alone first, so that it still bounds the walk of the value index.
    return f"{{v}} {strict}= ? AND ({{v}} {strict} ? OR ifnull({{x}}, 0) {_OPS[op]} ?)", [
        v,
        v,
        excess,
    ]


def valued_path(path: Path) -> Path:
    """Where the value of a delta path is indexed: the delta's rows have none
    (:data:`search.sqlite.rows.VALUELESS_ROOT`), and wherever the delta holds a path, its
    value there is desired's, so both have the same rows at that path."""
    return ("desired", *path[1:])


def _leaf_set(path: Path, condition: str = "", *params: Any) -> LeafSet:
    if path[0] == VALUELESS_ROOT and "{v}" in condition:
        return [_Branch(format_path(valued_path(path)), condition, params, format_path(path))]
    return [_Branch(format_path(path), condition, params)]


def _member(leaf_set: LeafSet, driving: bool, negate: bool = False) -> Sql:
    """Membership of ``t.tid`` in a leaf set.

    A driving set becomes ``t.tid IN (...)``: SQLite walks the value index and probes
    ``search_twin``. Other sets become correlated ``EXISTS`` probes on the leaf primary key
    (``+t``/``+v`` keep the planner off the value index there), so a broad condition in an
    ``and`` is never materialized whole.
    """
    if driving and not negate:
        union, union_params = _union_of_tids(leaf_set)
        return f"t.tid IN ({union})", union_params
    params: list[Any] = []
    conditions = []
    for branch in leaf_set:
        sql, p = branch.sql("+t", "+v")
        conditions.append(f"({sql})")
        params.extend(p)
    neg = "NOT " if negate else ""
    inner = " OR ".join(conditions)
    return f"{neg}EXISTS (SELECT 1 FROM search_leaf WHERE tid = t.tid AND ({inner}))", params


def _eq_set(path: Path, value: Value) -> LeafSet:
    if value is None:
        return _leaf_set(path, "{t} = 0")
    return _compare_set(path, "eq", value)


def _compare_set(path: Path, op: str, value: Value) -> LeafSet:
    """Leaves at ``path`` holding a value of the type of ``value`` that is ``op`` it."""
    if type_rank(value) == 2:
        assert isinstance(value, int | float)
        condition, params = number_condition(op, value)
        return _leaf_set(path, "{t} = 2 AND " + condition, *params)
    condition = f"{{t}} = ? AND {{v}} {_OPS[op]} ?"
    return _leaf_set(path, condition, type_rank(value), bind_value(value))


def _upper_bound(prefix: str) -> str | None:
    """The least string greater than every string starting with ``prefix``."""
    stripped = prefix.rstrip(_MAX_CHAR)
    if not stripped:
        return None
    after = ord(stripped[-1]) + 1
    if after == 0xD800:  # surrogates are no characters (SQLite cannot take them): skip them
        after = 0xE000
    return stripped[:-1] + chr(after)


def _like(node: Like) -> LeafSet:
    if node.ignore_case:
        return _leaf_set(node.path, "{t} = 3 AND rql_like(?, 1, {v})", node.pattern)
    prefix, literal = patterns.literal_prefix(node.pattern)
    if literal:
        return _eq_set(node.path, prefix)
    conditions, params = ["{t} = 3"], []
    if prefix:
        conditions.append("{v} >= ?")
        params.append(prefix)
        upper = _upper_bound(prefix)
        if upper is not None:
            conditions.append("{v} < ?")
            params.append(upper)
    conditions.append("rql_like(?, 0, {v})")
    params.append(node.pattern)
    return _leaf_set(node.path, " AND ".join(conditions), *params)


def _in(node: In) -> LeafSet:
    by_rank: dict[int, list[Any]] = defaultdict(list)
    out: LeafSet = []
    for value in node.values:
        if isinstance(value, int | float) and not isinstance(value, bool):
            v, _ = numbers.stored(value)
            if numbers.shares_v(v):  # exact only with its x: a branch of its own
                out += _compare_set(node.path, "eq", value)
                continue
            by_rank[2].append(v)
        else:
            by_rank[type_rank(value)].append(bind_value(value))
    for rank, values in sorted(by_rank.items()):
        if rank == 0:
            out += _leaf_set(node.path, "{t} = 0")
        else:
            marks = ",".join("?" * len(values))
            out += _leaf_set(node.path, f"{{t}} = ? AND {{v}} IN ({marks})", rank, *values)
    return out


def _join(sep: str, parts: list[Sql]) -> Sql:
    return "(" + f" {sep} ".join(p[0] for p in parts) + ")", [x for p in parts for x in p[1]]


def _selectivity(node: Filter) -> int:
    """A guess at how few twins a condition selects (lower is fewer), without statistics."""
    if isinstance(node, Compare):
        if node.op == "eq":
            return 5 if node.value is None else 0
        return 6 if node.op == "ne" else 3
    if isinstance(node, In):
        return 1
    if isinstance(node, Like):
        return 2 if not node.ignore_case and patterns.literal_prefix(node.pattern)[0] else 4
    if isinstance(node, Exists):
        return 5
    if isinstance(node, And):
        return min(_selectivity(op) for op in node.operands)
    if isinstance(node, Or):
        return max(_selectivity(op) for op in node.operands)
    return 7


#: Conditions at least this selective (see :func:`_selectivity`) join an intersection:
#: equalities, ``in`` and prefix ``like``. Broader ones (ranges, exists) could materialize a
#: large share of the index, so they are probed per candidate instead.
_INTERSECT_SELECTIVITY = 2


def _positive_set(node: Filter) -> LeafSet | None:
    """The leaf set whose twins are exactly the matches of ``node``, if it has one."""
    if isinstance(node, Compare):
        if node.op == "eq":
            return _eq_set(node.path, node.value)
        if node.op == "ne":
            return None
        return _compare_set(node.path, node.op, node.value)
    if isinstance(node, In):
        return _in(node)
    if isinstance(node, Like):
        return _like(node)
    if isinstance(node, Exists):
        return _leaf_set(node.path)
    return None


def _union_of_tids(leaf_set: LeafSet) -> Sql:
    """A compound SELECT of the ``tid`` of every leaf in ``leaf_set`` (value-index lookups)."""
    selects, params = [], []
    for branch in leaf_set:
        sql, p = branch.sql("t", "v")
        selects.append(f"SELECT tid FROM search_leaf WHERE {sql}")
        params.extend(p)
    return " UNION ALL ".join(selects), params


def _intersection(leaf_sets: list[LeafSet]) -> Sql:
    parts = []
    for leaf_set in leaf_sets:
        sql, params = _union_of_tids(leaf_set)
        # A union must be a subquery here: compound operators associate to the left.
        parts.append((sql if len(leaf_set) == 1 else f"SELECT tid FROM ({sql})", params))
    return (
        f"t.tid IN ({' INTERSECT '.join(p[0] for p in parts)})",
        [x for p in parts for x in p[1]],
    )


def filter_sql(node: Filter, driving: bool = True) -> Sql:
    """A boolean SQL expression on ``t.tid`` equivalent to :func:`search.rql.matches`.

    In an ``and`` only the operand that looks most selective drives the query.
    """
    leaf_set = _positive_set(node)
    if leaf_set is not None:
        return _member(leaf_set, driving)
    if isinstance(node, Compare):  # ne: has the property, with another value
        has = _member(_leaf_set(node.path), driving)
        return _join("AND", [has, _member(_eq_set(node.path, node.value), False, True)])
    if isinstance(node, And):
        if driving:
            # Two or more selective conditions: intersect their value-index lookups. Driving
            # with one and probing the others twin by twin costs a random B-tree descent per
            # candidate (4x slower at 100,000 twins for two equalities).
            selective = [
                (i, leaf_set)
                for i, op in enumerate(node.operands)
                if _selectivity(op) <= _INTERSECT_SELECTIVITY
                and (leaf_set := _positive_set(op)) is not None
            ]
            if len(selective) >= 2:
                chosen = {i for i, _ in selective}
                parts = [_intersection([leaf_set for _, leaf_set in selective])]
                parts += [
                    filter_sql(op, False) for i, op in enumerate(node.operands) if i not in chosen
                ]
                return _join("AND", parts)
        best = min(range(len(node.operands)), key=lambda i: _selectivity(node.operands[i]))
        return _join(
            "AND", [filter_sql(op, driving and i == best) for i, op in enumerate(node.operands)]
        )
    if isinstance(node, Or):
        return _join("OR", [filter_sql(op, driving) for op in node.operands])
    assert isinstance(node, Not)
    inner, params = filter_sql(node.operand, False)
    return f"NOT {inner}", params
