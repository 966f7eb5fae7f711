"""Second attack review of the ClickHouse-compatible endpoint (issue 18): holes found in the mechanisms that
rewrite, re-run or audit the analyst's SQL. Each test fails until its hole is closed.

Reuses tests/test_attack_issue18.py's module-scoped endpoint (a private analyst server, its own instance here).
"""

from __future__ import annotations

import uuid
from urllib.parse import quote

import psycopg
import pytest

from tally.cli import main
from tests import test_attack_issue18 as first_review
from tests.test_analyst_server import query
from tests.test_attack_issue18 import audited, send

endpoint = first_review.endpoint  # its module-scoped fixture, one instance for this module

ESC = "\x1b"


def sql_log_lines(monkeypatch, capsys, servers, marker: str) -> list[str]:
    """`tally sql-log`'s table lines (and the error line after each) of the rows whose line names `marker`."""
    monkeypatch.setenv("TALLY_PG_DSN", servers.pg_dsn)
    capsys.readouterr()
    assert main(["sql-log", "--last", "1000"]) == 0
    lines = capsys.readouterr().out.splitlines()
    found = [i for i, line in enumerate(lines) if marker in line]
    assert found, f"no sql-log line names {marker}"
    return [lines[j] for i in found for j in (i, i + 1) if j < len(lines)]


# --- 1. terminal control sequences reach the admin's terminal through `tally sql-log` ------------------------
#
# POST /?default_format=%1B%5B2J%1B%5D0%3Bpwned%07 (User-Agent: M), a valid analyst token -> 400 "Code: 73 ... format
#   '\x1b[2J\x1b]0;pwned\x07' is not served" (the message escapes it), and the refusal is audited with that format
#   as sent (oltp/audit.py record_refusal keeps format[:40], only NUL replaced). `tally sql-log` prints the format
#   column raw: ESC [2J clears the admin's screen, ESC ]0;... sets the terminal title, BEL rings. The same for the
#   query text of ANY audited query (`SELECT 'M\x1b[2J\x07'` runs fine and is audited as sent): tally/cmd_sqllog.py
#   only folds whitespace (`" ".join(sql.split())`), and str.split() does not split on ESC, BEL or BS. Measured on a
#   `tally up` stack: `tally sql-log | od -c` shows `033 [ 2 J 033 [ 3 1 m P W N E D \a` in the format column and
#   `' a 033 [ 2 J 033 ] 0 ; t i t l e \a \b \b b` in the sql column.


def test_sql_log_prints_no_control_characters_from_an_endpoint_refusal(endpoint, servers, monkeypatch, capsys):
    marker = f"esc-{uuid.uuid4().hex[:8]}"
    status, _h, _b, _c = send(endpoint, "/?default_format=" + quote(f"{ESC}[2J{ESC}]0;pwned\x07"), b"SELECT 1",
                              {"User-Agent": marker})
    assert status == 400
    assert [row[0] for row in audited(servers.pg_dsn, marker)] == ["refused"]
    for line in sql_log_lines(monkeypatch, capsys, servers, marker):
        assert ESC not in line and "\x07" not in line, repr(line)


def test_sql_log_prints_no_control_characters_from_a_query(endpoint, servers, monkeypatch, capsys):
    marker = f"esc-{uuid.uuid4().hex[:8]}"
    sql = f"SELECT '{marker}{ESC}[2J{ESC}]0;pwned\x07\x08\x08' AS x FORMAT CSV"
    status, _h, _b, _c = send(endpoint, "/", sql.encode(), {"User-Agent": marker})
    assert status == 200
    for line in sql_log_lines(monkeypatch, capsys, servers, marker):
        assert ESC not in line and "\x07" not in line and "\x08" not in line, repr(line)



# The client column too: a User-Agent of obs-text bytes (HTTP allows 0x80-0xFF; waitress decodes them as Latin-1)
#   `c1-\x9b2J-\x9d0;t\x9c` is stored and printed as U+009B (CSI), U+009D (OSC), U+009C (ST): C1 controls, which
#   terminals that honour them take as ESC [ / ESC ] / ESC \\ (`od -c` of `tally sql-log`: `c 1 - 302 233 2 J`).


def test_sql_log_prints_no_c1_controls_from_a_user_agent(endpoint, servers, monkeypatch, capsys):
    marker = f"c1-{uuid.uuid4().hex[:8]}"
    status, _h, _b, _c = send(endpoint, "/?readonly=0", b"SELECT 1", {"User-Agent": f"{marker}\x9b2J\x9d0;t\x9c"})
    assert status == 400
    for line in sql_log_lines(monkeypatch, capsys, servers, marker):
        assert not any("\x80" <= ch <= "\x9f" for ch in line), repr(line)

# --- 2. a refusal stores up to 100,000 characters of whatever body was sent ----------------------------------
#
# POST /?readonly=0 with a 1,000,013-byte body `SELECT 1 -- AAAA...` -> 400 "Code: 164 ... Cannot modify 'readonly'"
#   (right), and the audit row keeps 100,000 characters of the body (oltp/audit.py MAX_SQL_CHARS), 6x the 16 KiB an
#   analyst query may be. The same without any URL parameter ("the query is 1000013 bytes long"). At the endpoint's
#   own rate limit (TALLY_API_RATE_LIMIT, 1200/minute per token) one analyst token writes ~120 MB a minute into
#   PostgreSQL's analyst_queries, for requests that never ran.


