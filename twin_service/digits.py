"""Whole numbers written by clients as decimal text (headers, query values, ``waitFor``).
Pure, no I/O."""

from __future__ import annotations


def ascii_integer(text: str) -> int | None:
    """``text`` as a non-negative integer if it is ASCII decimal digits, else ``None``.

    ``str.isdigit`` alone also takes ``²``, which ``int`` refuses (a header value is Latin-1:
    a 500 where a 400 was due). Past 4,300 digits ``int`` refuses too (CPython's guard
    against quadratic conversion): a number no store holds, so ``None`` as well, where
    ``"rev:"`` and 5,000 nines was a 500.
    """
    if not (text.isascii() and text.isdigit()):
        return None
    try:
        return int(text)
    except ValueError:
        return None


def ascii_decimal(text: str) -> float | None:
    """``text`` as a non-negative number if it is ASCII decimal digits, optionally followed
    by ``.`` and more of them (``3``, ``0.5``), else ``None``.

    ``float`` alone also takes ``1_0``, ``+1``, ``1e2``, ``.5``, surrounding spaces, ``nan``,
    ``inf`` and digits of other scripts (``\\u0661``). A value too large for a float is
    infinity, which callers bound.
    """
    whole, point, fraction = text.partition(".")
    if not _digits(whole) or (point and not _digits(fraction)):
        return None
    return float(text)


def _digits(text: str) -> bool:
    return text.isascii() and text.isdigit()
