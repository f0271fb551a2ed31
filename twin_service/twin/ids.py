"""Twin identifiers: ``namespace:name``, following Eclipse Ditto's rules."""

from __future__ import annotations

import re
import uuid

from twin_service.errors import InvalidTwinId

MAX_ID_LENGTH = 256

# A namespace is a Java-package-like dotted name; it may be empty as in Ditto. Words are
# ASCII, as Ditto's (Java) \w is; Python's \w would also take any Unicode letter.
_WORD = r"[a-zA-Z][a-zA-Z0-9_]*"
_NAMESPACE = rf"(?:{_WORD}(?:\.{_WORD})*)?"
# A name: URL-safe characters (RFC 3986 unreserved + sub-delims + ':' '@') and percent
# escapes, never '/'.
_NAME = r"(?:[A-Za-z0-9\-._~!$&'()*+,;=:@]|%[0-9A-Fa-f]{2})+"
_ID_RE = re.compile(rf"({_NAMESPACE}):({_NAME})")
_NAMESPACE_RE = re.compile(_NAMESPACE)
#: The whole rule as a regular expression that JSON Schema (ECMA-262) reads the same way,
#: for the API's description; ``parse_twin_id`` also bounds the length.
TWIN_ID_PATTERN = rf"^{_NAMESPACE}:{_NAME}$"


def parse_twin_id(twin_id: str) -> tuple[str, str]:
    """Split and validate a twin id, returning ``(namespace, name)``."""
    if len(twin_id) > MAX_ID_LENGTH:
        raise InvalidTwinId(
            f"Twin id is {len(twin_id)} characters long, at most {MAX_ID_LENGTH} are allowed.",
            description="A twin id is 'namespace:name' of at most 256 characters.",
        )
    # fullmatch, not match + '$': '$' also matches before a trailing newline.
    match = _ID_RE.fullmatch(twin_id)
    if match is None:
        raise InvalidTwinId(
            f"Twin id {twin_id!r} is not valid.",
            description=(
                "A twin id is 'namespace:name': the namespace is dotted words starting with a "
                "letter (e.g. org.acme.plant1), the name any URL-safe characters except '/'."
            ),
        )
    return match.group(1), match.group(2)


def validate_namespace(namespace: str) -> str:
    """Return ``namespace`` if it follows the namespace rules."""
    # The namespace must leave room for ':' and a name of at least one character.
    if not _NAMESPACE_RE.fullmatch(namespace) or len(namespace) > MAX_ID_LENGTH - 2:
        raise InvalidTwinId(f"Namespace {namespace!r} is not valid.")
    return namespace


#: Characters of the name :func:`generate_twin_id` makes (a UUID), and the longest
#: namespace that leaves room for it.
GENERATED_NAME_LENGTH = 36
MAX_GENERATED_NAMESPACE = MAX_ID_LENGTH - GENERATED_NAME_LENGTH - 1


def generate_twin_id(namespace: str) -> str:
    """A new random twin id in ``namespace``.

    Raises InvalidTwinId, about the namespace, when it is none or leaves no room for the
    name: a ``:`` in it chose part of the name (``org.a:x:<uuid>``), and anything else
    failed as an id the client never sent.
    """
    if len(namespace) > MAX_GENERATED_NAMESPACE or not _NAMESPACE_RE.fullmatch(namespace):
        shown = (
            repr(namespace)
            if len(namespace) <= MAX_ID_LENGTH
            else f"of {len(namespace)} characters"
        )
        raise InvalidTwinId(
            f"Namespace {shown} is not valid.",
            description="A namespace is dotted words starting with a letter (e.g. "
            f"org.acme.plant1), at most {MAX_GENERATED_NAMESPACE} characters to leave room "
            "for a generated name.",
        )
    return f"{namespace}:{uuid.uuid4()}"
