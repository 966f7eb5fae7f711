"""The schema analysts rely on (issue 18 §2, ADR 52): tally.sites kept in sync from PostgreSQL, tally.countries,
a COMMENT on every analyst column, docs/analysts.md generated from the live schema, and times with their zone.

Against the session's PostgreSQL, chDB and analyst server; the sync under test runs in this process, on the
chDB directory the analyst server reads.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import logging
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import replace
from pathlib import Path
from zoneinfo import ZoneInfo

import psycopg
import pycountry
import pytest

from olap import analyst_tables, docs
from olap.allowlist import ANALYST_TABLES
from olap.analyst import AnalystQueryError, prepare
from olap.client import connect
from olap.countries import COMMON_NAMES, countries
from olap.formats import FORMATS
from olap.schema import ensure_schema
from olap.sites_sync import SiteRow, SitesSync
from oltp import sites
from tests.conftest import SECRET
from tests.test_analyst_server import make_token, query

pytestmark = pytest.mark.servers("postgres", "chdb", "analyst")
DB = "tally"
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def ch(servers):
    client = connect(servers.chdb_dsn)
    ensure_schema(client, DB)
    return client


def rows(analyst_url: str, sql: str) -> list[list]:
    status, _, body = query(analyst_url, sql)
    assert status == 200, body
    return json.loads(body)["rows"]


def until(what: str, probe, timeout: float = 30.0):
    """Poll `probe` until it returns a truthy value (generous: the sync runs every 2 s)."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


# --- countries ----------------------------------------------------------------------------------

def test_countries_has_every_iso_code_with_its_continent(ch, analyst_url):
    got = {code: (name, continent) for code, name, continent in
           rows(analyst_url, "SELECT code, name, continent FROM tally.countries ORDER BY code")}
    assert {c.alpha_2 for c in pycountry.countries} | {"XK"} == set(got)
    assert got["DE"] == ("Germany", "Europe") and got["JP"] == ("Japan", "Asia")
    assert got["BR"][1] == "South America" and got["AU"][1] == "Oceania" and got["EG"][1] == "Africa"
    assert got["US"][1] == "North America" and got["AQ"][1] == "Antarctica" and got["CI"][0] == "Côte d'Ivoire"
    assert rows(analyst_url, "SELECT continent FROM tally.countries WHERE code = 'DE'") == [["Europe"]]


def test_countries_have_their_un_region_and_subregion(ch, analyst_url):
    """The issue's columns (region/subregion): UN M49 by countryinfo, NULL where M49 has none; ClickHouse
    migration 6 adds them to a table migration 3 made, every row once (re-applying it changes nothing)."""
    got = {code: (region, subregion) for code, region, subregion in rows(
        analyst_url, "SELECT code, region, subregion FROM tally.countries WHERE code IN "
                     "('DE', 'US', 'BR', 'JP', 'AU', 'EG', 'XK', 'AQ')")}
    assert got["DE"] == ("Europe", "Western Europe") and got["US"] == ("Americas", "Northern America")
    assert got["BR"] == ("Americas", "Latin America and the Caribbean") and got["JP"] == ("Asia", "Eastern Asia")
    assert got["AU"] == ("Oceania", "Australia and New Zealand") and got["EG"] == ("Africa", "Northern Africa")
    assert got["XK"] == ("Europe", "Southern Europe") and got["AQ"] == (None, None)
    assert not [c.code for c in countries() if c.region is None and c.code not in ("AQ", "HM")]
    for statement in analyst_tables.migration_6(DB):  # as when a crash re-applies the migration
        ch.command(statement)
    assert ch.query(f"SELECT count(), uniqExact(code), countIf(region IS NULL) FROM {DB}.countries").result_rows == [
        (len(pycountry.countries) + 1, len(pycountry.countries) + 1, 2)]


