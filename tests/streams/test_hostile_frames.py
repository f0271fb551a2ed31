"""Random hostile WebSocket frames against the real service: every frame gets one reply,
never a 5xx, always the one error body; the socket stays open, and a refused command never
changes the twin.

The frames come from a seeded generator (the same ones on every run): broken JSON, messages
that are not objects, unknown types, commands and subscriptions with fields of the wrong
type, bad JSON pointers, bad RQL and `fields`, oversized values, mixed with well-formed
writes so that the refusals happen to a twin that keeps changing. The REST counterpart is
tests/api/test_hostile_requests.py, whose value generator this reuses.
"""

from __future__ import annotations

import asyncio
import json
import random
import uuid
from dataclasses import dataclass
from typing import Any

import httpx

from tests.api.test_hostile_requests import Hostile
from tests.service_process import ServiceProcess
from tests.streams.test_websocket import Json, connect, receive

FRAMES = 800
#: The messages that answer a client message (``resync.required`` answers a subscription
#: whose ``since`` the journal cannot serve); anything else is a subscription's output.
REPLIES = {"response", "error", "subscribed", "unsubscribed", "resync.required"}
STREAM = {"event", "left"}
WRITES = ("put", "patch", "delete")

_RAW = [
    "",
    "{",
    "null",
    "[]",
    '"x"',
    "1e999",
    '{"type": "command", "type": "subscribe"}',
    '{"type": "command", "command": "get", "twinId": NaN}',
    '{"type": "command", "value": Infinity}',
    '{"type": "\\ud800"}',
    '{"\\ud800": 1}',
    "[" * 3000 + "]" * 3000,
    '{"type": "command", "value": ' + '{"k": ' * 40 + "1" + "}" * 41,
]
_COMMANDS = ["get", "get", "put", "put", "patch", "patch", "patch", "delete", "search"]
_COMMANDS += ["patch", "put", "nosuch", "", "GET"]
_SECTIONS = ["attributes", "desired", "reported", "live", "delta", "connection", "metadata"]
_SECTIONS += ["lifecycle", "nosuch", "", "desired", "reported", "attributes"]
_POINTER_TOKENS = ["fan", "speed", "arr", "0", "-", "~0", "~1", "~2", "~", "", "99999999999"]
_POINTER_TOKENS += ["fan", "speed", "a"]
_FILTERS = ["eq(desired/a,1)", "eq(", "and()", "like(a,'*')", "in(a)", "exists()", ")"]
_FILTERS += ["gt(revision,0)", "eq(desired/a,1e999)", "not(eq(a,1))", "eq(a,'\\"]
_FIELDS = ["attributes", "desired/fan", "", ",", "x", "desired(a)", "//", "revision"]


