"""Recursive-descent parser for RQL filters and Ditto-style option strings."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from twin_service.errors import RqlInvalid, RqlSyntaxError

from . import patterns
from .ast import (
    COMPARE_OPS,
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
from .paths import parse_path

OPERATORS = (*COMPARE_OPS, "in", "like", "ilike", "exists", "and", "or", "not")
_OPERATORS_TEXT = ", ".join(OPERATORS)
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?")
_VALUE = "a value (number, string, true, false or null)"
_WORD = re.compile(r"[A-Za-z]+")
#: Characters that end a bare (unquoted) property or cursor token.
BARE_STOP = frozenset("(),'\"") | frozenset(" \t\r\n")
_SIMPLE_ESCAPES = {
    '"': '"',
    "'": "'",
    "\\": "\\",
    "/": "/",
    "b": "\b",
    "f": "\f",
    "n": "\n",
    "r": "\r",
    "t": "\t",
}
_ESCAPES_TEXT = "an escape (\\\\ \\\" \\' \\/ \\b \\f \\n \\r \\t \\uXXXX)"
_LOW_SURROGATE = "a \\u escape of a low surrogate (DC00-DFFF) after a high surrogate"
_LONE_SURROGATE = "a high surrogate escape (D800-DBFF) before a low surrogate"


@dataclass(frozen=True)
class Options:
    """The parsed ``option`` string; ``None`` where the option was not given."""

    sort: tuple[SortKey, ...] | None = None
    size: int | None = None
    cursor: str | None = None


class _Scanner:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0
        self.conditions = 0

    def fail(self, expected: str, position: int | None = None) -> RqlSyntaxError:
        at = self.pos if position is None else position
        found = repr(self.text[at]) if at < len(self.text) else "end of input"
        return RqlSyntaxError(
            f"expected {expected} at position {at}, found {found}", position=at, expected=expected
        )

    def skip_ws(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos] in " \t\r\n":
            self.pos += 1

    def peek(self) -> str:
        self.skip_ws()
        return self.text[self.pos : self.pos + 1]

    def expect(self, ch: str) -> None:
        if self.peek() != ch:
            raise self.fail(f"'{ch}'")
        self.pos += 1

    def at_end(self) -> bool:
        return self.peek() == ""

    def word(self, expected: str) -> tuple[str, int]:
        self.skip_ws()
        match = _WORD.match(self.text, self.pos)
        if match is None:
            raise self.fail(expected)
        self.pos = match.end()
        return match.group(), match.start()

    def string(self) -> str:
        quote = self.text[self.pos]
        self.pos += 1
        out: list[str] = []
        while True:
            if self.pos >= len(self.text):
                raise self.fail(f"closing {quote}")
            ch = self.text[self.pos]
            if ch == quote:
                self.pos += 1
                return "".join(out)
            if ch == "\\":
                esc = self.text[self.pos + 1 : self.pos + 2]
                if esc in _SIMPLE_ESCAPES:
                    out.append(_SIMPLE_ESCAPES[esc])
                    self.pos += 2
                elif esc == "u":
                    out.append(self.unicode_escape())
                else:
                    raise self.fail(_ESCAPES_TEXT, self.pos + 1)
            else:
                out.append(ch)
                self.pos += 1

    def hex4(self, at: int) -> int:
        digits = self.text[at : at + 4]
        if len(digits) != 4 or not all(c in "0123456789abcdefABCDEF" for c in digits):
            raise self.fail("4 hex digits after \\u", at)
        return int(digits, 16)

    def unicode_escape(self) -> str:
        """``\\uXXXX`` at ``pos``; a surrogate pair is one character, as in JSON."""
        start = self.pos
        code = self.hex4(start + 2)
        self.pos += 6
        if 0xDC00 <= code <= 0xDFFF:
            raise self.fail(_LONE_SURROGATE, start)
        if 0xD800 <= code <= 0xDBFF:
            if self.text[self.pos : self.pos + 2] != "\\u":
                raise self.fail(_LOW_SURROGATE, self.pos)
            low = self.hex4(self.pos + 2)
            if not 0xDC00 <= low <= 0xDFFF:
                raise self.fail(_LOW_SURROGATE, self.pos)
            self.pos += 6
            code = 0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00)
        return chr(code)

    def bare(self, expected: str) -> str:
        self.skip_ws()
        start = self.pos
        while self.pos < len(self.text) and self.text[self.pos] not in BARE_STOP:
            self.pos += 1
        if self.pos == start:
            raise self.fail(expected)
        return self.text[start : self.pos]

    def token_text(self, expected: str) -> str:
        """A bare token or a quoted string."""
        if self.peek() in ("'", '"'):
            return self.string()
        return self.bare(expected)

    def property(self) -> Path:
        self.skip_ws()
        start = self.pos
        text = self.token_text("a property")
        try:
            return parse_path(text)
        except RqlInvalid as exc:
            raise RqlInvalid(f"{exc.message} (at position {start})") from None

    def value(self) -> Value:
        ch = self.peek()
        if ch in ("'", '"'):
            return self.string()
        if ch == "-" or ch.isdigit():
            match = _NUMBER.match(self.text, self.pos)
            if match is None:
                raise self.fail(_VALUE)
            self.pos = match.end()
            # float() first: it bounds the magnitude (and so the digits int() has to convert).
            number = float(match.group())
            if not math.isfinite(number):
                raise RqlInvalid(f"number out of range at position {match.start()}")
            if match.group(1) is None and match.group(2) is None:
                return int(match.group())
            return number
        start = self.pos
        match = _WORD.match(self.text, self.pos)
        if match is not None and match.group() in ("true", "false", "null"):
            self.pos = match.end()
            return {"true": True, "false": False, "null": None}[match.group()]
        raise self.fail(_VALUE, start)

    def delimiter(self) -> None:
        if self.peek() not in (",", ")"):
            raise self.fail("',' or ')'")


def _check_value(op: str, value: Value, start: int) -> None:
    if value is None and op not in ("eq", "ne"):
        raise RqlInvalid(f"{op} cannot compare with null (at position {start})")


#: Deepest nesting of and/or/not, the condition included. Every store and index turns a
#: filter into a nested query (SQLite's parser overflows at about 100 levels; the
#: translations recurse) and no real query comes near it. Elasticsearch refuses bool queries
#: nested over ``indices.query.bool.max_nested_depth`` (30), and its translation adds up
#: to 3 levels (namespaces, nested leaves): 32 was refused there only.
MAX_DEPTH = 24
#: Most conditions (comparisons, in, like, exists) in one filter: SQLite answers a
#: compound query of more than 500 parts with an error.
MAX_CONDITIONS = 256
#: Most values of one ``in``: Elasticsearch refuses a terms query of more
#: (``index.max_terms_count``), and SQLite binds each as a parameter.
MAX_IN_VALUES = 65_536
#: Most keys of one ``sort``: each costs every backend a join or a nested sort per page
#: (SQLite refuses a query of more than 200 tables, MongoDB a sort of more than 32 fields,
#: twinId included; 5,000 took Elasticsearch 5 s a page).
MAX_SORT_KEYS = 16


def _filter(sc: _Scanner, depth: int = 1) -> Filter:
    name, start = sc.word(f"an operator ({_OPERATORS_TEXT})")
    if name not in OPERATORS:
        raise sc.fail(f"an operator ({_OPERATORS_TEXT})", start)
    if depth > MAX_DEPTH:
        raise RqlInvalid(f"filter nests deeper than {MAX_DEPTH} levels (at position {start})")
    if name not in ("and", "or", "not"):
        sc.conditions += 1
        if sc.conditions > MAX_CONDITIONS:
            raise RqlInvalid(
                f"filter has more than {MAX_CONDITIONS} conditions (at position {start})"
            )
    sc.expect("(")
    result: Filter
    if name in ("and", "or"):
        operands = [_filter(sc, depth + 1)]
        while sc.peek() == ",":
            sc.pos += 1
            operands.append(_filter(sc, depth + 1))
        result = And(tuple(operands)) if name == "and" else Or(tuple(operands))
    elif name == "not":
        result = Not(_filter(sc, depth + 1))
    elif name == "exists":
        result = Exists(sc.property())
    else:
        path = sc.property()
        sc.expect(",")
        sc.skip_ws()
        value_start = sc.pos
        value = sc.value()
        sc.delimiter()
        if name == "in":
            values = [value]
            while sc.peek() == ",":
                sc.pos += 1
                if len(values) == MAX_IN_VALUES:
                    raise RqlInvalid(
                        f"in has more than {MAX_IN_VALUES} values (at position {start})"
                    )
                values.append(sc.value())
                sc.delimiter()
            result = In(path, tuple(values))
        elif name in ("like", "ilike"):
            if not isinstance(value, str):
                raise RqlInvalid(f"{name} needs a string pattern (at position {value_start})")
            patterns.validate(value)
            result = Like(path, value, ignore_case=name == "ilike")
        else:
            _check_value(name, value, value_start)
            result = Compare(name, path, value)  # type: ignore[arg-type]
    sc.expect(")")
    return result


def parse_filter(text: str) -> Filter:
    """Parse an RQL filter; raises :class:`RqlSyntaxError` or :class:`RqlInvalid`."""
    sc = _Scanner(text)
    result = _filter(sc)
    if not sc.at_end():
        raise sc.fail("end of input")
    return result


def _sort_keys(sc: _Scanner, start: int) -> tuple[SortKey, ...]:
    keys: list[SortKey] = []
    while True:
        if len(keys) == MAX_SORT_KEYS:
            raise RqlInvalid(f"sort has more than {MAX_SORT_KEYS} keys (at position {start})")
        descending = False
        if sc.peek() in ("+", "-"):
            descending = sc.text[sc.pos] == "-"
            sc.pos += 1
        keys.append(SortKey(sc.property(), descending))
        if sc.peek() != ",":
            return tuple(keys)
        sc.pos += 1


def parse_options(text: str) -> Options:
    """Parse ``sort(+a,-b),size(n),cursor(c)`` (any order, each at most once)."""
    sc = _Scanner(text)
    found: dict[str, object] = {}
    if sc.at_end():
        return Options()
    while True:
        name, start = sc.word("an option (sort, size or cursor)")
        if name not in ("sort", "size", "cursor"):
            raise sc.fail("an option (sort, size or cursor)", start)
        if name in found:
            raise RqlInvalid(f"option {name} given twice (at position {start})")
        sc.expect("(")
        if name == "sort":
            found[name] = _sort_keys(sc, start)
        elif name == "size":
            sc.skip_ws()
            value_start = sc.pos
            value = sc.value()
            if not isinstance(value, int) or isinstance(value, bool):
                raise RqlInvalid(f"size must be an integer (at position {value_start})")
            found[name] = value
        else:
            found[name] = sc.token_text("a cursor")
        sc.expect(")")
        if sc.at_end():
            break
        sc.expect(",")
    return Options(
        sort=found.get("sort"),  # type: ignore[arg-type]
        size=found.get("size"),  # type: ignore[arg-type]
        cursor=found.get("cursor"),  # type: ignore[arg-type]
    )
