"""The API's HTTP server survives idle and slow clients (tally/wsgi_server.py; ADR 35).

End to end: `tally api` in a subprocess on a free port (real PostgreSQL), as `tally up` starts it, with
many idle sockets and a slowloris open. Mechanics (which connection is closed, busy ones never; the
timeouts) with the same server around a tiny WSGI app in this process.
"""

from __future__ import annotations

import http.client
import os
import resource
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from infra.processes import free_port, tcp_open, wait_until
from tally.wsgi_server import ConnectionLimits, create_server
from tests.conftest import SECRET

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def enough_descriptors() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < 4096:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(4096, hard), hard))


def healthz(port: int, source: str = "127.0.0.1", timeout: float = 5.0) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout, source_address=(source, 0))
    try:
        conn.request("GET", "/healthz")
        return conn.getresponse().status
    finally:
        conn.close()


def connect(port: int, source: str = "127.0.0.1") -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0))


def closed_by_server(sock: socket.socket) -> bool:
    """True once the server has closed this connection (EOF or reset), False while it is open."""
    sock.setblocking(False)
    try:
        return sock.recv(1 << 16) == b""  # (an answer such as 408 would precede the EOF)
    except BlockingIOError:
        return False
    except OSError:
        return True
    finally:
        sock.setblocking(True)


