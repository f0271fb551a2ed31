"""uvicorn's HTTP protocol with the service's JSON error body for requests it cannot parse,
and a bound on the size of a request's head.

A request line or header that the HTTP parser refuses never reaches the application, so
uvicorn answers it itself: 400 with a plain-text body. Clients of this API read one JSON
error shape (twin_service.api.errors); this gives them that shape there too.

Neither uvicorn nor the parser bounds the headers: a 10 MB header, or 200,000 small ones,
were read whole and answered. A head larger than ``limits.max_head_bytes`` is answered 431
and the connection closed, WebSocket handshakes included.
"""

from __future__ import annotations

from twin_service.errors import BadRequest, HeadTooLarge, TwinServiceError
from twin_service.twin.jsonvalue import dumps_bytes

try:  # what uvicorn's "auto" picks: httptools when installed, else h11
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as _Base
except ImportError:  # pragma: no cover - uvicorn[standard] brings httptools
    from uvicorn.protocols.http.h11_impl import H11Protocol as _Base  # type: ignore[assignment]

_REASONS = {400: b"Bad Request", 431: b"Request Header Fields Too Large"}


class _HeadTooLargeSignal(Exception):
    """Raised in a parser callback to stop parsing a head past the bound."""


class JsonErrorHttpProtocol(_Base):
    #: Bytes of a request line and headers past which the request is refused.
    max_head_bytes = 64 * 1024
    #: Bytes of the current request's head: its parts as parsed (url, headers), and the
    #: reads of the socket that began and ended inside it (a header still being read).
    _in_head = False
    _head_bytes = 0
    _streamed = 0

    @classmethod
    def bounded(cls, max_head_bytes: int) -> type[JsonErrorHttpProtocol]:
        """This protocol with another bound on a request's head (for uvicorn's ``http``)."""
        return type(cls.__name__, (cls,), {"max_head_bytes": max_head_bytes})

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = True
        self._head_bytes = self._streamed = 0

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value) + 4)
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        super().on_headers_complete()

    def _count(self, size: int) -> None:
        self._head_bytes += size
        if self._head_bytes > self.max_head_bytes:
            # The parser stops at a callback's exception; send_400_response answers.
            raise _HeadTooLargeSignal

    def data_received(self, data: bytes) -> None:
        # The parser hands over a header only once it is whole: one header of 10 MB would be
        # read whole before on_header saw it. Reads that began and ended inside a head
        # count too, so that it cannot grow past the bound by more than a read or two.
        inside = self._in_head
        super().data_received(data)
        if inside and self._in_head and not self.transport.is_closing():
            self._streamed += len(data)
            if self._streamed > self.max_head_bytes:
                self._refuse(self._head_too_large())

    def _head_too_large(self) -> HeadTooLarge:
        return HeadTooLarge(
            "The request line and headers exceed limits.max_head_bytes "
            f"({self.max_head_bytes} bytes)."
        )

    def send_400_response(self, msg: str) -> None:
        if self._head_bytes > self.max_head_bytes:
            self._refuse(self._head_too_large())
            return
        self._refuse(BadRequest(f"{msg} The request line or a header is not valid HTTP/1.1."))

    def _refuse(self, error: TwinServiceError) -> None:
        """Answer ``error`` in the one JSON shape, before the application, and close."""
        body = dumps_bytes(error.to_body())
        head = [b"HTTP/1.1 %d %s\r\n" % (error.status, _REASONS[error.status])]
        for name, value in self.server_state.default_headers:
            head += [name, b": ", value, b"\r\n"]
        head += [
            b"content-type: application/json\r\n",
            b"content-length: %d\r\n" % len(body),
            b"connection: close\r\n\r\n",
        ]
        self.transport.write(b"".join(head) + body)
        self.transport.close()
