from __future__ import annotations

import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from search.rql import exists, matches, order, parse_filter, parse_path, patterns, sort_key
from search.rql.ast import SortKey
from twin_service.errors import RqlInvalid
from twin_service.types import JSONObject

DOC: JSONObject = {
    "twinId": "org.acme:pump-1",
    "namespace": "org.acme",
    "revision": 7,
    "connection": {"status": "online", "since": "2026", "lastSeen": None},
    "attributes": {
        "n": 1,
        "f": 2.5,
        "s": "Pump*1",
        "b": True,
        "z": None,
        "arr": [1, "x", [3, {"k": 1}]],
        "objs": [{"k": "a"}, {"k": "b"}],
        "empty": {},
        "hollow": {"a": {}},
        "noarr": [],
        "a/b": {"c~d": "slash"},
    },
    "delta": {},
    "desired": {"fan": {"speed": 3}},
}

CASES = [
    ("eq(attributes/n,1)", True),
    ("eq(attributes/n,1.0)", True),
    ("eq(attributes/n,true)", False),
    ("eq(attributes/b,1)", False),
    ("eq(attributes/b,true)", True),
    ("eq(attributes/n,'1')", False),
    ("eq(attributes/z,null)", True),
    ("eq(attributes/n,null)", False),
    ("eq(attributes/missing,null)", False),
    ("ne(attributes/n,2)", True),
    ("ne(attributes/n,1)", False),
    ("ne(attributes/n,'1')", True),
    ("ne(attributes/missing,1)", False),
    ("ne(attributes/z,null)", False),
    ("ne(attributes/arr,1)", False),
    ("ne(attributes/arr,2)", True),
    ("gt(attributes/n,0)", True),
    ("gt(attributes/n,1)", False),
    ("ge(attributes/n,1.0)", True),
    ("lt(attributes/f,3)", True),
    ("le(attributes/f,2.5)", True),
    ("gt(attributes/s,'A')", True),
    ("gt(attributes/s,1)", False),
    ("lt(attributes/n,'z')", False),
    ("gt(attributes/b,false)", True),
    ("in(attributes/n,5,1.0)", True),
    ("in(attributes/n,'1',true)", False),
    ("in(attributes/z,1,null)", True),
    ("eq(attributes/arr,'x')", True),
    ("eq(attributes/arr,3)", True),
    ("gt(attributes/arr,2)", True),
    ("eq(attributes/arr/k,1)", True),
    ("eq(attributes/objs/k,'b')", True),
    ("like(attributes/objs/k,'?')", True),
    ("eq(attributes/a~1b/c~0d,'slash')", True),
    ("like(attributes/s,'Pump*')", True),
    ("like(attributes/s,'pump*')", False),
    ("ilike(attributes/s,'pump*')", True),
    ("like(attributes/s,'Pump\\\\*?')", True),
    ("like(attributes/s,'Pump\\\\*')", False),
    ("like(attributes/s,'Pump??')", True),
    ("like(attributes/s,'Pump?')", False),
    ("like(attributes/s,'ump*')", False),
    ("like(attributes/n,'*')", False),
    ("like(attributes/arr,'x')", True),
    ("exists(attributes/n)", True),
    ("exists(attributes/z)", True),
    ("exists(attributes/missing)", False),
    ("exists(attributes/empty)", False),
    ("exists(attributes/hollow)", False),
    ("exists(attributes/noarr)", True),
    ("exists(attributes/arr/k)", True),
    ("exists(attributes)", True),
    ("exists(delta)", False),
    ("exists(desired)", True),
    ("exists(desired/fan)", True),
    ("exists(connection/lastSeen)", True),
    ("exists(definition)", False),
    ("eq(connection/status,'online')", True),
    ("and(eq(attributes/n,1),eq(revision,7))", True),
    ("and(eq(attributes/n,1),eq(revision,8))", False),
    ("or(eq(attributes/n,2),eq(revision,7))", True),
    ("not(exists(delta))", True),
    ("not(eq(attributes/missing,1))", True),
]


@pytest.mark.parametrize(("text", "expected"), CASES)
def test_matches(text: str, expected: bool) -> None:
    assert matches(parse_filter(text), DOC) is expected


def test_exists_delta_is_non_empty_delta() -> None:
    for delta, expected in [({}, False), ({"a": 1}, True), ({"a": None}, True), ({"a": []}, True)]:
        assert exists({"delta": delta}, ("delta",)) is expected
    assert not exists({}, ("delta",))


def test_sort_keys() -> None:
    def key(path: str) -> tuple[object, ...]:
        return sort_key(DOC, parse_path(path))

    assert key("attributes/missing") == (-1, None)
    assert key("attributes/z") == (0, None)
    assert key("attributes/b") == (1, 1)
    assert key("attributes/n") == (2, 1)
    assert key("attributes/s") == (3, "Pump*1")
    assert key("attributes/arr") == (4, None)
    assert key("attributes/objs/k") == (-1, None)
    assert key("desired/fan") == (5, None)
    assert key("attributes/empty") == (-1, None)


