"""Twin ids: ``namespace:name`` following Ditto's rules, at most 256 characters."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from twin_service.errors import InvalidTwinId
from twin_service.twin.ids import (
    MAX_ID_LENGTH,
    TWIN_ID_PATTERN,
    generate_twin_id,
    parse_twin_id,
    validate_namespace,
)

VALID = [
    ("org.acme.plant1:pump-1", ("org.acme.plant1", "pump-1")),
    ("org:pump", ("org", "pump")),
    (":pump", ("", "pump")),
    ("a:b", ("a", "b")),
    ("org_1.b2_c:x", ("org_1.b2_c", "x")),
    ("Org.Acme:X", ("Org.Acme", "X")),
    ("org.acme:name:with:colons", ("org.acme", "name:with:colons")),
    ("org.acme::", ("org.acme", ":")),
    ("org.acme:a%20b", ("org.acme", "a%20b")),
    ("org.acme:%C3%A9", ("org.acme", "%C3%A9")),
    ("org.acme:-._~!$&'()*+,;=@", ("org.acme", "-._~!$&'()*+,;=@")),
    ("org.acme:1", ("org.acme", "1")),
    ("a:" + "x" * (MAX_ID_LENGTH - 2), ("a", "x" * (MAX_ID_LENGTH - 2))),
]

INVALID = [
    "",
    ":",
    "pump",
    "org.acme:",
    "1org:pump",
    "_org:pump",
    "org..acme:pump",
    ".org:pump",
    "org.:pump",
    "org.1a:pump",
    "org-acme:pump",
    "org acme:pump",
    "org.acme:a/b",
    "org.acme:/",
    "org.acme:a b",
    "org.acme:a?b",
    "org.acme:a#b",
    'org.acme:a"b',
    "org.acme:%zz",
    "org.acme:%2",
    "org.acme:a%",
    "orgé:pump",
    "org.acmé:pump",
    "org:naïve",
    "org.acme:pump\n",
    "org.acme\n:pump",
    "org.acme:pump\x00",
    "a:" + "x" * (MAX_ID_LENGTH - 1),
    "a" * 300 + ":x",
]


@pytest.mark.parametrize(("twin_id", "expected"), VALID)
def test_valid_ids(twin_id: str, expected: tuple[str, str]) -> None:
    assert parse_twin_id(twin_id) == expected


@pytest.mark.parametrize("twin_id", INVALID)
def test_invalid_ids(twin_id: str) -> None:
    with pytest.raises(InvalidTwinId) as info:
        parse_twin_id(twin_id)
    assert info.value.status == 400 and info.value.code == "twin.id.invalid"


@pytest.mark.parametrize("namespace", ["", "org", "org.acme.plant1", "a_b.c1", "A", "a" * 254])
def test_valid_namespaces(namespace: str) -> None:
    assert validate_namespace(namespace) == namespace


@pytest.mark.parametrize(
    "namespace", ["1a", "a.", ".a", "a..b", "a-b", "a b", "é", "org\n", "org:x", "a/b", "a" * 255]
)
def test_invalid_namespaces(namespace: str) -> None:
    with pytest.raises(InvalidTwinId):
        validate_namespace(namespace)


namespaces = st.from_regex(
    r"\A(?:[a-zA-Z][a-zA-Z0-9_]{0,5}(?:\.[a-zA-Z][a-zA-Z0-9_]{0,5}){0,3})?\Z"
)
names = st.text(alphabet="abcXYZ019-._~!$&'()*+,;=:@", min_size=1, max_size=40)


@given(namespaces, names)
def test_any_well_formed_id_parses_back(namespace: str, name: str) -> None:
    assert parse_twin_id(f"{namespace}:{name}") == (namespace, name)


@given(namespaces)
def test_generated_ids_are_valid_and_unique(namespace: str) -> None:
    first, second = generate_twin_id(namespace), generate_twin_id(namespace)
    assert parse_twin_id(first)[0] == namespace
    assert first != second


@given(st.text(max_size=30))
def test_parse_accepts_or_raises_invalid_twin_id(twin_id: str) -> None:
    try:
        namespace, name = parse_twin_id(twin_id)
    except InvalidTwinId:
        return
    assert f"{namespace}:{name}" == twin_id
    assert "/" not in name and len(twin_id) <= MAX_ID_LENGTH
    assert twin_id.isascii() and twin_id.isprintable()


def _pattern_takes(twin_id: str) -> bool:
    """What a JSON Schema validator reads from the published pattern and length (ECMA-262
    ``$`` ends the text; Python's would also match before a final newline)."""
    assert TWIN_ID_PATTERN.startswith("^") and TWIN_ID_PATTERN.endswith("$")
    core = TWIN_ID_PATTERN[1:-1]
    return len(twin_id) <= MAX_ID_LENGTH and re.fullmatch(core, twin_id) is not None


def _parses(twin_id: str) -> bool:
    try:
        parse_twin_id(twin_id)
    except InvalidTwinId:
        return False
    return True


@pytest.mark.parametrize("twin_id", [valid for valid, _ in VALID] + INVALID)
def test_the_published_pattern_is_the_rule(twin_id: str) -> None:
    assert _pattern_takes(twin_id) == _parses(twin_id)


@given(st.text(alphabet=st.sampled_from("aZ9_.:%/-~é 2F\n"), max_size=20))
def test_the_published_pattern_agrees_on_any_text(twin_id: str) -> None:
    assert _pattern_takes(twin_id) == _parses(twin_id)
