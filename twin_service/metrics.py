"""The service's Prometheus metrics (text exposition format 0.0.4).

``GET /metrics`` renders the same figures as ``GET /ready``, read at scrape time from the
counters the parts keep anyway. A figure a part does not report (no broker, another store)
is left out, as Prometheus expects. The one thing counted on the request path for it is
:class:`RequestMetrics`: each HTTP request's route, status and duration.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass(frozen=True)
class Metric:
    name: str
    kind: Literal["counter", "gauge"]
    help: str
    #: Where the value is in the checks of /ready: check name, then keys.
    path: tuple[str, ...]


METRICS = (
    Metric(
        "twin_service_store_writes_committed_total",
        "counter",
        "Twin writes committed by this process.",
        ("store", "writes", "committed"),
    ),
    Metric(
        "twin_service_store_writes_retried_total",
        "counter",
        "Write attempts that lost the compare-and-set to a concurrent writer.",
        ("store", "writes", "retried"),
    ),
    Metric(
        "twin_service_store_writes_failed_total",
        "counter",
        "Write attempts the store failed (out of reach, full, not confirmed).",
        ("store", "writes", "failed"),
    ),
    Metric(
        "twin_service_sqlite_writer_unsent",
        "gauge",
        "Writes waiting to be sent to the SQLite writer process.",
        ("store", "writer", "unsent"),
    ),
    Metric(
        "twin_service_index_backlog",
        "gauge",
        "Writes the search index has yet to take.",
        ("index", "backlog"),
    ),
    Metric(
        "twin_service_index_lag_seconds",
        "gauge",
        "Age of the oldest write the search index has yet to take.",
        ("index", "lagSeconds"),
    ),
    Metric(
        "twin_service_index_rejected_total",
        "counter",
        "Twins the search engine refused for good.",
        ("index", "rejected"),
    ),
    Metric(
        "twin_service_stream_subscriptions",
        "gauge",
        "Change-stream subscriptions (WebSocket and server-sent events) of this process.",
        ("streams", "subscriptions"),
    ),
    Metric(
        "twin_service_stream_readers",
        "gauge",
        "Change-stream readers (WebSocket connections and server-sent-event streams) of this "
        "process (bounded by stream.max_connections).",
        ("streams", "readers"),
    ),
    Metric(
        "twin_service_stream_readers_max",
        "gauge",
        "Change-stream readers this process serves at most (stream.max_connections, or fewer "
        "when the open files limit has no room for them).",
        ("streams", "maxReaders"),
    ),
    Metric(
        "twin_service_stream_queued_bytes",
        "gauge",
        "Bytes of messages queued for this process's change-stream readers "
        "(bounded by stream.total_queue_bytes).",
        ("streams", "queuedBytes"),
    ),
    Metric(
        "twin_service_stream_position",
        "gauge",
        "Sequence number of the last journal event offered to this process's subscribers.",
        ("streams", "position"),
    ),
    Metric(
        "twin_service_mqtt_reconnects_total",
        "counter",
        "Reconnections to the MQTT broker.",
        ("mqtt", "reconnects"),
    ),
    Metric(
        "twin_service_mqtt_embedded_devices",
        "gauge",
        "Device connections the embedded broker holds (bounded by mqtt.embedded_max_devices).",
        ("mqtt", "devices"),
    ),
    Metric(
        "twin_service_mqtt_embedded_devices_max",
        "gauge",
        "Device connections the embedded broker holds at most (mqtt.embedded_max_devices).",
        ("mqtt", "maxDevices"),
    ),
    Metric(
        "twin_service_mqtt_pending_acks",
        "gauge",
        "Device messages received and not yet acknowledged to the broker.",
        ("mqtt", "pendingAcks"),
    ),
    Metric(
        "twin_service_mqtt_handler_failures_total",
        "counter",
        "Device messages whose handling failed unexpectedly.",
        ("mqtt", "handlerFailures"),
    ),
    Metric(
        "twin_service_mqtt_messages_applied_total",
        "counter",
        "Device messages applied to their twin.",
        ("mqtt", "applied"),
    ),
    Metric(
        "twin_service_mqtt_messages_duplicate_total",
        "counter",
        "Device messages recognised as already applied (same clientToken).",
        ("mqtt", "duplicates"),
    ),
    Metric(
        "twin_service_mqtt_messages_rejected_total",
        "counter",
        "Device messages answered on a rejected topic.",
        ("mqtt", "rejected"),
    ),
    Metric(
        "twin_service_mqtt_deltas_published_total",
        "counter",
        "Delta messages published to devices.",
        ("mqtt", "deltasPublished"),
    ),
)


#: Upper bounds, in seconds, of the request duration histogram's buckets: from a GET served
#: from the cache (about a millisecond under load) to a write that waited out a slow store.
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

#: Methods counted under their name; any other (a client can send anything) as ``other``,
#: so a hostile client cannot make series without end. Routes are templates for the same
#: reason, and a path no route matches is ``unmatched``.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class _Durations:
    __slots__ = ("buckets", "total")

    def __init__(self) -> None:
        # One more than the bounds: the requests slower than the last (only in +Inf).
        self.buckets = [0] * (len(DURATION_BUCKETS) + 1)
        self.total = 0.0

    def add(self, other: _Durations) -> None:
        self.buckets = [a + b for a, b in zip(self.buckets, other.buckets, strict=True)]
        self.total += other.total


class RequestMetrics:
    """HTTP requests by method, route template and status, and their durations by method
    and route. One process's event loop calls it, so plain counters do."""

    def __init__(self) -> None:
        # Durations by method, route and status: one lookup a request (the count of a
        # series is its buckets' sum); the histogram adds the statuses up when scraped.
        self._series: dict[tuple[str, str, int], _Durations] = {}

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        durations = self._series.get((method, route, status))
        if durations is None:
            if method not in METHODS:
                method = "other"
            durations = self._series.setdefault((method, route, status), _Durations())
        durations.buckets[bisect_left(DURATION_BUCKETS, seconds)] += 1
        durations.total += seconds

    def exposition(self) -> list[str]:
        name = "twin_service_http_requests_total"
        lines = [
            f"# HELP {name} HTTP requests answered, by method, route and status.",
            f"# TYPE {name} counter",
        ]
        by_route: dict[tuple[str, str], _Durations] = {}
        for (method, route, status), durations in sorted(self._series.items()):
            count = sum(durations.buckets)
            lines.append(f'{name}{{{_labels(method, route)},status="{status}"}} {count}')
            by_route.setdefault((method, route), _Durations()).add(durations)
        name = "twin_service_http_request_duration_seconds"
        lines += [
            f"# HELP {name} Time from a request's arrival to its response's end.",
            f"# TYPE {name} histogram",
        ]
        for (method, route), durations in by_route.items():
            labels = _labels(method, route)
            seen = 0
            for bound, count in zip(DURATION_BUCKETS, durations.buckets, strict=False):
                seen += count
                lines.append(f'{name}_bucket{{{labels},le="{bound}"}} {seen}')
            seen += durations.buckets[-1]
            lines += [
                f'{name}_bucket{{{labels},le="+Inf"}} {seen}',
                f"{name}_sum{{{labels}}} {_number(durations.total)}",
                f"{name}_count{{{labels}}} {seen}",
            ]
        return lines


