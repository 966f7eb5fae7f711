"""The API's HTTP server survives idle and slow clients (tally/wsgi_server.py; ADR 35).

End to end: `tally api` in a subprocess on a free port (real PostgreSQL, and a real analyst server for
the clients that ask for big answers and never read them), as `tally up` starts it, with many idle
sockets, a slowloris or slow readers. Mechanics (which connection is closed, busy ones never; the
timeouts; the per-address gate) with the same server around a tiny WSGI app in this process.
"""

from __future__ import annotations

import http.client
import json
import os
import resource
import select
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

    start.procs = procs  # type: ignore[attr-defined]
    yield start
    for proc in procs:  # told to stop; one still relaying big answers queued behind the per-address gate
        proc.terminate()  # lets them run for the stop's grace (10 s), which no test here is about: not waited for
    for proc in procs:
        try:
            proc.wait(timeout=3)
        except subprocess.TimeoutExpired:
            proc.kill()
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


# --- clients that ask for big answers and never read them ------------------------------------------
# An analyst CSV of ~28 MB: more than waitress's 16 MiB output buffer plus what the kernel holds, so the
# thread relaying it has to wait for the client to read (TALLY_SQL_MAX_RESULT_ROWS 10,000 by default).
BIG_SQL = "SELECT number, repeat('x', 2800) AS pad FROM numbers(10000)"
BIG_BYTES = 28_000_000


@pytest.fixture(scope="module")
def big_answers(servers) -> Iterator[tuple[str, str]]:
    """A real analyst server (in this process, 6 threads, as many query slots) and an analyst token."""
    from tests.conftest import start_analyst_server
    from tests.test_analyst_server import make_token

    url, server = start_analyst_server(servers, TALLY_SQL_MAX_CONCURRENT="6")
    yield url, make_token(servers.pg_dsn, "analyst")
    server.close()


def ask_and_never_read(port: int, source: str, request: bytes) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window: the server keeps the rest
    sock.bind((source, 0))
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    sock.sendall(request)
    return sock


