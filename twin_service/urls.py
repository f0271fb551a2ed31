"""Checks of the URLs the service is given (broker, database, search engine).

Apart from the settings so that the device library (``connectivity``) can use them without
loading the service's settings.
"""

from __future__ import annotations

from urllib.parse import urlsplit


def check_url(url: str, schemes: tuple[str, ...]) -> None:
    """Raise ValueError unless ``url`` has one of ``schemes``, a host and a valid port.

    The messages never repeat the URL: it may hold a password.
    """
    parts = urlsplit(url)
    if parts.scheme not in schemes:
        expected = " or ".join(f"{scheme}://" for scheme in schemes)
        raise ValueError(f"must start with {expected}, not {parts.scheme or 'no scheme'}")
    # The first '/', '?' or '#' ends the host part: one in a password (`openssl rand
    # -base64` puts a '/' in about 40% of them) left the rest, '@' and host included, in the
    # path, and the error blamed the port, or digits before it became the port, silently.
    if "@" not in parts.netloc and "@" in parts.path + parts.query + parts.fragment:
        raise ValueError(
            "has a '/', '?' or '#' before its '@': percent-encode them in the user and "
            "password (%2F, %3F, %23)"
        )
    if not parts.hostname:
        raise ValueError("has no host")
    if "," in parts.netloc:  # a MongoDB seed list (h1,h2:27018) is pymongo's to read
        return
    try:
        port = parts.port
    except ValueError:
        raise ValueError("has a port that is not a number from 1 to 65535") from None
    # Port 0 is no server's port; read as "unset" it quietly meant the scheme's default.
    if port == 0:
        raise ValueError("has port 0; leave the port out for the default")
