"""Item 3 of issue 15: analyst SQL is answered by the clock (ADR 32).

ClickHouse checks its time limit and KILL QUERY only between blocks, so a query busy inside one
block used to hold its slot (and the caller) until the block was done. These tests use a query
that passes the allowlist and spends seconds inside one block (`hasAll` is quadratic in its
arrays' length; the arrays are built without `range`, which is capped at MAX_RANGE_ELEMENTS), and
assert by state, not by wall clock: the answer arrives while ClickHouse is
still running the query (system.processes), and the slot serves another query meanwhile.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
import uuid
from urllib.parse import urlsplit

import clickhouse_connect
import psycopg
import pytest

from core.keys import internal_token
from olap.watchdog import DeadlineReached, Watchdog
from tests.conftest import SECRET, start_analyst_server


def quadratic(n: str) -> str:
    """hasAll of 1..n and its reverse: quadratic in n (550,000: about nine seconds on this machine)."""
    return (f"hasAll(arrayEnumerate(arrayWithConstant({n}, 0)), "
            f"arrayReverse(arrayEnumerate(arrayWithConstant(550000, 0))))")


def expensive(marker: str) -> str:
    """One row, one block, seconds of hasAll; not constant, so not folded."""
    return f"SELECT {quadratic('550000 + number')} AS h, '{marker}' AS m FROM numbers(1)"


def query(url: str, sql: str, token_id: str | None = None, fmt: str = "json") -> tuple[int, dict]:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=120)
    try:
        conn.request("POST", "/v1/query", body=json.dumps({"sql": sql, "format": fmt, "token_id": token_id}),
                     headers={"Content-Type": "application/json", "Authorization": f"Bearer {internal_token(SECRET)}"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read() or b"{}")
    finally:
        conn.close()


def in_clickhouse(admin, marker: str) -> int:
    return admin.query("SELECT count() FROM system.processes WHERE query LIKE {m:String} "
                       "AND query NOT LIKE '%system.processes%'", parameters={"m": f"%{marker}%"}).result_rows[0][0]


def wait_gone(admin, marker: str, timeout: float = 180) -> None:
    """Let a cancelled query finish its block (so it does not load the next tests)."""
    end = time.monotonic() + timeout
    while in_clickhouse(admin, marker) and time.monotonic() < end:
        time.sleep(0.2)
    assert in_clickhouse(admin, marker) == 0, "the cancelled query never ended in ClickHouse"


def audit(pg_dsn: str, token_id: str) -> list[tuple[str, str | None]]:
    with psycopg.connect(pg_dsn) as conn:
        return conn.execute("SELECT status, error FROM analyst_queries WHERE token_id = %s ORDER BY id",
                            (token_id,)).fetchall()


@pytest.fixture()
def admin(servers):
    client = clickhouse_connect.get_client(dsn=servers.chdb_dsn)
    yield client
    client.close()


def test_a_query_busy_inside_one_block_is_answered_at_its_deadline_and_audited(make_settings, servers, admin):
    """Through the API, as analysts call it; csv, so the cut comes before the first byte of a streamed format."""
    from tally.roots import build_api
    from tests.test_analyst_server import make_token

    url, server = start_analyst_server(servers, TALLY_SQL_MAX_CONCURRENT="1", TALLY_SQL_MAX_EXECUTION_S="1")
    app = build_api(make_settings(TALLY_ANALYST_URL=url, TALLY_SQL_MAX_EXECUTION_S="1"))
    marker = f"wd-{uuid.uuid4().hex[:8]}"
    try:
        headers = {"Authorization": f"Bearer {make_token(servers.pg_dsn, 'analyst')}"}
        client = app.test_client()
        resp = client.post("/api/v1/sql?format=csv", json={"sql": expensive(marker)}, headers=headers)
        assert resp.status_code == 400 and resp.json["error"]["code"] == "query_timeout", resp.data
        assert "1 s" in resp.json["error"]["message"]
        # answered while ClickHouse is still inside the block: before the watchdog, the answer came after it
        assert in_clickhouse(admin, marker) == 1
        # and the only slot already serves the next query
        ok = client.post("/api/v1/sql", json={"sql": "SELECT 1 AS one"}, headers=headers)
        assert ok.status_code == 200 and ok.json["rows"] == [[1]]
        assert in_clickhouse(admin, marker) == 1
        with psycopg.connect(servers.pg_dsn) as conn:
            (row,) = conn.execute("SELECT status, error FROM analyst_queries WHERE sql LIKE %s",
                                  (f"%{marker}%",)).fetchall()
        assert row[0] == "timeout"
        assert "cancelled by the watchdog at the 2 s deadline" in row[1] and "KILL QUERY" in row[1]
        assert "slot was handed back at once" in row[1]
        # it ends by itself at its block's end (KILL QUERY); the cap test below waits for that
    finally:
        app.extensions["tally_backends"].rollups.pool.close()
        server.close()


def test_a_stream_that_reaches_its_deadline_midway_is_cut_not_ended(servers, admin):
    """The first block (8,192 quick rows) goes out; the second holds one expensive row: the deadline cuts the
    response without its final chunk, so the client sees an incomplete body. The deadline is 3 s, not 1: the first
    block must be out before it even on a loaded machine (at 1 s a fresh-clone run once got the 400 of a query cut
    before its first block), and the expensive row still takes several times longer."""
    url, server = start_analyst_server(servers, TALLY_SQL_MAX_CONCURRENT="1", TALLY_SQL_MAX_EXECUTION_S="3")
    marker, token_id = f"wd-{uuid.uuid4().hex[:8]}", f"tok_{uuid.uuid4().hex[:10]}"
    sql = (f"SELECT number, if(number = 9000, {quadratic('550000 + number')}, 0) AS h, '{marker}' AS m "
           "FROM numbers(10000)")
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=120)
    try:
        conn.request("POST", "/v1/query", body=json.dumps({"sql": sql, "format": "csv", "token_id": token_id}),
                     headers={"Content-Type": "application/json", "Authorization": f"Bearer {internal_token(SECRET)}"})
        resp = conn.getresponse()
        assert resp.status == 200
        with pytest.raises(http.client.IncompleteRead) as info:
            resp.read()
        assert info.value.partial.startswith(b"number,h,m\r\n0,0,")
        assert in_clickhouse(admin, marker) == 1  # cut while ClickHouse is inside the second block
        deadline = time.monotonic() + 10
        while not audit(servers.pg_dsn, token_id) and time.monotonic() < deadline:
            time.sleep(0.1)
        (row,) = audit(servers.pg_dsn, token_id)
        assert row[0] == "timeout" and "cancelled by the watchdog" in row[1]
        wait_gone(admin, marker)  # its expensive row ends by itself: not beside the next test's queries
    finally:
        conn.close()
        server.close()


def test_cancelled_queries_still_computing_are_capped_at_the_slot_count(servers, admin):
    """One slot: the first cancelled query frees it; a second one cut while the first still computes keeps
    its slot until its own block ends, so ClickHouse never runs more than twice the slots. A 2 s deadline: the
    second query must reach ClickHouse before it while the first still computes on a loaded machine (at 1 s a
    fresh-clone run once cut it first)."""
    url, server = start_analyst_server(servers, TALLY_SQL_MAX_CONCURRENT="1", TALLY_SQL_MAX_EXECUTION_S="2")
    first, second, token_id = f"wd-{uuid.uuid4().hex[:8]}", f"wd-{uuid.uuid4().hex[:8]}", f"tok_{uuid.uuid4().hex[:10]}"
    try:
        assert query(url, expensive(first), token_id)[0] == 400
        assert in_clickhouse(admin, first) == 1
        status, body = query(url, expensive(second), token_id)
        assert status == 400 and body["error"]["code"] == "query_timeout"
        assert in_clickhouse(admin, first) == 1 and in_clickhouse(admin, second) == 1
        status, body = query(url, "SELECT 1", token_id)
        assert status == 429 and body["error"]["code"] == "analyst_busy"
        rows = audit(servers.pg_dsn, token_id)
        assert [r[0] for r in rows] == ["timeout", "timeout", "busy"]
        assert "handed back at once" in rows[0][1] and "comes back when that block ends" in rows[1][1]
        wait_gone(admin, first)
        wait_gone(admin, second)
        assert query(url, "SELECT 1", token_id)[0] == 200
    finally:
        server.close()


# --- the watchdog's own contract, without ClickHouse --------------------------------------------------------

class Calls:
    def __init__(self) -> None:
        self.released: list[bool] = []
        self.closed = 0
        self.killed: list[str] = []
        self.done = threading.Event()

    def release(self, fresh: bool) -> None:
        self.released.append(fresh)
        self.done.set()

    def close_client(self) -> None:
        self.closed += 1
        self.done.set()


def test_a_query_that_ends_in_time_hands_its_slot_back_once():
    calls = Calls()
    watchdog = Watchdog(calls.killed.append, max_abandoned=1)
    run = watchdog.start(lambda tag: iter([b"a", b"b"]), 30, calls.release, calls.close_client)
    assert [run.next_chunk(), run.next_chunk(), run.next_chunk()] == [b"a", b"b", None]
    run.close()
    assert calls.done.wait(5) and calls.released == [False] and calls.closed == 0 and calls.killed == []


def test_at_the_deadline_the_query_is_killed_and_its_slot_freed_before_it_ends():
    calls, proceed = Calls(), threading.Event()

    def work(tag):
        proceed.wait(30)  # stands for ClickHouse inside one block
        yield b"late"

    watchdog = Watchdog(calls.killed.append, max_abandoned=1)
    run = watchdog.start(work, 0.2, calls.release, calls.close_client)
    with pytest.raises(DeadlineReached):
        run.next_chunk()
    assert calls.killed == [run.tag] and calls.released == [True] and run.slot_freed
    assert watchdog.abandoned == 1 and calls.closed == 0
    proceed.set()
    run.thread.join(10)
    assert calls.closed == 1 and calls.released == [True] and watchdog.abandoned == 0
    assert run.overran_s is not None and run.overran_s >= 0


def test_the_deadline_holds_even_if_nobody_reads():
    """A caller gone before the first byte never asks for a chunk: the run's own timer cuts it."""
    calls, proceed = Calls(), threading.Event()

    def work(tag):
        proceed.wait(30)
        yield b"late"

    run = Watchdog(calls.killed.append, max_abandoned=1).start(work, 0.2, calls.release, calls.close_client)
    assert calls.done.wait(5) and calls.released == [True] and calls.killed == [run.tag]
    proceed.set()
    run.thread.join(10)
    assert calls.closed == 1
    with pytest.raises(DeadlineReached):
        run.next_chunk()


