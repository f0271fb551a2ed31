"""The readiness checks as Prometheus metrics (text exposition format 0.0.4).

``GET /metrics`` renders the same figures as ``GET /ready``, read at scrape time from the
counters the parts keep anyway: nothing is counted on the request path for it. A figure a
part does not report (no broker, another store) is left out, as Prometheus expects.
"""

from __future__ import annotations

import math
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


def render(checks: Mapping[str, Any], *, version: str, starting: bool) -> str:
    """The exposition of ``checks`` (the ``checks`` object of /ready)."""
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
