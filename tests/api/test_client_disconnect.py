"""A client that goes away in the middle of its request body is not a server error."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from pathlib import Path

from tests.service_process import ADMIN_TOKEN, ServiceProcess


def test_a_body_cut_short_leaves_no_error_in_the_log_and_no_write(
    tmp_path: Path, service_factory: Callable[..., ServiceProcess]
) -> None:
    service = service_factory(tmp_path / "data")
    head = (
        "PUT /api/v1/twins/org.cut:a HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{service.port}\r\n"
        f"Authorization: Bearer {ADMIN_TOKEN}\r\n"
        "Content-Type: application/json\r\n"
        "Content-Length: 1000\r\n\r\n"
    )
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", service.port), timeout=5) as sock:
            sock.sendall(head.encode() + b'{"attributes": {"x": ')
            time.sleep(0.2)  # the service is now waiting for the rest of the body
    with service.client() as api:
        # The service still answers, and nothing of the cut request was written.
        assert api.get("/api/v1/twins/org.cut:a").status_code == 404
        assert api.put("/api/v1/twins/org.cut:b", json={}).status_code == 201
    service.stop()
    log = service.log_path.read_text(errors="replace")
    assert "Exception in ASGI application" not in log, log
    assert "Traceback" not in log, log
