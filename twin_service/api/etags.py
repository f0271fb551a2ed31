"""Entity tags (RFC 9110 section 8.8.3) and the ``If-Match`` / ``If-None-Match`` lists.

The service's ETags are strong, ``"rev:N"``. A client may send a list of them, the same
header more than once (the lines are one list), or tags it got elsewhere: a well-formed tag
that is not one of ours simply matches nothing. Only a header that is not a list of entity
tags at all is a 400.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from twin_service.digits import ascii_integer
from twin_service.errors import BadRequest

# An element of the list: optional ``W/``, a quoted opaque tag (any visible character but
# the quote, or obs-text), then the comma or the end. Optional whitespace around each.
_ELEMENT = re.compile(r'[ \t]*(?:(W/)?"([\x21\x23-\x7e\x80-\xff]*)")?[ \t]*(?:,|\Z)')


def etag(revision: int) -> str:
    return f'"rev:{revision}"'


@dataclass(frozen=True)
class EntityTag:
    opaque: str
    """The tag between its quotes."""
    weak: bool

    @property
    def revision(self) -> int | None:
        """N when this is ``"rev:N"`` (weak or not) as this service writes it, else ``None``.

        Tags compare character by character (RFC 9110 section 8.8.3.2): ``"rev:04"`` is not
        ``"rev:4"``, so a leading zero names no revision.
        """
        digits = self.opaque[4:]
        if not self.opaque.startswith("rev:") or (digits.startswith("0") and digits != "0"):
            return None
        return ascii_integer(digits)


def parse_tags(header: str, value: str) -> list[EntityTag] | None:
    """The entity tags of an ``If-Match`` or ``If-None-Match`` value; ``None`` for ``*``.

    Empty list elements are skipped (RFC 9110 section 5.6.1 asks recipients to accept them).
    """
    if value.strip(" \t") == "*":
        return None
    tags: list[EntityTag] = []
    position = 0
    while position < len(value):
        found = _ELEMENT.match(value, position)
        if found is None or found.end() == position:
            raise BadRequest(
                f"{header} {value!r} is not '*' or a list of entity tags "
                f'(such as "rev:3" or "rev:3", "rev:4").'
            )
        if found.group(2) is not None:
            tags.append(EntityTag(found.group(2), weak=found.group(1) is not None))
        position = found.end()
    return tags


def strong_revisions(tags: list[EntityTag]) -> frozenset[int]:
    """The revisions that ``If-Match`` names: it compares strongly (RFC 9110 section 13.1.1),
    so a weak tag matches nothing (a proxy that weakened our ETag changed the bytes)."""
    return frozenset(
        revision for tag in tags if not tag.weak and (revision := tag.revision) is not None
    )


def weak_revisions(tags: list[EntityTag]) -> frozenset[int]:
    """The revisions that ``If-None-Match`` names: it compares weakly (section 13.1.2)."""
    return frozenset(revision for tag in tags if (revision := tag.revision) is not None)
