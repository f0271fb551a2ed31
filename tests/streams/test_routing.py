"""The subscription index and shared message encoding: tables and properties, no sockets."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from search.rql.ast import And, Compare, Exists, Filter, In, Like, Not, Or, Path, Value
from search.rql.parser import parse_filter
from twin_service.store.base import StoredEvent
from twin_service.streams.messages import EventFrame, Outgoing
from twin_service.streams.routing import (
    SubscriptionIndex,
    filing_of,
    filter_terms,
    key_of,
)
from twin_service.streams.subscription import Subscription
from twin_service.twin.document import Action, ChangeEvent
from twin_service.twin.jsonvalue import dumps
from twin_service.types import JSON, JSONObject

SITE: Path = ("attributes", "site")
N: Path = ("attributes", "n")


def sub(id: str, filter: str | None = None, **scope: list[str]) -> Subscription:
    return Subscription(
        id=id,
        filter=parse_filter(filter) if filter else None,
        namespaces=frozenset(scope["namespaces"]) if "namespaces" in scope else None,
        twins=frozenset(scope["twins"]) if "twins" in scope else None,
    )


def change(twin_id: str, before: JSONObject | None, after: JSONObject | None) -> ChangeEvent:
    action: Action = "created" if before is None else "deleted" if after is None else "modified"
    return ChangeEvent(twin_id, 1, "2024-01-01T00:00:00.000Z", "test", action, {})


# -- which literals a filter implies ---------------------------------------------------------

TERMS: list[tuple[str, set[tuple[Path, tuple[int, Value]]] | None]] = [
    ('eq(attributes/site,"a")', {(SITE, (3, "a"))}),
    ("eq(attributes/n,1)", {(N, (2, 1))}),
    ("eq(attributes/n,true)", {(N, (1, True))}),
    ("eq(attributes/n,null)", {(N, (0, None))}),
    ('in(attributes/site,"a","b")', {(SITE, (3, "a")), (SITE, (3, "b"))}),
    ('and(eq(attributes/site,"a"),gt(attributes/n,1))', {(SITE, (3, "a"))}),
    ('and(gt(attributes/n,1),eq(attributes/site,"a"))', {(SITE, (3, "a"))}),
    ('and(in(attributes/site,"a","b","c"),eq(attributes/n,2))', {(N, (2, 2))}),
    ('and(exists(attributes/n),and(eq(attributes/site,"a")))', {(SITE, (3, "a"))}),
    ('or(eq(attributes/site,"a"),eq(attributes/n,1))', {(SITE, (3, "a")), (N, (2, 1))}),
    ('or(eq(attributes/site,"a"),gt(attributes/n,1))', None),
    ('ne(attributes/site,"a")', None),
    ("gt(attributes/n,1)", None),
    ('like(attributes/site,"a*")', None),
    ("exists(attributes/site)", None),
    ('not(eq(attributes/site,"a"))', None),
    ('and(gt(attributes/n,1),like(attributes/site,"a*"))', None),
]


@pytest.mark.parametrize(("text", "expected"), TERMS)
def test_filter_terms(text: str, expected: set[tuple[Path, tuple[int, Value]]] | None) -> None:
    terms = filter_terms(parse_filter(text))
    assert (None if terms is None else set(terms)) == expected


def test_keys_compare_like_the_evaluator() -> None:
    assert key_of(1) == key_of(1.0) and hash(key_of(1)) == hash(key_of(1.0))
    assert key_of(0) == key_of(-0.0)
    assert key_of(True) != key_of(1) and key_of(False) != key_of(0)
    assert key_of("1") != key_of(1) and key_of(None) != key_of(0)


FILINGS: list[tuple[Subscription, str]] = [
    (sub("t", twins=["ns:a"]), "twins"),
    (sub("tf", 'eq(attributes/site,"a")', twins=["ns:a"]), "twins"),
    (sub("te", twins=[]), "twins"),
    (sub("f", 'eq(attributes/site,"a")'), "terms"),
    (sub("fn", 'eq(attributes/site,"a")', namespaces=["ns"]), "terms"),
    (sub("n", namespaces=["ns"]), "namespaces"),
    (sub("gn", "gt(attributes/n,1)", namespaces=["ns"]), "namespaces"),
    (sub("g", "gt(attributes/n,1)"), "rest"),
    (sub("all"), "rest"),
]


@pytest.mark.parametrize(("subscription", "where"), FILINGS)
def test_where_a_subscription_is_filed(subscription: Subscription, where: str) -> None:
    filing = filing_of(subscription)
    filed = {
        "twins": filing.twins == subscription.twins,
        "terms": bool(filing.terms),
        "namespaces": bool(filing.namespaces),
        "rest": filing.rest,
    }
    assert [name for name, hit in filed.items() if hit] == [where]


# -- candidates, by example ------------------------------------------------------------------

SUBS = [
    sub("twin-a", twins=["ns1:a"]),
    sub("twin-b-site-x", 'eq(attributes/site,"x")', twins=["ns2:b"]),
    sub("site-x", 'eq(attributes/site,"x")'),
    sub("site-y-ns1", 'eq(attributes/site,"y")', namespaces=["ns1"]),
    sub("n-one", "and(eq(attributes/n,1),exists(attributes/site))"),
    sub("ns2", namespaces=["ns2"]),
    sub("big-n", "gt(attributes/n,5)"),
    sub("everything"),
]

CANDIDATES: list[tuple[str, str, JSONObject | None, JSONObject | None, list[str]]] = [
    ("no values", "ns1:z", {}, {}, ["big-n", "everything"]),
    ("twin id", "ns1:a", {}, {}, ["twin-a", "big-n", "everything"]),
    ("namespace", "ns2:q", {}, {}, ["ns2", "big-n", "everything"]),
    (
        "new value",
        "ns1:z",
        {"attributes": {"site": "w"}},
        {"attributes": {"site": "x"}},
        ["site-x", "big-n", "everything"],
    ),
    (
        "old value: left",
        "ns1:z",
        {"attributes": {"site": "x"}},
        {"attributes": {"site": "w"}},
        ["site-x", "big-n", "everything"],
    ),
    (
        "deleted",
        "ns1:z",
        {"attributes": {"site": "y"}},
        None,
        ["site-y-ns1", "big-n", "everything"],
    ),
    ("created", "ns1:z", None, {"attributes": {"n": 1.0}}, ["n-one", "big-n", "everything"]),
    ("typed: true is not 1", "ns1:z", None, {"attributes": {"n": True}}, ["big-n", "everything"]),
    (
        "array elements",
        "ns1:z",
        {"attributes": {"site": ["w", "y"]}},
        {"attributes": {"site": ["x"]}},
        ["site-x", "site-y-ns1", "big-n", "everything"],
    ),
    (
        "twins scope wins over the filter",
        "ns2:b",
        {},
        {"attributes": {"site": "x"}},
        ["twin-b-site-x", "site-x", "ns2", "big-n", "everything"],
    ),
]


@pytest.mark.parametrize(
    ("twin_id", "before", "after", "expected"),
    [case[1:] for case in CANDIDATES],
    ids=[case[0] for case in CANDIDATES],
)
def test_candidates(
    twin_id: str, before: JSONObject | None, after: JSONObject | None, expected: list[str]
) -> None:
    index: SubscriptionIndex[str] = SubscriptionIndex()
    for subscription in SUBS:
        index.add(subscription.id, subscription)
    order = [s.id for s in SUBS]
    assert index.candidates(twin_id, before, after) == sorted(expected, key=order.index)


def test_remove_and_refile() -> None:
    index: SubscriptionIndex[str] = SubscriptionIndex()
    for subscription in SUBS:
        index.add(subscription.id, subscription)
    doc = {"attributes": {"site": "x"}}
    for subscription in SUBS:
        index.remove(subscription.id)
        assert subscription.id not in index.candidates("ns2:b", doc, doc)
    assert len(index) == 0
    assert index.candidates("ns2:b", doc, doc) == []
    index.remove("unknown")  # ignored
    index.add("s", sub("s", 'eq(attributes/site,"x")'))
    index.add("s", sub("s", namespaces=["ns9"]))  # re-filed, not duplicated
    assert index.candidates("ns1:a", doc, doc) == []
    assert index.candidates("ns9:a", None, None) == ["s"]


CLASSIFIED_DELETIONS: list[tuple[Subscription, JSONObject | None, str | None]] = [
    (Subscription(id="all"), {"attributes": {}}, "event"),
    # The state before unknown (a journal pruned before retention kept each twin's newest
    # event): without a filter the deletion is still the subscription's.
    (Subscription(id="all"), None, "event"),
    (Subscription(id="ns", namespaces=frozenset({"ns1"})), None, "event"),
    (Subscription(id="other", namespaces=frozenset({"ns2"})), None, None),
    (
        Subscription(id="f", filter=parse_filter("exists(attributes/n)")),
        {"attributes": {"n": 1}},
        "event",
    ),
    (Subscription(id="f", filter=parse_filter("exists(attributes/n)")), None, None),
]


@pytest.mark.parametrize(("subscription", "before", "outcome"), CLASSIFIED_DELETIONS)
def test_a_deletion_is_classified_by_what_is_known_before_it(
    subscription: Subscription, before: JSONObject | None, outcome: str | None
) -> None:
    deleted = ChangeEvent("ns1:a", 2, "2024-01-01T00:00:00.000Z", "test", "deleted", {})
    assert subscription.classify(deleted, before, None) == outcome


# -- candidates, by property: never miss a subscription that classify would notify ----------

PATHS: list[Path] = [SITE, N, ("reported", "a", "b"), ("attributes",)]
VALUES: list[Value] = ["x", "y", 0, 1, 1.0, 2.5, True, False, None]
NAMESPACES = ["ns1", "ns2", "ns3"]
TWINS = ["ns1:a", "ns1:b", "ns2:a", "ns3:c"]

values = st.sampled_from(VALUES)
paths = st.sampled_from(PATHS)
leaves: st.SearchStrategy[Filter] = st.one_of(
    st.builds(Compare, st.sampled_from(["eq", "eq", "ne", "gt", "le"]), paths, values),
    st.builds(In, paths, st.lists(values, min_size=1, max_size=3).map(tuple)),
    st.builds(Like, paths, st.sampled_from(["x*", "?"]), st.booleans()),
    st.builds(Exists, paths),
)
filters: st.SearchStrategy[Filter] = st.recursive(
    leaves,
    lambda inner: st.one_of(
        st.builds(And, st.lists(inner, min_size=1, max_size=3).map(tuple)),
        st.builds(Or, st.lists(inner, min_size=1, max_size=3).map(tuple)),
        st.builds(Not, inner),
    ),
    max_leaves=6,
)
subscriptions = st.builds(
    Subscription,
    id=st.just(""),
    filter=st.none() | filters,
    namespaces=st.none() | st.frozensets(st.sampled_from(NAMESPACES), max_size=2),
    twins=st.none() | st.frozensets(st.sampled_from(TWINS), max_size=2),
)
leaf_values: st.SearchStrategy[JSON] = values | st.lists(values, max_size=3)
attributes = st.fixed_dictionaries(
    {}, optional={"site": leaf_values, "n": leaf_values | st.just({})}
)
reported_a = st.fixed_dictionaries({}, optional={"b": leaf_values})
documents: st.SearchStrategy[JSONObject | None] = st.none() | st.fixed_dictionaries(
    {},
    optional={
        "attributes": attributes,
        "reported": st.fixed_dictionaries(
            {}, optional={"a": reported_a | st.lists(reported_a, max_size=2)}
        ),
    },
)


@settings(max_examples=400, deadline=None)
@given(
    st.lists(subscriptions, min_size=1, max_size=12),
    st.sets(st.integers(0, 11), max_size=4),
    st.sampled_from([*TWINS, "ns2:z"]),
    documents,
    documents,
)
def test_candidates_cover_every_notified_subscription(
    subs: list[Subscription],
    removed: set[int],
    twin_id: str,
    before: JSONObject | None,
    after: JSONObject | None,
) -> None:
    index: SubscriptionIndex[int] = SubscriptionIndex()
    for number, subscription in enumerate(subs):
        index.add(number, subscription)
    for number in removed:
        index.remove(number)
    live = [n for n in range(len(subs)) if n not in removed]
    event = change(twin_id, before, after)
    notified = [n for n in live if subs[n].classify(event, before, after) is not None]
    candidates = index.candidates(twin_id, before, after)
    assert set(notified) <= set(candidates)
    assert set(candidates) <= set(live)
    assert candidates == sorted(candidates)  # registration order


# -- messages: encoded once, shaped as ever -----------------------------------------------------


def stored(twin_id: str, seq: int = 7) -> StoredEvent:
    event = ChangeEvent(
        twin_id, 3, "2024-01-01T00:00:00.000Z", "api", "modified", {"attributes": {"é": "ü"}}
    )
    return StoredEvent(seq, event)


AFTER: JSONObject = {"twinId": "ns:a", "attributes": {"site": "x", "é": "ü"}, "revision": 3}

MESSAGES: list[tuple[str, list[list[str]] | None, JSONObject | None]] = [
    ("event", None, AFTER),
    ("event", [["attributes", "site"], ["revision"]], AFTER),
    ("event", [["missing"]], AFTER),
    ("event", None, None),  # a deletion: "twin": null
    ("left", None, AFTER),
    ("left", [["revision"]], AFTER),
]


@pytest.mark.parametrize(("outcome", "fields", "after"), MESSAGES)
def test_composed_message_is_the_encoded_object(
    outcome: str, fields: list[list[str]] | None, after: JSONObject | None
) -> None:
    subscription = Subscription(id='s "1" ü', fields=fields)
    frame = EventFrame(stored("ns:a"), None, after)
    item = frame.message(outcome, subscription)  # type: ignore[arg-type]
    expected: JSONObject = {
        "type": outcome,
        "subscription": subscription.id,
        "seq": 7,
        "event": frame.stored.event.to_json(),
    }
    if outcome == "event":
        expected["twin"] = subscription.view(after)
    assert item.text == dumps(expected)
    assert json.loads(item.text) == expected
    assert (item.kind, item.seq, item.advances_resume) == (outcome, 7, True)


def test_encodings_are_shared_per_event_and_fields() -> None:
    frame = EventFrame(stored("ns:a"), None, AFTER)
    a = Subscription(id="a", fields=[["attributes"]])
    b = Subscription(id="b", fields=[["attributes"]])
    c = Subscription(id="c")
    assert frame.view_text(a) is frame.view_text(b)
    assert frame.view_text(a) != frame.view_text(c)
    assert frame.event_text is frame.event_text


CONTROLS: list[tuple[JSONObject, str, int | None, bool]] = [
    ({"type": "subscribed", "subscription": "s", "seq": 4}, "subscribed", 4, False),
    ({"type": "resync.required", "subscription": "s", "seq": 4}, "resync.required", 4, False),
    (
        {"type": "response", "correlationId": "c", "status": 200, "body": {}},
        "response",
        None,
        False,
    ),
    ({"type": "event", "seq": 9}, "event", 9, True),
]


@pytest.mark.parametrize(("message", "kind", "seq", "advances"), CONTROLS)
def test_control_messages(message: JSONObject, kind: str, seq: int | None, advances: bool) -> None:
    item = Outgoing.of(message)
    assert (item.kind, item.seq, item.advances_resume) == (kind, seq, advances)
    assert item.text == dumps(message)


def test_outcome_is_shared_by_subscriptions_of_the_same_scope() -> None:
    frame = EventFrame(stored("ns:a"), None, AFTER)
    x = 'eq(attributes/site,"x")'
    a = Subscription(id="a", filter=parse_filter(x), fields=[["attributes"]])
    b = Subscription(id="b", filter=parse_filter(x), namespaces=None)
    c = Subscription(id="c", filter=parse_filter('eq(attributes/site,"y")'))
    d = Subscription(id="d", filter=parse_filter(x), namespaces=frozenset({"other"}))
    assert a.scope_key == b.scope_key
    assert len({a.scope_key, c.scope_key, d.scope_key}) == 3
    assert frame.outcome(a) == frame.outcome(b) == a.classify(frame.stored.event, None, AFTER)
    assert frame.outcome(a) == "event"
    assert frame.outcome(c) is None and frame.outcome(d) is None
    # 1, 1.0 and true are different literals to the key, whatever the evaluator says.
    keys = {Subscription(id="n", filter=parse_filter(f"eq(attributes/n,{v})")).scope_key
            for v in ("1", "1.0", "true")}  # fmt: skip
    assert len(keys) == 3
