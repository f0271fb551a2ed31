from __future__ import annotations

import contextlib

import pytest
from differential import filters
from hypothesis import given, settings
from hypothesis import strategies as st

from search.rql import (
    And,
    Compare,
    Exists,
    In,
    Like,
    Not,
    Or,
    SortKey,
    parse_filter,
    parse_options,
    print_filter,
)
from search.rql.ast import Filter
from twin_service.errors import RqlInvalid, RqlSyntaxError

A = ("attributes", "a")

VALID: list[tuple[str, Filter]] = [
    ("eq(attributes/a,1)", Compare("eq", A, 1)),
    ("  ne ( attributes/a , 'x' )  ", Compare("ne", A, "x")),
    ("gt(revision,-1.5)", Compare("gt", ("revision",), -1.5)),
    ("ge(revision,2e3)", Compare("ge", ("revision",), 2000.0)),
    ("lt(revision,-2.5E-1)", Compare("lt", ("revision",), -0.25)),
    ('le(created,"2026")', Compare("le", ("created",), "2026")),
    ("eq(attributes/a,true)", Compare("eq", A, True)),
    ("eq(attributes/a,false)", Compare("eq", A, False)),
    ("eq(attributes/a,null)", Compare("eq", A, None)),
    ("eq(attributes/a,0)", Compare("eq", A, 0)),
    ('eq(attributes/a,"q\\"\\\\\\n\\u00e9")', Compare("eq", A, 'q"\\\né')),
    ("eq(attributes/a,'it\\'s')", Compare("eq", A, "it's")),
    ("in(attributes/a,1,'b',null,true)", In(A, (1, "b", None, True))),
    ('like(attributes/a,"x*?")', Like(A, "x*?")),
    ('ilike(attributes/a,"X\\\\*")', Like(A, "X\\*", ignore_case=True)),
    ("exists(delta)", Exists(("delta",))),
    ("exists(connection/lastSeen)", Exists(("connection", "lastSeen"))),
    ("eq(attributes/a~1b/c~0d,1)", Compare("eq", ("attributes", "a/b", "c~d"), 1)),
    ('eq("attributes/a b,(c)",1)', Compare("eq", ("attributes", "a b,(c)"), 1)),
    (
        "eq(lifecycle/fan~1speed/state,'pending')",
        Compare("eq", ("lifecycle", "fan/speed", "state"), "pending"),
    ),
    (
        "and(eq(attributes/a,1),or(exists(delta),not(eq(twinId,'x'))))",
        And((Compare("eq", A, 1), Or((Exists(("delta",)), Not(Compare("eq", ("twinId",), "x")))))),
    ),
    ("and(exists(attributes))", And((Exists(("attributes",)),))),
]


@pytest.mark.parametrize(("text", "expected"), VALID)
def test_valid(text: str, expected: Filter) -> None:
    parsed = parse_filter(text)
    assert parsed == expected
    assert parse_filter(print_filter(parsed)) == parsed


OP_TEXT = "an operator (eq, ne, gt, ge, lt, le, in, like, ilike, exists, and, or, not)"
VALUE_TEXT = "a value (number, string, true, false or null)"

SYNTAX: list[tuple[str, int, str]] = [
    ("", 0, OP_TEXT),
    ("   ", 3, OP_TEXT),
    ("eq", 2, "'('"),
    ("foo(attributes/a,1)", 0, OP_TEXT),
    ("eq(", 3, "a property"),
    ("eq(attributes/a", 15, "','"),
    ("eq(attributes/a,", 16, VALUE_TEXT),
    ("eq(attributes/a, )", 17, VALUE_TEXT),
    ("eq(attributes/a,1", 17, "',' or ')'"),
    ("eq(attributes/a,1))", 18, "end of input"),
    ("eq(attributes/a,1) x", 19, "end of input"),
    ("eq(attributes/a,12abc)", 18, "',' or ')'"),
    ("eq(attributes/a,tru)", 16, VALUE_TEXT),
    ("eq(attributes/a,-)", 16, VALUE_TEXT),
    ("eq(attributes/a,01)", 17, "',' or ')'"),
    ("eq(attributes/a,1.)", 17, "',' or ')'"),
    ('eq(attributes/a,"x)', 19, 'closing "'),
    ('eq(attributes/a,"\\q")', 18, "an escape (\\\\ \\\" \\' \\/ \\b \\f \\n \\r \\t \\uXXXX)"),
    ('eq(attributes/a,"\\u12")', 19, "4 hex digits after \\u"),
    ("and()", 4, OP_TEXT),
    ("and(exists(delta),)", 18, OP_TEXT),
    ("not(exists(delta),exists(delta))", 17, "')'"),
    ("in(attributes/a)", 15, "','"),
    ("exists(delta,1)", 12, "')'"),
]


@pytest.mark.parametrize(("text", "position", "expected"), SYNTAX)
def test_syntax_errors(text: str, position: int, expected: str) -> None:
    with pytest.raises(RqlSyntaxError) as info:
        parse_filter(text)
    assert (info.value.position, info.value.expected) == (position, expected)
    assert info.value.to_body()["position"] == position


