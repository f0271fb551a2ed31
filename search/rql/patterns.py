"""``like`` patterns: ``*`` any run, ``?`` one character, ``\\*`` ``\\?`` ``\\\\`` literal."""

from __future__ import annotations

import importlib
import re
from functools import lru_cache

from twin_service.errors import RqlInvalid

_ESCAPABLE = frozenset("*?\\")
_ESCAPES_TEXT = "only \\*, \\? and \\\\ are allowed"


def _tokens(pattern: str) -> list[str]:
    """Split into tokens: ``"*"``, ``"?"`` or a one-character literal prefixed with ``"="``."""
    out: list[str] = []
    i = 0
    while i < len(pattern):
        ch = pattern[i]
        if ch == "\\":
            nxt = pattern[i + 1 : i + 2]
            if nxt not in _ESCAPABLE or nxt == "":
                raise RqlInvalid(f"invalid escape in like pattern {pattern!r}: {_ESCAPES_TEXT}")
            out.append("=" + nxt)
            i += 2
        else:
            out.append(ch if ch in "*?" else "=" + ch)
            i += 1
    return out


def validate(pattern: str) -> None:
    """Raise :class:`RqlInvalid` when ``pattern`` has a bad escape."""
    _tokens(pattern)


def literal_prefix(pattern: str) -> tuple[str, bool]:
    """The literal text before the first wildcard, and whether the pattern has no wildcard."""
    out: list[str] = []
    for token in _tokens(pattern):
        if token in ("*", "?"):
            return "".join(out), False
        out.append(token[1])
    return "".join(out), True


#: Python's IGNORECASE takes İ (U+0130) for i and ı (U+0131) for I, by their lower and upper
#: case; Unicode simple case folding (what ``ilike`` promises) folds neither, so these four
#: are matched with case-sensitive groups. Every other character folds the same both ways.
_DOTTED_AND_DOTLESS = {"i": "(?-i:[iI])", "I": "(?-i:[iI])", "İ": "(?-i:İ)", "ı": "(?-i:ı)"}


@lru_cache(maxsize=512)
def compile_pattern(pattern: str, ignore_case: bool) -> re.Pattern[str]:
    """A regular expression that must ``fullmatch`` the whole string.

    Each ``*`` as a plain ``.*`` made a backtracking engine try every way of cutting the
    string between the stars: ``*a*a*a*a*b`` against 200 ``a`` took seconds, one more star
    a minute, on the event loop of every change-stream filter. The runs between the stars
    match at their first place instead, in atomic groups no failure backtracks into:
    taking the first place leaves the most string for what follows, so it matches exactly
    when some place does, in time about linear in the string.
    """
    runs = [""]  # the regular expressions of the runs between the stars
    for token in _tokens(pattern):
        if token == "*":
            runs.append("")
        elif token == "?":
            runs[-1] += "."
        elif ignore_case and token[1] in _DOTTED_AND_DOTLESS:
            runs[-1] += _DOTTED_AND_DOTLESS[token[1]]
        else:
            runs[-1] += re.escape(token[1])
    if len(runs) == 1:  # no star
        body = runs[0]
    else:
        first, *middle, last = runs
        body = first + "".join(f"(?>.*?{run})" for run in middle if run) + ".*" + last
    flags = re.DOTALL | (re.IGNORECASE if ignore_case else 0)
    return re.compile(body, flags)


#: The lower-case characters that IGNORECASE also takes for each other (``s`` and the long
#: s, the Greek symbol variants...): the table the ``re`` module itself matches with.
_EXTRA_CASES: dict[int, tuple[int, ...]] = importlib.import_module("re._casefix")._EXTRA_CASES


@lru_cache(maxsize=4096)
def _fold_char(ch: str) -> str:
    if ch in "İı":
        return ch
    lower = ch.lower()  # one character for all but İ (full mapping i + dot)
    if lower == "i":  # ı is left out of i's class above
        return lower
    return min(lower, *map(chr, _EXTRA_CASES.get(ord(lower), ())))


def fold(text: str) -> str:
    """``text`` with each character replaced by one representative of its ``ilike`` class.

    ``ilike(p, pattern)`` matches a string exactly when ``like`` matches ``fold(pattern)``
    against ``fold(string)``: the character classes are those of :func:`compile_pattern`
    (Python's IGNORECASE, with İ and ı matching only themselves), one character maps to
    one, and ``*``, ``?`` and ``\\`` map to themselves, so a folded pattern stays a pattern.
    External indexes store folded strings to answer ``ilike`` for every script.
    """
    if text.isascii():  # every ASCII class's least member is its lower case
        return text.lower()
    return "".join(map(_fold_char, text))


def like(pattern: str, ignore_case: bool, text: str) -> bool:
    """Whether ``text`` matches the whole ``pattern``."""
    return compile_pattern(pattern, ignore_case).fullmatch(text) is not None