def test_order_types_then_twin_id() -> None:
    values = [None, "b", 2, True, [1], {"x": 1}, "a", 1.0, False, 1, {}]
    docs = [{"twinId": f"t{i:02d}", "attributes": {"v": v}} for i, v in enumerate(values)]
    docs.append({"twinId": "t99", "attributes": {}})
    ascending = [d["twinId"] for d in order(docs, [SortKey(("attributes", "v"))])]
    assert ascending == [
        "t10",
        "t99",
        "t00",
        "t08",
        "t03",
        "t07",
        "t09",
        "t02",
        "t06",
        "t01",
        "t04",
        "t05",
    ]
    descending = [d["twinId"] for d in order(docs, [SortKey(("attributes", "v"), True)])]
    assert descending == [
        "t05",
        "t04",
        "t01",
        "t06",
        "t02",
        "t07",
        "t09",
        "t03",
        "t08",
        "t00",
        "t10",
        "t99",
    ]


@pytest.mark.parametrize(
    ("pattern", "text", "expected"),
    [
        # Unicode simple case folding: these fold to one another...
        ("i", "I", True),
        ("I", "i", True),
        ("k", "\u212a", True),  # the Kelvin sign
        ("s", "\u017f", True),  # the long s
        ("\u00df", "\u1e9e", True),  # ß and capital sharp s
        ("\u03c3", "\u03c2", True),  # sigma and final sigma
        ("i*", "Istanbul", True),
        ("?stanbul", "\u0130stanbul", True),
        # ...and the dotted capital I and the dotless small i fold to nothing else (Python's
        # IGNORECASE took them for i and I).
        ("i", "\u0130", False),
        ("I", "\u0131", False),
        ("\u0130", "i", False),
        ("\u0131", "I", False),
        ("\u0130", "\u0130", True),
        ("\u0131", "\u0131", True),
        ("*i*", "D\u0130YAR", False),
    ],
)
def test_ilike_folds_case_as_unicode_simple_case_folding(
    pattern: str, text: str, expected: bool
) -> None:
    doc: JSONObject = {"twinId": "a:b", "namespace": "a", "attributes": {"s": text}}
    assert matches(parse_filter(f'ilike(attributes/s,"{pattern}")'), doc) is expected


def _valid_pattern(pattern: str) -> bool:
    try:
        patterns.validate(pattern)
    except RqlInvalid:
        return False
    return True


def _like_by_table(pattern: str, text: str) -> bool:
    """``like`` by dynamic programming over the pattern's tokens: the reference."""
    tokens = patterns._tokens(pattern)
    # matched[j]: the tokens so far match text[:j].
    matched = [True] + [False] * len(text)
    for token in tokens:
        if token == "*":
            for j in range(1, len(text) + 1):
                matched[j] = matched[j] or matched[j - 1]
        else:
            matched = [False] + [
                matched[j] and (token == "?" or token[1] == text[j]) for j in range(len(text))
            ]
    return matched[len(text)]


@settings(max_examples=3000, deadline=None)
@given(
    pattern=st.text(alphabet="ab*?\\", max_size=10).filter(_valid_pattern),
    text=st.text(alphabet="ab*?\\", max_size=12),
)
def test_like_matches_as_the_table_does(pattern: str, text: str) -> None:
    assert patterns.like(pattern, False, text) is _like_by_table(pattern, text)


def test_like_with_many_stars_ends() -> None:
    """Each star as a backtracking ``.*`` tried every way of cutting the string between
    them: about 40 times longer for each star, here for good (the test's timeout)."""
    assert not patterns.like("*a" * 30 + "*b", False, "a" * 100_000)
    assert not patterns.like("*" * 5000 + "a", True, "a" * 200 + "b")
    assert patterns.like("*a" * 30 + "*b", False, "a" * 100_000 + "b")


def test_fold_gives_the_classes_of_ilike() -> None:
    """``fold`` (what external indexes match ``ilike`` on) puts two characters in one class
    exactly when ilike takes one for the other, for every cased code point."""
    checked = 0
    for code in range(sys.maxunicode + 1):
        ch = chr(code)
        if 0xD800 <= code <= 0xDFFF or ch.lower() == ch.upper() == ch:
            continue
        folded = patterns.fold(ch)
        assert len(folded) == 1 and patterns.like(ch, True, folded), hex(code)
        assert patterns.like(folded, True, ch), hex(code)
        for other in {ch.upper(), ch.lower(), ch.swapcase(), ch.casefold(), ch.title()}:
            if len(other) == 1:
                same = patterns.fold(other) == folded
                assert patterns.like(ch, True, other) == same, (hex(code), other)
        checked += 1
    assert checked > 2_500
    assert patterns.fold("CAFÉ \\* İıIK") == "café \\* İıik"
    assert patterns.fold("ΣΑΣ") == patterns.fold("σας")
