"""The process's limit of open files, raised at start to what the system allows."""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

#: Descriptors kept for everything but the change-stream readers: REST connections, the
#: devices of the embedded broker, the store, the broker and index clients, the log.
RESERVED = 1024


def raise_open_files_limit(readers: int) -> int | None:
    """Raise the soft limit of open files to the hard one, and warn when it leaves fewer than
    ``readers`` (``stream.max_connections``) plus :data:`RESERVED`. Returns the soft limit
    now in force, or ``None`` where the platform has no such limit.

    Each connection (a stream reader, a request, a device of the embedded broker) holds a
    descriptor. The soft limit is often 1,024 (a login shell, systemd's default) while the
    hard one allows far more; the Go runtime and nginx raise it the same way. Past the soft
    limit the server stops accepting anyone, REST included, and only says so in a log line.
    """
    try:
        import resource
    except ImportError:  # not a POSIX system
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != soft and (hard == resource.RLIM_INFINITY or hard > soft):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:  # some platforms cap it below the hard limit
            log.info("cannot raise the open files limit from %d to %d: %s", soft, hard, exc)
    if soft != resource.RLIM_INFINITY and soft < readers + RESERVED:
        log.warning(
            "the open files limit is %d, less than stream.max_connections (%d) and %d for "
            "requests, devices and clients: past it nobody can connect; raise the limit "
            "(ulimit -n, LimitNOFILE=) or lower stream.max_connections",
            soft,
            readers,
            RESERVED,
        )
    return soft
