"""`tally reconcile` against real stores: PostgreSQL rollups vs chDB events through the analyst server's internal
route."""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import psycopg
import pytest

from core.keys import internal_token
from olap.aggregates import ClickHouseAggregates, RemoteAggregates, parse_request
from olap.client import connect
from oltp.reconcile import (
    Groups,
    NotSettled,
    Totals,
    ceil_quarter,
    compare,
    floor_quarter,
    latest_mismatches,
    loader_reached,
    reconcile,
)
from tally.cli import main
from tally.roots import build_loader_loop, build_rollup_loop
from tests.conftest import SECRET
from tests.test_pipeline import Pipeline

NOW = datetime.now(UTC)


def mid(minutes: int) -> datetime:
    """The middle of the quarter hour that held the instant `minutes` ago (so a few seconds never change it)."""
    return floor_quarter(datetime.now(UTC) - timedelta(minutes=minutes)) + timedelta(minutes=7, seconds=30)


class Stack(Pipeline):
    """The test pipeline, but with the production consumer groups (on the test's own topic), as the CLI expects."""

    def __init__(self, settings) -> None:
        super().__init__(settings)
        self.rollups.close()
        self.loader.close()
        self.rollups = build_rollup_loop(settings)
        self.loader = build_loader_loop(settings)

    def send(self, domain: str, spec: list[tuple[int, str, str | None, int]]) -> int:
        """spec: (minutes ago, type, value, count); posts, ships and drains both workers. Returns events sent."""
        events = []
        for minutes, kind, value, count in spec:
            ts = mid(minutes).isoformat()
            for i in range(count):
                e = {"domain": domain, "url": f"https://{domain}/{minutes}/{i}", "type": kind, "ts": ts}
                if value is not None:
                    e["value"] = value
                events.append(e)
        for i in range(0, len(events), 400):
            self.post(events[i:i + 400])
        self.ship()
        self.drain()
        return len(events)


@pytest.fixture()
def stack(settings):
    s = Stack(settings)
    yield s
    s.close()


