"""The RQL abstract syntax tree: frozen, hashable values that compare by structure."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Literal, TypeAlias

#: A literal in a query: JSON scalars only.
Value: TypeAlias = bool | int | float | str | None
#: A property path as unescaped key segments, e.g. ``("attributes", "a/b")``.
Path: TypeAlias = tuple[str, ...]


def type_rank(value: Value) -> int:
    """0 null, 1 boolean, 2 number, 3 string: values compare only within one rank."""
    if value is None:
        return 0
    if isinstance(value, bool):
        return 1
    if isinstance(value, int | float):
        return 2
    return 3


CompareOp: TypeAlias = Literal["eq", "ne", "gt", "ge", "lt", "le"]
COMPARE_OPS: tuple[CompareOp, ...] = ("eq", "ne", "gt", "ge", "lt", "le")


@dataclass(frozen=True)
class Compare:
    """``op(path, value)`` for eq, ne, gt, ge, lt, le."""

    op: CompareOp
    path: Path
    value: Value


@dataclass(frozen=True)
class In:
    """``in(path, v1, v2, ...)``: equal to any of the values (at least one)."""

    path: Path
    values: tuple[Value, ...]

    @cached_property
    def typed_values(self) -> frozenset[tuple[int, Value]]:
        """The values as (type rank, value), for a membership test in one step: ``1`` and
        ``1.0`` are one, ``1`` and ``true`` two. A test value by value made every change
        event cost each subscription's ``in`` of up to 65,536 values that many steps."""
        return frozenset((type_rank(v), v) for v in self.values)


@dataclass(frozen=True)
class Like:
    """``like(path, pattern)`` or, with ``ignore_case``, ``ilike(path, pattern)``."""

    path: Path
    pattern: str
    ignore_case: bool = False


@dataclass(frozen=True)
class Exists:
    """``exists(path)``."""

    path: Path


@dataclass(frozen=True)
class And:
    """``and(f1, f2, ...)`` with at least one operand."""

    operands: tuple[Filter, ...]


@dataclass(frozen=True)
class Or:
    """``or(f1, f2, ...)`` with at least one operand."""

    operands: tuple[Filter, ...]


@dataclass(frozen=True)
class Not:
    """``not(f)``."""

    operand: Filter


Filter: TypeAlias = Compare | In | Like | Exists | And | Or | Not


@dataclass(frozen=True)
class SortKey:
    """One ``sort`` entry: a path and a direction."""

    path: Path
    descending: bool = False


#: The tie-break that makes every sort a total order (twin ids are unique).
TWIN_ID_PATH: Path = ("twinId",)
