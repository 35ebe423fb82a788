"""Request bounds as ASGI middleware: head and body size limits and a body deadline (issue 12, item 5).

* A request head (path, query and headers) larger than `max_header_bytes` is answered 431. The
  HTTP parser already refuses to *buffer* more than that of an incomplete head; this also covers
  a large head that arrives in one piece.

* A body declared larger than `max_body_bytes` (Content-Length) is answered 413 before a byte
  of it is read; a chunked body is counted as it streams and cut off with 413 as soon as it
  passes the limit, so a 200 MB body costs at most `max_body_bytes` of memory.
* The whole body must arrive within `body_timeout_s` of the request's start, else 408: a client
  that trickles a body one byte at a time cannot hold a worker. (The time to send the request
  *headers* is bounded by the server protocol, `vidseek.serve.server`.)

Both answers carry ``Connection: close``: the rest of an oversized or stalled body is never read.
"""
from __future__ import annotations

import asyncio
import json
from typing import Any, Awaitable, Callable

from starlette.exceptions import HTTPException

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: Longest Content-Length value read as a number; longer is "too large" without calling int()
#: (Python refuses to parse integers of more than 4,300 digits).
_MAX_LENGTH_DIGITS = 18


def too_large_message(size: str, limit: int) -> str:
    return f"request body is {size} bytes; this server accepts at most {limit} bytes"


def declared_length(scope: Scope) -> int | None:
    """The Content-Length header as a number (None when absent or not a plain number)."""
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            text = value.decode("latin-1").strip()
            if not text.isdigit():
                return None
            return int(text) if len(text) <= _MAX_LENGTH_DIGITS else 1 << 63
    return None


class RequestLimits:
    """Pure ASGI middleware (no body buffering of its own) enforcing the two bounds above."""

    def __init__(self, app: ASGIApp, *, max_header_bytes: int, max_body_bytes: int, body_timeout_s: float):
        self.app = app
        self.max_header_bytes = max_header_bytes
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        head_bytes = len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"") + \
            sum(len(name) + len(value) + 4 for name, value in scope.get("headers", ()))
        if head_bytes > self.max_header_bytes:
            await _send_json(send, 431, f"request head is {head_bytes} bytes; this server accepts at most "
                                        f"{self.max_header_bytes} bytes of path, query and headers")
            return
        declared = declared_length(scope)
        if declared is not None and declared > self.max_body_bytes:
            await _send_json(send, 413, too_large_message(str(declared), self.max_body_bytes))
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.body_timeout_s
        received = 0
        body_done = False

        async def bounded_receive() -> Message:
            nonlocal received, body_done
            if body_done:  # later receives wait for the disconnect of a long response: no deadline
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                raise HTTPException(408, f"the request body did not arrive within {self.body_timeout_s:g} s; "
                                         f"send it at once", headers={"Connection": "close"}) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise HTTPException(413, too_large_message(f"more than {self.max_body_bytes}", self.max_body_bytes),
                                        headers={"Connection": "close"})
                body_done = not message.get("more_body", False)
            else:
                body_done = True
            return message

        await self.app(scope, bounded_receive, send)


async def _send_json(send: Send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