INVALID = [
    ("eq(x/a,1)", "unknown property"),
    ("eq(connection,1)", "unknown property"),
    ("eq(connection/foo,1)", "unknown property"),
    ("eq(metadata/a,1)", "unknown property"),
    ("eq(attributes//a,1)", "empty key"),
    ("eq(attributes/,1)", "empty key"),
    ("eq(attributes/~2,1)", "invalid escape"),
    ("eq(attributes/a~,1)", "invalid escape"),
    ("like(attributes/a,1)", "string pattern"),
    ("ilike(attributes/a,null)", "string pattern"),
    ('like(attributes/a,"\\\\a")', "invalid escape in like pattern"),
    ('like(attributes/a,"a\\\\")', "invalid escape in like pattern"),
    ("gt(attributes/a,null)", "cannot compare with null"),
    ("eq(attributes/a,1e999)", "out of range"),
    # Stores translate a filter into a nested query: SQLite's parser overflowed at about
    # 100 levels (a 503), the translations at about 500 (a 500).
    ("not(" * 24 + "exists(attributes/a)" + ")" * 24, "nests deeper than 24 levels"),
    ("and(" * 3000 + "exists(attributes/a)" + ")" * 3000, "nests deeper than 24 levels"),
    # SQLite refuses a compound query of more than 500 parts.
    ("or(" + ",".join(["exists(attributes/a)"] * 257) + ")", "more than 256 conditions"),
    # Elasticsearch refuses a terms query of more values (index.max_terms_count).
    ("in(attributes/a," + ",".join(["1"] * 65_537) + ")", "more than 65536 values"),
]


def test_the_deepest_and_widest_filters_allowed() -> None:
    deepest = parse_filter("not(" * 23 + "exists(attributes/a)" + ")" * 23)
    for _ in range(23):
        assert isinstance(deepest, Not)
        deepest = deepest.operand
    widest = parse_filter("and(" + ",".join(["exists(attributes/a)"] * 256) + ")")
    assert isinstance(widest, And) and len(widest.operands) == 256
    largest = parse_filter("in(attributes/a," + ",".join(["1"] * 65_536) + ")")
    assert isinstance(largest, In) and len(largest.values) == 65_536


@pytest.mark.parametrize(("text", "message"), INVALID)
def test_invalid(text: str, message: str) -> None:
    with pytest.raises(RqlInvalid, match=message):
        parse_filter(text)


def test_sort_keys_are_bounded() -> None:
    keys = [f"+attributes/k{i}" for i in range(17)]
    assert len(parse_options(f"sort({','.join(keys[:16])})").sort or ()) == 16
    with pytest.raises(RqlInvalid, match="sort has more than 16 keys"):
        parse_options(f"sort({','.join(keys)})")


def test_options() -> None:
    options = parse_options(" sort( +attributes/a , -revision, twinId ) , size(10),cursor(abc-_=)")
    assert options.sort == (
        SortKey(A),
        SortKey(("revision",), descending=True),
        SortKey(("twinId",)),
    )
    assert options.size == 10
    assert options.cursor == "abc-_="
    assert parse_options("") == parse_options("  ")
    assert parse_options("").sort is None


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("limit(1)", RqlSyntaxError),
        ("size(1),", RqlSyntaxError),
        ("size(1) size(2)", RqlSyntaxError),
        ("sort()", RqlSyntaxError),
        ("size(1),size(2)", RqlInvalid),
        ("size('a')", RqlInvalid),
        ("size(1.5)", RqlInvalid),
        ("sort(+foo)", RqlInvalid),
    ],
)
def test_option_errors(text: str, error: type[Exception]) -> None:
    with pytest.raises(error):
        parse_options(text)


@settings(max_examples=300, deadline=None)
@given(filters())
def test_round_trip(node: Filter) -> None:
    text = print_filter(node)
    parsed = parse_filter(text)
    assert parsed == node
    # Structural equality treats 1 == 1.0 == True; the canonical text does not.
    assert print_filter(parsed) == text


ALPHABET = st.sampled_from([*list("eqnltgiaxdsorkm()/,'\"\\ -.0123456789*?~u"), "exists", "eq("])


@settings(max_examples=500, deadline=None)
@given(st.lists(ALPHABET, max_size=30).map("".join) | st.text(max_size=40))
def test_random_text_only_raises_rql_errors(text: str) -> None:
    with contextlib.suppress(RqlSyntaxError, RqlInvalid):
        parse_filter(text)
    with contextlib.suppress(RqlSyntaxError, RqlInvalid):
        parse_options(text)


@settings(max_examples=200, deadline=None)
@given(filters(), st.data())
def test_mutated_text_only_raises_rql_errors(node: Filter, data: st.DataObject) -> None:
    text = print_filter(node)
    cut = data.draw(st.integers(0, len(text)))
    junk = data.draw(st.sampled_from(["", ")", "(", ",", "'", '"', "\\", "x", " "]))
    try:
        parse_filter(text[:cut] + junk + text[cut + 1 :])
    except (RqlSyntaxError, RqlInvalid) as exc:
        if isinstance(exc, RqlSyntaxError):
            assert 0 <= exc.position <= len(text) + 1
