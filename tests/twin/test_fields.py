"""``fields`` selection: nesting kept, missing paths skipped, the document never written."""

from __future__ import annotations

import copy

import pytest

from twin_service.twin.fields import parse_fields, select

DOC = {
    "twinId": "org.acme:t",
    "desired": {"fan": {"speed": 3, "mode": "auto"}, "light": True},
    "reported": {"fan": {"speed": 2}},
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
    ],
)
def test_select(fields: str | None, expected: object) -> None:
    before = copy.deepcopy(DOC)
    assert select(DOC, parse_fields(fields)) == expected
    # Twins are shared (caches, structural sharing): selecting must never write into them.
    assert before == DOC
