"""Random hostile device messages against the real service and mosquitto: every request is
answered once, a refusal carries a 4xx code allowed by the protocol's rules and changes
nothing, and an accepted message changes exactly what the protocol says.

The messages come from a seeded generator (the same ones on every run), sent one at a time
to one device's own topics: reported updates, live updates and gets with malformed, oversized
or ill-typed payloads, mixed with well-formed ones so that the refusals happen to a twin that
keeps changing, and messages on topics the service does not serve. The rules a message is
judged by (the `_judge_*` functions) are those of docs/device-protocol.md and docs/errors.md:

- more than `limits.max_twin_bytes` of payload, or a twin that would grow beyond it: 413
  `twin.toolarge` (near the limit either answer is right: the test cannot measure the
  service's encoding to the byte);
- not UTF-8, malformed JSON, NaN/Infinity, numbers out of range, duplicate keys, lone
  surrogates: 400 `json.invalid`;
- not an object, an unknown field, a wrong type, a client token over 64 bytes: 400
  `request.invalid`;
- a `desiredVersion` older than one already reported or newer than the twin's: 409
  `version.conflict`;
- a result with an empty key, a key with control characters or over 256 characters, or
  nested deeper than 16 levels: 400 `limits.exceeded`.

A message that breaks several rules may be refused for any of them; one that breaks none
must be accepted. Along the way the service must stay connected, ready, and free of handler
failures and tracebacks.

`test_deep_list_is_refused`: a list nested a few hundred levels deep (which the JSON decoder
still reads) crashed the handler: no answer, and the message redelivered at every
reconnection.
"""

from __future__ import annotations

import asyncio
import json
import random
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from tests.hostile_json import JsonValues
from tests.servers.mosquitto import Mosquitto
from tests.service_process import ServiceProcess
from tests.sync.conftest import SVC_MAX_TWIN_BYTES
from tests.sync.helpers import RawDevice, until_twin

SEED = 20261205
MESSAGES = 400
MAX_TWIN_BYTES = SVC_MAX_TWIN_BYTES  # the svc fixture's limit
#: How far the test's size estimate of a twin may be from the service's own encoding.
SIZE_SLACK = 64
MAX_DEPTH = 16
MAX_NESTING = 128  # of any JSON input
MAX_KEY_LENGTH = 256
MAX_TOKEN_BYTES = 64
REPORT_FIELDS = {"state", "clientToken", "desiredVersion", "rejected"}
GET_FIELDS = {"clientToken"}
#: Topics the service answers on: nothing may arrive on them unasked.
ANSWERS = (
    "reported/update/accepted",
    "reported/update/rejected",
    "get/accepted",
    "get/rejected",
    "live/update/rejected",
)
#: Topics of a twin that the service does not serve.
UNSERVED = ["reported/update/extra", "reported", "live", "delta", "nosuch", "get/x", ""]
UNSERVED += ["Reported/Update", "reported/update/", "live/update/x"]

TOO_LARGE = (413, "twin.toolarge")
JSON_INVALID = (400, "json.invalid")
REQUEST_INVALID = (400, "request.invalid")
LIMITS = (400, "limits.exceeded")
CONFLICT = (409, "version.conflict")

INVALID = object()  # stands for a payload that is not strict JSON
DEEP = object()  # stands for one nested deeper than the decoder goes (Python's included)

