"""MongoDB over TLS, as a managed or operator-run MongoDB is usually reached: a server
certificate from a CA of its own, and a client certificate where the server asks for one.
The service takes both from the driver's URL options (``tls``, ``tlsCAFile``,
``tlsCertificateKeyFile``); when it cannot connect, ``/ready`` says why while it waits.

The FerretDB of the tests listens in plain TCP: a real TLS front (tests/servers/tls_proxy.py)
stands where a TLS-enabled server's listener would.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple
from urllib.parse import quote

import pytest

from tests.certificates import self_signed
from tests.servers.ferretdb import FerretDB
from tests.servers.tls_proxy import TlsProxy
from tests.service_fixtures import mongodb_env
from tests.service_process import ServiceProcess


class Certificates(NamedTuple):
    server: Path
    server_key: Path
    client: Path
    #: The client's certificate and key in one PEM file (what ``tlsCertificateKeyFile`` takes).
    client_pem: Path


@pytest.fixture
def certs(tmp_path: Path) -> Certificates:
    server, server_key = self_signed(tmp_path, "server")
    client, client_key = self_signed(tmp_path, "client")
    client_pem = tmp_path / "client.pem"
    client_pem.write_text(client.read_text() + client_key.read_text())
    return Certificates(server, server_key, client, client_pem)


def _url(port: int, **options: Path | str) -> str:
    query = "&".join(f"{name}={quote(str(value), safe='')}" for name, value in options.items())
    return f"mongodb://127.0.0.1:{port}/?tls=true{'&' if query else ''}{query}"


def _port(ferretdb: FerretDB) -> int:
    assert ferretdb.port is not None
    return ferretdb.port


def _service(tmp_path: Path, url: str, database: str) -> ServiceProcess:
    env = mongodb_env(url, database)
    # A start that cannot connect tries again soon, so /ready shows the reason quickly.
    env["TWIN_MONGODB__SERVER_SELECTION_TIMEOUT_MS"] = "500"
    return ServiceProcess(tmp_path / "svc", env=env).start()


def test_the_store_over_tls_with_its_own_ca_and_a_client_certificate(
    ferretdb_server: FerretDB,
    certs: Certificates,
    tmp_path: Path,
    unique_name: str,
) -> None:
    with TlsProxy(_port(ferretdb_server), certs.server, certs.server_key, certs.client) as proxy:
        url = _url(proxy.port, tlsCAFile=certs.server, tlsCertificateKeyFile=certs.client_pem)
        proc = _service(tmp_path, url, unique_name)
        try:
            with proc.client() as api:
                created = api.put("/api/v1/twins/org.acme:tls", json={"desired": {"on": True}})
                assert created.status_code == 201, created.text
                read = api.get("/api/v1/twins/org.acme:tls")
                assert read.json()["desired"] == {"on": True}
                ready = api.get("/ready?require=store")
                assert ready.status_code == 200, ready.text
        finally:
            proc.stop()
        assert proxy.accepted > 0
        assert proxy.refused == []


def test_a_server_certificate_the_service_does_not_trust_is_named(
    ferretdb_server: FerretDB,
    certs: Certificates,
    tmp_path: Path,
    unique_name: str,
) -> None:
    """Without ``tlsCAFile`` the driver trusts the system's CAs only: the service waits
    for a store it can trust, and says why."""
    with TlsProxy(_port(ferretdb_server), certs.server, certs.server_key) as proxy:
        proc = _service(tmp_path, _url(proxy.port), unique_name)
        try:
            with proc.client() as api:
                ready = api.get("/ready")
                write = api.put("/api/v1/twins/org.acme:tls", json={})
        finally:
            proc.stop()
    assert ready.status_code == 503
    assert ready.json()["status"] == "starting"
    error = ready.json()["checks"]["store"]["error"]
    assert "CERTIFICATE_VERIFY_FAILED" in error
    assert "Topology Description" not in error  # the reason, not the driver's internals
    assert write.status_code == 503
    assert write.json()["error"] == "service.starting"
    assert proxy.refused, "the service never reached the TLS listener"


def test_a_server_that_asks_for_a_client_certificate_gets_none(
    ferretdb_server: FerretDB,
    certs: Certificates,
    tmp_path: Path,
    unique_name: str,
) -> None:
    with TlsProxy(_port(ferretdb_server), certs.server, certs.server_key, certs.client) as proxy:
        proc = _service(tmp_path, _url(proxy.port, tlsCAFile=certs.server), unique_name)
        try:
            with proc.client() as api:
                ready = api.get("/ready")
        finally:
            proc.stop()
    assert ready.status_code == 503
    assert ready.json()["status"] == "starting"
    assert any("CERTIFICATE" in reason.upper() for reason in proxy.refused), proxy.refused
