"""uvicorn's HTTP protocol with the service's JSON error body for requests it cannot parse,
and bounds on the size of a request's head and the time a request takes to arrive.

A request line or header that the HTTP parser refuses never reaches the application, so
uvicorn answers it itself: 400 with a plain-text body. Clients of this API read one JSON
error shape (twin_service.api.errors); this gives them that shape there too.

Neither uvicorn nor the parser bounds the headers: a 10 MB header, or 200,000 small ones,
were read whole and answered. A head larger than ``limits.max_head_bytes`` is answered 431
and the connection closed, WebSocket handshakes included.

Nor does uvicorn bound the time a request takes to arrive: a connection that sent nothing,
a header a byte at a time, or a body that stopped half-way was held for good (a few
thousand such, and the process has no descriptors left). A head must be complete
``limits.read_timeout_seconds`` after the connection opened (or, on a kept-alive one, after
its next request began), and a body may not pause longer than that: else 408 and the
connection closed.

Each head and body has its bound, but not all of them together: 300 clients each stopping
short of a 1 MB body held 295 MB, for as long as they sent a byte now and then. The heads
and bodies still arriving count in ``limits.incoming_bytes`` (with the WebSocket messages,
api.websocket_protocol); the connection whose bytes pass it is answered 503.

Those answers are written here, past the application's HEAD handling (api.head) and
uvicorn's: to a HEAD they are the headers alone (RFC 9110 section 9.3.2), Content-Length
included. And past its request metrics: each is counted here, under the route ``refused``,
except a body's, whose request the application counts as it lets go of it, with the status
given here (:func:`answered_status`).

And the other way round: a response that opts in with :func:`cut_when_unread` (an event
stream, which has no end of its own) has its connection cut once its client leaves what
is written to it unread for ``UNREAD_SECONDS`` (api.closing), as a WebSocket's is. Nor does
such a response end when the service stops: uvicorn's graceful shutdown tells each
connection (``shutdown``), which closes a WebSocket with 1012 but only marks an HTTP response
under way as the connection's last, and the stream ran on until the shutdown timeout cut it
mid-body. The same call reaches a response that asked for it (:func:`on_shutdown`).
"""

from __future__ import annotations

import asyncio
import enum
import re
import time
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

from starlette.requests import Request

from twin_service.api.closing import QuietClose, UnreadCut
from twin_service.api.errors import error_headers
from twin_service.budget import ByteBudget
from twin_service.errors import (
    BadRequest,
    Busy,
    HeadTooLarge,
    RequestTimeout,
    TwinServiceError,
)
from twin_service.metrics import RequestMetrics
from twin_service.twin.jsonvalue import dumps_bytes

try:  # what uvicorn's "auto" picks: httptools when installed, else h11
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as _Base

    #: The bounds below follow httptools' callbacks; h11 has none of them (and bounds the
    #: size of a head itself).
    _BOUNDED = True
except ImportError:  # pragma: no cover - uvicorn[standard] brings httptools
    from uvicorn.protocols.http.h11_impl import H11Protocol as _Base  # type: ignore[assignment]

    _BOUNDED = False

EXTENSION = "twin.http.unread"
#: The route of the requests refused before any route was sought.
REFUSED = "refused"


class _HeadTooLargeSignal(Exception):
    """Raised in a parser callback to stop parsing a head past the bound."""


class _InvalidHeadSignal(Exception):
    """Raised in a parser callback to stop parsing a head the parser took but HTTP does
    not (``_invalid_head`` says why)."""


#: RFC 9110 section 7.2: ``uri-host [ ":" port ]``, the host an IP literal or a reg-name
#: (RFC 3986 section 3.2.2); empty for a target with no authority.
_HOST = re.compile(
    rb"(?:\[[0-9A-Za-z:._~!$&'()*+,;=-]+\]|(?:[0-9A-Za-z._~!$&'()*+,;=-]|%[0-9A-Fa-f]{2})*)"
    rb"(?::[0-9]*)?"
)