_DEEP_OBJECT = b'{"state": ' + b'{"k": ' * 17 + b"1" + b"}" * 18
_RAW: list[tuple[bytes, bool | object]] = [  # (payload, whether it is strict JSON, or DEEP)
    (b"", False),
    (b"  ", False),
    (b"{", False),
    (b"{not json", False),
    (b"null", True),
    (b"[]", True),
    (b"5", True),
    (b'"state"', True),
    (b"\xff\xfe", False),
    (b'{"state": {"a": "\xc3"}}', False),
    (b'{"state": {"a": NaN}}', False),
    (b'{"state": {"a": Infinity}}', False),
    (b'{"state": {"a": -Infinity}}', False),
    (b'{"state": {"a": 1e999}}', False),
    (b'{"state": {"a": 1' + b"0" * 400 + b"}}", False),
    (b'{"state": {"a": 1, "a": 2}}', False),
    (b'{"state": {}, "state": {}}', False),
    (b'{"a": 1, "a": 1}', False),
    (b'{"state": {"a": "\\ud800"}}', False),
    (b'{"state": {"\\udfff": 1}}', False),
    (b'"\\ud800"', False),
    (b"[" * 2000 + b"]" * 2000, DEEP),
    (_DEEP_OBJECT, True),
    (b'{"state": {"a": ' + b"[" * 200 + b"]" * 200 + b"}}", True),
    (b'{"state": {"a": ' + b"[" * 600 + b"]" * 600 + b"}}", True),
    (b'{"state": ' + b'{"":' * 200 + b"1" + b"}" * 201, True),
    (b'{"a": ' + b"[" * 200 + b"]" * 200 + b"}", True),
    (b'{"state": {"blob": "' + b"x" * 5000 + b'"}}', True),
    (b'{"blob": "' + b"x" * 4100 + b'"}', True),
    (b'{"state": {}, "clientToken": "' + b"t" * 5000 + b'"}', True),
    (b'{"state": {"a": 1}}', True),
    (b'{"state": {"a": null}}', True),
    (b'{"state": {}}', True),
    (b"{}", True),
]
_KEYS = ["a", "b", "fan", "mode", "speed", "arr", "a/b", "~1", "~0", "é", "$x", "a.b", "0"]
_ODD_KEYS = ["", "\u0000", "\u001f", "\u007f", "\u0085", "x" * 300, "k" * 256, "k" * 257]
_ODD_TOKENS = [None, 7, ["t"], "", "t" * 65, "é" * 33, "t" * 5000, {"t": 1}]
_ODD_VERSIONS = [0, -1, 10**30, "1", 1.5, 1.0, True, False, None, [1]]
# Paths need not name a desired leaf ("" names all of them); reasons are short strings.
_GOOD_REJECTED = [{"fan/speed": "too fast"}, {"mode": "no"}, {"": "all of it"}, {"\u0000": "x"}]
_BAD_REJECTED = [{"a": 5}, {"a": "r" * 300}, {"a": None}, ["fan"], "mode", {}, None, 3]
_NUMBERS = [0, -1, 1, 1.0, 1.5, 3, -0.0, 10**20, 2**63, -(2**64), 1e308, -1e-308, 5e-324]


def merge(target: Any, patch: Any) -> Any:
    """RFC 7396: what the service must make of ``target`` patched with ``patch``."""
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge(result.get(key), value)
    return result


def canon(value: Any) -> str:
    """JSON equality that Python's ``==`` lacks: ``true`` is not ``1``, ``1.0`` is not ``1``."""
    return json.dumps(value, sort_keys=True)


def _bad_key(key: str) -> bool:
    control = any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in key)
    return key == "" or len(key) > MAX_KEY_LENGTH or control


def _breaks_limits(value: Any, depth: int = 1) -> bool:
    """Whether a section (depth 1) holds a key or a nesting level the limits refuse."""
    if depth > MAX_DEPTH:
        return True
    if isinstance(value, dict):
        return any(_bad_key(k) or _breaks_limits(v, depth + 1) for k, v in value.items())
    if isinstance(value, list):
        return any(_breaks_limits(v, depth + 1) for v in value)
    return False


def _valid_token(token: Any) -> bool:
    return isinstance(token, str) and 0 < len(token.encode()) <= MAX_TOKEN_BYTES


