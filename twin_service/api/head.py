"""HEAD requests, answered as the GET of the same resource without its body.

RFC 9110 (section 9.3.2): HEAD is GET without the content, with the headers GET would send
(Content-Length included), and every general-purpose server supports it. FastAPI's routes
take only the methods they declare, so each GET route answered HEAD 405. Rather than a
HEAD route beside each GET, the application serves a HEAD as the GET it stands for, with
the same authentication, preconditions and errors, and this adapter keeps the body from
the client: the answer ends with its headers. A streamed answer (Server-Sent Events) ends
there too, and the endpoint learns that its client is gone (as from a closed connection),
so that it stops.
"""

from __future__ import annotations

from starlette.types import Message, Receive, Scope, Send

#: The scope key that holds the method a request came with, when it is served as another
#: (the 405 names the client's method).
ASKED_METHOD = "twin_service.asked_method"

_DISCONNECT: Message = {"type": "http.disconnect"}


def as_get(scope: Scope, receive: Receive, send: Send) -> tuple[Scope, Receive, Send]:
    """The scope, receive and send with which the application serves the HEAD request of
    ``scope`` as a GET.

    The server keeps the original scope (uvicorn sends no body to a HEAD either); the
    application gets a copy that says GET.
    """
    answered = False

    async def send_head(message: Message) -> None:
        nonlocal answered
        if answered:  # the body, or the rest of a stream: nobody's to read
            return
        if message["type"] == "http.response.start":
            await send(message)
            answered = True
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        await send(message)

    async def receive_head() -> Message:
        if answered:
            return _DISCONNECT
        return await receive()

    return {**scope, "method": "GET", ASKED_METHOD: "HEAD"}, receive_head, send_head