def test_country_names_are_the_ones_people_use_with_the_official_one_kept(analyst_url):
    """pycountry's ISO names read as list entries ("Russian Federation", "Congo, The Democratic Republic of the")
    where it has no common name, and KR had no official name (walkthrough item 27)."""
    got = {code: (name, official) for code, name, official in rows(
        analyst_url, "SELECT code, name, official_name FROM tally.countries WHERE code IN "
                     "('KR', 'RU', 'CD', 'CG', 'US', 'DE', 'VN', 'GB')")}
    assert got["KR"] == ("South Korea", "Republic of Korea") and got["RU"] == ("Russia", "Russian Federation")
    assert got["CD"] == ("DR Congo", "Democratic Republic of the Congo")
    assert got["CG"] == ("Congo", "Republic of the Congo")
    assert got["VN"] == ("Vietnam", "Socialist Republic of Viet Nam")
    assert got["US"] == ("United States", "United States of America") and got["DE"][0] == "Germany"
    names = [c.name for c in countries()]
    lists = {"Bonaire, Sint Eustatius and Saba", "Saint Helena, Ascension and Tristan da Cunha"}  # places listed
    assert not [n for n in names if ", " in n and n not in lists], "a name reads as a list entry"
    assert set(COMMON_NAMES) <= {c.alpha_2 for c in pycountry.countries}


def test_filling_countries_again_adds_nothing(ch):
    before = ch.query(f"SELECT count() FROM {DB}.countries").result_rows[0][0]
    for statement in analyst_tables.migration_3(DB):  # as when a crash re-applies the migration
        ch.command(statement)
    assert ch.query(f"SELECT count() FROM {DB}.countries").result_rows[0][0] == before == len(pycountry.countries) + 1


# --- the allowlist ------------------------------------------------------------------------------

def test_the_dimension_tables_are_allowed_and_the_rest_still_refused(ch):
    assert {"events", "sites", "countries"} <= ANALYST_TABLES
    prepare(ch, "SELECT s.account, sum(e.value) FROM tally.events AS e INNER JOIN tally.sites AS s "
                "ON e.domain = s.domain GROUP BY s.account", DB)
    prepare(ch, "SELECT c.continent, count() FROM tally.events AS e LEFT JOIN tally.countries AS c "
                "ON e.country = c.code GROUP BY c.continent", DB)
    for sql, named in (("SELECT * FROM tally.consumer_offsets", "consumer_offsets"),
                       ("SELECT * FROM tally.schema_migrations", "schema_migrations"),
                       ("SELECT * FROM system.parts", "system.parts"),
                       ("SELECT * FROM other.sites", "other.sites"),
                       ("SELECT * FROM tally.sites AS s JOIN system.users AS u ON 1", "system.users")):
        with pytest.raises(AnalystQueryError) as info:
            prepare(ch, sql, DB)
        assert info.value.code == "refused" and named in info.value.message


# --- the sites sync -----------------------------------------------------------------------------

def _site(domain: str, account: str | None = "Acme", **changes) -> SiteRow:
    when = dt.datetime(2026, 11, 2, 10, 0, 0, 123456, tzinfo=dt.UTC)
    return replace(SiteRow(domain, account, "UTC", (), False, when, when), **changes)


@pytest.fixture()
def scratch(ch):
    """A database of its own holding only a sites table (the sync below would mark tally's other sites removed)."""
    db = f"t_sites_{uuid.uuid4().hex[:10]}"
    ch.command(f"CREATE DATABASE {db}")
    ch.command(analyst_tables.migration_3(db)[0])
    yield db
    ch.command(f"DROP DATABASE IF EXISTS {db}")


def final(ch, db: str) -> dict[str, tuple]:
    return {r[0]: r[1:] for r in ch.query(f"SELECT domain, account, tz, keep_query, removed_at FROM {db}.sites FINAL"
                                          ).result_rows}