def sql_request(token: str, sql: str, fmt: str = "csv") -> bytes:
    body = json.dumps({"sql": sql}).encode()
    return (f"POST /api/v1/sql?format={fmt} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body


def api_sql(port: int, token: str, sql: str, source: str, timeout: float) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout, source_address=(source, 0))
    try:
        conn.request("POST", "/api/v1/sql", body=json.dumps({"sql": sql}),
                     headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def cut(sock: socket.socket) -> bool:
    """Whether the server closed (FIN) or reset this connection; reads nothing (reading would let it go on)."""
    poller = select.poll()
    poller.register(sock, select.POLLRDHUP)
    return any(events & (select.POLLRDHUP | select.POLLHUP | select.POLLERR) for _, events in poller.poll(0))


def all_cut(socks: list[socket.socket], timeout: float) -> int:
    """Wait until every socket of `socks` was cut by the server; returns how many were."""
    deadline = time.monotonic() + timeout
    while sum(map(cut, socks)) < len(socks) and time.monotonic() < deadline:
        time.sleep(0.2)
    return sum(map(cut, socks))


def drain(sock: socket.socket, timeout: float) -> tuple[int, bool]:
    """Read what the server sent until it closed (EOF or reset): (bytes read, whether it closed in time)."""
    sock.settimeout(timeout)
    received = 0
    try:
        while chunk := sock.recv(1 << 20):
            received += len(chunk)
    except TimeoutError:
        return received, False
    except OSError:
        pass  # reset
    return received, True


def test_clients_that_never_read_their_answers_are_cut_and_free_every_thread(tally_api, big_answers):
    """16 clients (the API's thread count), each from its own address so that the per-address gate does
    not help, ask for big analyst answers and never read: before, every API thread waited for them for
    good and /healthz never answered; now each is cut once its answer has not moved for
    TALLY_API_REQUEST_TIMEOUT_S (3 s here), and its thread serves others."""
    analyst_url, token = big_answers
    port = tally_api(TALLY_ANALYST_URL=analyst_url, TALLY_API_REQUEST_TIMEOUT_S="3")
    readers = [ask_and_never_read(port, f"127.0.0.{10 + i}", sql_request(token, BIG_SQL)) for i in range(16)]
    try:
        time.sleep(1)  # their requests are in the server's queue ahead of the ones below
        assert healthz(port, "127.0.0.3", timeout=120) == 200
        assert api_sql(port, token, "SELECT 1 AS one", "127.0.0.4", timeout=120) == 200
        assert all_cut(readers, 120) == 16
        for sock in readers:  # what each gets now ends early, not with the whole answer
            received, closed = drain(sock, 60)
            assert closed and received < BIG_BYTES // 2
    finally:
        for sock in readers:
            sock.close()


def test_one_address_runs_at_most_a_quarter_of_the_threads(tally_api, big_answers):
    """20 clients from one address (within its 64 connections) ask for big answers and never read: only 4
    (16 threads / 4) of their requests run, the others wait on their connections, so /healthz and other
    clients' queries answer long before the send timeout (60 s here) frees anything."""
    analyst_url, token = big_answers
    port = tally_api(TALLY_ANALYST_URL=analyst_url, TALLY_API_REQUEST_TIMEOUT_S="60")
    readers = [ask_and_never_read(port, "127.0.0.2", sql_request(token, BIG_SQL)) for _ in range(20)]
    try:
        time.sleep(1)
        assert healthz(port, "127.0.0.3", timeout=40) == 200
        assert api_sql(port, token, "SELECT 1 AS one", "127.0.0.4", timeout=40) == 200
        assert not any(map(cut, readers))  # those waiting were not refused
    finally:
        for sock in readers:
            sock.close()


# --- the mechanics, on a tiny app ------------------------------------------------------------------

class SlowApp:
    """/slow waits until `release` is set (`running` says one runs); /slowbig then answers 8 MiB; anything else
    answers at once."""

    BIG = 8 << 20

    def __init__(self) -> None:
        self.release = threading.Event()
        self.running = threading.Event()

    def __call__(self, environ, start_response):
        if environ["PATH_INFO"] in ("/slow", "/slowbig"):
            self.running.set()
            self.release.wait(20)
        if environ["PATH_INFO"] == "/slowbig":
            start_response("200 OK", [("Content-Type", "application/octet-stream"), ("Content-Length", str(self.BIG))])
            return [b"x" * self.BIG]
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
    _others = [connect(port, f"127.0.0.{3 + i % 4}") for i in range(12)]  # held open: 16 in all
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


class StreamApp:
    """/big streams 64 MiB in 1 MiB chunks and counts the iterables closed; /mid answers 8 MiB (under
    waitress's 16 MiB output buffer: the request ends at once); anything else answers at once."""

    def __init__(self) -> None:
        self.closed = 0

    def __call__(self, environ, start_response):
        if environ["PATH_INFO"] == "/mid":
            start_response("200 OK", [("Content-Type", "application/octet-stream"), ("Content-Length", str(8 << 20))])
            return [b"x" * (8 << 20)]
        if environ["PATH_INFO"] != "/big":
            start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
            return [b"ok"]
        start_response("200 OK", [("Content-Type", "application/octet-stream")])
        return self.stream()

    def stream(self):
        try:
            for _ in range(64):
                yield b"x" * (1 << 20)
        finally:
            self.closed += 1  # (the server closes the iterable; one thread at a time gets here)


def test_a_client_that_stops_reading_is_cut_and_its_thread_and_iterable_freed(serve_app):
    app = StreamApp()
    port = serve_app(app, max_per_client=0, request_timeout_s=1)  # 4 threads, no per-address gate
    readers = [ask_and_never_read(port, "127.0.0.2", b"GET /big HTTP/1.1\r\nHost: a\r\n\r\n") for _ in range(4)]
    try:
        deadline = time.monotonic() + 30
        while app.closed < 4 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert app.closed == 4  # every stuck thread was woken and the app's iterable closed
        assert healthz(port, "127.0.0.3") == 200
        for sock in readers:
            received, closed = drain(sock, 10)
            assert closed and received < 32 << 20
    finally:
        for sock in readers:
            sock.close()



def test_an_idle_connection_whose_answer_sits_unread_is_still_closed(serve_app):
    """A finished answer (no request running) that the client never reads: the idle timeout marks the
    connection to close, but waitress closes only once the socket is writable, which it never becomes;
    it is reset a sweep later instead of keeping its descriptor for good."""
    app = StreamApp()
    port = serve_app(app, idle_timeout_s=1, request_timeout_s=60)  # the send timeout is not what closes it
    reader = ask_and_never_read(port, "127.0.0.2", b"GET /mid HTTP/1.1\r\nHost: a\r\n\r\n")
    try:
        assert all_cut([reader], 20) == 1
    finally:
        reader.close()


class CountingApp(SlowApp):
    """SlowApp that counts the /slow requests that have started."""

    def __init__(self) -> None:
        super().__init__()
        self.started = 0
        self.lock = threading.Lock()

    def __call__(self, environ, start_response):
        if environ["PATH_INFO"] == "/slow":
            with self.lock:
                self.started += 1
        return super().__call__(environ, start_response)


def started_after(app: CountingApp, wanted: int, timeout: float = 5.0) -> int:
    deadline = time.monotonic() + timeout
    while app.started < wanted and time.monotonic() < deadline:
        time.sleep(0.05)
    return app.started


def test_requests_of_one_address_beyond_its_share_wait_their_turn(serve_app):
    app = CountingApp()
    port = serve_app(app, max_per_client=8)  # 4 threads: one request of an address runs at a time
    first, second = connect(port, "127.0.0.2"), connect(port, "127.0.0.2")
    first.sendall(b"GET /slow HTTP/1.1\r\nHost: a\r\n\r\n")
    assert started_after(app, 1) == 1
    second.sendall(b"GET /slow HTTP/1.1\r\nHost: a\r\n\r\n")
    assert started_after(app, 2, timeout=1.0) == 1  # it waits (not refused, not run)
    assert healthz(port, "127.0.0.3") == 200  # other addresses are not held up
    assert not closed_by_server(second)
    app.release.set()
    assert first.recv(1024).startswith(b"HTTP/1.1 200")
    assert second.recv(1024).startswith(b"HTTP/1.1 200")
    # pipelined requests on one connection pass the slot on, and hand it back at the end
    first.sendall(b"GET /a HTTP/1.1\r\nHost: a\r\n\r\nGET /b HTTP/1.1\r\nHost: a\r\n\r\n")
    answers = b""
    while answers.count(b"HTTP/1.1 200") < 2:
        answers += first.recv(1024)
    assert healthz(port, "127.0.0.2") == 200


def test_without_a_per_address_bound_the_gate_is_off(serve_app):
    app = CountingApp()
    port = serve_app(app, max_per_client=0)  # behind a reverse proxy every client is the proxy's address
    socks = [connect(port, "127.0.0.2") for _ in range(2)]
    for sock in socks:
        sock.sendall(b"GET /slow HTTP/1.1\r\nHost: a\r\n\r\n")
    assert started_after(app, 2) == 2
    app.release.set()
    assert all(sock.recv(1024).startswith(b"HTTP/1.1 200") for sock in socks)


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


# --- stopping (SIGTERM, `tally up` stopping): in-flight requests end, keep-alive clients do not hold it -------------

class KeepAsking:
    """A client on one kept-alive connection asking GET /x every 50 ms until the server closes it (or 60 s)."""

    def __init__(self, port: int) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        self.answers = 0
        self.ended_by: BaseException | None = None
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        deadline = time.monotonic() + 60
        try:
            while time.monotonic() < deadline:
                self.conn.request("GET", "/x")
                self.conn.getresponse().read()
                self.answers += 1
                time.sleep(0.05)
        except (OSError, http.client.HTTPException) as exc:  # closed by the server: what a stop should do
            self.ended_by = exc


def run_server(app, **limits: int):
    """(server, the thread running it, port): create_server's server in a thread of this process."""
    port = free_port()
    server = create_server(app, "127.0.0.1", port, threads=4, limits=ConnectionLimits(**limits))
    loop = threading.Thread(target=server.run, daemon=True)
    loop.start()
    wait_until(lambda: tcp_open("127.0.0.1", port), what="server", timeout=10)
    return server, loop, port


def slow_request_running():
    """(app, server, loop thread, port, client socket): a server with one /slow request running."""
    app = SlowApp()
    server, loop, port = run_server(app)
    busy = connect(port)
    busy.sendall(b"GET /slow HTTP/1.1\r\nHost: a\r\n\r\n")
    assert app.running.wait(10)
    return app, server, loop, port, busy


def no_servicing_errors(caplog) -> bool:
    return not [r for r in caplog.records if "Exception when servicing" in r.getMessage()]


def test_a_stop_ends_the_server_while_a_kept_alive_client_keeps_asking(caplog):
    """waitress's close() of one listening socket closed it and its trigger but left the connections: a client
    asking every 50 ms kept the server's loop running (each answer then logged EBADF from the closed trigger)."""
    server, loop, port = run_server(SlowApp())
    client = KeepAsking(port)
    wait_until(lambda: client.answers >= 3, what="answers before the stop", timeout=10)
    server.close()
    loop.join(30)
    assert not loop.is_alive(), "the server still runs while a kept-alive client asks"
    client.thread.join(10)
    assert client.ended_by is not None  # its connection was closed, not answered for 60 s
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5)
    assert no_servicing_errors(caplog)