def test_a_refused_oversized_query_is_not_stored_beyond_the_query_limit(endpoint, servers):
    marker = f"flood-{uuid.uuid4().hex[:8]}"
    status, _h, _b, _c = send(endpoint, "/?readonly=0", ("SELECT 1 -- " + "A" * 500_000).encode(),
                              {"User-Agent": marker})
    assert status == 400
    ((state, sql, _error),) = audited(servers.pg_dsn, marker)
    assert state == "refused"
    assert len(sql) <= 16 * 1024, f"the audit row keeps {len(sql)} characters of a refused body"


# --- 3. a refusal that is not audited: a body over 1 MiB -----------------------------------------------------
#
# POST /?readonly=0 with a valid analyst token and a 1,100,000-byte body (User-Agent: M) -> 400 "Code: 36 ... the
#   request body is larger than 1 MiB", and no audit row (api/clickhouse_http.py `_http_error` answers werkzeug's
#   413 before `_query` runs). Every other refusal of a verified token is audited (attack review 1); this one lets
#   an analyst probe `readonly=0`, `max_result_rows=...` or `database=system` without a trace, by padding the body.


def test_an_oversized_body_from_a_valid_token_is_audited(endpoint, servers):
    marker = f"big-{uuid.uuid4().hex[:8]}"
    status, _h, _b, _c = send(endpoint, "/?readonly=0", b"SELECT 1 -- " + b"A" * 1_100_000, {"User-Agent": marker})
    assert 400 <= status < 500
    with psycopg.connect(servers.pg_dsn) as conn:
        rows = conn.execute("SELECT status FROM analyst_queries WHERE client = %s", (marker,)).fetchall()
    assert rows == [("refused",)], "a refused request of a verified token left no audit row"


# --- 4. EXPLAIN SYNTAX / EXPLAIN QUERY TREE print the server's own settings, the watchdog's tag included ---------
#
# POST / `EXPLAIN SYNTAX SELECT 1 FORMAT JSON` (analyst token) -> 200, the one row:
#   "SELECT 1\nFROM system.one\nSETTINGS final = '1', max_execution_time = '30', timeout_overflow_mode = 'throw',
#   max_memory_usage = '536870912', ..., max_result_rows = '10000', ..., allow_introspection_functions = '0',
#   log_comment = 'tally-analyst-5b9f92c74a1841e4955b7127b36fd59c', readonly = '1'"
#   and `EXPLAIN QUERY TREE SELECT 1 FORMAT JSON` ends with "SETTINGS final=1 max_execution_time=30 ... log_comment=
#   tally-analyst-<hex> readonly=1". The same through /api/v1/sql and `tally sql` (json, csv ...): tally's formats
#   read an EXPLAIN with client.query(text, settings=...), and clickhouse-connect's chDB client sends settings as a
#   trailing SETTINGS clause of the statement, which EXPLAIN SYNTAX and QUERY TREE then print. ADR 50's rule (no
#   server settings in what an analyst sees; tests/test_attack_issue18.py checks errors only) is broken by a
#   result. Since dcfabc6 (EXPLAIN read whole with raw_query, the same clause appended) in every endpoint format.

_SERVER_WORDS = ("max_result_rows", "max_memory_usage", "log_comment", "tally-analyst-", "readonly",
                 "allow_introspection_functions")


@pytest.mark.parametrize("sql", ["EXPLAIN SYNTAX SELECT 1 FORMAT JSON",
                                 "EXPLAIN SYNTAX oneline = 1 SELECT 1 FORMAT JSON",
                                 "EXPLAIN QUERY TREE SELECT 1 FORMAT JSON", "EXPLAIN SYNTAX SELECT 1",
                                 "EXPLAIN QUERY TREE SELECT 1 FORMAT CSV"])
def test_explain_on_the_endpoint_does_not_print_the_server_settings(endpoint, sql):
    status, _h, body, _c = send(endpoint, "/", sql.encode())
    for word in _SERVER_WORDS:
        assert word.encode() not in body, (status, body[:600])


@pytest.mark.parametrize("sql", ["EXPLAIN SYNTAX SELECT 1", "EXPLAIN QUERY TREE SELECT 1"])
def test_explain_in_tallys_formats_does_not_print_the_server_settings(analyst_url, sql):
    """Fixed by refusing these two kinds (they print the query back with its SETTINGS clause): a refusal naming
    the kind, and none of the server's words."""
    status, _h, body = query(analyst_url, sql, "json")
    assert status == 400 and b"is not allowed" in body, body[:300]
    for word in _SERVER_WORDS:
        assert word.encode() not in body, body[:600]


# --- 5. (not a hole: a contradiction) `SETTINGS readonly = 1` is refused saying readonly = 1 is accepted -----------
#
# POST / `SELECT 1 SETTINGS readonly = 1` -> 400 "Code: 164. DB::Exception: Cannot modify 'readonly' setting to '1':
#   the analyst endpoint is read-only (readonly = 1 or 2 is accepted). (READONLY)"; `POST /?readonly=1` `SELECT 1`
#   -> 200 "1". olap/ch_settings.py says the same names are taken in a trailing SETTINGS clause as in the URL;
#   `take_settings` sends the clause to `check_forwarded`, which knows no `readonly` (split_request_settings handles
#   it for the URL only).


def test_a_settings_clause_takes_readonly_1_as_the_url_does(endpoint):
    status, _h, body, _c = send(endpoint, "/", b"SELECT 1 SETTINGS readonly = 1")
    assert (status, body) == (200, b"1\n"), body[:300]