def test_the_sync_writes_changes_only_and_keeps_removed_sites(ch, scratch):
    registry = [_site("a.test"), _site("b.test", None, keep_query=("q",))]
    sync = SitesSync(lambda: registry, ch, scratch)
    assert sync.sync_once() == 2 and sync.sync_once() == 0  # unchanged: nothing written
    assert final(ch, scratch) == {"a.test": ("Acme", "UTC", [], None), "b.test": (None, "UTC", ["q"], None)}
    registry[1] = _site("b.test", "Other Ltd", keep_query=("q",), tz="Asia/Tokyo")
    assert sync.sync_once() == 1
    assert final(ch, scratch)["b.test"] == ("Other Ltd", "Asia/Tokyo", ["q"], None)
    del registry[0]
    assert sync.sync_once() == 1 and sync.sync_once() == 0
    removed = final(ch, scratch)["a.test"]
    assert removed[:3] == ("Acme", "UTC", []) and removed[3] is not None  # kept, with removed_at
    registry.append(_site("a.test", "Acme"))  # registered again
    assert sync.sync_once() == 1 and final(ch, scratch)["a.test"] == ("Acme", "UTC", [], None)
    fresh = SitesSync(lambda: registry, ch, scratch)  # a restarted process reads what ClickHouse has
    assert fresh.sync_once() == 0


def test_a_clock_going_back_does_not_hide_a_change(ch, scratch):
    clock = [dt.datetime(2030, 1, 1, tzinfo=dt.UTC)]
    registry = [_site("a.test", "First")]
    sync = SitesSync(lambda: registry, ch, scratch, now=lambda: clock[0])
    sync.sync_once()
    clock[0] -= dt.timedelta(days=400)
    registry[0] = _site("a.test", "Second")
    sync.sync_once()
    assert final(ch, scratch)["a.test"][0] == "Second"


def test_a_reader_never_sees_the_table_half_written(ch, scratch, servers):
    import clickhouse_connect

    registry = [_site(f"s{i}.test", "A") for i in range(300)]
    sync = SitesSync(lambda: registry, ch, scratch)
    sync.sync_once()
    reader = clickhouse_connect.get_client(dsn=servers.chdb_dsn)  # a query beside the writer's
    seen: set[tuple[int, int]] = set()
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            seen.add(tuple(reader.query(f"SELECT count(), uniqExact(account) FROM {scratch}.sites FINAL "
                                        "WHERE removed_at IS NULL").result_rows[0]))

    thread = threading.Thread(target=read)
    thread.start()
    try:
        for account in ("B", "C", "D", "E"):
            registry[:] = [_site(r.domain, account) for r in registry]
            sync.sync_once()
            time.sleep(0.05)
    finally:
        stop.set()
        thread.join()
        reader.close()
    assert seen and {count for count, _ in seen} == {300} and {accounts for _, accounts in seen} == {1}


def test_the_sync_retries_a_failing_registry_and_says_so_once(ch, scratch, caplog):
    calls = []

    def read() -> list[SiteRow]:
        calls.append(1)
        if len(calls) <= 3:
            raise psycopg.OperationalError("connection refused")
        return [_site("a.test")]

    stop = threading.Event()
    sync = SitesSync(read, ch, scratch)
    with caplog.at_level(logging.WARNING, logger="olap.sites_sync"):
        thread = threading.Thread(target=sync.run, args=(stop, 0.01))
        thread.start()
        try:
            until("the sync to recover", lambda: "a.test" in final(ch, scratch), timeout=20)
        finally:
            stop.set()
            thread.join()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "connection refused" in warnings[0].getMessage()


@pytest.fixture(scope="module")
def sync_running(servers, ch):
    """The sync as the loader's process runs it (tally/roots.py), against the session's stores."""
    from core.config import Settings
    from tally.roots import start_sites_sync

    settings = Settings.from_env({"TALLY_PG_DSN": servers.pg_dsn, "TALLY_CLICKHOUSE_DSN": servers.chdb_dsn,
                                  "TALLY_SECRET": SECRET, "TALLY_REGISTRY_REFRESH_S": "0.5"})
    stop = start_sites_sync(settings, servers.pg_dsn)
    assert start_sites_sync(settings, servers.pg_dsn) is stop  # one per process and pair of stores
    yield
    stop.set()


