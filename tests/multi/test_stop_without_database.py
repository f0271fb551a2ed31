"""A service whose MongoDB went away still stops when told to."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from tests.servers.ferretdb import FerretDB
from tests.service_fixtures import mongodb_env
from tests.service_process import ServiceProcess


@pytest.mark.server("ferretdb")
def test_sigterm_stops_a_service_whose_database_is_gone(
    fresh_ferretdb: FerretDB, tmp_path: Path
) -> None:
    svc = ServiceProcess(tmp_path / "svc", env=mongodb_env(fresh_ferretdb.url, "gone")).start()
    try:
        with svc.client() as api:
            assert api.put("/api/v1/twins/org.acme:gone", json={}).status_code == 201
        fresh_ferretdb.stop()
        time.sleep(1)
        assert svc.proc is not None
        svc.proc.send_signal(signal.SIGTERM)
        svc.proc.wait(30)
    finally:
        svc.kill()
