"""The device protocol against the real service and mosquitto: answers, rules, hostile input."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

import pytest

from connectivity.messages import InboundMessage
from tests.connectivity.helpers import Collector
from tests.servers.mosquitto import Mosquitto
from tests.service_process import ServiceProcess
from tests.sync.helpers import (
    RawDevice,
    get_twin,
    put_twin,
    until_twin,
)


@pytest.fixture
def twin(svc: ServiceProcess) -> str:
    twin_id = f"org.acme:p-{uuid.uuid4().hex[:10]}"
    with svc.client() as api:
        put_twin(api, twin_id, desired={"fan": {"speed": 3}, "mode": "eco"}, reported={})
    return twin_id


async def test_report_accepted_and_get(
    svc: ServiceProcess, mosquitto_server: Mosquitto, twin: str
) -> None:
    async with RawDevice(mosquitto_server.url, twin) as dev:
        got = await dev.call("get", {"clientToken": "g1"}, "accepted")
        assert got["clientToken"] == "g1"
        assert got["delta"] == {"fan": {"speed": 3}, "mode": "eco"}
        assert (got["desiredVersion"], got["reportedVersion"]) == (1, 1)
        await asyncio.sleep(0.2)  # the get's lastSeen write (first traffic) commits
        with svc.client() as api:
            base = get_twin(api, twin)["revision"]
        ok = await dev.call(
            "reported/update",
            {"state": {"fan": {"speed": 3}}, "desiredVersion": 1, "clientToken": "r1"},
            "accepted",
        )
        assert ok == {"clientToken": "r1", "revision": base + 1, "reportedVersion": 2}
        bad = await dev.call(
            "reported/update",
            {"state": {}, "desiredVersion": 1, "rejected": {"mode": "not supported"}},
            "accepted",
        )
        assert bad["revision"] == base + 2
    with svc.client() as api:
        doc = get_twin(api, twin)
    assert doc["reported"] == {"fan": {"speed": 3}}
    assert doc["lifecycle"]["fan/speed"]["state"] == "applied"
    assert doc["lifecycle"]["mode"] == {
        "state": "rejected",
        "since": doc["lifecycle"]["mode"]["since"],
        "desiredVersion": 1,
        "reason": "not supported",
    }
    assert doc["connection"]["status"] == "online"


async def test_a_refusal_names_the_desired_version_it_refuses(
    svc: ServiceProcess, mosquitto_server: Mosquitto, twin: str
) -> None:
    """The device refuses mode "eco" of version 1 after an operator asked for "turbo"
    (version 2), which it has not seen yet: "turbo" stays pending. It was marked rejected,
    with the reason given for "eco"."""
    with svc.client() as api:
        assert api.put(f"/api/v1/twins/{twin}/desired/mode", json="turbo").status_code == 204
    async with RawDevice(mosquitto_server.url, twin) as dev:
        await dev.call(
            "reported/update",
            {"state": {}, "desiredVersion": 1, "rejected": {"mode": "eco unsupported"}},
            "accepted",
        )
        with svc.client() as api:
            mode = get_twin(api, twin)["lifecycle"]["mode"]
        assert (mode["state"], mode["desiredVersion"]) == ("pending", 2)
        await dev.call(
            "reported/update",
            {"state": {}, "desiredVersion": 2, "rejected": {"mode": "turbo unsupported"}},
            "accepted",
        )
    with svc.client() as api:
        mode = get_twin(api, twin)["lifecycle"]["mode"]
    assert (mode["state"], mode["reason"]) == ("rejected", "turbo unsupported")


async def test_a_value_drifted_from_can_be_refused_at_the_version_that_wrote_it(
    svc: ServiceProcess, mosquitto_server: Mosquitto
) -> None:
    """Reported drifting away from an applied value made it pending with the twin's current
    desired version, though the value was of an earlier one: the device's refusal naming the
    version it had seen was accepted and dropped, the value left pending without a reason."""
    twin = f"org.acme:p-{uuid.uuid4().hex[:10]}"
    with svc.client() as api:
        put_twin(api, twin, desired={"x": 1, "y": 1}, reported={})
    async with RawDevice(mosquitto_server.url, twin) as dev:
        both = {"state": {"x": 1, "y": 1}, "desiredVersion": 1}
        await dev.call("reported/update", both, "accepted")
        with svc.client() as api:
            assert api.put(f"/api/v1/twins/{twin}/desired/y", json=2).status_code == 204
        drift = {"state": {"x": 5}, "desiredVersion": 1}
        await dev.call("reported/update", drift, "accepted")
        with svc.client() as api:
            x = get_twin(api, twin)["lifecycle"]["x"]
        assert (x["state"], x["desiredVersion"]) == ("pending", 1)
        refusal = {"state": {}, "desiredVersion": 1, "rejected": {"x": "cannot go back"}}
        await dev.call("reported/update", refusal, "accepted")
    with svc.client() as api:
        lifecycle = get_twin(api, twin)["lifecycle"]
    assert (lifecycle["x"]["state"], lifecycle["x"]["reason"]) == ("rejected", "cannot go back")
    assert lifecycle["y"]["state"] == "pending"  # version 2's value: not covered by the refusal


async def test_duplicate_client_token_is_applied_once(
    svc: ServiceProcess, mosquitto_server: Mosquitto, twin: str
) -> None:
    async with RawDevice(mosquitto_server.url, twin) as dev:
        body = {"state": {"counter": 1}, "clientToken": "dup-1"}
        first = await dev.call("reported/update", body, "accepted")
        again = await dev.call("reported/update", {**body, "state": {"counter": 2}}, "accepted")
    assert again == {**first, "duplicate": True}
    with svc.client() as api:
        doc = get_twin(api, twin)
    assert doc["reported"] == {"counter": 1}
    assert doc["revision"] == first["revision"]


async def test_stale_and_impossible_desired_versions_are_409(
    svc: ServiceProcess, mosquitto_server: Mosquitto, twin: str
) -> None:
    with svc.client() as api:
        api.patch(
            f"/api/v1/twins/{twin}",
            content=json.dumps({"desired": {"mode": "boost"}}),
            headers={"Content-Type": "application/merge-patch+json"},
        ).raise_for_status()
    async with RawDevice(mosquitto_server.url, twin) as dev:
        await dev.call(
            "reported/update", {"state": {"mode": "boost"}, "desiredVersion": 2}, "accepted"
        )
        # Out of order: a report about version 1 arrives after the one about version 2.
        stale = await dev.call(
            "reported/update",
            {"state": {"mode": "eco"}, "desiredVersion": 1, "clientToken": "late"},
            "rejected",
        )
        ahead = await dev.call(
            "reported/update",
            {"state": {}, "desiredVersion": 9, "clientToken": "ahead"},
            "rejected",
        )
    assert stale["code"] == 409 and stale["error"] == "version.conflict"
    assert stale["clientToken"] == "late" and stale["desiredVersion"] == 2
    assert ahead["code"] == 409
    with svc.client() as api:
        assert get_twin(api, twin)["reported"] == {"mode": "boost"}


DEEP = b'{"state": ' + b'{"k": ' * 17 + b"1" + b"}" * 18

HOSTILE = [
    (b"{not json", 400, "json.invalid"),
    (b'{"state": {"a": NaN}}', 400, "json.invalid"),
    (b'{"state": 5, "clientToken": "t"}', 400, "request.invalid"),
    (b'{"state": {}, "desiredVersion": "1"}', 400, "request.invalid"),
    (b'{"state": {}, "clientToken": 7}', 400, "request.invalid"),
    (b'{"state": {}, "extra": 1}', 400, "request.invalid"),
    (b"[1, 2]", 400, "request.invalid"),
    (b'{"state": {}, "rejected": {"a": 5}}', 400, "request.invalid"),
    (json.dumps({"state": {}, "rejected": {"a": "x" * 257}}).encode(), 400, "limits.exceeded"),
    (json.dumps({"rejected": {f"p{i}": "r" for i in range(257)}}).encode(), 400, "limits.exceeded"),
    (
        DEEP,
        400,
        "limits.exceeded",
    ),
    (json.dumps({"state": {"blob": "x" * 5000}}).encode(), 413, "twin.toolarge"),
    (json.dumps({"state": {"blob": "x" * 4040}}).encode(), 413, "twin.toolarge"),
    (b"\xff\xfe", 400, "json.invalid"),
]


@pytest.mark.parametrize(("payload", "status", "code"), HOSTILE)
async def test_hostile_reports_are_rejected_and_change_nothing(
    svc: ServiceProcess,
    mosquitto_server: Mosquitto,
    twin: str,
    payload: bytes,
    status: int,
    code: str,
) -> None:
    async with RawDevice(mosquitto_server.url, twin) as dev:
        await dev.call("get", {}, "accepted")
        await asyncio.sleep(0.2)  # the get's lastSeen write (first traffic) commits
        with svc.client() as api:
            before = get_twin(api, twin)
        answer = await dev.call("reported/update", payload, "rejected")
        # The service is still alive and serving this twin.
        await dev.call("get", {}, "accepted")
    assert (answer["code"], answer["error"]) == (status, code), answer
    assert answer["message"]
    with svc.client() as api:
        after = get_twin(api, twin)
    assert after["revision"] == before["revision"]


async def test_a_get_with_an_unknown_field_is_rejected(
    svc: ServiceProcess, mosquitto_server: Mosquitto, twin: str
) -> None:
    async with RawDevice(mosquitto_server.url, twin) as dev:
        answer = await dev.call("get", {"clientToken": "g", "clienToken": "x"}, "rejected")
        assert (answer["code"], answer["error"], answer["clientToken"]) == (
            400,
            "request.invalid",
            "g",
        )
        assert "clienToken" in answer["message"]
        assert (await dev.call("get", {"clientToken": "g2"}, "accepted"))["clientToken"] == "g2"


async def test_a_message_refused_or_applied_before_still_says_the_device_is_there(
    svc: ServiceProcess, mosquitto_server: Mosquitto, twin: str
) -> None:
    """Any message from the device is traffic: after its offline, a report the service
    refuses or had already applied (a device resending what went unanswered), a refused
    live update or get, each brings the twin back online. They left it offline."""

    def online(doc: dict[str, object]) -> bool:
        return doc["connection"]["status"] == "online"  # type: ignore[index]

    def offline(doc: dict[str, object]) -> bool:
        return not online(doc)

    refused = [
        ("reported/update", {"state": 5}, "rejected"),
        ("reported/update", {"state": {"n": 1}, "clientToken": "once"}, "accepted"),
        ("live/update", [1], "rejected"),
        ("get", {"x": 1}, "rejected"),
    ]
    async with RawDevice(mosquitto_server.url, twin) as dev, svc.async_client() as api:
        await dev.call("reported/update", {"state": {"n": 1}, "clientToken": "once"}, "accepted")
        for topic, body, answer in refused:
            await dev.send("status", b"offline", retain=False)
            await until_twin(api, twin, offline)
            await dev.call(topic, body, answer)
            await until_twin(api, twin, online)


async def test_unknown_twin_is_404(svc: ServiceProcess, mosquitto_server: Mosquitto) -> None:
    async with RawDevice(mosquitto_server.url, "org.acme:nobody") as dev:
        report = await dev.call(
            "reported/update", {"state": {"a": 1}, "clientToken": "n"}, "rejected"
        )
        got = await dev.call("get", {"clientToken": "g"}, "rejected")
        await dev.send("status", b"online", retain=False)
        await dev.send("live/update", {"t": 1})
    assert (report["code"], report["error"], report["clientToken"]) == (404, "twin.notfound", "n")
    assert (got["code"], got["clientToken"]) == (404, "g")


async def test_mqtt5_request_response(
    svc: ServiceProcess, mosquitto_server: Mosquitto, twin: str
) -> None:
    async with RawDevice(mosquitto_server.url, twin) as dev:
        inbox = f"{dev.base}/inbox/{uuid.uuid4().hex[:6]}"
        await dev.client.publish(
            f"{dev.base}/reported/update",
            json.dumps({"state": {"x": 1}}).encode(),
            response_topic=inbox,
            correlation_data=b"corr-1",
        )
        await dev.client.publish(
            f"{dev.base}/get", b"", response_topic=inbox, correlation_data=b"corr-2"
        )
        # A response topic in another twin's subtree is ignored: the answer goes home.
        await dev.client.publish(
            f"{dev.base}/get",
            b'{"clientToken": "home"}',
            response_topic="twins/org.acme:victim/inbox",
            correlation_data=b"corr-3",
        )
        home = await dev.reply("get/accepted")
        async with asyncio.timeout(10):
            while len([m for m in dev.inbox.messages if m.topic == inbox]) < 2:
                await asyncio.sleep(0.01)
    answers = [m for m in dev.inbox.messages if m.topic == inbox]
    by_corr = {_corr(m): json.loads(m.payload) for m in answers}
    assert by_corr[b"corr-1"]["reportedVersion"] == 2
    assert by_corr[b"corr-2"]["reported"] == {"x": 1}
    assert home["clientToken"] == "home"


async def test_a_response_topic_no_publish_can_go_to_is_answered_home(
    svc: ServiceProcess, mosquitto_server: Mosquitto, twin: str
) -> None:
    """mosquitto passes a response topic with wildcards on; the service's reply to it
    failed in paho (a handler failure: no answer, and the message left unacknowledged)."""
    async with RawDevice(mosquitto_server.url, twin) as dev:
        for n, response in enumerate((f"{dev.base}/#", f"{dev.base}/+/inbox")):
            await dev.client.publish(
                f"{dev.base}/get",
                json.dumps({"clientToken": f"w{n}"}).encode(),
                response_topic=response,
                correlation_data=b"c",
            )
            home = await dev.reply("get/accepted", n)
            assert home["clientToken"] == f"w{n}"
    with svc.client() as api:
        mqtt = api.get("/ready").json()["checks"]["mqtt"]
    assert mqtt["handlerFailures"] == 0, mqtt


async def test_a_response_topic_the_service_reads_is_answered_home(
    svc: ServiceProcess, mosquitto_server: Mosquitto, twin: str
) -> None:
    """A response topic on one of the device's own topics that the service reads made the
    service feed its answer to itself: a get answered on ``live/update`` wrote the answer
    into the twin's live state, and one on ``reported/update`` came back as a report."""
    async with RawDevice(mosquitto_server.url, twin) as dev:
        for n, suffix in enumerate(("live/update", "reported/update", "get", "status")):
            await dev.client.publish(
                f"{dev.base}/get",
                json.dumps({"clientToken": f"s{n}"}).encode(),
                response_topic=f"{dev.base}/{suffix}",
                correlation_data=b"c",
            )
            home = await dev.reply("get/accepted", n)
            assert home["clientToken"] == f"s{n}"
        await dev.call("get", {"clientToken": "last"}, "accepted")
    async with svc.async_client() as api:
        doc = (await api.get(f"/api/v1/twins/{twin}")).json()
        mqtt = (await api.get("/ready")).json()["checks"]["mqtt"]
    assert doc["live"] == {} and doc["reported"] == {}, doc
    assert mqtt["handlerFailures"] == 0, mqtt


