"""Order-preserving string encodings of typed values and paths. Pure.

A typed value is one rank digit (:mod:`search.rql.ordering`: 0 null, 1 boolean, 2 number,
3 string, 4 array, 5 object) followed by its payload, so comparing two encodings as strings
(by code point, which is also UTF-8 byte order, MongoDB's string order) compares ranks first
and then values within a rank:

* booleans: ``0`` / ``1``;
* numbers: exact decimal, ``1`` + exponent + complemented digits + ``~`` when negative, ``2``
  for zero, ``3`` + exponent + digits when positive (``1 == 1.0``, big integers exact);
* strings: the string itself; arrays and objects: no payload (they all tie).
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from search.rql.ast import Path
from search.rql.ordering import ARRAY, MISSING, OBJECT, Key
from search.rql.paths import format_path

_EXPONENT_BIAS = 5000
_COMPLEMENT = str.maketrans("0123456789", "9876543210")


def encode_number(value: int | float) -> str:
    """An encoding whose string order is numeric order, exact for ints and floats."""
    if value == 0:
        return "2"
    sign, digit_tuple, exponent = Decimal(value).as_tuple()
    assert isinstance(exponent, int)  # finite: twins never hold NaN or infinities
    digits = "".join(map(str, digit_tuple))
    # value = 0.<digits> * 10**adjusted, with no leading or trailing zero digits.
    adjusted = len(digits) + exponent
    digits = digits.rstrip("0")
    if sign:
        return f"1{_EXPONENT_BIAS - adjusted:04d}{digits.translate(_COMPLEMENT)}~"
    return f"3{_EXPONENT_BIAS + adjusted:04d}{digits}"


def encode_key(key: Key) -> str | None:
    """The string of a ``(rank, value)`` sort key; None for a missing value."""
    rank, value = key
    if rank == MISSING:
        return None
    if rank in (0, ARRAY, OBJECT):
        return str(rank)
    if rank == 1:
        return "1" + ("1" if value else "0")
    if rank == 2:
        assert isinstance(value, int | float)
        return "2" + encode_number(value)
    return "3" + str(value)


def encode_value(value: Any) -> str:
    """The typed encoding of a JSON scalar (null, boolean, number or string)."""
    if value is None:
        return "0"
    if isinstance(value, bool):
        return "1" + ("1" if value else "0")
    if isinstance(value, int | float):
        return "2" + encode_number(value)
    return "3" + str(value)


_FIELD_ESCAPES = str.maketrans({"%": "%25", ".": "%2E", "$": "%24", "\x00": "%00"})


def field_key(path: Path | str) -> str:
    """A path as one field name: escaped (:func:`format_path`), then without ``.`` or ``$``."""
    text = path if isinstance(path, str) else format_path(path)
    return text.translate(_FIELD_ESCAPES)


def sort_field(path: Path) -> str:
    """The dotted field holding a path's sort key."""
    return "k." + field_key(path)


def value_field(path: Path, rank: int) -> str:
    """The dotted field holding the encodings of a path's values of one rank."""
    return f"e.{field_key(path)}.t{rank}"


def path_field(path: Path) -> str:
    """The dotted field that exists exactly when a path holds something."""
    return "e." + field_key(path)