def cli_runner(settings, monkeypatch, capsys):
    """Run `tally ...` in this process with these settings as its environment: (exit code, stdout, stderr)."""
    for key in [k for k in os.environ if k.startswith("TALLY_")]:
        monkeypatch.delenv(key)
    for key, value in settings.raw.items():
        monkeypatch.setenv(key, value)

    def run(*argv: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = main(list(argv))
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.fixture()
def cli(settings, monkeypatch, capsys):
    return cli_runner(settings, monkeypatch, capsys)


def window() -> tuple[str, str]:
    now = datetime.now(UTC)
    return (now - timedelta(hours=3)).isoformat(), (now + timedelta(minutes=15)).isoformat()


def rows(dsn: str, domain: str, table: str = "rollup_15m") -> list[tuple]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(f"SELECT event_type, bucket_start, events, valued, value_sum, value_min, value_max"
                            f" FROM {table} WHERE domain = %s ORDER BY 1, 2", (domain,)).fetchall()


TRAFFIC = [(70, "impression", None, 12), (70, "impression", "1.25", 3), (40, "pageview", None, 5),
           (10, "impression", "0.5", 7), (10, "pageview", "2", 2)]


def test_clean_stores_have_no_differences(stack, cli, domain):
    stack.send(domain, TRAFFIC)
    lo, hi = window()
    code, out, err = cli("reconcile", "--from", lo, "--to", hi, "--domain", domain)
    assert code == 0 and "tally reconcile:" not in err, out + err
    assert "0 differences" in out
    code, out, _ = cli("reconcile", "--from", lo, "--to", hi, "--domain", domain, "--json")
    body = json.loads(out)
    assert code == 0 and body["differences"] == [] and body["domain"] == domain
    assert body["buckets_compared"] == 4  # (impression, pageview) x the 3 quarter hours used, minus the empty pair


def test_corrupted_rollups_are_listed_and_exit_1(stack, cli, settings, domain):
    stack.send(domain, TRAFFIC)
    with psycopg.connect(settings.pg_dsn, autocommit=True) as conn:
        before = conn.execute("SELECT count(*) FROM reconcile_runs").fetchone()[0] \
            if conn.execute("SELECT to_regclass('reconcile_runs')").fetchone()[0] else 0
        conn.execute("UPDATE rollup_15m SET events = events + 3 WHERE domain = %s AND event_type = 'impression'"
                     " AND valued = 7", (domain,))
        conn.execute("DELETE FROM rollup_15m WHERE domain = %s AND event_type = 'pageview' AND valued = 0", (domain,))
    lo, hi = window()
    code, out, err = cli("reconcile", "--from", lo, "--to", hi, "--domain", domain, "--json")
    assert code == 1, err
    diffs = json.loads(out)["differences"]
    by_field = {(d["type"], d["field"]): d for d in diffs}
    assert by_field[("impression", "events")]["diff"] == 3
    assert by_field[("impression", "events")]["pg"] == 10 and by_field[("impression", "events")]["ch"] == 7
    assert by_field[("pageview", "events")] == {**by_field[("pageview", "events")], "pg": 0, "ch": 5, "diff": -5}
    assert len(diffs) == 2  # only those two; the other fields and buckets agree
    code, out, _ = cli("reconcile", "--from", lo, "--to", hi, "--domain", domain)
    assert code == 1
    assert "2 differences in 2 buckets" in out and domain[:20] in out
    with psycopg.connect(settings.pg_dsn) as conn:
        recorded = conn.execute("SELECT source, status, mismatches FROM reconcile_runs ORDER BY id DESC LIMIT 2"
                                ).fetchall()
        assert conn.execute("SELECT count(*) FROM reconcile_runs").fetchone()[0] == before + 2
    assert recorded == [("cli", "differences", 2)] * 2


def test_value_corruption_is_a_difference(stack, cli, settings, domain):
    stack.send(domain, TRAFFIC)
    with psycopg.connect(settings.pg_dsn, autocommit=True) as conn:
        conn.execute("UPDATE rollup_15m SET value_sum = value_sum + 1, value_max = 99 WHERE domain = %s"
                     " AND event_type = 'pageview' AND valued = 2", (domain,))
    lo, hi = window()
    code, out, _ = cli("reconcile", "--from", lo, "--to", hi, "--domain", domain, "--json")
    diffs = {d["field"]: d for d in json.loads(out)["differences"]}
    assert code == 1 and set(diffs) == {"value_sum", "value_max"}
    assert Decimal(diffs["value_sum"]["diff"]) == 1 and Decimal(diffs["value_max"]["ch"]) == 2


def test_domain_filter_compares_only_that_domain(stack, cli, settings, domain):
    other = "other-" + domain
    stack.send(domain, TRAFFIC[:2])
    stack.send(other, TRAFFIC[:2])
    with psycopg.connect(settings.pg_dsn, autocommit=True) as conn:
        conn.execute("DELETE FROM rollup_15m WHERE domain = %s", (other,))
    lo, hi = window()
    assert cli("reconcile", "--from", lo, "--to", hi, "--domain", domain)[0] == 0
    code, out, _ = cli("reconcile", "--from", lo, "--to", hi, "--domain", other, "--json")
    assert code == 1 and {d["domain"] for d in json.loads(out)["differences"]} == {other}


@pytest.mark.parametrize("args, message", [
    (["--from", "yesterday", "--to", "2026-01-01T00:00:00Z"], "--from 'yesterday' is not an ISO-8601 time"),
    (["--from", "2026-01-01T00:00:00Z", "--to", "2026-01-01T10:00:00"], "--to '2026-01-01T10:00:00' has no UTC offset"),
    (["--from", "2026-01-02T00:00:00Z", "--to", "2026-01-01T00:00:00Z"], "must be before --to"),
    (["--from", "2026-01-01T00:00:00Z", "--to", "2026-01-01T00:00:00+00:00"], "must be before --to"),
    (["--from", "2020-01-01T00:00:00Z", "--to", "2026-01-01T00:00:00Z"], "longer than 400 days"),
    (["--from", "2026-01-01T00:00:00Z", "--to", "2026-01-02T00:00:00Z", "--domain", " "], "--domain is empty"),
])
@pytest.mark.parametrize("command", ["reconcile", "rebuild"])
def test_bad_arguments_exit_2_and_write_nothing(cli, settings, command, args, message):
    with psycopg.connect(settings.pg_dsn, autocommit=True) as conn:
        conn.execute("SELECT 1")
        runs = conn.execute("SELECT count(*) FROM reconcile_runs").fetchone()[0] \
            if conn.execute("SELECT to_regclass('reconcile_runs')").fetchone()[0] else 0
        rollups = conn.execute("SELECT count(*), coalesce(sum(events), 0) FROM rollup_15m").fetchone()
    code, out, err = cli(command, *args)
    assert code == 2 and out == ""
    assert message in err and err.startswith(f"tally {command}: ")
    with psycopg.connect(settings.pg_dsn, autocommit=True) as conn:
        if runs:
            assert conn.execute("SELECT count(*) FROM reconcile_runs").fetchone()[0] == runs
        assert conn.execute("SELECT count(*), coalesce(sum(events), 0) FROM rollup_15m").fetchone() == rollups


def test_missing_secret_with_embedded_clickhouse_is_a_configuration_error(cli, monkeypatch):
    monkeypatch.delenv("TALLY_SECRET")
    lo, hi = window()
    code, _, err = cli("reconcile", "--from", lo, "--to", hi)
    assert code == 2 and "TALLY_SECRET" in err


def test_unreachable_analyst_server_exits_3(cli, monkeypatch, settings, domain):
    from infra.processes import free_port
    from tests.conftest import registered

    registered(settings.pg_dsn, domain)  # an unregistered --domain exits 2 first (ADR 48)
    monkeypatch.setenv("TALLY_ANALYST_URL", f"http://127.0.0.1:{free_port()}")
    lo, hi = window()
    code, out, err = cli("reconcile", "--from", lo, "--to", hi, "--domain", domain)
    assert code == 3 and "unreachable" in err and out == ""


# ------------------------------------------------------------------ events in flight are not differences

def test_events_only_in_clickhouse_so_far_are_in_flight_not_differences(stack, settings, domain):
    stack.send(domain, TRAFFIC[:1])
    stack.post([{"domain": domain, "url": f"https://{domain}/late", "type": "impression",
                 "ts": mid(70).isoformat()}] * 4)
    stack.ship()
    stack.loader.drain()  # the loader has them, the rollup worker not yet
    source = ClickHouseAggregates(connect(settings.clickhouse_dsn), settings.clickhouse_database)
    groups = Groups("tally-rollups", "tally-loader", settings.topic)
    lo, hi = floor_quarter(NOW - timedelta(hours=3)), ceil_quarter(datetime.now(UTC))
    with psycopg.connect(settings.pg_dsn) as conn:
        first = compare(*_both(conn, source, lo, hi, domain))
        assert [(d.field, d.pg, d.ch) for d in first] == [("events", 12, 16)]  # what a naive comparison sees
        report = reconcile(conn, source, lo, hi, groups, domain=domain, wait_s=5)
        assert report.differences == [] and report.rechecked == 1
        # ... unless ClickHouse received them long enough ago for PostgreSQL to have had them by now.
        late = reconcile(conn, source, lo, hi, groups, domain=domain, wait_s=5, settle_s=-60)
        assert [(d.field, d.pg, d.ch) for d in late.differences] == [("events", 12, 16)]
    stack.rollups.drain()
    with psycopg.connect(settings.pg_dsn) as conn:
        assert reconcile(conn, source, lo, hi, groups, domain=domain, wait_s=5).differences == []


def _both(conn, source, lo, hi, domain):
    from oltp.reconcile import from_rows, pg_totals

    pg = pg_totals(conn, lo, hi, domain)
    conn.commit()
    return pg, from_rows(source.aggregates(lo, hi, domain))


def test_a_loader_behind_the_rollup_worker_is_waited_for(stack, settings, domain):
    stack.send(domain, TRAFFIC[:1])
    stack.post([{"domain": domain, "url": f"https://{domain}/x", "type": "impression",
                 "ts": mid(70).isoformat()}] * 4)
    stack.ship()
    stack.rollups.drain()  # PostgreSQL has them, ClickHouse not yet
    source = ClickHouseAggregates(connect(settings.clickhouse_dsn), settings.clickhouse_database)
    groups = Groups("tally-rollups", "tally-loader", settings.topic)
    lo, hi = floor_quarter(NOW - timedelta(hours=3)), ceil_quarter(datetime.now(UTC))
    with psycopg.connect(settings.pg_dsn) as conn:
        with pytest.raises(NotSettled, match="has not reached the rollup worker's offsets"):
            reconcile(conn, source, lo, hi, groups, domain=domain, wait_s=1)
        loader = threading.Thread(target=lambda: (time.sleep(1.0), stack.loader.drain()))
        loader.start()
        report = reconcile(conn, source, lo, hi, groups, domain=domain, wait_s=60)
        loader.join()
    assert report.differences == [] and report.rechecked == 1


# ------------------------------------------------------------------ pieces

def test_loader_reached_compares_offsets_of_one_incarnation():
    assert loader_reached({0: ("a", 5), 1: ("a", 0)}, {0: ("a", 5)})
    assert not loader_reached({0: ("a", 5)}, {0: ("a", 4)})
    assert not loader_reached({0: ("a", 5)}, {})
    assert loader_reached({0: ("old", 50)}, {0: ("new", 3)})  # another incarnation: cannot be ordered, skipped
    assert loader_reached({}, {0: ("a", 1)})


def test_compare_counts_a_missing_side_as_zero():
    t = datetime(2026, 1, 1, tzinfo=UTC)
    pg = {("d", "impression", t): Totals(3, 1, Decimal("1.5"), Decimal("1.5"), Decimal("1.5"))}
    diffs = compare(pg, {})
    assert [(d.field, d.pg, d.ch, d.diff) for d in diffs] == [
        ("events", 3, 0, 3), ("valued", 1, 0, 1), ("value_sum", Decimal("1.5"), None, Decimal("1.5")),
        ("value_min", Decimal("1.5"), None, Decimal("1.5")), ("value_max", Decimal("1.5"), None, Decimal("1.5"))]
    assert compare(pg, dict(pg)) == []


def test_quarter_rounding():
    t = datetime(2026, 3, 1, 10, 7, 30, tzinfo=UTC)
    assert floor_quarter(t) == t.replace(minute=0, second=0) and ceil_quarter(t) == t.replace(minute=15, second=0)
    assert ceil_quarter(t.replace(minute=15, second=0)) == t.replace(minute=15, second=0)


# ------------------------------------------------------------------ the analyst server's internal route

def _post(url: str, body: object, token: str | None) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url + "/v1/internal/aggregates", data=json.dumps(body).encode(), headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.mark.parametrize("body, message", [
    ({"op": "sql", "from_ms": 0, "to_ms": 1}, "op must be one of aggregates, events, offsets"),
    ({"op": "aggregates", "sql": "SELECT 1", "from_ms": 0, "to_ms": 1}, "unknown field 'sql'"),
    ({"op": "aggregates", "from_ms": 5, "to_ms": 1}, "from_ms < to_ms"),
    ({"op": "aggregates", "from_ms": "0", "to_ms": 1}, "must be integers"),
    ({"op": "events", "from_ms": 0, "to_ms": 1, "keys": [["d", "t"]]}, "'keys' must be a list"),
    ({"op": "offsets", "group": "g"}, "needs 'group' and 'topic'"),
    ([1, 2], "send a JSON object"),
])
def test_internal_route_allows_only_its_fixed_questions(analyst_url, body, message):
    status, answer = _post(analyst_url, body, internal_token(SECRET))
    assert status == 400 and message in answer["error"]["message"]
    with pytest.raises(ValueError, match="."):
        parse_request(body)


def test_internal_route_needs_the_internal_token(analyst_url):
    body = {"op": "aggregates", "from_ms": 0, "to_ms": 1}
    assert _post(analyst_url, body, None)[0] == 401
    assert _post(analyst_url, body, "tly_tok_0123456789_not-the-internal-key")[0] == 401
    assert _post(analyst_url, body, internal_token(SECRET))[0] == 200


def test_remote_and_direct_sources_answer_the_same(stack, settings, analyst_url, domain):
    stack.send(domain, TRAFFIC)
    direct = ClickHouseAggregates(connect(settings.clickhouse_dsn), settings.clickhouse_database)
    remote = RemoteAggregates(analyst_url, internal_token(SECRET))
    lo, hi = NOW - timedelta(hours=3), datetime.now(UTC) + timedelta(minutes=1)
    assert sorted(remote.aggregates(lo, hi, domain)) == sorted(direct.aggregates(lo, hi, domain))
    assert sorted(remote.events(lo, hi, domain)) == sorted(direct.events(lo, hi, domain))
    assert len(remote.events(lo, hi, domain)) == 29
    assert (remote.loader_offsets("tally-loader", settings.topic)
            == direct.loader_offsets("tally-loader", settings.topic))
    key = min(direct.aggregates(lo, hi, domain))[:3]
    assert {e[2] for e in remote.events(lo, hi, domain, keys=[key])} == {key[1]}


# ------------------------------------------------------------------ the schedule and its gauge

def test_scheduled_run_is_recorded_for_the_gauge(settings, monkeypatch):
    import tally.cmd_reconcile as cmd

    source = ClickHouseAggregates(connect(settings.clickhouse_dsn), settings.clickhouse_database)
    monkeypatch.setattr(cmd, "scheduled_range",
                        lambda now: (datetime(2001, 1, 1, tzinfo=UTC), datetime(2001, 1, 1, 3, tzinfo=UTC)))
    assert cmd.run_scheduled_once(settings, settings.pg_dsn, source) == 0
    with psycopg.connect(settings.pg_dsn) as conn:
        assert latest_mismatches(conn) == 0
        last = conn.execute("SELECT source, status, range_from FROM reconcile_runs ORDER BY id DESC LIMIT 1").fetchone()
    assert last == ("schedule", "ok", datetime(2001, 1, 1, tzinfo=UTC))


# ------------------------------------------------------------------ a stack of its own: every domain, and the schedule

@pytest.fixture()
def isolated(servers, make_settings):
    """Settings on a new PostgreSQL database and a new ClickHouse database, with an analyst server of their own:
    a reconcile over every domain sees only this test's events."""
    import uuid

    from oltp import partitions
    from oltp.schema import ensure_schema
    from tests.conftest import start_analyst_server

    name = f"rec_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(servers.pg_dsn, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    dsn = servers.pg_dsn.rsplit("/", 1)[0] + f"/{name}"
    ensure_schema(dsn)
    url, server = start_analyst_server(servers, TALLY_PG_DSN=dsn, TALLY_CLICKHOUSE_DATABASE=name)
    yield make_settings(TALLY_PG_DSN=dsn, TALLY_CLICKHOUSE_DATABASE=name, TALLY_ANALYST_URL=url)
    server.close()
    partitions.forget()
    connect(servers.chdb_dsn).command(f"DROP DATABASE IF EXISTS {name}")
    with psycopg.connect(servers.pg_dsn, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture()
def isolated_cli(isolated, monkeypatch, capsys):
    return cli_runner(isolated, monkeypatch, capsys)


def test_every_domain_clean_then_one_corrupted(isolated, isolated_cli, domain):
    stack = Stack(isolated)
    try:
        stack.send(domain, TRAFFIC)
        stack.send("b-" + domain, TRAFFIC[2:])
    finally:
        stack.close()
    lo, hi = window()
    code, out, err = isolated_cli("reconcile", "--from", lo, "--to", hi)
    assert code == 0 and "tally reconcile:" not in err, out + err
    assert "0 differences" in out and "7 buckets compared" in out
    with psycopg.connect(isolated.pg_dsn, autocommit=True) as conn:
        conn.execute("UPDATE rollup_15m SET valued = valued - 1 WHERE domain = %s AND valued > 0", ("b-" + domain,))
    code, out, _ = isolated_cli("reconcile", "--from", lo, "--to", hi, "--json")
    diffs = json.loads(out)["differences"]
    assert code == 1 and len(diffs) == 2 and {(d["domain"], d["field"], d["diff"]) for d in diffs} == {
        ("b-" + domain, "valued", -1)}
    assert isolated_cli("rebuild", "--from", lo, "--to", hi)[0] == 0  # every domain
    assert isolated_cli("reconcile", "--from", lo, "--to", hi)[0] == 0


def test_the_schedule_runs_and_records_for_the_gauge(isolated, domain):
    from tally.cmd_reconcile import start_schedule

    assert start_schedule(isolated.with_overrides(reconcile_interval_s=0.0), threading.Event()) is None
    stack = Stack(isolated)
    try:
        stack.send(domain, [(60, "impression", None, 5)])
    finally:
        stack.close()
    with psycopg.connect(isolated.pg_dsn, autocommit=True) as conn:
        conn.execute("UPDATE rollup_15m SET events = events + 1 WHERE domain = %s", (domain,))
    stop = threading.Event()
    thread = start_schedule(isolated.with_overrides(reconcile_interval_s=0.5), stop, first_delay_s=0.1)
    try:
        deadline = time.monotonic() + 60
        while True:
            with psycopg.connect(isolated.pg_dsn) as conn:
                found = latest_mismatches(conn)
                runs = conn.execute("SELECT count(*) FROM reconcile_runs WHERE source = 'schedule'").fetchone()[0] \
                    if found is not None else 0
            if found is not None and runs >= 2:
                break
            assert time.monotonic() < deadline, "no scheduled reconcile run was recorded"
            time.sleep(0.2)
    finally:
        stop.set()
        thread.join(timeout=30)
    assert found == 1 and not thread.is_alive()


def test_reconcile_compares_the_rollups_by_dimension_with_clickhouse(stack, cli, settings, domain):
    """ADR 46: on a sample of the agreeing buckets, rollup_dim_15m is compared with ClickHouse's events grouped
    by dimension value; a corrupted page count and a lost browser row are named, the 15-minute totals agreeing."""
    stack.send(domain, TRAFFIC)
    lo, hi = window()
    assert cli("reconcile", "--from", lo, "--to", hi, "--domain", domain)[0] == 0
    with psycopg.connect(settings.pg_dsn, autocommit=True) as conn:
        conn.execute("UPDATE rollup_dim_15m SET events = events + 4 WHERE domain = %s AND dimension = 'page'"
                     " AND key = '/10/3'", (domain,))
        conn.execute("DELETE FROM rollup_dim_15m WHERE domain = %s AND dimension = 'browser'"
                     " AND event_type = 'pageview' AND bucket_start = %s", (domain, floor_quarter(mid(40))))
    code, out, _ = cli("reconcile", "--from", lo, "--to", hi, "--domain", domain, "--json")
    diffs = {(d["type"], d["field"]): (d["pg"], d["ch"]) for d in json.loads(out)["differences"]}
    assert code == 1
    assert diffs[("impression", "page[/10/3].events")] == (5, 1)
    assert diffs[("pageview", "browser[].events")] == (0, 5)
    assert all(not f.startswith(("events", "valued", "value_")) for _, f in diffs)
    code, out, _ = cli("reconcile", "--from", lo, "--to", hi, "--domain", domain)  # the table names the value
    assert code == 1 and "page[/10/3].events" in out