def host_error(http_version: str, headers: list[tuple[bytes, bytes]]) -> BadRequest | None:
    """Why a request with these headers (names in lower case) has not the one valid Host
    RFC 9112 section 3.2 asks for, to be answered 400; None if it has. llhttp checks none
    of it, and uvicorn served such a request (h11 refuses it itself)."""
    hosts = [value for name, value in headers if name == b"host"]
    if len(hosts) > 1:
        return BadRequest(f"The request has {len(hosts)} Host headers; one at most.")
    if not hosts:
        if http_version != "1.1":  # HTTP/1.0 had no Host
            return None
        return BadRequest("An HTTP/1.1 request needs a Host header.")
    if _HOST.fullmatch(hosts[0]) is None:
        host = hosts[0].decode("latin-1")
        return BadRequest(f"The Host header {host!r} is not host[:port].")
    return None


class _Reading(enum.Enum):
    HEAD = "head"
    BODY = "body"


class JsonErrorHttpProtocol(_Base):
    #: Bytes of a request line and headers past which the request is refused.
    max_head_bytes = 64 * 1024
    #: Whether the request being read came as HEAD, and the method the parser held when it
    #: began (see :meth:`_asked_head`).
    _head_asked = False
    _method_before = b""
    #: The current request's method once whole (None before), and when its reading began.
    _method: bytes | None = None
    _began = 0.0
    #: Why the head being read is refused, once a callback found it (_InvalidHeadSignal).
    _invalid_head: BadRequest | None = None
    #: Where the requests refused here are counted (the application's).
    requests: RequestMetrics | None = None
    #: Seconds a head may take, and a body may pause (see the module's documentation).
    read_timeout = 30.0
    #: Bytes of the current request's head as parsed (url, headers).
    _head_bytes = 0
    #: What part of a request is awaited (None: no request is arriving), its timer, and
    #: when the last bytes of a body came.
    _reading: _Reading | None = None
    _timer: asyncio.TimerHandle | None = None
    _last_read = 0.0

    #: Bytes of requests still arriving, of every connection of the process (WebSocket
    #: messages too, api.websocket_protocol), and this connection's part: the reads of the
    #: socket that began and ended inside the current head (a header still being read),
    #: or the body as far as it came.
    incoming = ByteBudget(64 * 1024 * 1024)
    _held = 0
    #: After an answer before the application, what closes the socket (see api.closing).
    _closing: QuietClose | None = None
    #: Once a response asked for it (:func:`cut_when_unread`), what cuts the connection if
    #: its client stops reading; kept for the connection's life: what the stream left
    #: unread stays in the buffer after its response ends.
    _unread: UnreadCut | None = None
    #: What the responses under way on this connection do when the server begins its
    #: graceful shutdown (:func:`on_shutdown`), and whether it has.
    _on_shutdown: list[Callable[[], None]] | None = None
    _shut_down = False

    @classmethod
    def bounded(
        cls,
        max_head_bytes: int,
        read_timeout: float,
        incoming: ByteBudget,
        requests: RequestMetrics | None = None,
    ) -> type[JsonErrorHttpProtocol]:
        """This protocol with other bounds (for uvicorn's ``http``), counting its refusals
        in ``requests``."""
        bounds = {
            "max_head_bytes": max_head_bytes,
            "read_timeout": read_timeout,
            "incoming": incoming,
            "requests": requests,
        }
        return type(cls.__name__, (cls,), bounds)

    # -- time ------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if _BOUNDED:  # else no callback would ever stop the timer
            self._await_head()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._unread is not None:
            self._unread.cancel()
        self._stop_timer()
        self._hold(0)
        if self._closing is not None:
            self._closing.cancel()
        super().connection_lost(exc)

    def _await_head(self) -> None:
        self._reading = _Reading.HEAD
        self._began = time.perf_counter()
        if self._timer is None:
            self._timer = self.loop.call_later(self.read_timeout, self._timed_out)

    def _stop_timer(self) -> None:
        self._reading = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def on_body(self, body: bytes) -> None:
        # Not a timer per piece: the timer looks at this when it fires.
        self._last_read = self.loop.time()
        cycle = self.cycle  # None before a first request's head is whole, or an upgrade's
        if cycle is not None and not cycle.response_complete:  # else uvicorn drops it
            # Held until the body is whole: the application reads it all (api.deps).
            self._hold(self._held + len(body))
        super().on_body(body)

    def on_message_complete(self) -> None:
        self._stop_timer()
        self._hold(0)
        super().on_message_complete()

    def on_response_complete(self) -> None:
        # Answered before its body was whole (a refusal): the application let go of it.
        self._hold(0)
        super().on_response_complete()

    def handle_websocket_upgrade(self) -> None:
        self._stop_timer()  # the connection is the WebSocket protocol's from here
        super().handle_websocket_upgrade()

    def _timed_out(self) -> None:
        self._timer = None
        if self._reading is None or self.transport.is_closing():
            return
        if self._reading is _Reading.HEAD:
            what = "The request line and headers did not arrive within"
        else:
            if self.flow.read_paused:
                # The service stopped reading (flow control, the application behind): the
                # pause is not the client's.
                self._last_read = self.loop.time()
            paused = self.loop.time() - self._last_read
            if paused < self.read_timeout:
                self._timer = self.loop.call_later(self.read_timeout - paused, self._timed_out)
                return
            cycle = self.cycle
            if cycle is not None and cycle.response_started:
                # Answered without the rest of its body (a refusal): nothing to say.
                self.transport.close()
                return
            what = "The request body paused for longer than"
        seconds = f"limits.read_timeout_seconds ({self.read_timeout:g} s)."
        self._refuse(RequestTimeout(f"{what} {seconds}"))

    def _cut_when_unread(self) -> None:
        if self._unread is None:
            self._unread = UnreadCut(self.loop, self.transport)
            if self.flow.write_paused:
                self._unread.paused()

    def shutdown(self) -> None:
        self._shut_down = True
        super().shutdown()  # a response under way is now the connection's last
        for callback in list(self._on_shutdown or ()):
            callback()

    def _notify_shutdown(self, callback: Callable[[], None]) -> Callable[[], None]:
        if self._shut_down:  # before the response began: it ends at once
            callback()
            return lambda: None
        if self._on_shutdown is None:
            self._on_shutdown = []
        callbacks = self._on_shutdown
        callbacks.append(callback)
        return lambda: callbacks.remove(callback)

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._unread is not None:
            self._unread.paused()

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._unread is not None:
            self._unread.resumed()

    # -- size ------------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        extensions = self.scope.setdefault("extensions", {})
        if extensions is not None:
            extensions[EXTENSION] = {
                "cut_when_unread": self._cut_when_unread,
                "on_shutdown": self._notify_shutdown,
            }
        self._await_head()  # a kept-alive connection's next request
        self._head_bytes = 0  # and _held is 0 since the last head was whole
        self._head_asked = False
        self._method_before = self.parser.get_method()
        self._method = None
        self._invalid_head = None

    def on_url(self, url: bytes) -> None:
        self._method = self.parser.get_method()  # whole here
        self._head_asked = self._method == b"HEAD"
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value) + 4)
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        # Checked while the head is still the one read (_refuse), WebSocket handshakes too.
        self._invalid_head = host_error(self.parser.get_http_version(), self.headers)
        if self._invalid_head is not None:
            raise _InvalidHeadSignal  # the parser stops; send_400_response answers
        self._hold(0)
        self._reading = _Reading.BODY
        self._last_read = self.loop.time()
        super().on_headers_complete()

    def _count(self, size: int) -> None:
        self._head_bytes += size
        if self._head_bytes > self.max_head_bytes:
            # The parser stops at a callback's exception; send_400_response answers.
            raise _HeadTooLargeSignal

    def data_received(self, data: bytes) -> None:
        if self._closing is not None:  # refused: dropped
            self._closing.heard()
            return
        # The parser hands over a header only once it is whole: one header of 10 MB would be
        # read whole before on_header saw it. Reads that began and ended inside a head
        # count too, so that it cannot grow past the bound by more than a read or two.
        inside = self._reading is _Reading.HEAD
        super().data_received(data)
        if self.transport.is_closing():
            return
        if inside and self._reading is _Reading.HEAD:
            self._hold(self._held + len(data))
            if self._held > self.max_head_bytes:
                self._refuse(self._head_too_large())
                return
        if self._held and self.incoming.used > self.incoming.limit:
            self._refuse(
                Busy(
                    "The requests and messages clients are still sending hold "
                    "limits.incoming_bytes of this process; try again later."
                )
            )

    def _hold(self, size: int) -> None:
        """Count ``size`` bytes of a request still arriving for this connection (0: none)."""
        self._held = self.incoming.move(self._held, size)

    def _head_too_large(self) -> HeadTooLarge:
        return HeadTooLarge(
            "The request line and headers exceed limits.max_head_bytes "
            f"({self.max_head_bytes} bytes)."
        )

    # -- answers ---------------------------------------------------------------------------

    def send_400_response(self, msg: str) -> None:
        if self._head_bytes > self.max_head_bytes:
            self._refuse(self._head_too_large())
            return
        error = self._invalid_head or BadRequest(msg)
        self._refuse(
            BadRequest(f"{error.message} The request line or a header is not valid HTTP/1.1.")
        )

    def _asked_head(self) -> bool:
        """Whether the request refused came as HEAD. Its method is known once its target
        began (``on_url``); a request refused before that (a target the parser refuses) is
        a HEAD when the parser's method changed to HEAD: it keeps the previous request's
        until it has read the new one's (after a HEAD on the connection it cannot tell, and
        the body is sent, which a client closes the connection on anyway)."""
        if not _BOUNDED or self._reading is None:
            return False
        if self._head_asked:
            return True
        return self._method_before != b"HEAD" and self.parser.get_method() == b"HEAD"

    def _refuse(self, error: TwinServiceError) -> None:
        """Answer ``error`` in the one JSON shape, before the application, and close."""
        # The client may still be sending the request, so the connection is read on
        # (api.closing), unless an answer has begun on it: an earlier request's, which
        # must not follow this one, or this request's own. The application reading a
        # refused body learns the client is gone, as it would from a closed connection.
        cycle = self.cycle
        if self._reading is _Reading.BODY and cycle is not None:
            drain = not cycle.response_started
            if drain:  # the application's answer reaches nobody: this one is counted
                _extension(cycle.scope)["refused"] = error.status
            cycle.disconnected = True
            cycle.message_event.set()
        else:  # a head: the cycle, if any, is an earlier request's
            drain = cycle is None or cycle.response_complete
            if self.requests is not None:
                method = "other" if self._method is None else self._method.decode("latin-1")
                elapsed = time.perf_counter() - self._began
                self.requests.observe(method, REFUSED, error.status, elapsed)
        content = not self._asked_head()  # before _stop_timer, which ends the reading
        self._stop_timer()
        self._hold(0)
        body = dumps_bytes(error.to_body())
        status = HTTPStatus(error.status)
        head = [b"HTTP/1.1 %d %s\r\n" % (status, status.phrase.encode())]
        for name, value in self.server_state.default_headers:
            head += [name, b": ", value, b"\r\n"]
        head += [
            b"content-type: application/json\r\n",
            b"content-length: %d\r\n" % len(body),
            *(b"%s: %s\r\n" % (n.encode(), v.encode()) for n, v in error_headers(error).items()),
            b"connection: close\r\n\r\n",
        ]
        self.transport.write(b"".join(head) + (body if content else b""))
        if drain:
            self.flow.resume_reading()  # paused while the application was behind
            self._closing = QuietClose(self.loop, self.transport, self.read_timeout)
        else:
            self.transport.close()


def _extension(scope: Any) -> dict[str, Any]:
    extension = (scope.get("extensions") or {}).get(EXTENSION)
    return extension if isinstance(extension, dict) else {}


def answered_status(scope: Any, status: int) -> int:
    """The status the client of ``scope`` got: the refusal's when this protocol refused
    its body half-way (the application's answer, 499, then reached nobody)."""
    refused: int = _extension(scope).get("refused", status)
    return refused


def cut_when_unread(request: Request) -> None:
    """Have the connection of ``request`` cut if its client leaves what is written to it
    unread for ``UNREAD_SECONDS`` (api.closing): for a response with no end of its own."""
    extension = _extension(request.scope)
    if extension:
        extension["cut_when_unread"]()


def on_shutdown(request: Request, callback: Callable[[], None]) -> Callable[[], None]:
    """Have ``callback`` called when the server begins its graceful shutdown (at once if it
    has), for a response with no end of its own: the call that closes a WebSocket with
    1012. Returns what unregisters it, for when the response ends first (a connection
    kept alive would hold every earlier stream's callback)."""
    extension = _extension(request.scope)
    if extension:
        unregister: Callable[[], None] = extension["on_shutdown"](callback)
        return unregister
    return lambda: None
