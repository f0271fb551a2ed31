"""The test node behind an HTTPS gateway that asks for an API key.

The test node has no security features (tests/servers/search_engine.py), so HTTPS and
API-key authentication come from a gateway in front of it, as an ingress or Elastic Cloud's
proxy puts them in front of a cluster: a real TLS server with a certificate of its own CA,
forwarding every request with the right key to the real node and refusing the others the
way Elasticsearch does (401 ``security_exception``).
"""

from __future__ import annotations

import ssl
from pathlib import Path

import aiohttp
from aiohttp import web

from tests.servers.process import free_port

# Set by the gateway from its own reading of the body: the node's would not match once
# aiohttp has decompressed it.
_DROPPED = {"content-length", "content-encoding", "transfer-encoding", "connection"}
_PRODUCT = {"X-Elastic-Product": "Elasticsearch"}


class HttpsGateway:
    def __init__(self, upstream: str, cert: Path, key: Path, api_key: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.api_key = api_key
        self._tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._tls.load_cert_chain(cert, key)
        self.port = free_port()
        self.forwarded = 0
        self.refused = 0
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    async def start(self) -> HttpsGateway:
        self._session = aiohttp.ClientSession(auto_decompress=True)
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._forward)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port, ssl_context=self._tls).start()
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    async def _forward(self, request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != f"ApiKey {self.api_key}":
            self.refused += 1
            reason = "missing or unknown API key"
            body = {"error": {"type": "security_exception", "reason": reason}, "status": 401}
            return web.json_response(body, status=401, headers=_PRODUCT)
        self.forwarded += 1
        assert self._session is not None
        headers = {
            name: value
            for name, value in request.headers.items()
            if name.lower() in ("content-type", "accept")
        }
        async with self._session.request(
            request.method,
            f"{self.upstream}{request.rel_url}",
            data=await request.read(),
            headers=headers,
        ) as answer:
            body_bytes = await answer.read()
            kept = {k: v for k, v in answer.headers.items() if k.lower() not in _DROPPED}
            return web.Response(body=body_bytes, status=answer.status, headers=kept)