@dataclass
class Judgement:
    """A refusal must name one of ``must | may``; with ``must`` empty, it may be accepted."""

    must: set[tuple[int, str]] = field(default_factory=set)
    may: set[tuple[int, str]] = field(default_factory=set)

    def size(self, doc: dict[str, Any], section: str, value: Any) -> None:
        sections = {name: doc[name] for name in ("attributes", "desired", "reported", "live")}
        sections[section] = value
        size = len(json.dumps(sections, separators=(",", ":"), ensure_ascii=False).encode())
        if size > MAX_TWIN_BYTES + SIZE_SLACK:
            self.must.add(TOO_LARGE)
        elif size > MAX_TWIN_BYTES - SIZE_SLACK:
            self.may.add(TOO_LARGE)

    def merged(self, doc: dict[str, Any], section: str, patch: dict[str, Any]) -> None:
        value = merge(doc[section], patch)
        if _breaks_limits(value):
            self.must.add(LIMITS)
        self.size(doc, section, value)


def _decoded(payload: bytes, body: Any, judgement: Judgement) -> bool:
    """Apply the rules every JSON payload obeys; whether ``body`` is JSON to judge further."""
    if len(payload) > MAX_TWIN_BYTES:
        judgement.must.add(TOO_LARGE)
    if body is INVALID:
        judgement.must.add(JSON_INVALID)
        return False
    if body is DEEP:
        judgement.must.add(LIMITS)
        return False
    if _deeper_than(body, MAX_NESTING):  # refused as it is decoded, whatever else it breaks
        judgement.must.add(LIMITS)
    return True


def _deeper_than(value: Any, limit: int) -> bool:
    """Whether ``value`` nests more than ``limit`` objects or arrays."""
    if not isinstance(value, dict | list):
        return False
    if limit <= 0:
        return True
    children = value.values() if isinstance(value, dict) else value
    return any(_deeper_than(child, limit - 1) for child in children)


def _malformed_report(body: dict[str, Any]) -> tuple[int, str] | None:
    """The refusal of a reported update that breaks the protocol's types (null counts as
    absent) or bounds, in the order the service checks them; None for a well-formed one."""
    if set(body) - REPORT_FIELDS:
        return REQUEST_INVALID
    token, version, rejected = (body.get(k) for k in ("clientToken", "desiredVersion", "rejected"))
    if token is not None and not _valid_token(token):
        return REQUEST_INVALID
    if rejected is not None:
        if not isinstance(rejected, dict):
            return REQUEST_INVALID
        if len(rejected) > 256:
            return LIMITS
        for reason in rejected.values():
            if not isinstance(reason, str):
                return REQUEST_INVALID
            if len(reason) > 256:
                return LIMITS
    if ("state" not in body and not rejected) or not isinstance(body.get("state", {}), dict):
        return REQUEST_INVALID
    if version is not None and (type(version) is not int or version < 0):
        return REQUEST_INVALID
    return None


def _judge_report(payload: bytes, body: Any, doc: dict[str, Any], applied: int) -> Judgement:
    judgement = Judgement()
    if not _decoded(payload, body, judgement):
        return judgement
    if not isinstance(body, dict):
        judgement.must.add(REQUEST_INVALID)
        return judgement
    version = body.get("desiredVersion")
    state = body.get("state", {})
    if malformed := _malformed_report(body):
        judgement.must.add(malformed)
    elif version is not None and not applied <= version <= doc["desiredVersion"]:
        judgement.must.add(CONFLICT)
    if isinstance(state, dict):
        judgement.merged(doc, "reported", state)
    return judgement


def _judge_live(payload: bytes, body: Any, doc: dict[str, Any]) -> Judgement:
    judgement = Judgement()
    if not _decoded(payload, body, judgement):
        return judgement
    if isinstance(body, dict):
        judgement.merged(doc, "live", body)
    else:
        judgement.must.add(REQUEST_INVALID)
    return judgement


def _judge_get(payload: bytes, body: Any) -> Judgement:
    judgement = Judgement()
    if not payload.strip():  # an empty get is the plain form
        return judgement
    if not _decoded(payload, body, judgement):
        return judgement
    if (
        not isinstance(body, dict)
        or set(body) - GET_FIELDS
        or (body.get("clientToken") is not None and not _valid_token(body["clientToken"]))
    ):
        judgement.must.add(REQUEST_INVALID)
    return judgement