def _corr(msg: InboundMessage) -> bytes | None:
    return msg.correlation_data


async def test_status_and_live(svc: ServiceProcess, mosquitto_server: Mosquitto, twin: str) -> None:
    async with RawDevice(mosquitto_server.url, twin) as dev:
        await dev.send("status", b"online")
        await dev.send("live/update", {"temp": 21.5})
        await dev.send("live/update", b"not json")
        rejected = await dev.reply("live/update/rejected")
        await dev.send("status", b"offline")
    assert rejected["error"] == "json.invalid"
    async with svc.async_client() as api:
        doc = await until_twin(api, twin, lambda d: d["connection"]["status"] == "offline")
    assert doc["live"] == {"temp": 21.5}
    assert doc["connection"]["status"] == "offline"
    assert doc["connection"]["lastSeen"] is not None


_ = Path, Collector


async def test_a_message_over_the_packet_limit_never_reaches_the_service(
    svc: ServiceProcess, mosquitto_server: Mosquitto, twin: str
) -> None:
    """The service announces a Maximum Packet Size (MQTT 5) of 2 MiB, or twice the twin
    limit: a broker with no limit of its own (this one; HiveMQ allows 256 MB) sent it
    whatever a device published, read whole into memory, and again at every redelivery."""
    async with RawDevice(mosquitto_server.url, twin) as dev:
        blob = b"x" * (3 * 1024 * 1024)
        await dev.send("reported/update", b'{"state": {"blob": "' + blob + b'"}}')
        # The service handles a twin's messages in order: an answer to the large one would
        # come before this one's.
        after = await dev.call(
            "reported/update", {"state": {"a": 1}, "clientToken": "after"}, "accepted"
        )
        await asyncio.sleep(0.3)
    assert after["clientToken"] == "after"
    assert [m.topic for m in dev.inbox.messages if m.topic.endswith("/rejected")] == []
