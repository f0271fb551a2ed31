"""Strict JSON decoding and the structural limits of stored documents."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.twin.strategies import any_json
from twin_service.errors import InvalidJson, LimitExceeded, PayloadTooLarge, TwinServiceError
from twin_service.twin.jsonvalue import (
    Limits,
    check_key,
    check_size,
    check_structure,
    dumps,
    dumps_bytes,
    loads_strict,
)
from twin_service.twin.patch import json_equal
from twin_service.types import JSON

BAD_JSON: list[bytes | str] = [
    b"\xff",
    b'{"a": "\xc3"}',
    b'"\xed\xa0\x80"',  # a UTF-16 surrogate encoded as UTF-8 (CESU-8) is not UTF-8
    b"\xc0\xaf",  # overlong encoding of '/'
    b"\xef\xbb\xbf{}",  # byte order mark
    '{"a": 1, "a": 2}',
    '{"a": 1, "a": 1}',
    '{"x": {"a": 1, "b": 2, "a": 3}}',
    '[{"k": null, "k": null}]',
    "NaN",
    "Infinity",
    "-Infinity",
    "[NaN]",
    '{"a": Infinity}',
    "nan",
    "1e999",
    "-1e999",
    "[1e400]",
    '{"a": 2e308}',
    "1" + "0" * 400,
    "-" + "9" * 400,
    "1" + "0" * 5000,
    '"\\ud800"',
    '"\\uDFFF"',
    '"a\\udc00b"',
    '{"\\ud800": 1}',
    '["ok", {"x": "\\udbff"}]',
    "",
    " ",
    "{",
    "[1,]",
    '{"a": 1,}',
    "{'a': 1}",
    '{"a" 1}',
    "tru",
    "01",
    "1 2",
    "+1",
    ".5",
    '"\x01"',
    '"\\x41"',
]


@pytest.mark.parametrize("data", BAD_JSON)
def test_bad_json_is_refused(data: bytes | str) -> None:
    with pytest.raises(InvalidJson) as info:
        loads_strict(data)
    assert info.value.status == 400 and info.value.code == "json.invalid"


@pytest.mark.parametrize(
    "data",
    [
        "[" * 129 + "]" * 129,
        '{"a": ' * 129 + "1" + "}" * 129,
        "[" * 600 + "]" * 600,  # the decoder reads it; copying it would recurse too deep
        "[" * 100_000,  # deeper than the decoder goes: it stops before the missing end
    ],
)
def test_json_nested_deeper_than_any_value_is_refused(data: str) -> None:
    with pytest.raises(LimitExceeded) as info:
        loads_strict(data)
    assert info.value.status == 400 and "nested deeper than 128 levels" in info.value.message


def test_json_nested_128_deep_is_read() -> None:
    assert loads_strict("[" * 128 + "]" * 128) is not None
    assert loads_strict('{"a": ' * 128 + "1" + "}" * 128) is not None
    # Many brackets side by side are not depth: they are walked, and read.
    assert loads_strict("[" + ",".join(["[[]]"] * 500) + "]") is not None


GOOD_JSON: list[tuple[bytes | str, JSON]] = [
    ("1", 1),
    ("-0", 0),
    ("1.0", 1.0),
    ("1E2", 100.0),
    ("1e308", 1e308),
    ("-1.7976931348623157e308", -1.7976931348623157e308),
    ("9" * 300, int("9" * 300)),
    ("5e-324", 5e-324),
    ("1e-999", 0.0),
    ("true", True),
    ("null", None),
    ('"\\ud83d\\ude00"', "\U0001f600"),
    ('"\\u00e9"', "é"),
    ('"\\\\ud800"', "\\ud800"),
    ('"é"'.encode(), "é"),
    (b'{"a": [1, 2.5, true, null, "x"], "b": {}}', {"a": [1, 2.5, True, None, "x"], "b": {}}),
    ('{"a": {"a": 1}}', {"a": {"a": 1}}),
    (" [ ] ", []),
]


@pytest.mark.parametrize(("data", "expected"), GOOD_JSON)
def test_good_json_is_decoded(data: bytes | str, expected: JSON) -> None:
    value = loads_strict(data)
    assert value == expected and type(value) is type(expected)


def test_error_position_is_reported() -> None:
    with pytest.raises(InvalidJson) as info:
        loads_strict('{"a": }')
    assert info.value.extra["position"] == 6


@given(any_json)
def test_any_json_value_round_trips(value: JSON) -> None:
    text = dumps(value)
    assert json_equal(loads_strict(text), value)
    assert json_equal(loads_strict(text.encode("utf-8")), value)
    assert loads_strict(text) == value


@given(st.binary(max_size=40) | st.text(max_size=40))
def test_arbitrary_input_decodes_or_raises_invalid_json(data: bytes | str) -> None:
    try:
        value = loads_strict(data)
    except InvalidJson:
        return
    dumps(value).encode("utf-8")  # whatever is accepted can be stored and measured


@given(st.lists(st.integers(0, 0xFFFF), max_size=6))
def test_unicode_escapes_decode_to_encodable_text_or_are_refused(codepoints: list[int]) -> None:
    literal = '"' + "".join(f"\\u{c:04x}" for c in codepoints) + '"'
    try:
        value = loads_strict(literal)
    except InvalidJson:
        assert any(0xD800 <= c <= 0xDFFF for c in codepoints)
        return
    value.encode("utf-8")


@given(
    st.text(alphabet="0123456789", min_size=1, max_size=400).filter(
        lambda s: s == "0" or s[0] != "0"
    )
)
def test_integers_decode_exactly_or_overflow(digits: str) -> None:
    try:
        value = loads_strict(digits)
    except InvalidJson:
        assert math.isinf(float(digits))
        return
    assert value == int(digits)


LIMITS = Limits(max_twin_bytes=100, max_depth=3, max_key_length=5)

STRUCTURE_OK: list[JSON] = [
    {},
    [],
    1,
    {"abcde": 1},
    {"a": {"b": {"c": 1}}},
    {"a": [[1]]},
    {"é": 1, "a b": 2, "a/b": 3, "~": 4, "\u00a0": 5},
    {"a": {"b": {"c": {}}}},
    {"a": 1.5},
]

STRUCTURE_BAD: list[tuple[JSON, type[TwinServiceError]]] = [
    ({"": 1}, LimitExceeded),
    ({"a": {"": 1}}, LimitExceeded),
    ({"abcdef": 1}, LimitExceeded),
    ({"a": [{"abcdef": 1}]}, LimitExceeded),
    ({"a\x00": 1}, LimitExceeded),
    ({"\n": 1}, LimitExceeded),
    ({"a\tb": 1}, LimitExceeded),
    ({"\x1f": 1}, LimitExceeded),
    ({"\x7f": 1}, LimitExceeded),
    ({"\x85": 1}, LimitExceeded),
    ({"\x9f": 1}, LimitExceeded),
    ({"a": {"b": {"c": {"d": 1}}}}, LimitExceeded),
    ([[[[1]]]], LimitExceeded),
    ({"a": [[[1]]]}, LimitExceeded),
    ({"a": math.nan}, InvalidJson),
    ([math.inf], InvalidJson),
]


@pytest.mark.parametrize("value", STRUCTURE_OK)
def test_structure_within_limits(value: JSON) -> None:
    check_structure(value, LIMITS)


@pytest.mark.parametrize(("value", "error"), STRUCTURE_BAD)
def test_structure_beyond_limits(value: JSON, error: type[TwinServiceError]) -> None:
    with pytest.raises(error) as info:
        check_structure(value, LIMITS)
    assert info.value.status == 400


def test_depth_limit_reports_the_limit() -> None:
    with pytest.raises(LimitExceeded) as info:
        check_structure({"a": {"b": {"c": {"d": 1}}}}, LIMITS)
    assert info.value.extra == {"limit": 3}


@given(st.integers(min_value=0, max_value=8), st.integers(min_value=0, max_value=8))
def test_depth_limit_is_exact(depth: int, limit: int) -> None:
    value: JSON = 1
    for _ in range(depth):
        value = {"k": value}
    limits = Limits(max_depth=limit)
    if depth <= limit:
        check_structure(value, limits)
    else:
        with pytest.raises(LimitExceeded):
            check_structure(value, limits)


@pytest.mark.parametrize("key", ["a", "abcde", "é" * 5, "\u00a0", "\u200b", "😀"])
def test_keys_accepted(key: str) -> None:
    check_key(key, LIMITS)


SIZE_ROWS = [
    ("x" * 100, None),
    ("x" * 101, 101),
    ("é" * 50, None),
    ("é" * 51, 102),
    ("😀" * 25, None),
    ("😀" * 25 + "x", 101),
    ("", None),
]


@pytest.mark.parametrize(("encoded", "size"), SIZE_ROWS)
def test_size_limit_in_utf8_bytes(encoded: str, size: int | None) -> None:
    if size is None:
        check_size(encoded.encode(), LIMITS)
        return
    with pytest.raises(PayloadTooLarge) as info:
        check_size(encoded.encode(), LIMITS)
    assert info.value.status == 413 and info.value.code == "twin.toolarge"
    assert info.value.extra == {"size": size, "limit": 100}
    assert str(size) in info.value.message and "100" in info.value.message


@pytest.mark.parametrize(
    ("value", "text"),
    [({"a": [1, 2]}, '{"a":[1,2]}'), ("é", '"é"'), ({"b": 1.0, "a": None}, '{"b":1.0,"a":null}')],
)
def test_dumps_is_compact_utf8(value: JSON, text: str) -> None:
    assert dumps(value) == text
    assert json.loads(text) == value


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_numbers_are_refused_before_encoding(value: float) -> None:
    # The encoder would write them as null; validation refuses them before any write.
    with pytest.raises(InvalidJson):
        check_structure({"a": [1, {"b": value}]}, Limits())


@pytest.mark.parametrize("value", [2**64, -(2**70), {"big": [10**300, 1.5]}])
def test_dumps_keeps_integers_beyond_64_bits_exact(value: JSON) -> None:
    assert json.loads(dumps(value)) == value
    assert dumps_bytes(value) == dumps(value).encode()
