"""uvicorn's HTTP protocol with the service's JSON error body for requests it cannot parse.

A request line or header that the HTTP parser refuses never reaches the application, so
uvicorn answers it itself: 400 with a plain-text body. Clients of this API read one JSON
error shape (twin_service.api.errors); this gives them that shape there too.
"""

from __future__ import annotations

from twin_service.errors import BadRequest
from twin_service.twin.jsonvalue import dumps_bytes

try:  # what uvicorn's "auto" picks: httptools when installed, else h11
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as _Base
except ImportError:  # pragma: no cover - uvicorn[standard] brings httptools
    from uvicorn.protocols.http.h11_impl import H11Protocol as _Base  # type: ignore[assignment]


class JsonErrorHttpProtocol(_Base):
    def send_400_response(self, msg: str) -> None:
        error = BadRequest(f"{msg} The request line or a header is not valid HTTP/1.1.")
        body = dumps_bytes(error.to_body())
        head = [b"HTTP/1.1 400 Bad Request\r\n"]
        for name, value in self.server_state.default_headers:
            head += [name, b": ", value, b"\r\n"]
        head += [
            b"content-type: application/json\r\n",
            b"content-length: %d\r\n" % len(body),
            b"connection: close\r\n\r\n",
        ]
        self.transport.write(b"".join(head) + body)
        self.transport.close()
