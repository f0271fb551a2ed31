"""Bytes a process holds for its clients, against a bound."""

from __future__ import annotations


class ByteBudget:
    """What every client of one kind holds together, against ``limit``: the messages queued
    for the stream readers (``stream.total_queue_bytes``), the HTTP requests and WebSocket
    messages still arriving (``limits.incoming_bytes``). Each client's own bound times the
    number of clients is far more than the process has: a hundred slow stream readers held
    800 MB, most of the manifests' 1 GiB."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def move(self, held: int, now: int) -> int:
        """One client's part goes from ``held`` bytes to ``now``; returns ``now``, its new
        part, for the client to keep."""
        self.used += now - held
        return now

    def tight(self) -> bool:
        """Whether three quarters are used (a stream replay waits, the rest kept for live
        events)."""
        return self.used >= self.limit * 3 // 4
