"""SIGHUP reloads the tokens file of a running service (real process, real signals)."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import httpx

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