def test_a_request_running_when_the_stop_begins_is_answered_and_new_connections_are_refused():
    app, server, loop, port, busy = slow_request_running()
    server.close(grace_s=30)

    def refused() -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
        except ConnectionRefusedError:
            return True
        return False

    wait_until(refused, what="new connections refused once stopping", timeout=10)
    assert loop.is_alive()  # waiting for the running request
    app.release.set()
    answer = b""
    while not answer.endswith(b"ok"):
        chunk = busy.recv(1024)
        assert chunk, f"closed before the answer: {answer!r}"
        answer += chunk
    assert answer.startswith(b"HTTP/1.1 200")
    assert wait_closed(busy, 10)  # then closed (kept alive no more)
    loop.join(10)
    assert not loop.is_alive()


def test_a_request_that_outlives_the_grace_is_cut_and_the_server_ends(caplog):
    app, server, loop, port, busy = slow_request_running()
    server.close(grace_s=0.5)
    loop.join(10)
    assert not loop.is_alive() and not app.release.is_set()  # ended while the app still held its request
    assert any("cut 1 request(s)" in r.getMessage() for r in caplog.records)
    assert wait_closed(busy, 5)
    try:
        assert busy.recv(1024) == b""  # no answer came
    except OSError:
        pass  # reset: no answer either
    app.release.set()  # the abandoned request ends now: its thread finds the server stopped, quietly
    wait_until(lambda: not server.dispatcher.threads, what="the cut request's thread to end", timeout=10)
    assert no_servicing_errors(caplog)


