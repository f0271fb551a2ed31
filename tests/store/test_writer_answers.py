"""How the event loop reads the SQLite writer's answers (``WriterProcess.listen``): whole
answers in order however the bytes arrive, and every request still waiting answered
``WriterGone`` when the channel ends. The far end of a real socket pair stands in for the
writer process."""

from __future__ import annotations

import asyncio
import pickle
import socket
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from twin_service.settings import SqliteSettings, StreamSettings
from twin_service.store.sqlite_writer import WriterConfig
from twin_service.store.writer_process import WriterGone, WriterProcess


def _listening(tmp_path: Path) -> tuple[WriterProcess, Connection]:
    config = WriterConfig(tmp_path / "x.sqlite3", SqliteSettings(), StreamSettings(), False, True)
    writer = WriterProcess(config)
    ours, theirs = socket.socketpair()
    writer._channel = Connection(ours.detach())  # what start() sets up with the process
    writer._done.clear()
    writer.listen(asyncio.get_running_loop())
    return writer, Connection(theirs.detach())


async def test_answers_arrive_whole_and_in_order_however_they_are_split(
    tmp_path: Path,
) -> None:
    writer, far = _listening(tmp_path)
    got: list[tuple[str, Any]] = []
    done = asyncio.Event()

    def answered(kind: str, result: Any) -> None:
        got.append((kind, result))
        if len(got) == 4:
            done.set()

    for _ in range(4):
        writer.request("commit", [], answered)
    big = list(range(100_000))  # several reads of the socket
    frames = [pickle.dumps(("ok", n)) for n in (1, 2)]
    frames += [pickle.dumps(("ok", big)), pickle.dumps(("error", ValueError("no")))]
    raw = b"".join(len(f).to_bytes(4, "big") + f for f in frames)
    # Byte by byte for the first frames, then the rest: every split of a frame is seen.
    for index in range(40):
        far._send(raw[index : index + 1])  # type: ignore[attr-defined]
        await asyncio.sleep(0)
    # From another thread: the rest is more than the socket buffers, and this loop reads it.
    sending = asyncio.create_task(asyncio.to_thread(far._send, raw[40:]))
    await asyncio.wait_for(done.wait(), 10)
    await sending
    assert [kind for kind, _ in got] == ["ok", "ok", "ok", "error"]
    assert [got[0][1], got[1][1]] == [1, 2]
    assert got[2][1] == big
    assert str(got[3][1]) == "no"
    far.close()


async def test_requests_in_flight_when_the_channel_ends_are_answered(tmp_path: Path) -> None:
    writer, far = _listening(tmp_path)
    got: list[tuple[str, Any]] = []
    for _ in range(3):
        writer.request("commit", [], lambda kind, result: got.append((kind, result)))
    far.send_bytes(pickle.dumps(("ok", 7)))
    far.close()  # the writer process exits
    for _ in range(200):
        if len(got) == 3:
            break
        await asyncio.sleep(0.01)
    assert got[0] == ("ok", 7)
    assert [kind for kind, _ in got[1:]] == ["error", "error"]
    assert all(isinstance(result, WriterGone) for _, result in got[1:])
    assert not writer.alive
    # A request after the end is answered at once, never left waiting.
    late: list[str] = []
    writer.request("commit", [], lambda kind, result: late.append(kind))
    await asyncio.sleep(0.01)
    assert late == ["error"]
