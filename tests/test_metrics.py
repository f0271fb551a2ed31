"""The Prometheus exposition of the readiness checks and of the HTTP requests
(twin_service.metrics)."""

from __future__ import annotations

import math
import re
from typing import Any

import pytest

from twin_service.metrics import METRICS, RequestMetrics, render

# Label values are quoted strings, which may hold braces (route templates) and escapes.
SAMPLE = re.compile(r'^([a-z_]+)(\{(?:[^"}]|"(?:[^"\\]|\\.)*")*\})? (\S+)$')
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")

FULL: dict[str, Any] = {
    "store": {
        "status": "up",
        "kind": "sqlite",
        "writer": {"running": True, "pid": 7, "unsent": 2},
        "writes": {"committed": 10, "retried": 1, "failed": 3, "lastError": "store.full: x"},
    },
    "index": {"status": "up", "kind": "es", "lagSeconds": 0.25, "backlog": 4, "rejected": 12},
    "bus": {"kind": "in-process", "status": "up"},
    "streams": {
        "status": "up",
        "subscriptions": 3,
        "readers": 2,
        "maxReaders": 5,
        "position": 42,
        "queuedBytes": 4096,
    },
    "mqtt": {
        "status": "down",
        "reconnects": 5,
        "devices": 3,
        "maxDevices": 4,
        "pendingAcks": 6,
        "handlerFailures": 0,
        "deltasPublished": 7,
        "applied": 8,
        "duplicates": 9,
        "rejected": 11,
    },
}


def samples(text: str) -> dict[str, float]:
    """Every sample of an exposition by name and labels; checks each line's form."""
    out: dict[str, float] = {}
    declared: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind in ("counter", "gauge", "histogram"), line
            declared |= {name + s for s in HISTOGRAM_SUFFIXES} if kind == "histogram" else {name}
            continue
        if line.startswith("# HELP "):
            continue
        match = SAMPLE.match(line)
        assert match, line
        assert match.group(1) in declared, f"{line}: no TYPE before it"
        out[match.group(1) + (match.group(2) or "")] = float(match.group(3))
    return out


def test_every_figure_of_the_checks_is_a_metric() -> None:
    text = render(FULL, version="1.2.3", starting=False)
    assert text.endswith("\n")
    got = samples(text)
    assert got == {
        'twin_service_info{version="1.2.3"}': 1,
        "twin_service_starting": 0,
        'twin_service_check_up{check="store"}': 1,
        'twin_service_check_up{check="index"}': 1,
        'twin_service_check_up{check="bus"}': 1,
        'twin_service_check_up{check="streams"}': 1,
        "twin_service_stream_subscriptions": 3,
        "twin_service_stream_readers": 2,
        "twin_service_stream_readers_max": 5,
        "twin_service_stream_position": 42,
        "twin_service_stream_queued_bytes": 4096,
        'twin_service_check_up{check="mqtt"}': 0,
        "twin_service_store_writes_committed_total": 10,
        "twin_service_store_writes_retried_total": 1,
        "twin_service_store_writes_failed_total": 3,
        "twin_service_sqlite_writer_unsent": 2,
        "twin_service_index_backlog": 4,
        "twin_service_index_lag_seconds": 0.25,
        "twin_service_index_rejected_total": 12,
        "twin_service_mqtt_reconnects_total": 5,
        "twin_service_mqtt_embedded_devices": 3,
        "twin_service_mqtt_embedded_devices_max": 4,
        "twin_service_mqtt_pending_acks": 6,
        "twin_service_mqtt_handler_failures_total": 0,
        "twin_service_mqtt_messages_applied_total": 8,
        "twin_service_mqtt_messages_duplicate_total": 9,
        "twin_service_mqtt_messages_rejected_total": 11,
        "twin_service_mqtt_deltas_published_total": 7,
    }
    assert len(METRICS) == len(got) - 7  # every metric of the table was found


