"""Issue 12, HTTP half, over real sockets: a real uvicorn on 127.0.0.1 with vidseek's settings
(`vidseek.serve.server`) must drop slow and idle clients (slowloris), refuse oversized bodies
without reading them, and `vidseek serve` must fail in one line on a busy or invalid port.
Every loop here is bounded in count and time."""
from __future__ import annotations

import socket
import sys
import threading
import time

import pytest

from reliability.http_index import shared_http_index
from vidseek.serve.app import create_app
from vidseek.serve.server import HeaderDeadlineProtocol, bind, server_config

HEADER_TIMEOUT_S = 2.0  # shortened for the test (the default is 10 s)
ATTACK_LIMIT_S = 12.0  # the test gives up (and fails) after this long


class QuickDeadline(HeaderDeadlineProtocol):
    header_timeout_s = HEADER_TIMEOUT_S


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import uvicorn

    index, _ = shared_http_index(tmp_path_factory)
    sock = bind("127.0.0.1", 0)
    instance = uvicorn.Server(server_config(create_app(index), http=QuickDeadline))
    thread = threading.Thread(target=instance.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    for _ in range(600):  # up to 60 s for startup on a loaded machine
        if instance.started:
            break
        time.sleep(0.1)
    assert instance.started
    yield sock.getsockname()[:2]
    instance.should_exit = True
    thread.join(timeout=30)
    sock.close()


def request(address, raw: bytes, timeout: float = 30.0) -> bytes:
    """Send raw bytes, return everything the server sends until it closes or goes quiet."""
    with socket.create_connection(address, timeout=timeout) as conn:
        conn.sendall(raw)
        return read_all(conn)


def read_all(conn: socket.socket) -> bytes:
    data = b""
    try:
        while chunk := conn.recv(65536):
            data += chunk
    except (socket.timeout, ConnectionResetError):
        pass
    return data


def health(address) -> bytes:
    return request(address, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")


def test_slowloris_and_idle_sockets_are_closed_by_the_server(server):
    """20 sockets send a request head one byte per second, 10 more send nothing: the server
    closes all 30 (uvicorn alone held them for as long as the client liked)."""
    head = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 200
    slow = [socket.create_connection(server, timeout=5) for _ in range(20)]
    idle = [socket.create_connection(server, timeout=5) for _ in range(10)]
    for conn in slow + idle:
        conn.setblocking(False)
    began = time.monotonic()
    open_ = set(range(len(slow) + len(idle)))
    closed_after: dict[int, float] = {}
    healthy_during_attack = None
    position = 0
    while open_ and time.monotonic() - began < ATTACK_LIMIT_S:
        for number in sorted(open_):
            conn = (slow + idle)[number]
            try:
                if number < len(slow):
                    conn.send(head[position:position + 1])
                if conn.recv(1024) == b"":
                    raise ConnectionResetError
            except BlockingIOError:
                continue  # still open, nothing to read
            except OSError:  # closed by the server (EOF, reset or broken pipe)
                open_.discard(number)
                closed_after[number] = time.monotonic() - began
        if healthy_during_attack is None:
            healthy_during_attack = health(server)
        position += 1
        time.sleep(1.0)
    for conn in slow + idle:
        conn.close()
    assert not open_, f"{len(open_)} of 30 slow/idle sockets still open after {ATTACK_LIMIT_S} s"
    assert min(closed_after.values()) >= HEADER_TIMEOUT_S - 0.5  # closed by the deadline, not at once
    assert healthy_during_attack.startswith(b"HTTP/1.1 200")


def test_a_declared_200_mb_body_is_refused_unread(server):
    head = (f"POST /search HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {200 * 1024 * 1024}\r\n\r\n").encode()
    reply = request(server, head + b'{"q": "red", "pad": "' + b" " * 1000)
    assert reply.startswith(b"HTTP/1.1 413") and b"at most 65536 bytes" in reply
    assert b"connection: close" in reply.lower()


def test_a_chunked_body_past_the_limit_is_cut_off(server):
    with socket.create_connection(server, timeout=30) as conn:
        conn.sendall(b"POST /search HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        chunk = b" " * 16384
        sent = 0
        try:
            for _ in range(64):  # up to 1 MiB; the server answers after ~64 KiB and closes
                conn.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                sent += len(chunk)
        except OSError:
            pass
        reply = read_all(conn)
    assert reply.startswith(b"HTTP/1.1 413")


def test_an_oversized_request_head_is_refused(server):
    """431 when the whole head arrives at once, 400 from the parser when it arrives in pieces."""
    reply = request(server, b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 40_000 + b"\r\n\r\n")
    assert reply[:12] in (b"HTTP/1.1 431", b"HTTP/1.1 400")
    with socket.create_connection(server, timeout=30) as conn:
        conn.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000)
        time.sleep(0.5)
        conn.sendall(b"a" * 20_000 + b"\r\n\r\n")
        assert read_all(conn)[:12] in (b"HTTP/1.1 431", b"HTTP/1.1 400")


def test_a_stalled_body_gets_408(server):
    with socket.create_connection(server, timeout=30) as conn:
        conn.sendall(b"POST /search HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n"
                     b"\r\n{\"q\":")  # then nothing more
        reply = read_all(conn)
    assert reply.startswith(b"HTTP/1.1 408") and b"connection: close" in reply.lower()


def run_cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """`vidseek ARGS` through the console entry point, in process: (exit status, stdout, stderr)."""
    from vidseek.cli import app

    monkeypatch.setattr(sys, "argv", ["vidseek", *args])
    with pytest.raises(SystemExit) as exit_:
        app()
    out, err = capsys.readouterr()
    return exit_.value.code, out, err


def test_serve_on_a_busy_port_fails_in_one_line_before_announcing(tmp_path_factory, monkeypatch, capsys):
    index, _ = shared_http_index(tmp_path_factory)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        code, out, err = run_cli(monkeypatch, capsys, "serve", str(index), "--port", str(port))
    assert code == 2 and out == ""  # nothing announced
    assert err.count("\n") == 1 and err.startswith(f"error: cannot listen on 127.0.0.1:{port} (")
    assert "--port" in err


@pytest.mark.parametrize("port", ["70000", "-1"])
def test_serve_with_an_invalid_port_fails_in_one_line(tmp_path, monkeypatch, capsys, port):
    code, out, err = run_cli(monkeypatch, capsys, "serve", str(tmp_path), "--port", port)
    assert code == 2 and out == ""
    assert err == f"error: --port {port} is not a TCP port: use 1-65535 (or 0 for any free port)\n"


def test_serve_with_an_unknown_host_fails_in_one_line(tmp_path, monkeypatch, capsys):
    code, out, err = run_cli(monkeypatch, capsys, "serve", str(tmp_path), "--host", "no-such-host.invalid", "--port", "0")
    assert code == 2 and out == "" and err.count("\n") == 1
    assert err.startswith("error: cannot resolve --host 'no-such-host.invalid'")