@dataclass
class HostileFrames:
    """Makes the frames; ``twin_id`` is the twin most commands aim at."""

    rng: random.Random
    twin_id: str
    values: Hostile
    #: Set by the test while the twin is deleted: writes then often create it again.
    absent: bool = False

    def odd(self) -> Any:
        """A value of a type no field expects, or a plausible one."""
        return self.rng.choice([None, 1, -1, 1.5, True, [], {}, "x" * 300, self.values.text()])

    def maybe(self, message: Json, key: str, chance: float, choices: list[Any]) -> None:
        # Mostly a value of the right type: a refusal for one field would hide the rest.
        if self.rng.random() < chance:
            odd = self.rng.random() < 0.1
            message[key] = self.odd() if odd else self.rng.choice(choices)

    def pointer(self) -> str:
        tokens = [self.rng.choice(_SECTIONS)]
        tokens += [self.rng.choice(_POINTER_TOKENS) for _ in range(self.rng.randint(0, 3))]
        path = "/" + "/".join(tokens)
        return path if self.rng.random() < 0.9 else self.values.text()

    def correlation(self, message: Json) -> None:
        pick = self.rng.random()
        if pick < 0.8:
            message["correlationId"] = uuid.uuid4().hex
        elif pick < 0.9:
            message["correlationId"] = self.odd()

    def write(self) -> Json:
        """A well-formed write (its value may still be refused): the twin keeps changing."""
        message: Json = {"type": "command", "correlationId": uuid.uuid4().hex}
        message["command"] = self.rng.choice(["put", "patch", "patch", "delete"])
        message["twinId"] = self.twin_id
        section = self.rng.choice(["desired", "reported", "attributes", "live"])
        tokens = [self.rng.choice(["fan", "speed", "a"]) for _ in range(self.rng.randint(0, 2))]
        message["path"] = "/".join(["", section, *tokens])
        if self.rng.random() < (0.5 if self.absent else 0.05):
            message["command"] = "put"  # the whole twin: this creates it again
            del message["path"]
            message["value"] = {"desired": {"fan": self.values.value(2)}, "live": {}}
            return message
        message["value"] = self.values.value(1)
        if self.rng.random() < 0.05:
            message["value"] = {"blob": "x" * 70_000}  # past the twin size limit
        elif self.rng.random() < 0.02:
            message["value"] = _nested_lists(600)  # far past the depth limit
        return message

    def command(self) -> Json:
        if self.rng.random() < 0.35:
            return self.write()
        message: Json = {"type": "command"}
        self.correlation(message)
        self.maybe(message, "command", 0.99, _COMMANDS)
        twin_ids = [self.twin_id] * 20 + ["org.hostile:missing", "bad", "a:b/c", "x" * 300, ":"]
        self.maybe(message, "twinId", 0.95, twin_ids)
        if self.rng.random() < 0.7:
            message["path"] = self.pointer()
        if self.rng.random() < 0.8:
            message["value"] = self.values.value()
        if self.rng.random() < 0.2:
            message["value"] = json.loads(self.values.json_patch())
            message["patchType"] = "json"
        self.maybe(message, "patchType", 0.1, ["merge", "json", "strategic"])
        self.maybe(message, "fields", 0.15, _FIELDS)
        self.maybe(message, "condition", 0.1, _FILTERS)
        self.maybe(message, "ifMatch", 0.1, [1, 0, -1, 10**20, "1", '"rev:1"'])
        self.maybe(message, "ifNoneMatch", 0.05, ["*", "x"])
        self.maybe(message, "filter", 0.1, _FILTERS)
        self.maybe(message, "option", 0.05, ["size(0)", "size(1000)", "sort(+x)", "cursor(z)"])
        self.maybe(message, "namespaces", 0.05, ["org.hostile", "", "1x,", "a,b"])
        return message

    def subscribe(self) -> Json:
        message: Json = {"type": "subscribe"}
        self.maybe(message, "id", 0.9, [uuid.uuid4().hex[:8]] * 6 + ["s1", "", "x" * 300])
        self.maybe(message, "filter", 0.4, _FILTERS)
        self.maybe(message, "namespaces", 0.3, [["org.hostile"], [""], ["1x"], [1], "org.x"])
        self.maybe(message, "twins", 0.3, [[self.twin_id], ["bad"], [None], self.twin_id])
        self.maybe(message, "fields", 0.3, _FIELDS)
        self.maybe(message, "since", 0.2, [0, 1, -1, 10**20, "1", 1.5])
        return message

    def frame(self) -> str:
        pick = self.rng.random()
        if pick < 0.08:
            return self.rng.choice(_RAW)
        if pick < 0.12:
            other = self.rng.choice([{"type": "auth", "token": "x"}, {"type": "nosuch"}, {}])
            return json.dumps(other)
        if pick < 0.2:
            return json.dumps(self.subscribe())
        if pick < 0.24:
            known = self.rng.random() < 0.5
            return json.dumps({"type": "unsubscribe", "id": "s1" if known else self.odd()})
        return json.dumps(self.command(), ensure_ascii=self.rng.random() < 0.5)