def test_over_the_cap_the_slot_comes_back_only_when_the_query_ends():
    calls, proceed = Calls(), threading.Event()

    def work(tag):
        proceed.wait(30)
        yield b"late"

    run = Watchdog(calls.killed.append, max_abandoned=0).start(work, 0.2, calls.release, calls.close_client)
    with pytest.raises(DeadlineReached):
        run.next_chunk()
    assert calls.killed == [run.tag] and calls.released == [] and not run.slot_freed
    proceed.set()
    run.thread.join(10)
    assert calls.released == [False] and calls.closed == 0


def test_a_caller_that_goes_away_stops_the_query_and_frees_the_slot():
    calls, closed = Calls(), threading.Event()

    def work(tag):
        try:
            while True:
                yield b"x" * 10
        finally:
            closed.set()  # closing the generator is what cancels the ClickHouse stream

    run = Watchdog(calls.killed.append, max_abandoned=1).start(work, 30, calls.release, calls.close_client)
    assert run.next_chunk() == b"x" * 10
    run.close()
    assert closed.wait(5) and calls.done.wait(5)
    run.thread.join(5)
    # the query may be inside a block its stream's close reaches only at the block's end: KILL QUERY too
    assert calls.released == [False] and calls.killed == [run.tag] and not run.thread.is_alive()


