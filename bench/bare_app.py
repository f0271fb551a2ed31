"""The baseline of ``bench/rest.py``: FastAPI doing the same JSON work as a twin, no storage.

Run by the benchmark as ``uvicorn bench.bare_app:app`` with the same server options as the
service (one worker, uvloop, httptools, no access log). It answers the same URLs:

- ``GET /api/v1/twins/{twin_id}`` serialises a constant twin-shaped document on every call;
- ``PATCH /api/v1/twins/{twin_id}`` decodes the body into a dict, merges its ``desired``
  into a copy of that document and serialises the result.

So the ratio twin/bare is the cost of everything the service adds: authentication,
dependencies, the pure core, the store and its threads.
"""

from __future__ import annotations

import json
from typing import Any

import orjson
from fastapi import FastAPI, Request, Response

_STAMP = {"modified": "2025-01-01T00:00:00.000Z", "revision": 1}


def sample_document(twin_id: str) -> dict[str, Any]:
    """A document shaped and sized like a benchmark twin after ``bench.rest.seed_body``."""
    return {
        "twinId": twin_id,
        "namespace": twin_id.split(":", 1)[0],
        "attributes": {"site": "plant-3", "model": "P-100", "serial": "SN-00042", "floor": 2},
        "desired": {"fan": {"speed": 3}, "mode": "auto", "setpoint": 21.5},
        "reported": {
            "fan": {"speed": 2},
            "mode": "auto",
            "setpoint": 21.0,
            "firmware": "1.4.2",
        },
        "live": {},
        "delta": {"fan": {"speed": 3}, "setpoint": 21.5},
        "connection": {"status": "unknown", "since": _STAMP["modified"], "lastSeen": None},
        "lifecycle": {},
        "revision": 1,
        "desiredVersion": 1,
        "reportedVersion": 1,
        "created": _STAMP["modified"],
        "modified": _STAMP["modified"],
        "metadata": {
            "desired": {"fan": {"speed": _STAMP}, "mode": _STAMP, "setpoint": _STAMP},
            "reported": {
                "fan": {"speed": _STAMP},
                "mode": _STAMP,
                "setpoint": _STAMP,
                "firmware": _STAMP,
            },
        },
    }


def _dumps(value: Any) -> bytes:
    # The service's encoder (twin_service.twin.jsonvalue.dumps_bytes): orjson, compact UTF-8.
    return orjson.dumps(value)


_DOCUMENT = sample_document("bench:pump-00000")

app = FastAPI(title="bare baseline", docs_url=None, redoc_url=None, openapi_url=None)


@app.get("/api/v1/twins/{twin_id}")
async def get_twin(twin_id: str) -> Response:
    return Response(_dumps({**_DOCUMENT, "twinId": twin_id}), media_type="application/json")


@app.patch("/api/v1/twins/{twin_id}")
async def patch_twin(twin_id: str, request: Request) -> Response:
    body = json.loads(await request.body())
    if not isinstance(body, dict):
        return Response(status_code=400)
    desired = body.get("desired")
    doc = {**_DOCUMENT, "twinId": twin_id}
    if isinstance(desired, dict):
        doc["desired"] = {**_DOCUMENT["desired"], **desired}
    return Response(_dumps(doc), media_type="application/json")


@app.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}