def wait_closed(sock: socket.socket, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if closed_by_server(sock):
            return True
        time.sleep(0.1)
    return False


@pytest.fixture()
def tally_api(servers, tmp_path) -> Iterator:
    """Start `tally api` (the real command) with extra TALLY_* settings; returns its port."""
    procs = []

    def start(**env: str) -> int:
        port = free_port()
        log = tmp_path / f"api-{port}.out"
        full = {**os.environ, "TALLY_HOME": str(tmp_path / "home"), "TALLY_PG_DSN": servers.pg_dsn,
                "TALLY_SECRET": SECRET, "TALLY_API_PORT": str(port), "TALLY_LOG_DIR": str(tmp_path / "logs"), **env}
        proc = subprocess.Popen([sys.executable, "-m", "tally.cli", "api"], cwd=ROOT, env=full,
                                stdout=log.open("wb"), stderr=subprocess.STDOUT)
        procs.append(proc)
        wait_until(lambda: tcp_open("127.0.0.1", port), what="tally api", timeout=60, proc=proc, log_path=log)
        return port

    yield start
    for proc in procs:
        proc.terminate()
        proc.wait(timeout=30)


def test_healthz_answers_while_a_thousand_idle_sockets_are_open(tally_api):
    port = tally_api()
    idle = [connect(port, f"127.0.0.{2 + i % 20}") for i in range(1000)]  # 50 per address
    try:
        assert healthz(port) == 200
        assert not any(closed_by_server(s) for s in idle)  # within the bounds: nobody was turned away
        # ... and one address holding many idle sockets does not lock itself (or anyone) out either
        crowd = [connect(port, "127.0.0.1") for _ in range(200)]
        try:
            assert healthz(port, "127.0.0.1") == 200
            assert healthz(port, "127.0.0.30") == 200
            closed = sum(wait_closed(s, 0.1) for s in crowd)
            assert closed >= 200 - 64  # TALLY_API_MAX_CONNECTIONS_PER_CLIENT (64): the oldest idle ones went
        finally:
            for s in crowd:
                s.close()
    finally:
        for s in idle:
            s.close()


def test_slowloris_and_idle_sockets_are_timed_out(tally_api):
    port = tally_api(TALLY_API_REQUEST_TIMEOUT_S="2", TALLY_API_IDLE_TIMEOUT_S="3")
    loris, idle = connect(port, "127.0.0.2"), connect(port, "127.0.0.3")
    loris.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
    stop = threading.Event()

    def drip() -> None:  # one header byte every 0.5 s: never idle long enough for the idle timeout
        while not stop.wait(0.5):
            try:
                loris.send(b"a")
            except OSError:
                return

    threading.Thread(target=drip, daemon=True).start()
    try:
        assert wait_closed(loris, 20), "a request trickling in is cut at TALLY_API_REQUEST_TIMEOUT_S"
        assert wait_closed(idle, 20), "a silent connection is closed at TALLY_API_IDLE_TIMEOUT_S"
        assert healthz(port) == 200
    finally:
        stop.set()
        loris.close()
        idle.close()


# --- the mechanics, on a tiny app ------------------------------------------------------------------

class SlowApp:
    """/slow waits until `release` is set; anything else answers at once."""

    def __init__(self) -> None:
        self.release = threading.Event()

    def __call__(self, environ, start_response):  # noqa: ANN001
        if environ["PATH_INFO"] == "/slow":
            self.release.wait(20)
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
        return [b"ok"]


@pytest.fixture()
def serve_app():
    servers = []

    def start(app, **limits: int) -> int:
        port = free_port()
        server = create_server(app, "127.0.0.1", port, threads=4, limits=ConnectionLimits(**limits))
        threading.Thread(target=server.run, daemon=True).start()
        servers.append(server)
        return port

    yield start
    for server in servers:
        server.close()


def test_the_least_recently_active_idle_connection_makes_room(serve_app):
    port = serve_app(SlowApp(), max_connections=16, max_per_client=4)
    first = [connect(port, "127.0.0.2") for _ in range(4)]
    first[0].sendall(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")  # the oldest socket becomes the most recent
    assert first[0].recv(1024).startswith(b"HTTP/1.1 200")
    fifth = connect(port, "127.0.0.2")
    assert wait_closed(first[1], 5) and not closed_by_server(first[0]) and not closed_by_server(fifth)
    assert not any(closed_by_server(s) for s in first[2:])
    # the total bound: 16 open from several addresses, a 17th closes the least recently active one
    others = [connect(port, f"127.0.0.{3 + i % 4}") for i in range(12)]
    time.sleep(0.2)
    assert healthz(port, "127.0.0.9") == 200
    assert wait_closed(first[2], 5)  # the oldest idle, wherever it came from


def test_connections_with_a_request_running_are_never_closed_to_make_room(serve_app):
    app = SlowApp()
    port = serve_app(app, max_per_client=1)
    busy = connect(port, "127.0.0.2")
    busy.sendall(b"GET /slow HTTP/1.1\r\nHost: a\r\n\r\n")
    time.sleep(0.3)
    newcomer = connect(port, "127.0.0.2")
    assert wait_closed(newcomer, 5)  # nothing of that address could go: the new one is refused
    app.release.set()
    assert busy.recv(1024).startswith(b"HTTP/1.1 200")
    assert healthz(port, "127.0.0.3") == 200


def test_a_copied_cookie_is_refused_after_logout_over_http(tally_api, servers):
    """What the black-box check does, against `tally api` over real HTTP."""
    import urllib.parse

    import psycopg

    from oltp import tokens

    port = tally_api()
    origin = f"http://127.0.0.1:{port}"
    with psycopg.connect(servers.pg_dsn, autocommit=True) as conn:
        _, token = tokens.create(conn, "customer", ["hard.test"])

    def request(method: str, path: str, body: str = "", **headers: str) -> http.client.HTTPResponse:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        resp.read()
        conn.close()
        return resp

    form = {"Content-Type": "application/x-www-form-urlencoded", "Origin": origin}
    login = request("POST", "/login", urllib.parse.urlencode({"token": token}), **form)
    cookie = (login.getheader("Set-Cookie") or "").split(";")[0]
    assert login.status == 303 and cookie.startswith("tally_session=")
    assert request("GET", "/api/v1/domains/hard.test/summary?last=1h", Cookie=cookie).status == 200
    assert request("POST", "/logout", Cookie=cookie, Origin="https://evil.example").status == 403
    assert request("POST", "/logout", Cookie=cookie, Origin=origin).status == 303
    assert request("GET", "/api/v1/domains/hard.test/summary?last=1h", Cookie=cookie).status == 401
    assert request("GET", "/api/v1/no-such-route", Cookie=cookie).status == 401
