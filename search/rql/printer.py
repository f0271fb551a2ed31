"""AST to canonical RQL text; ``parse_filter(print_filter(f)) == f``."""

from __future__ import annotations

from .ast import And, Compare, Exists, Filter, In, Like, Not, Or, Path, SortKey, Value
from .parser import BARE_STOP
from .paths import format_path

_ESCAPES = {
    '"': '\\"',
    "\\": "\\\\",
    "\b": "\\b",
    "\f": "\\f",
    "\n": "\\n",
    "\r": "\\r",
    "\t": "\\t",
}


def print_string(text: str) -> str:
    """A double-quoted RQL string literal."""
    out = ['"']
    for ch in text:
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif ord(ch) < 0x20 or 0xD800 <= ord(ch) <= 0xDFFF:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def print_value(value: Value) -> str:
    """A literal: ``null``, ``true``, ``false``, a number or a quoted string."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    return print_string(value)


def print_path(path: Path) -> str:
    """The path, bare when possible, otherwise as a quoted string."""
    text = format_path(path)
    if any(ch in BARE_STOP for ch in text) or text[:1] in ("+", "-"):
        return print_string(text)
    return text


def print_filter(node: Filter) -> str:
    """Canonical text of a filter: no spaces, double-quoted strings."""
    if isinstance(node, Compare):
        return f"{node.op}({print_path(node.path)},{print_value(node.value)})"
    if isinstance(node, In):
        values = ",".join(print_value(v) for v in node.values)
        return f"in({print_path(node.path)},{values})"
    if isinstance(node, Like):
        name = "ilike" if node.ignore_case else "like"
        return f"{name}({print_path(node.path)},{print_string(node.pattern)})"
    if isinstance(node, Exists):
        return f"exists({print_path(node.path)})"
    if isinstance(node, And | Or):
        name = "and" if isinstance(node, And) else "or"
        return f"{name}({','.join(print_filter(op) for op in node.operands)})"
    assert isinstance(node, Not)
    return f"not({print_filter(node.operand)})"


def print_sort(keys: tuple[SortKey, ...]) -> str:
    """``sort(+a,-b)``."""
    inner = ",".join(("-" if k.descending else "+") + print_path(k.path) for k in keys)
    return f"sort({inner})"