@pytest.mark.servers("postgres", "broker", "chdb", "analyst")
def test_the_loaders_process_runs_the_sync(make_settings, monkeypatch):
    """With chDB the loader runs inside the analyst server (`analyst-server --with-loader`): so does the sync."""
    from tally import roots

    started = []
    monkeypatch.setattr(roots, "start_sites_sync", lambda settings, dsn: started.append(dsn))
    settings = make_settings()
    loop = roots.build_loader_loop(settings)
    loop.close()
    assert started == [settings.pg_dsn]


def account_of(analyst_url: str, domain: str) -> list[list]:
    return rows(analyst_url, f"SELECT account, tz, removed_at IS NULL FROM tally.sites WHERE domain = '{domain}'")


def test_an_account_change_reaches_analysts_without_a_restart(sync_running, servers, ch, analyst_url):
    one, two = (f"s{uuid.uuid4().hex[:10]}.example.com" for _ in range(2))
    sites.add(servers.pg_dsn, one, account="Acme Inc", tz="Europe/Berlin")
    sites.add(servers.pg_dsn, two, account="Other Ltd")
    until("the new sites", lambda: account_of(analyst_url, one) == [["Acme Inc", "Europe/Berlin", True]]
          and account_of(analyst_url, two) == [["Other Ltd", "UTC", True]])
    sites.update(servers.pg_dsn, two, sites.Change(account="Acme Inc"))
    until("the account change", lambda: account_of(analyst_url, two) == [["Acme Inc", "UTC", True]])
    now = dt.datetime.now(dt.UTC)
    ch.insert(f"{DB}.events", [[uuid.uuid4().hex, d, f"https://{d}/", now, now, "impression", v]
                               for d, v in ((one, 10.5), (two, 4.5), (two, 1))],
              column_names=["hash", "domain", "url", "ts", "received_at", "type", "value"])
    revenue = rows(analyst_url, "SELECT s.account, sum(e.value) AS revenue, count() FROM tally.events AS e INNER JOIN "
                                f"tally.sites AS s ON e.domain = s.domain WHERE e.domain IN ('{one}', '{two}') "
                                "GROUP BY s.account")
    assert revenue == [["Acme Inc", "16.000000", 3]]
    sites.remove(servers.pg_dsn, one)
    until("the removal", lambda: account_of(analyst_url, one) == [["Acme Inc", "Europe/Berlin", False]])


def test_sites_holds_nothing_secret(ch):
    names = {r[0] for r in ch.query("SELECT name FROM system.columns WHERE database = {db:String} AND "
                                    "table = 'sites'", parameters={"db": DB}).result_rows}
    assert names == {"domain", "account", "tz", "keep_query", "raw_urls", "registered_at", "updated_at",
                     "removed_at", "synced_at"}


# --- comments and docs/analysts.md --------------------------------------------------------------

def test_every_analyst_column_has_a_meaning_a_null_rule_and_an_example(ch):
    columns = ch.query("SELECT table, name, type, comment FROM system.columns WHERE database = {db:String} "
                       "AND has({t:Array(String)}, table)", parameters={"db": DB, "t": sorted(ANALYST_TABLES)}
                       ).result_rows
    assert {t for t, *_ in columns} == ANALYST_TABLES
    for table, name, kind, comment in columns:
        meaning, sep, example = comment.partition(" Example: ")
        assert sep and example and len(meaning) > 20, (table, name, comment)
        says_when_null = "NULL " in meaning.replace("Never NULL", "")
        assert ("Never NULL" not in meaning) == ("Nullable(" in kind) == says_when_null, (table, name, kind, comment)


