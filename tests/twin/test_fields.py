"""``fields`` selection: nesting kept, missing paths skipped, the document never written."""

from __future__ import annotations

import copy

import pytest

from twin_service.errors import BadRequest
from twin_service.twin.fields import MAX_GROUP_DEPTH, parse_fields, select

DOC = {
    "twinId": "org.acme:t",
    "desired": {"fan": {"speed": 3, "mode": "auto"}, "light": True},
    "reported": {"fan": {"speed": 2}},
    "lifecycle": {"fan/speed": {"state": "pending"}, "a~b": {"state": "applied"}},
}


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        (None, DOC),
        ("twinId", {"twinId": "org.acme:t"}),
        ("desired/fan/speed", {"desired": {"fan": {"speed": 3}}}),
        (
            "desired/fan/speed,reported/fan",
            {"desired": {"fan": {"speed": 3}}, "reported": {"fan": {"speed": 2}}},
        ),
        ("desired,desired/fan/speed", {"desired": DOC["desired"]}),
        ("desired/fan/speed,desired", {"desired": DOC["desired"]}),
        ("desired/fan,desired/fan/mode", {"desired": {"fan": {"speed": 3, "mode": "auto"}}}),
        ("desired/nope,live", {}),
        ("desired/light/deeper", {}),
        # Ditto's groups: a prefix and the paths below it in parentheses, nested.
        ("desired(fan/speed,light)", {"desired": {"fan": {"speed": 3}, "light": True}}),
        (
            "twinId,desired(fan(mode)),reported(fan)",
            {
                "twinId": "org.acme:t",
                "desired": {"fan": {"mode": "auto"}},
                "reported": {"fan": {"speed": 2}},
            },
        ),
        ("desired/fan(speed, mode )", {"desired": {"fan": {"speed": 3, "mode": "auto"}}}),
        # Keys are pointer tokens, as in RQL and pointer URLs: lifecycle keys hold a "/".
        ("lifecycle/fan~1speed", {"lifecycle": {"fan/speed": {"state": "pending"}}}),
        ("lifecycle/fan~1speed/state", {"lifecycle": {"fan/speed": {"state": "pending"}}}),
        ("lifecycle(fan~1speed,a~0b)", {"lifecycle": DOC["lifecycle"]}),
        ("lifecycle/fan/speed", {}),
    ],
)
def test_select(fields: str | None, expected: object) -> None:
    before = copy.deepcopy(DOC)
    assert select(DOC, parse_fields(fields)) == expected
    # Twins are shared (caches, structural sharing): selecting must never write into them.
    assert before == DOC


@pytest.mark.parametrize(
    ("fields", "paths"),
    [
        ("a", [["a"]]),
        ("a/b,c", [["a", "b"], ["c"]]),
        ("a(b,c/d)", [["a", "b"], ["a", "c", "d"]]),
        ("a/b(c(d,e),f),g", [["a", "b", "c", "d"], ["a", "b", "c", "e"], ["a", "b", "f"], ["g"]]),
        # Spaces around an item go; inside a path they are part of the keys.
        (" a / b , c ", [["a ", " b"], ["c"]]),
        ("a~1b/~0,c(~01)", [["a/b", "~"], ["c", "~1"]]),
        ("a" + "(a" * MAX_GROUP_DEPTH + ")" * MAX_GROUP_DEPTH, [["a"] * (MAX_GROUP_DEPTH + 1)]),
    ],
)
def test_parse(fields: str, paths: list[list[str]]) -> None:
    assert parse_fields(fields) == paths


_TOO_DEEP = "a" + "(a" * (MAX_GROUP_DEPTH + 1) + ")" * (MAX_GROUP_DEPTH + 1)
_REFUSED = ["", ",", "a,", ",a", "a//b", "/a", "a/", "a()", "a(b", "a)", "a)b", "(a)", "a(b)c"]
_REFUSED += ["a~", "a~2b", "a/~/b", "a(b~)"]  # "~" only starts an escape (~0, ~1)
_REFUSED += ["a(b,)", "a((b))", "a(b))", _TOO_DEEP, "a(" * 5000 + "b" + ")" * 5000]


@pytest.mark.parametrize("fields", _REFUSED)
def test_parse_refuses(fields: str) -> None:
    with pytest.raises(BadRequest) as refused:
        parse_fields(fields)
    assert refused.value.code == "fields.invalid"