@dataclass
class Hostile:
    """Makes the messages: (topic suffix, payload, the payload decoded or INVALID)."""

    rng: random.Random
    made: int = 0

    def key(self) -> str:
        return self.rng.choice(_ODD_KEYS if self.rng.random() < 0.05 else _KEYS)

    def text(self) -> str:
        pick = self.rng.random()
        if pick < 0.9:
            return "".join(
                self.rng.choice('ab z/~é\u0001"\\') for _ in range(self.rng.randint(0, 6))
            )
        return "y" * self.rng.choice([1000, 2500, 5000])

    def patch(self) -> dict[str, Any]:
        return JsonValues(self.rng, self.key, self.text, _NUMBERS).object()

    def token(self) -> Any:
        self.made += 1
        if self.rng.random() < 0.85:  # unique: a repeated token is answered from memory
            return f"tok-{self.made}-{self.rng.getrandbits(32):08x}"
        return self.rng.choice(_ODD_TOKENS)

    def version(self, doc: dict[str, Any]) -> Any:
        current = doc["desiredVersion"]
        if self.rng.random() < 0.7:
            return self.rng.choice([current, current, current, current - 1, current + 1])
        return self.rng.choice(_ODD_VERSIONS)

    def rejected(self) -> Any:
        return self.rng.choice([*_GOOD_REJECTED, *_BAD_REJECTED])

    def report(self, doc: dict[str, Any]) -> dict[str, Any]:
        body: dict[str, Any] = {}
        pick = self.rng.random()
        if pick < 0.04:  # empty the whole of reported
            body["state"] = dict.fromkeys(doc["reported"])
        elif pick < 0.9:
            body["state"] = self.patch()
        elif pick < 0.95:
            body["state"] = self.rng.choice([5, [], "x", None, True])
        if self.rng.random() < 0.6:
            body["desiredVersion"] = self.version(doc)
        if self.rng.random() < 0.7:
            body["clientToken"] = self.token()
        if self.rng.random() < 0.15:
            body["rejected"] = self.rejected()
        if self.rng.random() < 0.04:
            body[self.rng.choice(["extra", "State", "reported", ""])] = 1
        return body

    def encoded(self, body: Any) -> tuple[bytes, Any]:
        ascii_only = self.rng.random() < 0.5
        return json.dumps(body, ensure_ascii=ascii_only).encode(), body

    def raw(self) -> tuple[bytes, Any]:
        payload, kind = self.rng.choice(_RAW)
        return payload, json.loads(payload) if kind is True else INVALID if kind is False else kind

    def message(self, doc: dict[str, Any]) -> tuple[str, bytes, Any]:
        pick = self.rng.random()
        if pick < 0.65:
            if self.rng.random() < 0.15:
                return "reported/update", *self.raw()
            return "reported/update", *self.encoded(self.report(doc))
        if pick < 0.8:
            if self.rng.random() < 0.2:
                return "live/update", *self.raw()
            body = self.patch() if self.rng.random() < 0.9 else self.rng.choice([5, [], "x"])
            return "live/update", *self.encoded(body)
        if pick < 0.93:
            if self.rng.random() < 0.3:
                return "get", *self.raw()
            body = self.rng.choice([{}, {"clientToken": self.token()}, {"other": 1}, []])
            return "get", *self.encoded(body)
        return self.rng.choice(UNSERVED), *self.encoded(self.report(doc))


class Device(RawDevice):
    """A raw device that hears only the service's answers (not its own requests echoed)."""

    async def __aenter__(self) -> Device:
        await self.client.start()
        await self.client.wait_connected(10)
        for topic_filter in (
            "+/accepted",
            "+/rejected",
            "reported/update/+",
            "live/update/rejected",
        ):
            await self.client.subscribe(f"{self.base}/{topic_filter}", 0, self.inbox)
        return self


async def _new_twin(api: httpx.AsyncClient) -> str:
    twin_id = f"org.acme:hp-{uuid.uuid4().hex[:10]}"
    response = await api.put(
        f"/api/v1/twins/{twin_id}",
        json={"attributes": {"m": "x"}, "desired": {"fan": {"speed": 3}, "mode": "eco"}},
    )
    assert response.status_code == 201, response.text
    return twin_id


