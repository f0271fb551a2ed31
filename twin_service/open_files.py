"""The process's limit of open files: raised at start to what the system allows, and the
bound on change-stream readers kept within it."""

from __future__ import annotations

import logging
import resource

log = logging.getLogger(__name__)

#: Descriptors kept for everything but the change-stream readers and the devices of the
#: embedded broker: REST connections, the store, the broker and index clients, the log.
RESERVED = 1024


def raise_open_files_limit() -> None:
    """Raise the soft limit of open files to the hard one.

    Each connection (a stream reader, a request, a device of the embedded broker) holds a
    descriptor. The soft limit is often 1,024 (a login shell, systemd's default) while the
    hard one allows far more; the Go runtime and nginx raise it the same way. Past the soft
    limit the server could not take anyone, REST included, and the log said nothing (400
    idle connections to a service limited to 300: its /health failed).
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == hard:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError) as exc:  # some platforms cap it below the hard limit
        log.info("cannot raise the open files limit from %d to %d: %s", soft, hard, exc)


def readers_bound(max_connections: int, broker_connections: int = 0) -> int:
    """``stream.max_connections``, or fewer when the open files limit has no room for that
    many readers besides :data:`RESERVED` and ``broker_connections`` (the embedded broker's
    bounds on its connections; then at least half the limit; said in the log)."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        return max_connections
    reserved = RESERVED + broker_connections
    # Never more than asked for (half the limit may be more, with a small bound).
    bound = min(max(soft - reserved, soft // 2, 1), max_connections)
    if bound == max_connections:
        return bound
    log.warning(
        "the open files limit is %d: change-stream readers are bounded at %d, not "
        "stream.max_connections (%d), to keep %d for requests, devices and clients; raise "
        "the limit (ulimit -n, LimitNOFILE=) to serve more",
        soft,
        bound,
        max_connections,
        reserved,
    )
    return bound
