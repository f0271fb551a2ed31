"""The server helpers start real servers that behave as the store and MQTT tests need."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from paho.mqtt.client import Client, ConnectFlags, MQTTMessage
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from tests.servers.ferretdb import FerretDB
from tests.servers.mosquitto import Mosquitto, write_password_file
from tests.servers.process import port_accepts
from tests.servers.require import REQUIRE_SERVERS_ENV, require_server

TIMEOUT = 10.0


class Session:
    """A connected paho MQTT 5 client that collects received messages in a queue."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.messages: queue.Queue[MQTTMessage] = queue.Queue()
        self.session_present = False

    def next_message(self) -> MQTTMessage:
        return self.messages.get(timeout=TIMEOUT)


@contextmanager
def mqtt_session(
    broker: Mosquitto,
    client_id: str,
    *,
    clean_start: bool = True,
    username: str | None = None,
    password: str | None = None,
) -> Iterator[Session]:
    client = Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=MQTTProtocolVersion.MQTTv5,
    )
    session = Session(client)
    connected = threading.Event()
    results: list[ReasonCode] = []

    def on_connect(
        _c: Client, _u: object, flags: ConnectFlags, reason: ReasonCode, _p: object
    ) -> None:
        session.session_present = flags.session_present
        results.append(reason)
        connected.set()

    def on_message(_c: Client, _u: object, message: MQTTMessage) -> None:
        session.messages.put(message)

    client.on_connect = on_connect
    client.on_message = on_message
    if username is not None:
        client.username_pw_set(username, password)
    properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    properties.SessionExpiryInterval = 3600
    assert broker.port is not None
    client.connect(broker.host, broker.port, clean_start=clean_start, properties=properties)
    client.loop_start()
    try:
        assert connected.wait(TIMEOUT), "no CONNACK"
        if results[0].is_failure:
            raise ConnectionRefusedError(str(results[0]))
        yield session
    finally:
        client.disconnect()
        client.loop_stop()


def subscribe(session: Session, topic: str) -> None:
    done = threading.Event()
    session.client.on_subscribe = lambda *_: done.set()
    session.client.subscribe(topic, qos=1)
    assert done.wait(TIMEOUT), "no SUBACK"


def publish(session: Session, topic: str, payload: bytes) -> None:
    info = session.client.publish(topic, payload, qos=1)
    info.wait_for_publish(TIMEOUT)
    assert info.is_published()


def test_mosquitto_delivers_qos1(mosquitto_server: Mosquitto, unique_name: str) -> None:
    topic = f"{unique_name}/state"
    with (
        mqtt_session(mosquitto_server, f"{unique_name}-sub") as sub,
        mqtt_session(mosquitto_server, f"{unique_name}-pub") as pub,
    ):
        subscribe(sub, topic)
        publish(pub, topic, b"hello")
        message = sub.next_message()
    assert (message.topic, message.payload, message.qos) == (topic, b"hello", 1)
    assert mosquitto_server.url == f"mqtt://127.0.0.1:{mosquitto_server.port}"


def test_mosquitto_restart_keeps_persistent_session(fresh_mosquitto: Mosquitto) -> None:
    broker = fresh_mosquitto
    port, first_pid = broker.port, broker.pid
    with mqtt_session(broker, "device-1", clean_start=False) as device:
        subscribe(device, "things/t1/delta")
    with mqtt_session(broker, "service") as service:
        publish(service, "things/t1/delta", b"queued while offline")

    broker.restart()

    assert (broker.port, broker.running()) == (port, True)
    assert broker.pid != first_pid
    with mqtt_session(broker, "device-1", clean_start=False) as device:
        assert device.session_present
        message = device.next_message()
    assert (message.topic, message.payload) == ("things/t1/delta", b"queued while offline")
    assert "max_queued_messages 100000" in broker.config_path.read_text()
    assert broker.log_path.stat().st_size > 0


def test_mosquitto_password_and_acl(
    mosquitto_factory: Callable[..., Mosquitto], tmp_path: Path
) -> None:
    passwords = write_password_file(tmp_path / "passwd", {"device": "s3cret"})
    acl = tmp_path / "acl"
    acl.write_text("user device\ntopic readwrite things/#\n")
    broker = mosquitto_factory(password_file=passwords, acl_file=acl)

    with pytest.raises(ConnectionRefusedError), mqtt_session(broker, "anonymous"):
        pass
    with mqtt_session(broker, "device", username="device", password="s3cret") as device:
        subscribe(device, "things/t1")
        publish(device, "things/t1", b"ok")
        assert device.next_message().payload == b"ok"


def test_mosquitto_stop_frees_the_port(fresh_mosquitto: Mosquitto) -> None:
    assert fresh_mosquitto.port is not None
    fresh_mosquitto.stop()
    assert not fresh_mosquitto.running()
    assert not port_accepts(fresh_mosquitto.host, fresh_mosquitto.port)


async def test_ferretdb_compare_and_set(ferretdb_server: FerretDB, unique_name: str) -> None:
    from pymongo import AsyncMongoClient, ReturnDocument
    from pymongo.errors import DuplicateKeyError

    client: AsyncMongoClient[dict[str, object]] = AsyncMongoClient(
        ferretdb_server.url, serverSelectionTimeoutMS=5000
    )
    try:
        twins = client[unique_name]["twins"]
        await twins.create_index("thingId", unique=True)
        await twins.insert_one({"thingId": "t1", "revision": 1, "desired": {"temp": 20}})
        with pytest.raises(DuplicateKeyError):
            await twins.insert_one({"thingId": "t1", "revision": 1})

        updated = await twins.find_one_and_update(
            {"thingId": "t1", "revision": 1},
            {"$set": {"desired.temp": 21}, "$inc": {"revision": 1}},
            return_document=ReturnDocument.AFTER,
        )
        stale = await twins.find_one_and_update(
            {"thingId": "t1", "revision": 1},
            {"$set": {"desired.temp": 99}, "$inc": {"revision": 1}},
        )
        stored = await twins.find_one({"thingId": "t1"}, {"_id": 0})
    finally:
        await client.close()

    assert updated is not None and updated["revision"] == 2
    assert stale is None
    assert stored == {"thingId": "t1", "revision": 2, "desired": {"temp": 21}}


def test_ferretdb_restart_keeps_data(fresh_ferretdb: FerretDB) -> None:
    from pymongo import MongoClient

    port = fresh_ferretdb.port
    with MongoClient[dict[str, Any]](fresh_ferretdb.url, serverSelectionTimeoutMS=5000) as client:
        client.db.twins.insert_one({"thingId": "t1"})
    fresh_ferretdb.restart()
    assert fresh_ferretdb.port == port
    with MongoClient[dict[str, Any]](fresh_ferretdb.url, serverSelectionTimeoutMS=5000) as client:
        assert client.db.twins.count_documents({"thingId": "t1"}) == 1


@pytest.mark.parametrize(
    ("env", "outcome"), [("", pytest.skip.Exception), ("1", pytest.fail.Exception)]
)
def test_require_server_skips_or_fails(
    monkeypatch: pytest.MonkeyPatch, env: str, outcome: type[BaseException]
) -> None:
    monkeypatch.setenv(REQUIRE_SERVERS_ENV, env)
    with pytest.raises(outcome, match="mosquitto not installed"):
        require_server("mosquitto", "not installed: run scripts/servers/install-mosquitto")
