"""Numbers as the SQLite index stores them: exact and in order. Pure.

SQLite holds 64-bit integers and doubles, and compares those with each other exactly; a JSON
integer may be larger (up to the double range). A number ``n`` is stored in two columns:

* ``v``: ``n`` itself when SQLite can hold it (a double, or an integer of 64 bits), else the
  largest double not above ``n``;
* ``x``: NULL for the former; for the latter, the *excess* ``n - v`` (0 or more) as a key:
  an INTEGER when it fits 64 bits, else a BLOB of its length in bytes and its bytes,
  big-endian.

``(v, ifnull(x, 0))`` orders numbers exactly as the reference evaluator does. ``v`` never
decreases as ``n`` grows (rounding down is monotonic), and numbers with the same ``v`` differ
by their excess, whose keys SQLite orders by value: every INTEGER before every BLOB, and
blobs of minimal length by length, then bytes. Only a ``v`` beyond 64-bit integers can be
shared by numbers of different excess (:func:`shares_v`), so conditions on any other value
need not look at ``x``. An ``x`` of 0 marks an integer that a double holds exactly
(``2**64``): it reads back as an int.
"""

from __future__ import annotations

import math

#: What SQLite binds, stores and returns for a number's ``v`` and ``x``.
StoredV = int | float
StoredX = int | bytes | None

_INT64 = range(-(2**63), 2**63)


def _excess_key(excess: int) -> int | bytes:
    if excess in _INT64:
        return excess
    size = (excess.bit_length() + 7) // 8
    return bytes([size]) + excess.to_bytes(size, "big")


def _excess(x: StoredX) -> int:
    if x is None:
        return 0
    if isinstance(x, int):
        return x
    return int.from_bytes(x[1:], "big")


def stored(n: int | float) -> tuple[StoredV, StoredX]:
    """``(v, x)`` of the number ``n`` (finite, within the double range)."""
    if isinstance(n, float) or n in _INT64:
        return n, None
    v = float(n)  # the nearest double, one step above n at most
    if int(v) > n:
        v = math.nextafter(v, -math.inf)
    return v, _excess_key(n - int(v))


def number(v: StoredV, x: StoredX) -> int | float:
    """The number stored as ``(v, x)``: the inverse of :func:`stored`."""
    return v if x is None else int(v) + _excess(x)


def excess_key(x: StoredX) -> int | bytes:
    """The excess as ``ifnull(x, 0)`` gives it in SQL."""
    return 0 if x is None else x


def shares_v(v: StoredV) -> bool:
    """Whether integers beyond 64 bits may be stored with this ``v`` (then ``x`` tells them
    apart from each other and from ``v`` itself)."""
    return not -(2**63) <= v < 2**63
