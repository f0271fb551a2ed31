"""Change-stream subscribers of a chaos run: every change of every twin, once and in order.

A watcher subscribes to all the run's twins on one replica, over WebSocket or as server-sent
events. When its connection ends (the replica was killed, say) it connects to the next
replica and resumes from the last ``seq`` it received (``since``, or ``Last-Event-ID``), as a
client is told to. At the end of a phase each watcher must have received, for each twin,
every revision the phase made, each once, in order, with ``seq`` rising throughout.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

import httpx
import websockets
from websockets.exceptions import ConnectionClosed, InvalidHandshake

#: A connection that fails is tried again on the next replica this much later.
RETRY_SECONDS = 0.2


class Watcher:
    """A WebSocket subscriber; ``urls`` are the replicas' base URLs (``http://host:port``)."""

    def __init__(self, name: str, urls: list[str], twins: list[str], token: str) -> None:
        self.name = name
        self._urls = urls
        self._twins = twins
        self._token = token
        self.revisions: dict[str, list[int]] = {twin: [] for twin in twins}
        self.seqs: list[int] = []
        #: Where to resume: the last event's seq, or before any, where the subscription
        #: went live ("subscribed", "resync.required"), as docs/api.md tells clients. A
        #: watcher that resumed live instead, cut off before its first event, missed what
        #: was committed while it was away.
        self.resume: int | None = None
        self.resyncs = 0
        self.connections = 0
        #: What each connection was answered, for the report of a failed run.
        self.log: list[str] = []
        self.subscribed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self, first: int) -> None:
        self._task = asyncio.create_task(self._run(first), name=f"watcher-{self.name}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self, first: int) -> None:
        n = first
        while True:
            url = self._urls[n % len(self._urls)]
            n += 1
            try:
                await self._follow(url)
                self.log.append(f"{url}: the stream ended")
            except (
                OSError,
                TimeoutError,
                ConnectionClosed,
                InvalidHandshake,
                httpx.HTTPError,
            ) as exc:
                self.log.append(f"{url}: {type(exc).__name__}: {exc}")
            await asyncio.sleep(RETRY_SECONDS)

    async def _follow(self, url: str) -> None:
        headers = {"Authorization": f"Bearer {self._token}"}
        ws_url = url.replace("http://", "ws://") + "/api/v1/ws"
        async with websockets.connect(ws_url, additional_headers=headers, open_timeout=5) as ws:
            self.connections += 1
            request: dict[str, Any] = {
                "type": "subscribe",
                "id": "all",
                "twins": self._twins,
                "fields": "revision",
            }
            since = self.resume
            if since is not None:
                request["since"] = since
            await ws.send(json.dumps(request))
            async for raw in ws:
                if not self._take(json.loads(raw), url, since):
                    return

    def _take(self, message: dict[str, Any], url: str, since: int | None) -> bool:
        """Record one message; False when the subscription failed (the store out of reach)
        and is to be tried again on the next replica, from the same seq."""
        kind = message.get("type")
        if kind == "subscribed":
            self.log.append(f"{url}: since {since}: {message}")
            if since is None:
                self.resume = message["seq"]
            self.subscribed.set()
        elif kind == "event":
            self.seqs.append(message["seq"])
            self.resume = message["seq"]
            event = message["event"]
            self.revisions[event["twinId"]].append(event["revision"])
        elif kind == "resync.required":
            self.resyncs += 1
            self.resume = message["seq"]
            self.subscribed.set()
        elif kind == "error":
            self.log.append(f"{url}: since {since}: {message}")
            return False
        return True

    def caught_up(self, final: dict[str, int]) -> bool:
        return all(self.revisions[t] and self.revisions[t][-1] >= final[t] for t in self._twins)

    def problems(self, before: dict[str, int], final: dict[str, int]) -> list[str]:
        """What this watcher got wrong: a revision of the phase missed, received twice or
        out of order, a ``seq`` that did not rise, a resync."""
        found = []
        if self.resyncs:
            found.append(f"{self.name}: {self.resyncs} resync.required")
        detail = f"{self.name}: connections: {'; '.join(self.log)}"
        if any(b <= a for a, b in zip(self.seqs, self.seqs[1:], strict=False)):
            found.append(f"{self.name}: seq did not rise throughout")
        for twin in self._twins:
            got = [r for r in self.revisions[twin] if before[twin] < r <= final[twin]]
            want = list(range(before[twin] + 1, final[twin] + 1))
            if got != want:
                missed = sorted(set(want) - set(got))
                twice = len(got) - len(set(got))
                found.append(
                    f"{self.name}: {twin}: {len(got)} events for {len(want)} revisions, "
                    f"missed {missed[:5]}, {twice} twice, in order: {got == sorted(got)}"
                )
        return [*found, detail] if found else found


class SseWatcher(Watcher):
    """The same, as server-sent events (``GET /api/v1/stream/twins``, ``Last-Event-ID``),
    resuming as an EventSource does: from the ``id:`` of the last event dispatched."""

    _last_id: int | None = None

    async def _follow(self, url: str) -> None:
        headers = {"Authorization": f"Bearer {self._token}"}
        since = self._last_id
        if since is not None:
            headers["Last-Event-ID"] = str(since)
        # Every twin of a chaos run is in its namespace.
        namespaces = ",".join(sorted({twin.split(":", 1)[0] for twin in self._twins}))
        params = {"namespaces": namespaces, "fields": "revision"}
        timeout = httpx.Timeout(5.0, read=None)
        async with (
            httpx.AsyncClient(timeout=timeout) as client,
            client.stream(
                "GET", f"{url}/api/v1/stream/twins", params=params, headers=headers
            ) as response,
        ):
            self.connections += 1
            if response.status_code != 200:  # 503: the store out of reach
                body = (await response.aread()).decode(errors="replace")
                self.log.append(f"{url}: since {since}: {response.status_code} {body[:200]}")
                return
            kind, data, event_id = "", "", None
            async for line in response.aiter_lines():
                if line.startswith("id: "):
                    event_id = int(line[4:])
                elif line.startswith("event: "):
                    kind = line[7:]
                elif line.startswith("data: "):
                    data = line[6:]
                elif not line and data:
                    if event_id is not None:  # an EventSource takes it as it dispatches
                        self._last_id = event_id
                    if kind == "overflow":
                        self.log.append(f"{url}: since {since}: overflow {data}")
                        return
                    if not self._take(json.loads(data), url, since):
                        return
                    kind, data, event_id = "", "", None
