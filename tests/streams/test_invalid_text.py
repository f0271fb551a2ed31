"""A text frame that is not UTF-8 closes the connection with 1007 (invalid data), and says
nothing in the service's log beyond a debug line: uvicorn logged a traceback at ERROR for
each, before authentication, so any client could fill the log."""

from __future__ import annotations

from collections.abc import Callable

from tests.service_process import ServiceProcess
from tests.streams.test_incoming_bounds import _close, _raw_websocket, _text_header

Factory = Callable[..., ServiceProcess]


async def test_a_text_frame_that_is_not_utf8_closes_with_1007_and_no_traceback(
    service_factory: Factory,
) -> None:
    service = service_factory()
    for _ in range(3):
        async with _raw_websocket(service, None) as (reader, writer):  # not authenticated
            writer.write(_text_header(2) + b"\xff\xfe")
            code, _reason = await _close(reader)
            assert code == 1007
    log = service.log_path.read_text(errors="replace")
    assert "Traceback" not in log and "UTF-8" not in log, log[-2000:]
