"""A service whose MongoDB went away still answers every request and stops when told to."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.servers.ferretdb import FerretDB
from tests.service_fixtures import mongodb_env
from tests.service_process import ServiceProcess

TWIN = "/api/v1/twins/org.acme:gone"
MERGE = {"Content-Type": "application/merge-patch+json"}
# Fewer than httpx's 100 pooled connections: every request is sent at once and must be
# answered by the service (none waits in the client for a connection).
WRITERS = 90


@pytest.mark.server("ferretdb")
def test_sigterm_stops_a_service_whose_database_is_gone(
    fresh_ferretdb: FerretDB, tmp_path: Path
) -> None:
    svc = ServiceProcess(tmp_path / "svc", env=mongodb_env(fresh_ferretdb.url, "gone")).start()
    try:
        with svc.client() as api:
            assert api.put(TWIN, json={}).status_code == 201
        fresh_ferretdb.stop()
        time.sleep(1)
        assert svc.proc is not None
        svc.proc.send_signal(signal.SIGTERM)
        svc.proc.wait(30)
    finally:
        svc.kill()


async def _writes_cut_off(svc: ServiceProcess, ferretdb: FerretDB) -> list[object]:
    """WRITERS PATCHes of one twin; the database is killed after the first commits, and the
    service gets SIGTERM a second later. Returns each request's answer (or client error)
    once the service has exited."""
    async with svc.async_client() as api:
        assert (await api.put(TWIN, json={})).status_code == 201
        first = asyncio.Event()

        async def write(i: int) -> object:
            try:
                response = await api.patch(TWIN, json={"desired": {f"k{i}": i}}, headers=MERGE)
            except httpx.HTTPError as exc:
                return exc
            first.set()
            return response

        writes = [asyncio.create_task(write(i)) for i in range(WRITERS)]
        await asyncio.wait_for(first.wait(), 30)
        # The writes of one twin take turns, so most of them are still queued here.
        await asyncio.to_thread(ferretdb.kill)
        await asyncio.sleep(1)
        assert svc.proc is not None
        svc.proc.send_signal(signal.SIGTERM)
        try:
            # Before, each queued write waited out a whole server selection (5 s) after the
            # one ahead of it: minutes for this crowd, and SIGTERM waited for all of them.
            await asyncio.to_thread(svc.proc.wait, 60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the service did not stop on SIGTERM:\n{svc.log_tail()}")
        return list(await asyncio.gather(*writes))


@pytest.mark.server("ferretdb")
@pytest.mark.parametrize(
    ("settings", "refusal"),
    [
        # The writes queued behind one that found the database gone are refused at once.
        ({}, "service.unavailable"),
        # The writes outlive the shutdown timeout: uvicorn cancels them, and they are
        # answered in the service's error shape, not with uvicorn's plain-text 500.
        (
            {"TWIN_SHUTDOWN_TIMEOUT_SECONDS": "2"},
            "service.stopping",
        ),
    ],
    ids=["queued-behind-a-failure", "shutdown-timeout"],
)
async def test_writes_in_flight_when_the_database_dies_are_all_answered(
    fresh_ferretdb: FerretDB, tmp_path: Path, settings: dict[str, str], refusal: str
) -> None:
    env = {**mongodb_env(fresh_ferretdb.url, "gone"), **settings}
    svc = ServiceProcess(tmp_path / "svc", env=env).start()
    try:
        answers = await _writes_cut_off(svc, fresh_ferretdb)
    finally:
        svc.kill()
    codes: dict[str, int] = {}
    for answer in answers:
        assert isinstance(answer, httpx.Response), f"no answer: {answer!r}\n{svc.log_tail()}"
        assert answer.headers["content-type"] == "application/json", answer.text
        if answer.status_code == 200:
            codes["ok"] = codes.get("ok", 0) + 1
            continue
        assert answer.status_code == 503, answer.text
        assert answer.headers["retry-after"] == "1"
        body = answer.json()
        assert body["status"] == 503
        codes[body["error"]] = codes.get(body["error"], 0) + 1
    assert codes.get(refusal, 0) > 0, codes
    assert set(codes) <= {"ok", "service.unavailable", "service.stopping"}, codes