async def _handler_failures(api: httpx.AsyncClient) -> int:
    failures: int = (await api.get("/ready")).json()["checks"]["mqtt"]["handlerFailures"]
    return failures


class Session:
    """One device talking to the service, and what the test knows the twin must be."""

    def __init__(self, dev: Device, api: httpx.AsyncClient) -> None:
        self.dev = dev
        self.api = api
        self.doc: dict[str, Any] = {}
        self.applied = 0  # the highest desiredVersion an accepted report named
        self.seen: Counter[str] = Counter()

    def count(self, suffix: str) -> int:
        topic = f"{self.dev.base}/{suffix}"
        return sum(1 for m in self.dev.inbox.messages if m.topic == topic)

    def answered(self) -> dict[str, int]:
        return {suffix: self.count(suffix) for suffix in ANSWERS}

    async def read(self) -> dict[str, Any]:
        response = await self.api.get(f"/api/v1/twins/{self.dev.twin_id}")
        assert response.status_code == 200, response.text
        doc: dict[str, Any] = response.json()
        return doc

    async def answer(
        self, request: str, before: dict[str, int], where: str, besides: str = ""
    ) -> tuple[str, Any]:
        """The one answer to ``request`` since ``before``: ("accepted"|"rejected", body).

        Nothing else may have been answered since, but on ``besides``."""
        outcomes = ("accepted", "rejected")
        try:
            async with asyncio.timeout(10):
                while (
                    sum(self.count(f"{request}/{o}") - before[f"{request}/{o}"] for o in outcomes)
                    == 0
                ):
                    await asyncio.sleep(0.002)
        except TimeoutError:
            raise AssertionError(f"{where}: no answer in 10 s") from None
        now = self.answered()
        new = {s: now[s] - before[s] for s in ANSWERS if now[s] != before[s] and s != besides}
        assert list(new.values()) == [1], f"{where}: answers {new}"
        (suffix,) = new
        topic = f"{self.dev.base}/{suffix}"
        last = [m for m in self.dev.inbox.messages if m.topic == topic][-1]
        return suffix.rsplit("/", 1)[1], json.loads(last.payload)

    async def barrier(self, where: str, besides: str = "") -> dict[str, Any]:
        """A get: answered only once every earlier message of the twin was handled."""
        before = self.answered()
        await self.dev.send("get", b"")
        outcome, body = await self.answer("get", before, f"{where} (barrier)", besides)
        assert outcome == "accepted", f"{where}: barrier refused: {body}"
        return dict(body)

    def check_refusal(self, answer: Any, judgement: Judgement, body: Any, where: str) -> None:
        code, error = answer.get("code"), answer.get("error")
        assert isinstance(code, int) and 400 <= code < 500, f"{where}: {answer}"
        assert isinstance(error, str) and error, f"{where}: {answer}"
        assert isinstance(answer.get("message"), str) and answer["message"], f"{where}: {answer}"
        assert set(answer) <= {"clientToken", "code", "error", "message", "desiredVersion"}
        assert (code, error) in judgement.must | judgement.may, f"{where}: {answer} {judgement}"
        if (code, error) == CONFLICT:
            assert answer["desiredVersion"] == self.doc["desiredVersion"], where
        token = body.get("clientToken") if isinstance(body, dict) else None
        if _valid_token(token):  # the device can match a refusal to its request
            assert answer.get("clientToken") == token, f"{where}: {answer}"

    def check_unchanged(self, after: dict[str, Any], where: str) -> None:
        assert canon(after) == canon(self.doc), f"{where}: twin changed\n{self.doc}\n{after}"

    def check_write(self, after: dict[str, Any], section: str, value: Any, where: str) -> None:
        """``section`` became ``value`` and nothing else a device cannot write moved."""
        assert canon(after[section]) == canon(value), f"{where}: {after[section]} != {value}"
        changed = canon(self.doc[section]) != canon(value)
        step = after["revision"] - self.doc["revision"]
        assert (step == 1) if changed else (step in (0, 1)), f"{where}: revision step {step}"
        version = self.doc["reportedVersion"] + (1 if changed and section == "reported" else 0)
        assert after["reportedVersion"] == version, where
        for name in ("attributes", "desired", "desiredVersion", "connection", "created"):
            assert canon(after[name]) == canon(self.doc[name]), f"{where}: {name} changed"
        assert canon(after["reported" if section == "live" else "live"]) == canon(
            self.doc["reported" if section == "live" else "live"]
        ), f"{where}: the other section changed"

    def check_get(self, answer: Any, doc: dict[str, Any], token: Any, where: str) -> None:
        for name in ("desired", "reported", "delta", "desiredVersion", "reportedVersion"):
            assert canon(answer[name]) == canon(doc[name]), f"{where}: {name}"
        assert (answer["revision"], answer.get("clientToken")) == (doc["revision"], token), where

    async def report(self, payload: bytes, body: Any, where: str) -> None:
        judgement = _judge_report(payload, body, self.doc, self.applied)
        before = self.answered()
        await self.dev.send("reported/update", payload)
        outcome, answer = await self.answer("reported/update", before, where)
        after = await self.read()
        if outcome == "rejected":
            self.check_refusal(answer, judgement, body, where)
            self.check_unchanged(after, where)
            self.seen[f"reported {answer['code']} {answer['error']}"] += 1
        else:
            assert not judgement.must, f"{where}: accepted, but breaks {judgement.must}"
            state = body.get("state", {})
            self.check_write(after, "reported", merge(self.doc["reported"], state), where)
            token = body.get("clientToken")
            expected = {"revision": after["revision"], "reportedVersion": after["reportedVersion"]}
            assert answer == expected | ({"clientToken": token} if token else {}), where
            if body.get("desiredVersion") is not None:
                self.applied = max(self.applied, body["desiredVersion"])
            self.seen["reported accepted"] += 1
        self.doc = after

    async def live(self, payload: bytes, body: Any, where: str) -> None:
        judgement = _judge_live(payload, body, self.doc)
        refusals = self.count("live/update/rejected")
        await self.dev.send("live/update", payload)
        got = await self.barrier(where, besides="live/update/rejected")
        after = await self.read()
        self.check_get(got, after, None, where)
        new = self.count("live/update/rejected") - refusals
        if new:
            assert new == 1, f"{where}: {new} refusals"
            topic = f"{self.dev.base}/live/update/rejected"
            answer = json.loads(
                [m for m in self.dev.inbox.messages if m.topic == topic][-1].payload
            )
            self.check_refusal(answer, judgement, body, where)
            assert "clientToken" not in answer, where
            self.check_unchanged(after, where)
            self.seen[f"live {answer['code']} {answer['error']}"] += 1
        else:
            assert not judgement.must, f"{where}: accepted, but breaks {judgement.must}"
            self.check_write(after, "live", merge(self.doc["live"], body), where)
            self.seen["live accepted"] += 1
        self.doc = after

    async def get(self, payload: bytes, body: Any, where: str) -> None:
        judgement = _judge_get(payload, body)
        before = self.answered()
        await self.dev.send("get", payload)
        outcome, answer = await self.answer("get", before, where)
        after = await self.read()
        # lastSeen was written by the first message: a get writes nothing for ten minutes.
        self.check_unchanged(after, where)
        if outcome == "rejected":
            self.check_refusal(answer, judgement, body, where)
            self.seen[f"get {answer['code']} {answer['error']}"] += 1
        else:
            assert not judgement.must, f"{where}: accepted, but breaks {judgement.must}"
            token = body.get("clientToken") if isinstance(body, dict) else None
            self.check_get(answer, after, token, where)
            self.seen["get accepted"] += 1

    async def unserved(self, suffix: str, payload: bytes, where: str) -> None:
        before = self.answered()
        await self.dev.send(suffix, payload)
        await self.barrier(where)
        now = self.answered()
        now["get/accepted"] -= 1  # the barrier's own answer
        assert now == before, f"{where}: answered {before} -> {now}"
        self.check_unchanged(await self.read(), where)
        self.seen["unserved ignored"] += 1


