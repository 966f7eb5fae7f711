"""Finding A of the ADR 32 review: work left behind at the deadline has a hard bound.

The watchdog answers at the deadline and frees the slot, but ClickHouse finishes the block it is
in, and one block can be made to run for hours (quadratic array work on arrays built without
`range`). So a query cut at its deadline (or left behind by a caller that went away) that is still
computing `overrun_grace_s` after its deadline makes the watchdog log it at CRITICAL, with its tag
and audit id, and end the process with EXIT_OVERRUN for its supervisor to restart.

The watchdog's contract with an injected `exit` (no ClickHouse; a thread that waits stands for a
block); then `tally analyst-server` itself, as a subprocess with a one-second grace, exits with the
code while a quadratic query is abandoned, and the API answers 503 for a query it was still running.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import subprocess
import sys
import threading
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
import pytest

from core.config import SQL_OVERRUN_GRACE_MIN_S, Settings
from core.keys import internal_token
from infra.processes import free_port, tcp_open, wait_until
from olap.watchdog import EXIT_OVERRUN, DeadlineReached, Watchdog
from tests.conftest import SECRET
from tests.test_analyst_watchdog import Calls, quadratic

ROOT = Path(__file__).resolve().parents[1]


class Exits:
    def __init__(self) -> None:
        self.codes: list[int] = []
        self.called = threading.Event()

    def __call__(self, code: int) -> None:
        self.codes.append(code)
        self.called.set()


def block(proceed: threading.Event):
    def work(tag):
        proceed.wait(60)  # stands for ClickHouse inside one block
        yield b"late"
    return work


def test_a_cut_query_still_computing_after_the_grace_ends_the_process_loudly(caplog):
    calls, exits, proceed = Calls(), Exits(), threading.Event()
    watchdog = Watchdog(calls.killed.append, max_abandoned=1, overrun_grace_s=0.3, exit=exits)
    run = watchdog.start(block(proceed), 0.2, calls.release, calls.close_client)
    try:
        with caplog.at_level(logging.CRITICAL, logger="olap.watchdog"):
            with pytest.raises(DeadlineReached):
                run.next_chunk()
            run.audit_id = 4242  # what the analyst server sets once the audit row is written
            assert calls.killed == [run.tag] and calls.released == [True]
            assert exits.called.wait(10), "the overrun never ended the process"
        assert exits.codes == [EXIT_OVERRUN]
        (record,) = [r for r in caplog.records if r.levelno == logging.CRITICAL]
        assert run.tag in record.getMessage() and "audit id 4242" in record.getMessage()
    finally:
        proceed.set()
        run.thread.join(10)
    assert exits.codes == [EXIT_OVERRUN]  # once


def test_a_cut_query_that_ends_within_the_grace_does_not(caplog):
    calls, exits, proceed = Calls(), Exits(), threading.Event()
    watchdog = Watchdog(calls.killed.append, max_abandoned=1, overrun_grace_s=1.0, exit=exits)
    run = watchdog.start(block(proceed), 0.2, calls.release, calls.close_client)
    with pytest.raises(DeadlineReached):
        run.next_chunk()
    proceed.set()  # its block ends 0 s after the deadline
    run.thread.join(10)
    assert calls.closed == 1 and watchdog.abandoned == 0
    assert not exits.called.wait(1.5)  # past the grace: nothing
    assert not [r for r in caplog.records if r.levelno == logging.CRITICAL]


def test_an_overdue_query_that_kept_its_slot_is_bounded_too():
    """Over the abandoned cap the slot stays with the cut query; it must still end within the grace."""
    calls, exits, proceed = Calls(), Exits(), threading.Event()
    watchdog = Watchdog(calls.killed.append, max_abandoned=0, overrun_grace_s=0.3, exit=exits)
    run = watchdog.start(block(proceed), 0.2, calls.release, calls.close_client)
    try:
        with pytest.raises(DeadlineReached):
            run.next_chunk()
        assert not run.slot_freed
        assert exits.called.wait(10) and exits.codes == [EXIT_OVERRUN]
    finally:
        proceed.set()
        run.thread.join(10)


def test_a_query_left_behind_by_its_caller_is_killed_and_bounded():
    """A stream whose client went away between two blocks: before, nothing killed the block it was in and it
    held its slot for as long as that block ran."""
    calls, exits, proceed = Calls(), Exits(), threading.Event()

    def work(tag):
        yield b"first block"
        proceed.wait(60)  # the second block
        yield b"second block"

    watchdog = Watchdog(calls.killed.append, max_abandoned=1, overrun_grace_s=0.3, exit=exits)
    run = watchdog.start(work, 0.5, calls.release, calls.close_client)
    try:
        assert run.next_chunk() == b"first block"
        run.close()  # the caller went away
        assert calls.killed == [run.tag]  # told to stop at once
        assert exits.called.wait(10) and exits.codes == [EXIT_OVERRUN]
        assert calls.released == []  # the slot comes back when the block ends
    finally:
        proceed.set()
        run.thread.join(10)
    assert calls.released == [False]


def test_the_grace_is_a_setting_with_a_floor_of_30_s(make_settings):
    from tally.roots import build_analyst_server

    base = {"TALLY_SECRET": SECRET}
    assert Settings.from_env(base).sql_overrun_grace_s == SQL_OVERRUN_GRACE_MIN_S == 30.0
    assert Settings.from_env({**base, "TALLY_SQL_MAX_EXECUTION_S": "120"}).sql_overrun_grace_s == 120.0
    assert Settings.from_env({**base, "TALLY_SQL_OVERRUN_GRACE_S": "5"}).sql_overrun_grace_s == 5.0
    app = build_analyst_server(make_settings(TALLY_SQL_OVERRUN_GRACE_S="7"))
    app.extensions["tally_audit_pool"].close()  # not left to the garbage collector (ConnectionPool.__del__)
    assert app.extensions["tally_watchdog"].overrun_grace_s == 7.0
    assert app.config["TALLY_ANALYST"].overrun_grace == 7.0


# --- the real analyst server ------------------------------------------------------------------------------

def post(url: str, sql: str, token_id: str) -> tuple[int, dict]:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=60)
    try:
        conn.request("POST", "/v1/query", body=json.dumps({"sql": sql, "format": "json", "token_id": token_id}),
                     headers={"Content-Type": "application/json", "Authorization": f"Bearer {internal_token(SECRET)}"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read() or b"{}")
    finally:
        conn.close()


def test_the_analyst_server_exits_with_the_code_while_a_quadratic_query_is_abandoned(servers, make_settings, tmp_path):
    from tally.roots import build_api
    from tests.test_analyst_server import make_token

    port = free_port()
    url, logs = f"http://127.0.0.1:{port}", tmp_path / "logs"
    env = {**os.environ, "TALLY_HOME": str(tmp_path / "home"), "TALLY_PG_DSN": servers.pg_dsn,
           "TALLY_CLICKHOUSE_DSN": f"chdb://{tmp_path / 'chdb'}", "TALLY_SECRET": SECRET, "TALLY_ANALYST_URL": url,
           "TALLY_SQL_MAX_EXECUTION_S": "3", "TALLY_SQL_OVERRUN_GRACE_S": "3", "TALLY_SQL_MAX_CONCURRENT": "1",
           "TALLY_RECONCILE_INTERVAL_S": "0", "TALLY_LOG_DIR": str(logs), "TALLY_LOG_FORMAT": "text"}
    out = tmp_path / "analyst-server.out"
    proc = subprocess.Popen([sys.executable, "-m", "tally.cli", "analyst-server"], cwd=ROOT, env=env,
                            stdout=out.open("wb"), stderr=subprocess.STDOUT)
    api = build_api(make_settings(TALLY_ANALYST_URL=url, TALLY_SQL_MAX_EXECUTION_S="3"))
    token_id = f"tok_{uuid.uuid4().hex[:10]}"
    try:
        wait_until(lambda: tcp_open("127.0.0.1", port), what="tally analyst-server", timeout=60, proc=proc,
                   log_path=out)
        # 800,000 elements: tens of seconds inside one block, far past the 3 s deadline + 3 s grace (a 1 s grace
        # let a loaded machine reach the overrun exit before the request thread had written the timeout answer)
        status, body = post(url, f"SELECT {quadratic('800000 + number')} AS h FROM numbers(1)", token_id)
        assert status == 400 and body["error"]["code"] == "query_timeout", body
        assert proc.poll() is None  # answered at the deadline; the process goes on within the grace
        # a query another analyst sends meanwhile, through the API: the slot was handed back, so it runs ...
        headers = {"Authorization": f"Bearer {make_token(servers.pg_dsn, 'analyst')}"}
        other = api.test_client().post("/api/v1/sql", headers=headers,
                                       json={"sql": f"SELECT {quadratic('800001 + number')} AS h FROM numbers(1)"})
        # ... until the overrun ends the process under it: a 5xx, not a hang and not a wrong answer
        assert other.status_code == 503 and other.json["error"]["code"] == "analyst_unavailable", other.data
        assert proc.wait(timeout=60) == EXIT_OVERRUN
    finally:
        api.extensions["tally_backends"].rollups.pool.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    with psycopg.connect(servers.pg_dsn) as conn:
        (audit_id, error), = conn.execute("SELECT id, error FROM analyst_queries WHERE token_id = %s",
                                          (token_id,)).fetchall()
    tag = error.split("query tag ")[1].rstrip(")")
    assert tag.startswith("tally-analyst-")
    text = (logs / "analyst-server.log").read_text()
    (line,) = [line for line in text.splitlines() if "CRITICAL" in line]
    assert tag in line and f"audit id {audit_id}" in line and f"exiting with code {EXIT_OVERRUN}" in line