def test_counters_end_in_total_and_names_are_unique() -> None:
    names = [m.name for m in METRICS]
    assert len(names) == len(set(names))
    for metric in METRICS:
        assert metric.name.endswith("_total") == (metric.kind == "counter"), metric.name


def test_what_a_check_does_not_report_is_left_out() -> None:
    starting = {"store": {"status": "down", "error": "MongoDB does not answer"}}
    got = samples(render(starting, version="1", starting=True))
    assert got == {
        'twin_service_info{version="1"}': 1,
        "twin_service_starting": 1,
        'twin_service_check_up{check="store"}': 0,
    }


def test_flags_strings_and_odd_values() -> None:
    checks: dict[str, Any] = {
        "store": {"status": "up", "writes": {"committed": True, "retried": "3"}},
        "index": {"status": "up", "backlog": 0, "lagSeconds": math.inf},
        'we"ird\\': "not a mapping",
    }
    text = render(checks, version='a"b\\c\nd', starting=False)
    got = samples(text)
    assert "twin_service_store_writes_committed_total" not in got  # a flag, not a figure
    assert "twin_service_store_writes_retried_total" not in got  # text
    assert "twin_service_index_lag_seconds +Inf" in text.splitlines()
    assert 'twin_service_info{version="a\\"b\\\\c\\nd"} 1' in text.splitlines()
    assert 'twin_service_check_up{check="we\\"ird\\\\"} 0' in text.splitlines()


TWIN = "/api/v1/twins/{twin_id}"


def test_requests_are_counted_by_method_route_and_status() -> None:
    requests = RequestMetrics()
    for status, seconds in ((200, 0.0004), (200, 0.003), (404, 0.0025)):
        requests.observe("GET", TWIN, status, seconds)
    requests.observe("PATCH", TWIN, 200, 0.05)
    got = samples(render({}, version="1", starting=False, requests=requests))
    total = "twin_service_http_requests_total"
    counts = {k: v for k, v in got.items() if k.startswith(total)}
    assert counts == {
        f'{total}{{method="GET",route="{TWIN}",status="200"}}': 2,
        f'{total}{{method="GET",route="{TWIN}",status="404"}}': 1,
        f'{total}{{method="PATCH",route="{TWIN}",status="200"}}': 1,
    }
    duration = "twin_service_http_request_duration_seconds"
    get = f'method="GET",route="{TWIN}"'
    # Cumulative buckets, each bound included in its own bucket (le: less or equal).
    assert [
        got[f'{duration}_bucket{{{get},le="{le}"}}'] for le in ("0.001", "0.0025", "0.005")
    ] == [
        1,
        2,
        3,
    ]
    assert got[f'{duration}_bucket{{{get},le="10.0"}}'] == 3
    assert got[f'{duration}_bucket{{{get},le="+Inf"}}'] == 3
    assert got[f"{duration}_count{{{get}}}"] == 3
    assert got[f"{duration}_sum{{{get}}}"] == pytest.approx(0.0059)
    patch = f'method="PATCH",route="{TWIN}"'
    assert got[f'{duration}_bucket{{{patch},le="0.025"}}'] == 0
    assert got[f'{duration}_bucket{{{patch},le="0.05"}}'] == 1


def test_odd_methods_and_slow_requests() -> None:
    """A method of the client's making is ``other`` (no series without end), and a request
    slower than the last bound is only in +Inf."""
    requests = RequestMetrics()
    requests.observe("BREW", "unmatched", 405, 30.0)
    requests.observe("PROPFIND", "unmatched", 405, 0.0)
    got = samples(render({}, version="1", starting=False, requests=requests))
    duration = "twin_service_http_request_duration_seconds"
    other = 'method="other",route="unmatched"'
    assert got[f'twin_service_http_requests_total{{{other},status="405"}}'] == 2
    assert got[f'{duration}_bucket{{{other},le="0.001"}}'] == 1
    assert got[f'{duration}_bucket{{{other},le="10.0"}}'] == 1
    assert got[f'{duration}_bucket{{{other},le="+Inf"}}'] == 2
    assert got[f"{duration}_sum{{{other}}}"] == 30.0
