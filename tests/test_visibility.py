"""The rollup worker's maintenance pass keeps the visitors breakdown's ranking scan index-only (oltp/visibility.py,
ADR 62): after it, the visibility map marks every page of visitors_dim_1d all-visible and the ranking statement
reads no heap row. Real PostgreSQL, a database of its own (no other test's VACUUM or rows)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

from core.config import Settings
from infra.processes import wait_until
from oltp import visibility
from oltp import visitors as vis
from oltp.schema import ensure_schema
from tally.roots import partition_maintenance_pass
from tests.test_migrations import fresh_dsn  # noqa: F401 (a fixture)

pytestmark = pytest.mark.servers("postgres")
DAY = timedelta(days=1)


def _partition_of_today(conn: psycopg.Connection, today: datetime) -> str:
    """The visitors_dim_1d partition that holds today's rows."""
    (name,) = conn.execute("SELECT tableoid::regclass::text FROM visitors_dim_1d WHERE bucket_start = %s LIMIT 1",
                           (today,)).fetchone()
    return name


def _heap_fetches(conn: psycopg.Connection, domain: str, today: datetime, week: datetime | None = None,
                  table: str = "visitors_dim_1d") -> tuple[int, set[str]]:
    """The ranking statement (visitor_bounds's) for today, or for the compacted `week` read from visitors_dim_1w,
    index scans preferred: (heap fetches, scan node types of `table`)."""
    lo, hi, weeks = (today, today + DAY, ()) if week is None else (week, week + 7 * DAY, [(week, week + 7 * DAY)])
    params, _ = vis._rows_params(domain, "UTC", "page", lo, hi, None, weeks, weeks_form=True)
    with conn.transaction():
        conn.execute("SET LOCAL enable_seqscan = off")
        conn.execute("SET LOCAL enable_bitmapscan = off")
        (plan,) = conn.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + vis._BOUNDS, params).fetchone()
    nodes: list[dict[str, Any]] = []
    todo = [plan[0]["Plan"]]  # psycopg loads the json
    while todo:
        node = todo.pop()
        nodes.append(node)
        todo.extend(node.get("Plans", []))
    scans = {n["Node Type"] for n in nodes if n.get("Relation Name", "").startswith(table)}
    return sum(n.get("Heap Fetches", 0) for n in nodes if n.get("Relation Name", "").startswith(table)), scans


def _pages(conn: psycopg.Connection, table: str) -> tuple[int, int]:
    """(pages, pages the visibility map marks all-visible) of `table`, as its last VACUUM counted them."""
    (pages, visible), = conn.execute("SELECT relpages, relallvisible FROM pg_class WHERE oid = %s::regclass",
                                     (table,)).fetchall()
    return pages, visible


def _settled(conn: psycopg.Connection) -> bool:
    """Whether rows committed now can already be marked all-visible: PostgreSQL (18, with this suite's
    synchronous_commit=off) leaves a page it vacuums within about a second of its rows' commit not all-visible.
    A probe row committed after the test's rows, vacuumed: once its page is all-visible, the test's can be."""
    conn.execute("VACUUM settle_probe")
    return _pages(conn, "settle_probe")[1] == 1


def test_the_maintenance_pass_leaves_the_ranking_scan_no_heap_row_to_read(fresh_dsn):  # noqa: F811
    ensure_schema(fresh_dsn)
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    domain = "visibility.example"
    settings = Settings.from_env({"TALLY_PG_DSN": fresh_dsn})
    partition_maintenance_pass(settings, fresh_dsn)  # today's partitions, as the worker makes them at its start
    with psycopg.connect(fresh_dsn, autocommit=True) as conn:
        _autovacuum_off(conn, "visitors_dim_1d")
        with conn.transaction(), conn.cursor() as cur:
            vis.add_visitors(cur, [("1d", domain, "UTC", today, "page", f"/p{i}", [f"v{i}-{j}" for j in range(3)])
                                   for i in range(2000)])
        part = _partition_of_today(conn, today)
        fetches, scans = _heap_fetches(conn, domain, today)
        assert scans == {"Index Only Scan"} and fetches >= 2000  # written since the last VACUUM: every row read
        assert _pages(conn, part)[1] == 0
        week = _compacted_week(conn, domain, today)
        fetches, scans = _heap_fetches(conn, domain, today, week, "visitors_dim_1w")
        assert scans == {"Index Only Scan"} and fetches >= 500  # the weeks' bounds (migration 0016), not yet vacuumed
        conn.execute("CREATE TABLE settle_probe (a int) WITH (autovacuum_enabled = off)")
        conn.execute("INSERT INTO settle_probe VALUES (1)")
        wait_until(lambda: _settled(conn), what="a committed row that VACUUM may mark all-visible", timeout=60)

    partition_maintenance_pass(settings, fresh_dsn)

    with psycopg.connect(fresh_dsn, autocommit=True) as conn:
        pages, visible = _pages(conn, part)
        assert pages > 0 and visible == pages
        assert _heap_fetches(conn, domain, today) == (0, {"Index Only Scan"})
        assert sum(vis.visitor_bounds(conn, domain, "UTC", "page", today, today + DAY).values()) == 6000
        assert _heap_fetches(conn, domain, today, week, "visitors_dim_1w") == (0, {"Index Only Scan"})
        assert sum(vis.visitor_bounds(conn, domain, "UTC", "page", week, week + 7 * DAY,
                                      [(week, week + 7 * DAY)]).values()) == 1000


def _compacted_week(conn: psycopg.Connection, domain: str, today: datetime) -> datetime:
    """A closed week two weeks back with 500 values on its Monday, compacted (visitors_dim_1w), its partitions kept
    from autovacuum (only the pass may vacuum them) before the compaction writes them: the week's Monday."""
    from oltp import weekly
    from oltp.partitions import ensure_partitions
    from oltp.tiers import ensure_tier_partitions

    monday = today - (today.weekday() + 14) * DAY
    ensure_tier_partitions(conn, monday, monday + DAY)
    ensure_partitions(conn, "visitors_dim_1w", monday, monday)
    _autovacuum_off(conn, "visitors_dim_1w")
    with conn.transaction(), conn.cursor() as cur:
        vis.add_visitors(cur, [("1d", domain, "UTC", monday, "", "", ["w0", "w1"])]
                         + [("1d", domain, "UTC", monday, "page", f"/w{i}", ["w0", "w1"]) for i in range(500)])
    weekly.compact_weeks(conn, domain, "UTC", [(monday, monday + 7 * DAY)])
    return monday


def _autovacuum_off(conn: psycopg.Connection, table: str) -> None:
    """Every partition of `table` left to the maintenance pass's VACUUM alone."""
    for (name,) in conn.execute("SELECT inhrelid::regclass::text FROM pg_inherits WHERE inhparent = %s::regclass",
                                (table,)).fetchall():
        conn.execute(f"ALTER TABLE {name} SET (autovacuum_enabled = off)")


def test_vacuum_refuses_a_connection_inside_transactions(servers):
    with psycopg.connect(servers.pg_dsn) as conn, pytest.raises(ValueError, match="autocommit"):
        visibility.vacuum_for_index_only_scans(conn)