def _assert_error(message: Json, where: str) -> None:
    body = message.get("error")
    assert isinstance(body, dict), where
    assert body.get("status") == message["status"], where
    assert isinstance(body.get("error"), str) and body["error"], where
    assert isinstance(body.get("message"), str) and body["message"], where


def _reset(api: httpx.Client, twin_id: str) -> Json:
    created = api.put(
        f"/api/v1/twins/{twin_id}",
        json={"attributes": {"m": "x"}, "desired": {"fan": {"speed": 3}, "arr": [1, 2]}},
    )
    assert created.status_code in (200, 201), created.text
    doc: Json = created.json()
    return doc


def test_hostile_frames_get_one_4xx_reply_and_leave_the_twin_alone(
    service: ServiceProcess,
) -> None:
    twin_id = f"org.hostile:ws-{uuid.uuid4().hex[:8]}"
    frames = HostileFrames(
        random.Random(20261204), twin_id, Hostile(random.Random(4122026), twin_id)
    )
    statuses: dict[int | str, int] = {}

    async def run() -> None:
        with service.client() as api:
            doc: Json | None = _reset(api, twin_id)
            async with connect(service) as ws:
                for number in range(FRAMES):
                    frame = frames.frame()
                    where = f"frame {number}: {frame[:200]}"
                    await ws.send(frame)
                    reply = await _reply(ws, where)
                    answered = reply["type"] in ("response", "error")
                    key = reply["status"] if answered else reply["type"]
                    statuses[key] = statuses.get(key, 0) + 1
                    if reply["type"] == "error":
                        assert 400 <= reply["status"] < 500, f"{where} -> {reply}"
                        _assert_error(reply, where)
                    sent = _object(frame)
                    if sent.get("type") != "command" or sent.get("command") not in WRITES:
                        continue
                    if sent.get("twinId") != twin_id:
                        continue
                    now = api.get(f"/api/v1/twins/{twin_id}")
                    if reply["type"] == "error":
                        # A refused command leaves every byte of the twin as it was, or
                        # leaves it absent.
                        if doc is None:
                            assert now.status_code == 404, where
                        else:
                            assert now.status_code == 200 and now.json() == doc, where
                    elif reply["status"] == 204:
                        assert now.status_code == 404, where
                        doc = None
                    else:
                        doc = now.json()
                        assert reply["body"]["revision"] == doc["revision"], where
                    frames.absent = doc is None
                # The socket is still open and serving after all of it.
                await ws.send(json.dumps({"type": "command", "correlationId": "end"}))
                last = await _reply(ws, "the last message")
                assert last["correlationId"] == "end", last

    asyncio.run(run())
    # The mix reached the service's refusals and its successes, not only one kind.
    assert {200, 201, 204, 400, 404, 412, 413, "subscribed", "unsubscribed"} <= set(statuses), (
        statuses
    )
    assert "unexpected error" not in service.log_tail(10_000)
    assert "websocket message failed" not in service.log_tail(10_000)


async def _reply(ws: Any, where: str) -> Json:
    """The next reply to a client message; subscription output before it is checked and
    skipped (frames are sent one at a time, so the next reply is this frame's)."""
    while True:
        try:
            message = await receive(ws)
        except TimeoutError:
            raise AssertionError(f"{where}: no reply") from None
        if message.get("type") in REPLIES:
            return message
        assert message.get("type") in STREAM, f"{where}: unexpected {message}"
        assert isinstance(message.get("seq"), int), f"{where}: {message}"


def _object(frame: str) -> Json:
    try:
        value = json.loads(frame)
    except (ValueError, RecursionError):
        return {}
    return value if isinstance(value, dict) else {}


def _nested_lists(depth: int) -> Any:
    value: list[Any] = []
    for _ in range(depth - 1):
        value = [value]
    return value
