"""Change-stream subscribers of a chaos run: every change of every twin, once and in order.

A watcher subscribes over WebSocket to all the run's twins on one replica. When its
connection ends (the replica was killed, say) it connects to the next replica and resumes
with ``since`` = the last ``seq`` it received, as a client is told to. At the end of a phase
each watcher must have received, for each twin, every revision the phase made, each once, in
order, with ``seq`` rising throughout.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

import websockets
from websockets.exceptions import ConnectionClosed, InvalidHandshake

#: A connection that fails is tried again on the next replica this much later.
RETRY_SECONDS = 0.2


class Watcher:
    def __init__(self, name: str, urls: list[str], twins: list[str], token: str) -> None:
        self.name = name
        self._urls = urls
        self._twins = twins
        self._token = token
        self.revisions: dict[str, list[int]] = {twin: [] for twin in twins}
        self.seqs: list[int] = []
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
            with contextlib.suppress(OSError, TimeoutError, ConnectionClosed, InvalidHandshake):
                await self._follow(url)
            await asyncio.sleep(RETRY_SECONDS)

    async def _follow(self, url: str) -> None:
        headers = {"Authorization": f"Bearer {self._token}"}
        async with websockets.connect(url, additional_headers=headers, open_timeout=5) as ws:
            self.connections += 1
            request: dict[str, Any] = {
                "type": "subscribe",
                "id": "all",
                "twins": self._twins,
                "fields": "revision",
            }
            if self.seqs:
                request["since"] = self.seqs[-1]
            await ws.send(json.dumps(request))
            async for raw in ws:
                message = json.loads(raw)
                kind = message.get("type")
                if kind == "subscribed":
                    self.log.append(f"{url}: since {request.get('since')}: {message}")
                    self.subscribed.set()
                elif kind == "event":
                    self.seqs.append(message["seq"])
                    event = message["event"]
                    self.revisions[event["twinId"]].append(event["revision"])
                elif kind == "resync.required":
                    self.resyncs += 1
                    self.subscribed.set()
                elif kind == "error":  # the subscribe failed (the store out of reach)
                    self.log.append(f"{url}: since {request.get('since')}: {message}")
                    return  # on the next replica, from the same seq

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