async def test_hostile_device_messages_are_judged_by_the_rules_and_refusals_change_nothing(
    svc: ServiceProcess, mosquitto_server: Mosquitto
) -> None:
    log_start = svc.log_path.stat().st_size
    hostile = Hostile(random.Random(SEED))
    async with svc.async_client() as api:
        failures = await _handler_failures(api)
        twin_id = await _new_twin(api)
        async with Device(mosquitto_server.url, twin_id) as dev:
            session = Session(dev, api)
            await session.barrier("first get")
            # The first message of a device writes lastSeen after answering: wait for that
            # write, so every later revision comes from the messages themselves.
            session.doc = await until_twin(
                api, twin_id, lambda d: d["connection"]["lastSeen"] is not None
            )
            for number in range(MESSAGES):
                if number % 100 == 99:  # a newer desired version for reports to name
                    response = await api.patch(
                        f"/api/v1/twins/{twin_id}",
                        content=json.dumps({"desired": {"mode": f"m{number:04d}"}}),
                        headers={"Content-Type": "application/merge-patch+json"},
                    )
                    assert response.status_code == 200, response.text
                    session.doc = await session.read()
                suffix, payload, body = hostile.message(session.doc)
                where = f"message {number}: {suffix!r} {payload[:300]!r}"
                if suffix == "reported/update":
                    await session.report(payload, body, where)
                elif suffix == "live/update":
                    await session.live(payload, body, where)
                elif suffix == "get":
                    await session.get(payload, body, where)
                else:
                    await session.unserved(suffix, payload, where)
            await session.barrier("last get")
            assert dev.client.connected and dev.client.health().reconnect_count == 0
        ready = await api.get("/ready")
        assert ready.status_code == 200, ready.text
        assert ready.json()["checks"]["mqtt"]["reconnects"] == 0
        assert await _handler_failures(api) == failures
    with svc.log_path.open("rb") as log:
        log.seek(log_start)
        written = log.read().decode(errors="replace")
    assert "Traceback" not in written and "unexpected error" not in written, written[-3000:]
    # The mix reached every kind of refusal and plenty of successes, not only one side.
    seen = session.seen
    codes = {key.split(" ", 1)[1] for key in seen}
    assert {"accepted", "400 json.invalid", "400 request.invalid", "400 limits.exceeded"} <= codes
    assert {"413 twin.toolarge", "409 version.conflict"} <= codes, seen
    assert seen["reported accepted"] >= 50 and seen["live accepted"] >= 10, seen


@pytest.mark.parametrize("suffix", ["reported/update", "live/update"])
async def test_deep_list_is_refused(
    svc: ServiceProcess, mosquitto_server: Mosquitto, suffix: str
) -> None:
    # 600 levels: a 1.2 kB payload, which the JSON decoder (about 990 levels) accepts.
    nested = b'{"a": ' + b"[" * 600 + b"]" * 600 + b"}"
    payload = b'{"state": ' + nested + b"}" if suffix == "reported/update" else nested
    async with svc.async_client() as api:
        failures = await _handler_failures(api)
        twin_id = await _new_twin(api)
        async with Device(mosquitto_server.url, twin_id) as dev:
            session = Session(dev, api)
            await session.barrier("first get")
            before = session.answered()
            await dev.send(suffix, payload)
            await session.barrier("after the deep list", besides=f"{suffix}/rejected")
            refusals = [
                json.loads(m.payload)
                for m in dev.inbox.messages
                if m.topic == f"{dev.base}/{suffix}/rejected"
            ][before[f"{suffix}/rejected"] :]
        assert await _handler_failures(api) == failures, "the handler crashed"
    assert [(a["code"], a["error"]) for a in refusals] == [(400, "limits.exceeded")], refusals
