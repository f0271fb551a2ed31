"""SIGHUP reloads the tokens file of a running service (real process, real signals)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.service_process import ServiceProcess

OPS = "ops-token-0123456789abcdef"
LEAKED = "leaked-token-0123456789abc"
NEW = "new-token-0123456789abcdef"
URL = "/api/v1/twins/org.acme:reload"


def write_tokens(path: Path, entries: list[dict[str, str]] | str) -> None:
    """Replaced whole (rename), as a deployment tool or a Kubernetes Secret does."""
    text = entries if isinstance(entries, str) else json.dumps(entries)
    staged = path.with_suffix(".new")
    staged.write_text(text)
    os.replace(staged, path)


def status(proc: ServiceProcess, token: str) -> int:
    with proc.client(token=token) as api:
        return api.get(URL).status_code


def hang_up_until(proc: ServiceProcess, token: str, wanted: int) -> None:
    """Sends SIGHUP, then waits until ``token`` gets ``wanted`` (no deadline of its own:
    the test run's timeout ends a wait that never ends)."""
    assert proc.proc is not None
    proc.proc.send_signal(signal.SIGHUP)
    while status(proc, token) != wanted:
        assert proc.proc.poll() is None, proc.log_tail()
        time.sleep(0.05)


def test_sighup_reloads_the_tokens_file(tmp_path: Path) -> None:
    """Tokens were read once, at start: a revoked token worked until a restart, and a
    SIGHUP ended the service (its default action)."""
    tokens = tmp_path / "tokens.json"
    ops = {"name": "ops", "token": OPS, "role": "admin"}
    leaked = {"name": "leaked", "token": LEAKED, "role": "write"}
    write_tokens(tokens, [ops, leaked])
    proc = ServiceProcess(
        tmp_path / "data", env={"TWIN_AUTH__TOKENS": "[]", "TWIN_AUTH__TOKENS_FILE": str(tokens)}
    ).start()
    try:
        with proc.client(token=OPS) as api:
            assert api.put(URL, json={}).status_code == 201
        # Accepted once more, so that its Authorization header is remembered as accepted.
        assert status(proc, LEAKED) == 200
        assert status(proc, NEW) == 401

        write_tokens(tokens, [ops, {"name": "new", "token": NEW, "role": "read"}])
        hang_up_until(proc, LEAKED, 401)
        assert status(proc, NEW) == 200
        assert status(proc, OPS) == 200
        with proc.client(token=NEW) as api:  # with the role the file gives it
            assert api.put(URL, json={}).status_code == 403

        # A file that cannot be used keeps the tokens in force, and says why in one line.
        for bad in ("[{not json", json.dumps([ops, {"name": "x", "token": "short"}])):
            write_tokens(tokens, bad)
            proc.proc.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
            while proc.log_path.read_text().count("tokens not reloaded") < (
                1 if bad.startswith("[{") else 2
            ):
                assert proc.proc.poll() is None, proc.log_tail()  # type: ignore[union-attr]
                time.sleep(0.05)
            assert status(proc, NEW) == 200 and status(proc, OPS) == 200
            assert status(proc, LEAKED) == 401
        log = proc.log_path.read_text()
        assert "short" not in log and NEW not in log and OPS not in log
        line = next(x for x in log.splitlines() if "tokens not reloaded" in x)
        assert f"The tokens file {tokens} cannot be used" in line, line

        # An empty file revokes every token it held: emptying it is how to lock all out.
        write_tokens(tokens, "[]")
        hang_up_until(proc, OPS, 401)
        assert status(proc, NEW) == 401
        assert httpx.get(f"{proc.url}/health").status_code == 200
    finally:
        proc.stop()


def _catches_sighup(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status").read_text()
    caught = next(line for line in status.splitlines() if line.startswith("SigCgt:"))
    return bool(int(caught.split()[1], 16) & 1 << (signal.SIGHUP - 1))


def test_a_sighup_while_the_service_starts_reloads_once_it_can(tmp_path: Path) -> None:
    """SIGHUP's handler was set by the lifespan, a second or so into a start: until then
    the signal's default action ended the service, without a word, and a reloader firing
    right after a restart (a Secret updated) took it down."""
    tokens = tmp_path / "tokens.json"
    write_tokens(tokens, [{"name": "ops", "token": OPS, "role": "admin"}])
    env = {
        "TWIN_AUTH__TOKENS": "[]",
        "TWIN_AUTH__TOKENS_FILE": str(tokens),
        "TWIN_LOG_LEVEL": "info",
    }

    def hang_up_early(service: subprocess.Popen[bytes]) -> None:
        # As soon as the process catches SIGHUP, or at 0.5 s: before it serves.
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline and not _catches_sighup(service.pid):
            time.sleep(0.005)
        with contextlib.suppress(httpx.HTTPError):
            assert not httpx.get(f"{proc.url}/health", timeout=1).is_success, "serving already"
        service.send_signal(signal.SIGHUP)

    proc = ServiceProcess(tmp_path / "data", env=env)
    try:
        proc.start(spawned=hang_up_early)
        assert status(proc, OPS) == 404
        while "SIGHUP: tokens reloaded: 1 in force" not in proc.log_path.read_text():
            assert proc.proc is not None and proc.proc.poll() is None, proc.log_tail()
            time.sleep(0.05)
    finally:
        proc.stop()


APP = "app-token-0123456789abcdef"
SLOW = "/api/v1/twins/org.acme:slow"
#: Writes whose body is still arriving at the reload: (method, path, content type, body).
SLOW_WRITES = [
    ("POST", "/api/v1/twins?namespace=org.acme", "application/json", b'{"attributes":{}}'),
    ("PUT", "/api/v1/twins/org.acme:new", "application/json", b"{}"),
    ("PATCH", SLOW, "application/merge-patch+json", b'{"attributes":{"k":1}}'),
    ("PUT", f"{SLOW}/desired/x", "application/json", b"1"),
    ("PATCH", f"{SLOW}/attributes", "application/merge-patch+json", b'{"k":2}'),
]


def _send_all_but_the_last_byte(
    proc: ServiceProcess, method: str, path: str, kind: str, body: bytes
) -> socket.socket:
    conn = socket.create_connection(("127.0.0.1", proc.port), timeout=30)
    head = (
        f"{method} {path} HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {APP}\r\n"
        f"Content-Type: {kind}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    conn.sendall(head.encode() + body[:-1])
    return conn


def _status_after_the_last_byte(conn: socket.socket, body: bytes) -> int:
    with conn:
        conn.sendall(body[-1:])
        answer = b""
        while b"\r\n" not in answer and (chunk := conn.recv(4096)):
            answer += chunk
    return int(answer.split(b" ", 2)[1])


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"name": "app", "token": "other-token-0123456789ab", "role": "write"}, 401),
        ({"name": "app", "token": APP, "role": "read", "namespaces": ["org.acme"]}, 403),
        ({"name": "app", "token": APP, "role": "write", "namespaces": ["org.other"]}, 403),
    ],
    ids=["revoked", "demoted-to-read", "namespace-removed"],
)
def test_a_write_whose_body_arrives_after_a_reload_takes_the_new_rights(
    tmp_path: Path, change: dict[str, Any], expected: int
) -> None:
    """A write was authorized when its headers arrived: one whose body was still coming at
    the reload was committed with the token's old rights, however long after it (the body
    trickling in under the read timeout)."""
    tokens = tmp_path / "tokens.json"
    ops = {"name": "ops", "token": OPS, "role": "admin"}
    app = {"name": "app", "token": APP, "role": "write", "namespaces": ["org.acme"]}
    write_tokens(tokens, [ops, app])
    env = {
        "TWIN_AUTH__TOKENS": "[]",
        "TWIN_AUTH__TOKENS_FILE": str(tokens),
        "TWIN_LOG_LEVEL": "info",
    }
    proc = ServiceProcess(tmp_path / "data", env=env).start()
    try:
        with proc.client(token=OPS) as api:
            assert api.put(SLOW, json={"attributes": {"k": 0}}).status_code == 201
            before = api.get(SLOW).json()
        pending = [(_send_all_but_the_last_byte(proc, *w), w[3]) for w in SLOW_WRITES]
        # A request that follows them through the service: they were authorized by now.
        with proc.client(token=APP) as api:
            assert api.get(SLOW).status_code == 200

        write_tokens(tokens, [ops, change])
        assert proc.proc is not None
        proc.proc.send_signal(signal.SIGHUP)
        while "SIGHUP: tokens reloaded" not in proc.log_path.read_text():
            assert proc.proc.poll() is None, proc.log_tail()
            time.sleep(0.05)

        assert [_status_after_the_last_byte(conn, body) for conn, body in pending] == [
            expected
        ] * len(SLOW_WRITES)
        with proc.client(token=OPS) as api:
            assert api.get(SLOW).json() == before
            assert api.get("/api/v1/twins/org.acme:new").status_code == 404
    finally:
        proc.stop()
