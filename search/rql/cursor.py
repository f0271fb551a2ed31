"""Opaque keyset cursors: urlsafe base64 of JSON ``{"f": fingerprint, "k": [[rank, value], ...]}``.

The keys are the sort keys of the last twin returned (the last one is always its twinId);
the fingerprint binds the cursor to the filter, sort and namespaces that produced it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import sys
from collections.abc import Sequence
from typing import Any

from twin_service.errors import RqlInvalid

from .ast import Filter, SortKey
from .ordering import ARRAY, MISSING, OBJECT, Key
from .printer import print_filter, print_sort

_SURROGATE = re.compile("[\ud800-\udfff]")


def fingerprint(
    filter: Filter | None, sort: Sequence[SortKey], namespaces: Sequence[str] | None
) -> str:
    """A short hash of what a cursor must be reused with."""
    text = json.dumps(
        [
            None if filter is None else print_filter(filter),
            print_sort(tuple(sort)),
            None if namespaces is None else sorted(namespaces),
        ]
    )
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def encode_cursor(keys: Sequence[Key], fp: str) -> str:
    """The token for a page that ended at a twin with these sort keys."""
    data = json.dumps({"f": fp, "k": [list(k) for k in keys]}, separators=(",", ":"))
    return base64.urlsafe_b64encode(data.encode()).decode().rstrip("=")


def _valid_key(item: Any) -> bool:
    if not isinstance(item, list) or len(item) != 2 or type(item[0]) is not int:
        return False
    rank, value = item
    if rank in (MISSING, 0, ARRAY, OBJECT):
        return value is None
    if rank == 1:
        return type(value) is int and value in (0, 1)
    if rank == 2:
        # Finite and within the double range, like every number a query can hold.
        return type(value) in (int, float) and abs(value) <= sys.float_info.max
    return rank == 3 and isinstance(value, str) and _SURROGATE.search(value) is None


def decode_cursor(token: str, fp: str, sort: Sequence[SortKey]) -> list[Key]:
    """The sort keys in ``token``; :class:`RqlInvalid` if malformed or made for another query."""
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        data = json.loads(raw.decode())
    except (binascii.Error, ValueError, UnicodeDecodeError, RecursionError):
        raise RqlInvalid("malformed cursor") from None
    if not isinstance(data, dict) or not isinstance(data.get("k"), list):
        raise RqlInvalid("malformed cursor")
    if data.get("f") != fp:
        raise RqlInvalid("cursor does not belong to this filter, sort and namespaces")
    keys = data["k"]
    if len(keys) != len(sort) or not all(_valid_key(k) for k in keys):
        raise RqlInvalid("malformed cursor")
    if keys[-1][0] != 3:
        raise RqlInvalid("malformed cursor")
    return [(k[0], k[1]) for k in keys]
