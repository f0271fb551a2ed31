"""Pure parts: the ordered ack window and the topic layout (tables, no sockets)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from connectivity.dispatch import AckWindow
from connectivity.topics import TopicLayout


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