def test_an_answer_is_delivered_whole_when_the_client_had_sent_more_before_the_stop():
    """A client that sends its next request while one runs, after the stop began: the stop answers the running one
    and reads no more. Closing a socket with unread input makes the kernel reset it and drop the unsent tail of the
    answer, so the server shuts its side first, drains what the client sent, then closes."""
    app = SlowApp()
    server, loop, port = run_server(app)
    client = connect(port)
    client.sendall(b"GET /slowbig HTTP/1.1\r\nHost: a\r\n\r\n")
    assert app.running.wait(10)
    server.close(grace_s=30)
    time.sleep(0.5)  # the loop has taken the stop's first step: nothing more is read
    client.sendall(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")  # unread: the stop answers no new request
    app.release.set()
    time.sleep(0.5)  # the answer fills the socket's buffers; then the client reads it, slowly
    received = b""
    client.settimeout(10)
    while True:
        chunk = client.recv(1 << 16)  # a reset (the bug) raises ConnectionResetError here
        if not chunk:
            break
        received += chunk
        time.sleep(0.002)
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and len(body) == SlowApp.BIG  # whole, and the late request unanswered
    loop.join(10)
    assert not loop.is_alive()


def test_tally_api_stops_on_sigterm_while_a_kept_alive_client_keeps_asking(tally_api, tmp_path):
    """The bug as found: a soak's probe kept `tally api` running ~60 s after SIGTERM, logging EBADF every second,
    until `tally up` killed it."""
    port = tally_api()
    client = KeepAsking(port)
    wait_until(lambda: client.answers >= 3, what="answers before the stop", timeout=10)
    proc = tally_api.procs[-1]
    proc.terminate()
    try:
        code = proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        code = None
    assert code == 0, "tally api still runs 30 s after SIGTERM while a kept-alive client asks"
    client.thread.join(10)
    assert client.ended_by is not None
    logs = "".join(f.read_text() for f in (tmp_path / "logs").glob("*"))
    assert "Exception when servicing" not in logs and "Bad file descriptor" not in logs


# --- request sizes: refused by the server before the app runs (ADR 35, "request sizes") ---------------------
# waitress reads a whole request before the app runs (a body past 512 KiB into a temporary file), so the app's
# own MAX_CONTENT_LENGTH and token check came after an unauthenticated client's 400 MB had been spooled to /tmp.

MIB = 1 << 20


def sized_app(**config: object):
    """(a Flask app with MAX_CONTENT_LENGTH 1 MiB and `config` that answers the length of the body it reads, the
    list of requests that reached it): the server takes its bounds from the Flask app's config."""
    from flask import Flask, request

    app = Flask(__name__)
    app.config.update({"MAX_CONTENT_LENGTH": MIB, **config})

    @app.route("/", methods=["GET", "POST"])
    def echo() -> str:
        return str(len(request.get_data()))

    reached: list[str] = []

    def wsgi(environ, start_response):
        reached.append(environ["PATH_INFO"])
        return app(environ, start_response)

    wsgi.config = app.config  # type: ignore[attr-defined]
    return wsgi, reached


def answer_head(sock: socket.socket, timeout: float = 5.0) -> bytes:
    """The status line and headers the server sends (TimeoutError if none within `timeout`)."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data.partition(b"\r\n\r\n")[0]


def spooled_files(pid: int) -> list[str]:
    """The deleted files process `pid` holds open: waitress's temporary files for request bodies past 512 KiB."""
    found = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:  # closed meanwhile
            continue
        if target.endswith(" (deleted)"):
            found.append(target)
    return found


def test_a_body_over_the_apps_limit_is_refused_before_any_of_it_is_read(serve_app):
    """A Content-Length past the app's MAX_CONTENT_LENGTH (+ 64 KiB) is answered 413 as the headers end: the
    answer comes while the client has sent 64 KiB of its 2 MiB, so nothing of it is buffered (before: waitress's
    1 GiB default; it waited for the whole body, spooling it to a temporary file, then ran the app)."""
    app, reached = sized_app()
    port = serve_app(app)
    with connect(port) as sock:
        sock.sendall(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % (2 * MIB) + b"x" * 65536)
        assert answer_head(sock).startswith(b"HTTP/1.1 413 "), "no 413 before the body was all sent"
        assert wait_closed(sock, 5)
    assert reached == []
    # the app's own limit still answers just past it (its own error shape), and a body of exactly it is served
    for size, status in ((MIB, 200), (MIB + 1, 413)):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("POST", "/", body=b"y" * size)
        resp = conn.getresponse()
        body = resp.read()
        conn.close()
        assert resp.status == status
        assert body == str(size).encode() if status == 200 else b"generated by waitress" not in body
    assert reached == ["/", "/"]


def test_a_chunked_body_is_cut_once_past_the_limit(serve_app):
    """A chunked body has no length up front: the server reads it until it passes the bound (1 MiB + 64 KiB here),
    then answers 413 and closes; the app never runs (before: it read all of it, however large)."""
    app, reached = sized_app()
    port = serve_app(app)
    sent = 0
    with connect(port) as sock:
        sock.sendall(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n")
        head = b""
        while sent < 3 * MIB:
            sock.sendall(b"10000\r\n" + b"z" * 65536 + b"\r\n")
            sent += 65536
            if select.select([sock], [], [], 0.05)[0]:  # the server answered
                head = answer_head(sock)
                break
        assert head.startswith(b"HTTP/1.1 413 "), f"no 413 after {sent} bytes sent"
        assert sent <= MIB + 256 * 1024, f"the server read {sent} bytes before refusing"
    assert reached == []


def test_a_request_head_over_the_apps_bound_is_refused(serve_app):
    """The request line and headers are bounded at the app's TALLY_MAX_HEADER_BYTES (the API's: 32 KiB): 431,
    the app never runs (before: waitress's 256 KiB, so a 252 KB query string reached the app). An app that names
    no bound keeps waitress's 256 KiB (the ClickHouse-compatible endpoint's URLs carry query parameters)."""
    app, reached = sized_app(TALLY_MAX_HEADER_BYTES=32 * 1024)
    port = serve_app(app)
    for length, status in ((30_000, 200), (40_000, 431)):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/?percentiles=" + "5" * length)
        assert conn.getresponse().status == status
        conn.close()
    assert reached == ["/"]
    open_app, reached = sized_app()
    port = serve_app(open_app)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/?param_x=" + "5" * 200_000)
    assert conn.getresponse().status == 200
    conn.close()


def test_tally_api_refuses_big_bodies_and_heads_unread_and_marks_api_answers(tally_api, servers):
    """`tally api` as run: an unauthenticated 2 MiB POST is answered 413 after 64 KiB of it (no temporary file in
    the server), a 40 KB query string 431, the longest URL the dashboard builds (every filter, a page of 1,000
    bytes of UTF-8, the same URL again as the Referer) is served; answers under /api/ say no-store and nosniff."""
    from tests.test_analyst_server import make_token

    port = tally_api()
    pid = tally_api.procs[-1].pid
    with connect(port) as sock:
        sock.sendall(b"POST /api/v1/sql HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % (2 * MIB) + b"x" * 65536)
        assert answer_head(sock).startswith(b"HTTP/1.1 413 "), "no 413 before the body was all sent"
        assert not spooled_files(pid)
    token = make_token(servers.pg_dsn, "admin")
    auth = {"Authorization": f"Bearer {token}"}

    def get(path: str, headers: dict[str, str]) -> http.client.HTTPResponse:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", path, headers={"Host": "127.0.0.1", **headers})
        resp = conn.getresponse()
        resp.body = resp.read()  # type: ignore[attr-defined]
        conn.close()
        return resp

    assert get("/api/v1/domains/example.com/summary?percentiles=" + "5," * 20_000, auth).status == 431
    from urllib.parse import quote

    filters = "&".join(f"filter={quote(f'{d}:{v}', safe=':/')}" for d, v in (
        ("page", "/" + "é" * 499), ("source", "ß" * 64), ("country", "DE"), ("device", "d" * 32),
        ("browser", "b" * 64), ("os", "o" * 64)))
    longest = ("/api/v1/domains/example.com/pageviews?from=2026-01-01T00:00:00Z&to=2026-01-31T00:00:00Z"
               f"&tz=Europe/Berlin&percentiles=50,95,99&{filters}")
    assert len(longest) > 3000
    resp = get(longest, {**auth, "Referer": f"http://127.0.0.1:{port}/?domain=example.com&{filters}"})
    assert (resp.status, b"unknown_domain" in resp.body) == (404, True), resp.body  # type: ignore[attr-defined]
    for path, headers, status in (("/api/v1/domains", auth, 200), ("/api/v1/domains", {}, 401),
                                  ("/api/v1/openapi.json", {}, 200), ("/api/v1/nothing", auth, 404)):
        resp = get(path, headers)
        assert (resp.status, resp.getheader("Cache-Control"), resp.getheader("X-Content-Type-Options")) == (
            status, "no-store", "nosniff"), path
    static = get("/static/dashboard.js", {})
    assert static.status == 200 and "no-store" not in (static.getheader("Cache-Control") or "")