def test_the_schema_in_the_docs_is_the_live_schema(ch):
    document = (ROOT / "docs" / "analysts.md").read_text()
    section = docs.schema_markdown(ch, DB)
    assert docs.with_section(document, section) == document, "docs/analysts.md is stale: run python -m olap.docs"
    for table in ANALYST_TABLES:
        assert f"### `{DB}.{table}`" in section
    assert "<!-- questions:begin -->" in document and "<!-- questions:end -->" in document


def test_the_docs_command_regenerates_the_section(tmp_path):
    document = (ROOT / "docs" / "analysts.md").read_text()
    stale = tmp_path / "analysts.md"
    stale.write_text(docs.with_section(document, f"{docs.BEGIN}\nold\n{docs.END}"))
    check = subprocess.run([sys.executable, "-m", "olap.docs", "--check", "--path", str(stale)], cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
    assert check.returncode == 1 and "out of date" in check.stderr
    # rewriting is the same code path without --check; the section it writes is what the test above compares
    with pytest.raises(ValueError):
        docs.with_section("no markers here", "x")


# --- times with their zone ----------------------------------------------------------------------

BERLIN = dt.datetime(2026, 12, 6, 10, 9, 17, tzinfo=ZoneInfo("Europe/Berlin"))
TYPES = ["DateTime64(3, 'UTC')", "DateTime('UTC')", "Date", "DateTime('Europe/Berlin')", "Nullable(DateTime64(6))"]
ROW = [dt.datetime(2026, 12, 6, 9, 9, 17, 292000), dt.datetime(2026, 12, 6, 9, 9, 17), dt.date(2026, 12, 6), BERLIN,
       dt.datetime(2026, 12, 6, 9, 9, 17, 5, tzinfo=dt.UTC)]
WANT = ["2026-12-06T09:09:17.292Z", "2026-12-06T09:09:17Z", "2026-12-06", "2026-12-06T10:09:17+01:00",
        "2026-12-06T09:09:17.000005Z"]


def encode(fmt: str) -> str:
    encoder = FORMATS[fmt].encoder()
    names = [f"c{i}" for i in range(len(TYPES))]
    return (encoder.start(names, TYPES) + encoder.rows([ROW]) + encoder.end()).decode()


def test_times_carry_their_zone_in_every_format():
    assert json.loads(encode("json"))["rows"] == [WANT]
    assert list(json.loads(encode("jsonl")).values()) == WANT
    assert list(csv.reader(io.StringIO(encode("csv"))))[1] == WANT
    assert encode("tsv").splitlines()[1].split("\t") == WANT
    bare = FORMATS["csv"].encoder()  # rows before (or without) a header: every value still written
    assert bare.rows([ROW[:2]]).decode().strip() == "2026-12-06T09:09:17.292Z,2026-12-06T09:09:17Z"


def test_times_carry_their_zone_through_the_analyst_server_and_the_api(analyst_url, make_settings, servers):
    from tally.roots import build_api

    sql = ("SELECT toDateTime64('2026-12-06 09:09:17.292', 3, 'UTC') AS t, toDate('2026-12-06') AS d, "
           "toTimezone(t, 'Asia/Tokyo') AS tokyo, [t] AS a")
    assert rows(analyst_url, sql) == [["2026-12-06T09:09:17.292Z", "2026-12-06", "2026-12-06T18:09:17.292+09:00",
                                       ["2026-12-06T09:09:17.292Z"]]]
    app = build_api(make_settings())
    try:
        headers = {"Authorization": f"Bearer {make_token(servers.pg_dsn, 'analyst')}"}
        resp = app.test_client().post("/api/v1/sql", json={"sql": sql}, headers=headers)
        assert resp.status_code == 200 and resp.json["rows"][0][:2] == ["2026-12-06T09:09:17.292Z", "2026-12-06"]
        tsv = app.test_client().post("/api/v1/sql?format=tsv", json={"sql": sql}, headers=headers)
        assert tsv.get_data(as_text=True).splitlines()[1].split("\t")[0] == "2026-12-06T09:09:17.292Z"
    finally:
        app.extensions["tally_backends"].rollups.pool.close()
