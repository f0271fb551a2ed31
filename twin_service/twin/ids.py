"""Twin identifiers: ``namespace:name``, following Eclipse Ditto's rules."""

from __future__ import annotations

import re
import uuid

from twin_service.errors import InvalidTwinId

MAX_ID_LENGTH = 256

# A namespace is a Java-package-like dotted name; it may be empty as in Ditto.
_NAMESPACE = r"(?:[a-zA-Z]\w*(?:\.[a-zA-Z]\w*)*)?"
# A name: URL-safe characters (RFC 3986 unreserved + sub-delims + ':' '@'), never '/'.
_NAME = r"[A-Za-z0-9\-._~!$&'()*+,;=:@%]+"
# re.ASCII: Ditto (Java) reads \w as [A-Za-z0-9_]; Python would also accept any Unicode letter.
_ID_RE = re.compile(rf"({_NAMESPACE}):({_NAME})", re.ASCII)
_NAMESPACE_RE = re.compile(_NAMESPACE, re.ASCII)
_PCT_RE = re.compile(r"%(?![0-9A-Fa-f]{2})")


def parse_twin_id(twin_id: str) -> tuple[str, str]:
    """Split and validate a twin id, returning ``(namespace, name)``."""
    if len(twin_id) > MAX_ID_LENGTH:
        raise InvalidTwinId(
            f"Twin id is {len(twin_id)} characters long, at most {MAX_ID_LENGTH} are allowed.",
            description="A twin id is 'namespace:name' of at most 256 characters.",
        )
    # fullmatch, not match + '$': '$' also matches before a trailing newline.
    match = _ID_RE.fullmatch(twin_id)
    if match is None or _PCT_RE.search(match.group(2)):
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


def generate_twin_id(namespace: str) -> str:
    """A new random twin id in ``namespace``."""
    return f"{namespace}:{uuid.uuid4()}"
