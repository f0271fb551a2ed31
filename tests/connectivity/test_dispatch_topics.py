"""Pure parts: the ordered ack window, the dispatcher and the topic layout (no sockets)."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable

import paho.mqtt.client as paho
import pytest
from hypothesis import given
from hypothesis import strategies as st

from connectivity.dispatch import AckWindow, KeyedDispatcher
from connectivity.topics import (
    LEGACY_GROUP,
    MAX_TOPIC_BYTES,
    TopicFilter,
    TopicLayout,
    is_topic_name,
    redact_group,
    service_group,
)


def test_ack_window_releases_in_arrival_order() -> None:
    w: AckWindow[int] = AckWindow()
    a, b, c = w.open(1), w.open(2), w.open(3)
    assert w.settle(c, True) == []
    assert w.settle(b, False) == []  # failed: never acked, but does not block
    assert w.settle(a, True) == [1, 3]
    assert len(w) == 0


def test_ack_window_reset_forgets_old_connection() -> None:
    w: AckWindow[int] = AckWindow()
    old = w.open(7)
    w.reset()
    new = w.open(7)
    assert w.settle(old, True) == []
    assert w.settle(new, True) == [7]


@given(st.permutations(range(12)), st.sets(st.integers(0, 11)))
def test_ack_window_property(order: list[int], failed: set[int]) -> None:
    w: AckWindow[int] = AckWindow()
    slots = [w.open(i) for i in range(12)]
    acked: list[int] = []
    for i in order:
        acked += w.settle(slots[i], i not in failed)
    assert acked == [i for i in range(12) if i not in failed]


@pytest.mark.parametrize(
    ("prefix", "topic", "twin", "suffix"),
    [
        ("twins/{twinId}", "twins/org.acme:p-1/reported/update", "org.acme:p-1", "reported/update"),
        ("twins/{twinId}", "other/x/get", None, None),
        ("a/{twinId}/b", "a/t:1/b/get", "t:1", "get"),
        ("a/{twinId}/b", "a/t:1/c/get", None, None),
        ("{twinId}", "t:1/delta", "t:1", "delta"),
    ],
)
def test_topic_layout(prefix: str, topic: str, twin: str | None, suffix: str | None) -> None:
    layout = TopicLayout(prefix)
    assert layout.twin_id(topic) == twin
    assert layout.suffix(topic) == suffix


def test_topic_layout_refuses_bad_ids() -> None:
    with pytest.raises(ValueError):
        TopicLayout().base("a/b")
    with pytest.raises(ValueError):
        TopicLayout("twins/+")
    assert TopicLayout().all_twins("get") == "twins/+/get"


@pytest.mark.parametrize(
    ("topic", "expected"),
    [
        ("twins/org.acme:t/inbox", True),
        ("a", True),
        ("é" * (MAX_TOPIC_BYTES // 2), True),  # 2 bytes each: exactly the limit
        ("é" * (MAX_TOPIC_BYTES // 2) + "a" * 2, False),
        ("", False),
        ("twins/org.acme:t/#", False),
        ("twins/org.acme:t/+/x", False),
        ("twins/org.acme:t/a+b", False),
        ("twins/org.acme:t/\x00", False),
        ("\ud800", True),  # a lone surrogate: counted, not a crash
    ],
)
def test_is_topic_name(topic: str, expected: bool) -> None:
    assert is_topic_name(topic) is expected


FILTER_TABLE = [
    ("twins/+/reported/update", "twins/a:b/reported/update", True),
    ("twins/+/reported/update", "twins/a:b/reported/update/accepted", False),
    ("twins/+/reported/update", "twins/reported/update", False),
    ("$share/svc/twins/+/get", "twins/a:b/get", True),
    ("$share/svc/twins/+/get", "$share/svc/twins/a:b/get", False),
    ("twins/#", "twins", True),
    ("twins/#", "twins/a/b/c", True),
    ("#", "$SYS/broker", False),
    ("+/x", "$SYS/x", False),
    ("$SYS/#", "$SYS/broker", True),
    ("a/+/+", "a//", True),
    ("a/b", "a/b/", False),
    ("+", "", True),
]


@pytest.mark.parametrize(("topic_filter", "topic", "expected"), FILTER_TABLE)
def test_topic_filter(topic_filter: str, topic: str, expected: bool) -> None:
    assert TopicFilter.parse(topic_filter).matches(topic) is expected


_LEVEL = st.sampled_from(["a", "b", "", "$x", "twins"])


@given(
    st.lists(st.one_of(_LEVEL, st.just("+")), min_size=1, max_size=4).map("/".join)
    | st.lists(st.one_of(_LEVEL, st.just("+")), max_size=3).map(lambda ls: "/".join([*ls, "#"])),
    st.lists(_LEVEL, min_size=1, max_size=5).map("/".join),
)
def test_topic_filter_agrees_with_paho(topic_filter: str, topic: str) -> None:
    assert TopicFilter.parse(topic_filter).matches(topic) is paho.topic_matches_sub(
        topic_filter, topic
    )


@pytest.mark.parametrize("redelivers", [True, False])
async def test_jobs_of_a_lost_connection_wait_for_the_next_and_run_only_if_not_redelivered(
    redelivers: bool,
) -> None:
    """After a broker restart, a backlog of hundreds was handled, then sent again by the
    broker and handled a second time: past what client tokens dedupe."""
    acked: list[int] = []
    ran: list[int] = []
    dispatcher: KeyedDispatcher[int] = KeyedDispatcher(4, acked.append)
    gate = asyncio.Event()

    def job(n: int) -> Callable[[], Awaitable[None]]:
        async def run() -> None:
            if n == 0:
                await gate.wait()
            ran.append(n)

        return run

    for n in range(5):
        dispatcher.submit("twin", job(n), n)
    await asyncio.sleep(0.01)  # job 0 runs; 1-4 wait behind it
    dispatcher.reset_acks()  # the connection is lost
    gate.set()
    await asyncio.sleep(0.05)
    assert ran == [0]  # running, it finished; the others wait for the next CONNACK
    dispatcher.resumed(redelivers)
    await dispatcher.join()
    assert ran == ([0] if redelivers else [0, 1, 2, 3, 4])
    assert dispatcher.dropped_for_redelivery == (4 if redelivers else 0)
    assert acked == []  # nothing of the old connection is acknowledged on the new one


@pytest.mark.parametrize("redelivers", [True, False])
async def test_jobs_to_be_dropped_are_named_at_the_connack_not_the_running_one(
    redelivers: bool,
) -> None:
    """The broker's copies follow the CONNACK at once, ahead of the worker that drops the
    waiting jobs: the client must know by then which copies nobody handled."""
    dropped: list[int] = []
    dispatcher: KeyedDispatcher[int] = KeyedDispatcher(4, lambda _token: None)
    gate = asyncio.Event()

    async def held() -> None:
        await gate.wait()

    async def quick() -> None:
        return None

    for n in range(4):
        dispatcher.submit(
            "twin", held if n == 0 else quick, n, functools.partial(dropped.append, n)
        )
    await asyncio.sleep(0.01)  # job 0 runs; 1-3 wait behind it
    dispatcher.reset_acks()
    dispatcher.resumed(redelivers)
    # At once, with job 0 still running (its copy may well have been handled: not named).
    assert dropped == ([1, 2, 3] if redelivers else [])
    gate.set()
    await dispatcher.join()
    assert dropped == ([1, 2, 3] if redelivers else [])


@pytest.mark.parametrize(
    ("topic", "expected"),
    [
        ("twins/org.acme:p1/reported/update", "reported/update"),
        ("twins/org.acme:p1/", ""),
        ("twins/org.acme:p1", None),
        ("twins/org.acme:p10/get", None),
        ("twins/org.acme:p2/get", None),
    ],
)
def test_below_is_the_inverse_of_topic(topic: str, expected: str | None) -> None:
    layout = TopicLayout()
    assert layout.below("org.acme:p1", topic) == expected
    if expected is not None:
        assert layout.topic("org.acme:p1", expected) == topic


@pytest.mark.parametrize(
    ("configured", "password", "expected"),
    [
        ("replicas", "pw", "replicas"),  # an explicit group is used as is
        ("", "pw", ""),  # no sharing
        ("auto", None, LEGACY_GROUP),  # nothing secret to derive it from
        ("auto", "", LEGACY_GROUP),
    ],
)
def test_service_group(configured: str, password: str | None, expected: str) -> None:
    assert service_group(configured, password) == expected


def test_the_derived_group_is_one_of_the_password() -> None:
    group = service_group("auto", "svc-secret")
    assert group == service_group("auto", "svc-secret")  # the same for every replica
    assert group.startswith(f"{LEGACY_GROUP}-") and group != LEGACY_GROUP
    assert "svc-secret" not in group
    assert service_group("auto", "other") != group
    assert not any(ch in group for ch in "/+#")


@pytest.mark.parametrize(
    ("topic_filter", "shown"),
    [
        ("$share/secret/twins/+/get", "$share/***/twins/+/get"),
        ("$share/secret", "$share/***"),
        ("twins/+/get", "twins/+/get"),
    ],
)
def test_redact_group(topic_filter: str, shown: str) -> None:
    assert redact_group(topic_filter) == shown
