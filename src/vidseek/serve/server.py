"""Running the app under uvicorn with the bounds a public port needs (issue 12, item 5).

* **Header deadline:** a connection must deliver a complete request head within
  `HEADER_TIMEOUT_S` of opening (or of its previous response); uvicorn alone waits forever for a
  client that sends one byte a second (slowloris), since its keep-alive timer stops at the first
  byte. `HeaderDeadlineProtocol` closes such a connection.
* Idle keep-alive connections close after `KEEP_ALIVE_S`; the parser buffers at most
  `MAX_HEADER_BYTES` of an incomplete request head (400 beyond; a complete head that large is
  431 from `vidseek.serve.limits`); beyond `MAX_CONCURRENCY`
  connections + requests uvicorn answers 503 instead of queueing without bound.
* The port is bound before the app is announced, so a busy or invalid port is one line.
The request body's own bounds (size, deadline) are ASGI middleware: `vidseek.serve.limits`.
"""
from __future__ import annotations

import asyncio
import socket
from typing import Any, Callable

from uvicorn.protocols.http.h11_impl import H11Protocol

from vidseek.errors import ConfigError
from vidseek.serve.app import MAX_HEADER_BYTES

HEADER_TIMEOUT_S = 10.0
KEEP_ALIVE_S = 5
MAX_CONCURRENCY = 256


class HeaderDeadlineProtocol(H11Protocol):
    """uvicorn's h11 protocol, plus: close a connection that has not completed a request head
    within `header_timeout_s` of opening or of its last response, however it trickles bytes."""

    header_timeout_s: float = HEADER_TIMEOUT_S

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_deadline: asyncio.TimerHandle | None = None
        self._arm_header_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_header_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_deadline()
        super().connection_lost(exc)

    def _arm_header_deadline(self) -> None:
        self._cancel_header_deadline()
        if not self.transport.is_closing():
            self._header_deadline = self.loop.call_later(self.header_timeout_s, self._header_deadline_passed)

    def _cancel_header_deadline(self) -> None:
        deadline = getattr(self, "_header_deadline", None)
        if deadline is not None:
            deadline.cancel()
            self._header_deadline = None

    def _header_deadline_passed(self) -> None:
        self._header_deadline = None
        waiting_for_a_request = self.cycle is None or self.cycle.response_complete
        if waiting_for_a_request and not self.transport.is_closing():
            self.transport.close()


def check_port(port: int) -> None:
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port {port} is not a TCP port: use 1-65535 (or 0 for any free port)")


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, or a one-line ConfigError saying why not and what to do."""
    check_port(port)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as err:
        raise ConfigError(f"cannot resolve --host {host!r} ({err}); pass an address such as 127.0.0.1") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # no wait after a restart; a live listener still blocks
        sock.bind(address)
        sock.listen(2048)
    except OSError as err:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port} ({err.strerror or err}); stop what uses the port or "
                          f"pick another with --port") from None
    sock.set_inheritable(True)
    return sock


def server_config(app: Any, **overrides: Any) -> Any:
    """uvicorn settings with the bounds above (the app's own log lines stay at warning)."""
    import uvicorn

    settings: dict[str, Any] = dict(http=HeaderDeadlineProtocol, timeout_keep_alive=KEEP_ALIVE_S,
                                    h11_max_incomplete_event_size=MAX_HEADER_BYTES, limit_concurrency=MAX_CONCURRENCY,
                                    log_level="warning", lifespan="on")
    settings.update(overrides)
    return uvicorn.Config(app, **settings)


def shown_url(host: str, sock: socket.socket) -> str:
    """The URL a bound listening socket answers on (the real port when --port 0 was asked)."""
    shown_host = f"[{host}]" if ":" in host else host
    return f"http://{shown_host}:{sock.getsockname()[1]}/"


def serve(make_app: Callable[[], Any], host: str, port: int, announce: Callable[[str], None]) -> None:
    """Bind host:port (failing in one line, before the slow index open), build the app, call
    `announce` with the URL, serve until interrupted."""
    import uvicorn

    sock = bind(host, port)
    try:
        app = make_app()
    except BaseException:
        sock.close()
        raise
    announce(shown_url(host, sock))
    uvicorn.Server(server_config(app)).run(sockets=[sock])