def _labels(method: str, route: str) -> str:
    return f'method="{method}",route="{_label(route)}"'


def render(
    checks: Mapping[str, Any],
    *,
    version: str,
    starting: bool,
    requests: RequestMetrics | None = None,
) -> str:
    """The exposition of ``checks`` (the ``checks`` object of /ready), and of ``requests``."""
    lines = [
        "# HELP twin_service_info The service's version.",
        "# TYPE twin_service_info gauge",
        f'twin_service_info{{version="{_label(version)}"}} 1',
        "# HELP twin_service_starting 1 while the service waits for its store to start.",
        "# TYPE twin_service_starting gauge",
        f"twin_service_starting {int(starting)}",
        "# HELP twin_service_check_up 1 when the readiness check is up.",
        "# TYPE twin_service_check_up gauge",
    ]
    for name, check in checks.items():
        up = isinstance(check, Mapping) and check.get("status") == "up"
        lines.append(f'twin_service_check_up{{check="{_label(name)}"}} {int(up)}')
    for metric in METRICS:
        value = _find(checks, metric.path)
        if value is None:
            continue
        lines += [
            f"# HELP {metric.name} {metric.help}",
            f"# TYPE {metric.name} {metric.kind}",
            f"{metric.name} {_number(value)}",
        ]
    if requests is not None:
        lines += requests.exposition()
    return "\n".join(lines) + "\n"


def _find(checks: Mapping[str, Any], path: tuple[str, ...]) -> int | float | None:
    value: Any = checks
    for key in path:
        if not isinstance(value, Mapping) or key not in value:
            return None
        value = value[key]
    # bool is an int: a flag is not a figure here.
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return value


def _number(value: int | float) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)


def _label(value: str) -> str:
    """A label value escaped as the format asks (backslash, quote, newline)."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
