"""The entity-tag list parser behind If-Match and If-None-Match (pure, no service)."""

from __future__ import annotations

import pytest

from twin_service.api.etags import (
    EntityTag,
    etag,
    parse_tags,
    strong_revisions,
    weak_revisions,
)
from twin_service.errors import BadRequest

STRONG_1 = EntityTag("rev:1", weak=False)


@pytest.mark.parametrize(
    ("value", "tags"),
    [
        ("*", None),
        (" * ", None),
        ("", []),
        (",,", []),
        ('"rev:1"', [STRONG_1]),
        ('W/"rev:1"', [EntityTag("rev:1", weak=True)]),
        ('"rev:1",W/"rev:2"', [STRONG_1, EntityTag("rev:2", weak=True)]),
        ('\t"rev:1" ,\t, "a,b" ', [STRONG_1, EntityTag("a,b", weak=False)]),
        ('""', [EntityTag("", weak=False)]),
        ('"\xb2"', [EntityTag("\xb2", weak=False)]),
    ],
)
def test_well_formed_lists(value: str, tags: list[EntityTag] | None) -> None:
    assert parse_tags("If-Match", value) == tags


@pytest.mark.parametrize(
    "value",
    [
        "rev:1",
        '"rev:1',
        'rev:1"',
        '"rev:1" "rev:2"',
        'w/"rev:1"',
        'W/ "rev:1"',
        '"a"b',
        '"a"*',
        '*, "rev:1"',
        '"tab\there"',
        '"quote"inside"',
    ],
)
def test_malformed_values_are_a_bad_request(value: str) -> None:
    with pytest.raises(BadRequest, match="If-None-Match"):
        parse_tags("If-None-Match", value)


def test_revisions_compare_strongly_or_weakly() -> None:
    many_digits = "9" * 5000
    value = f'{etag(3)}, W/{etag(4)}, "rev:x", "rev:-1", "rev:03", "rev:{many_digits}"'
    tags = parse_tags("If-Match", value)
    assert tags is not None
    assert strong_revisions(tags) == {3}
    assert weak_revisions(tags) == {3, 4}
    assert [tag.revision for tag in tags] == [3, 4, None, None, None, None]