def test_errors_reach_the_caller_and_the_slot_comes_back():
    calls = Calls()

    def work(tag):
        raise ValueError("refused")

    run = Watchdog(calls.killed.append, max_abandoned=1).start(work, 30, calls.release, calls.close_client)
    with pytest.raises(ValueError, match="refused"):
        run.next_chunk()
    assert calls.done.wait(5) and calls.released == [False]


# --- the API's relay timeout and the server's deadline come from one setting -------------------------------

def test_the_relay_timeout_is_the_servers_deadline_plus_a_margin(make_settings):
    from core.config import SQL_RELAY_MARGIN_S, SQL_SLOT_WAIT_S
    from tally.roots import build_analyst_server, build_api

    settings = make_settings(TALLY_SQL_MAX_EXECUTION_S="5")
    assert settings.sql_deadline_s == 6.0
    assert settings.sql_relay_timeout_s == SQL_SLOT_WAIT_S + 6.0 + SQL_RELAY_MARGIN_S
    assert settings.sql_relay_timeout_s <= 10.0  # the API answers well before 11-hardening's 9 s + probe overhead
    api = build_api(settings)
    try:
        assert api.extensions["tally_backends"].analyst.timeout_s == settings.sql_relay_timeout_s
    finally:
        api.extensions["tally_backends"].rollups.pool.close()
    analyst = build_analyst_server(settings)
    analyst.extensions["tally_audit_pool"].close()  # not left to the garbage collector (ConnectionPool.__del__)
    config = analyst.config["TALLY_ANALYST"]
    assert config.deadline == settings.sql_deadline_s and config.wait_s == SQL_SLOT_WAIT_S


def test_an_analyst_server_that_does_not_answer_gets_504_not_a_hang():
    from api.analyst_proxy import AnalystService

    listener = socket.create_server(("127.0.0.1", 0))  # accepts, never answers
    try:
        port = listener.getsockname()[1]
        upstream = AnalystService(f"http://127.0.0.1:{port}", "t" * 32, timeout_s=0.5).query("SELECT 1", "json", None)
        assert upstream.status == 504
        assert json.loads(b"".join(upstream.body))["error"]["code"] == "analyst_timeout"
    finally:
        listener.close()
