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


def _heap_fetches(conn: psycopg.Connection, domain: str, today: datetime) -> tuple[int, set[str]]:
    """The ranking statement (visitor_bounds's) for today, index scans preferred: (heap fetches, scan node types)."""
    params, _ = vis._rows_params(domain, "UTC", "page", today, today + DAY, None, (), weeks_form=True)
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
    scans = {n["Node Type"] for n in nodes if n.get("Relation Name", "").startswith("visitors_dim_1d")}
    return sum(n.get("Heap Fetches", 0) for n in nodes), scans


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
        for (name,) in conn.execute("SELECT inhrelid::regclass::text FROM pg_inherits"
                                    " WHERE inhparent = 'visitors_dim_1d'::regclass").fetchall():
            conn.execute(f"ALTER TABLE {name} SET (autovacuum_enabled = off)")  # only the pass may vacuum them
        with conn.transaction(), conn.cursor() as cur:
            vis.add_visitors(cur, [("1d", domain, "UTC", today, "page", f"/p{i}", [f"v{i}-{j}" for j in range(3)])
                                   for i in range(2000)])
        part = _partition_of_today(conn, today)
        fetches, scans = _heap_fetches(conn, domain, today)
        assert scans == {"Index Only Scan"} and fetches >= 2000  # written since the last VACUUM: every row read
        assert _pages(conn, part)[1] == 0
        conn.execute("CREATE TABLE settle_probe (a int) WITH (autovacuum_enabled = off)")
        conn.execute("INSERT INTO settle_probe VALUES (1)")
        wait_until(lambda: _settled(conn), what="a committed row that VACUUM may mark all-visible", timeout=60)

    partition_maintenance_pass(settings, fresh_dsn)

    with psycopg.connect(fresh_dsn, autocommit=True) as conn:
        pages, visible = _pages(conn, part)
        assert pages > 0 and visible == pages
        assert _heap_fetches(conn, domain, today) == (0, {"Index Only Scan"})
        assert sum(vis.visitor_bounds(conn, domain, "UTC", "page", today, today + DAY).values()) == 6000


def test_vacuum_refuses_a_connection_inside_transactions(servers):
    with psycopg.connect(servers.pg_dsn) as conn, pytest.raises(ValueError, match="autocommit"):
        visibility.vacuum_for_index_only_scans(conn)
