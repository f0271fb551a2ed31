"""Keys as JSON pointer tokens (RFC 6901): ``~`` is written ``~0`` and ``/`` is ``~1``.

Every path form of the service escapes keys this way: request pointers, lifecycle keys,
RQL properties and the paths of the search indexes.
"""

from __future__ import annotations

from collections.abc import Iterable


def escape_token(key: str) -> str:
    """One key as a pointer token."""
    # Keys almost never need escaping, and index and lifecycle code escapes every key a
    # write passes through: the test skips two replace() calls.
    if "~" in key or "/" in key:
        return key.replace("~", "~0").replace("/", "~1")
    return key


def unescape_token(token: str) -> str:
    """The key a pointer token stands for (``~1`` first, as RFC 6901 says)."""
    return token.replace("~1", "/").replace("~0", "~")


def key_path(keys: Iterable[str]) -> str:
    """``("fan", "speed")`` -> ``"fan/speed"``: escaped tokens joined by ``/``, no leading one."""
    return "/".join(map(escape_token, keys))
