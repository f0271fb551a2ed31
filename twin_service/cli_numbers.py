"""Argument types for numbers on the command line: each refuses what argparse's own
``type=int``/``type=float`` let through or reported poorly (text that is no number,
``nan`` and ``inf``, values below a bound) with a one-line usage error."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T", int, float)


def number(text: str, kind: Callable[[str], T]) -> T:
    """``text`` as a finite ``kind`` (int or float), or an argparse usage error."""
    try:
        value = kind(text)
    except ValueError:
        what = "a whole number" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"must be {what}, not {text!r}") from None
    # 'nan' compares false with every bound, and so passed them all.
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, not {text!r}")
    return value


def at_least(low: float, kind: Callable[[str], T]) -> Callable[[str], T]:
    """An argument type: a finite ``kind`` of at least ``low``."""

    def parse(text: str) -> T:
        value = number(text, kind)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low:g}")
        return value

    return parse
