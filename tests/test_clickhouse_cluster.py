"""ClickHouse as a cluster (issue 19 §4, ADR 57): TALLY_CLICKHOUSE_CLUSTER turns the migrations into their cluster
form (olap/cluster.py), `tally migrate --print-sql` prints them without running anything, and the single-node
path stays what it was.

There is no ClickHouse server or Keeper here. What is checked instead: every statement of both modes is parsed by
ClickHouse's own parser (chDB's formatQuery), and the cluster migrations are rehearsed on chDB in a process of its
own whose config defines a 2-shard cluster: the statements run in order with `ON CLUSTER` dropped and the
Replicated engines made plain (what needs Keeper), so the Distributed table, its ALTERs, the TTL and the catalog
are really created and checked. Replication, Keeper and the distributed insert itself are not exercised.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

from olap import cluster as ch_cluster
from olap.client import connect
from olap.loader_sink import events_insert_settings
from olap.schema import EVENT_COLUMNS, MIGRATIONS, planned_statements
from tests.cli_inproc import run_tally

pytestmark = pytest.mark.servers("chdb")
ROOT = Path(__file__).resolve().parent.parent
DB = "tally"


def flat(cluster: str | None, ttl_days: int = 30, db: str = DB) -> list[str]:
    return [s for _, statements in planned_statements(db, ttl_days, cluster) for s in statements]


@pytest.mark.parametrize("cluster", [None, "c"])
def test_every_statement_of_both_modes_is_parsed_by_clickhouse(servers, cluster):
    client = connect(servers.chdb_dsn)
    statements = flat(cluster, 30) + flat(cluster, 0)[-1:]  # MODIFY TTL and REMOVE TTL too
    assert len(statements) > 25
    for statement in statements:
        (canonical,) = client.query("SELECT formatQuerySingleLine({q:String})",
                                    parameters={"q": statement}).result_rows[0]
        if cluster and statement.startswith(("CREATE", "ALTER TABLE tally.events")):
            assert " ON CLUSTER c " in f"{canonical} ", canonical[:200]  # the parser read it, not a comment
    if cluster is None:
        assert not any("ON CLUSTER" in s or "Replicated" in s or "Distributed" in s for s in statements)


def test_the_cluster_note_s_sql_is_parsed_by_clickhouse(servers):
    """docs/clickhouse-cluster.md's analyst user (ON CLUSTER grants): each `;`-ended statement parses."""
    text = (ROOT / "docs" / "clickhouse-cluster.md").read_text()
    blocks = re.findall(r"```sql\n(.*?)```", text, re.S)
    statements = [s.strip() for block in blocks for s in block.split(";\n") if s.strip()]
    assert len(statements) >= 8
    client = connect(servers.chdb_dsn)
    for statement in statements:
        (canonical,) = client.query("SELECT formatQuerySingleLine({q:String})",
                                    parameters={"q": statement.rstrip(";")}).result_rows[0]
        assert "ON CLUSTER tally_cluster" in canonical


def test_cluster_form_of_the_events_tables():
    statements = flat("c")
    local = [s for s in statements if s.startswith("CREATE TABLE IF NOT EXISTS tally.events_local ON CLUSTER c ")]
    assert len(local) == 1
    assert "ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/tally/events_local', '{replica}')" \
        in local[0]
    assert "ORDER BY (toDate(ts), domain, hash)" in local[0]  # the dedup key: one event's copies collapse
    assert "replicated_deduplication_window = 1000" in local[0]
    assert ("CREATE TABLE IF NOT EXISTS tally.events ON CLUSTER c AS tally.events_local "
            "ENGINE = Distributed(c, tally, events_local, cityHash64(hash))") in statements
    # every other table is replicated to every node (one Keeper path for the cluster, no {shard})
    for table in ("schema_migrations", "consumer_offsets", "rejected_records", "sites", "countries"):
        (create,) = [s for s in statements if s.startswith(f"CREATE TABLE IF NOT EXISTS tally.{table} ON CLUSTER c ")]
        assert f"('/clickhouse/tables/all/tally/{table}', '{{replica}}'" in create
    # storage settings only on the local table, column changes on both
    assert [s.split(" ON CLUSTER")[0] for s in statements if "min_age_to_force_merge_seconds" in s] == \
        ["ALTER TABLE tally.events_local"]
    assert [s.split(" ON CLUSTER")[0] for s in statements if "ADD COLUMN IF NOT EXISTS page " in s] == \
        ["ALTER TABLE tally.events_local", "ALTER TABLE tally.events"]


def test_single_node_plan_is_the_migrations_as_written():
    plan = planned_statements(DB, 400)
    assert [s for _, sts in plan[1:] for s in sts] == [s for m in MIGRATIONS for s in m.statements(DB)]
    assert len(plan) == 1 + len(MIGRATIONS)  # 400 days is what migration 1 sets: no TTL statement


class Recording:
    """A client that notes every DDL statement it runs (the real chDB runs them)."""

    def __init__(self, client):
        self.client, self.ran = client, []

    def command(self, sql, *args, **kwargs):
        if not sql.startswith("EXISTS "):
            self.ran.append(sql)
        return self.client.command(sql, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.client, name)


def test_one_node_migrations_run_exactly_what_print_sql_prints(servers):
    from olap.schema import ensure_schema

    db = f"plan_{uuid.uuid4().hex[:8]}"
    client = Recording(connect(servers.chdb_dsn))
    try:
        ensure_schema(client, db, 30)
        assert client.ran == flat(None, 30, db)
    finally:
        client.client.command(f"DROP DATABASE IF EXISTS {db}")
        client.client.command(f"DROP DATABASE IF EXISTS {db}_catalog")


def test_a_statement_without_a_cluster_rule_is_refused():
    with pytest.raises(ValueError, match="no cluster rule"):
        ch_cluster.on_cluster(["DROP TABLE tally.events"], DB, "c")
    with pytest.raises(ValueError, match="no cluster rule"):
        ch_cluster.on_cluster(["ALTER TABLE tally.events DELETE WHERE 1"], DB, "c")
    with pytest.raises(ValueError, match="not a cluster name"):
        ch_cluster.on_cluster(["CREATE DATABASE IF NOT EXISTS tally"], DB, "c; DROP DATABASE tally")


def test_the_loader_inserts_in_the_foreground_on_a_cluster_with_the_same_token():
    one_node = events_insert_settings("tok")
    assert one_node == {"input_format_skip_unknown_fields": 1, "date_time_input_format": "best_effort",
                        "insert_deduplication_token": "tok"}
    assert events_insert_settings("tok", distributed=True) == {**one_node, "distributed_foreground_insert": 1}


def test_migrate_print_sql_runs_nothing_and_needs_no_stack(tmp_path):
    """What check 12-scale runs, as a command: no TALLY_PG_DSN, no running `tally up`, nothing created."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TALLY_")}
    home = tmp_path / "home"
    tally = Path(sys.executable).with_name("tally")  # the console script, as the check runs it
    done = subprocess.run([str(tally), "migrate", "--print-sql"], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path, env={**env, "TALLY_HOME": str(home), "TALLY_CLICKHOUSE_CLUSTER": "c"})
    assert done.returncode == 0, done.stderr
    one = run_tally(["migrate", "--print-sql"], {**env, "TALLY_HOME": str(home)})
    assert one.returncode == 0, one.stderr
    out = {"cluster": done.stdout, "one": one.stdout}
    for word in ("ReplicatedReplacingMergeTree", "Distributed", "ON CLUSTER"):
        assert word in out["cluster"]
        assert word not in out["one"]
    # the printed statements are the plan, each ended by ";" at the end of a line, under "--" headings
    printed = [line for line in out["cluster"].splitlines() if line and not line.startswith("--")]
    assert "\n".join(printed) == "\n".join(f"{s};" for s in flat("c", 400))
    assert not home.exists() or not any(home.iterdir())  # no chDB directory, no embedded stack
    as_json = run_tally(["migrate", "--print-sql", "--json"], {**env, "TALLY_HOME": str(home),
                                                                "TALLY_CLICKHOUSE_CLUSTER": "c"})
    steps = json.loads(as_json.stdout)["clickhouse"]["steps"]
    assert [s for step in steps for s in step["statements"]] == flat("c", 400)


def test_migrate_refuses_a_cluster_on_embedded_chdb(tmp_path):
    """Running (not printing) the cluster migrations needs a server of the cluster: chDB is one node. A
    configuration error (exit 2), found before either store is touched."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TALLY_")}
    done = run_tally(["migrate"], {**env, "TALLY_HOME": str(tmp_path), "TALLY_CLICKHOUSE_CLUSTER": "c"})
    assert done.returncode == 2
    assert "TALLY_CLICKHOUSE_CLUSTER=c needs TALLY_CLICKHOUSE_DSN to be a node of that cluster" in done.stderr
    assert not (tmp_path / "chdb").exists()  # it did not open the embedded directory


_REHEARSAL = textwrap.dedent('''
    import json, re, sys
    from olap import catalog, schema
    from olap.allowlist import CATALOG_TABLES
    from olap.client import connect

    db = sys.argv[1]
    ran = []

    class Rehearsal:
        """chDB as one node of cluster c: ON CLUSTER dropped, Replicated engines made plain (no Keeper here)."""
        def __init__(self, client):
            self.client = client
        def command(self, sql, *args, **kwargs):
            if not sql.startswith("EXISTS "):
                ran.append(sql)
            sql = re.sub(r" ON CLUSTER c\\b", "", sql)
            sql = re.sub(r"Replicated(\\w*MergeTree)\\('[^']*', '\\{replica\\}'(, )?", r"\\1(", sql)
            return self.client.command(sql, *args, **kwargs)
        def __getattr__(self, name):
            return getattr(self.client, name)

    raw = connect("chdb://" + sys.argv[2])
    client = Rehearsal(raw)
    out = {"clusters": raw.query("SELECT DISTINCT cluster FROM system.clusters").result_rows}
    out["applied"] = schema.ensure_schema(client, db, 30, "c")
    out["ran"] = list(ran)
    q = lambda sql: [list(r) for r in raw.query(sql, parameters={"d": db}).result_rows]
    out["tables"] = q("SELECT name, engine, engine_full FROM system.tables WHERE database = {d:String} ORDER BY name")
    out["events"] = q("SELECT name, type, comment FROM system.columns WHERE database = {d:String} AND table = 'events'"
                      " ORDER BY position")
    out["events_local"] = q("SELECT name, type, comment FROM system.columns WHERE database = {d:String} "
                            "AND table = 'events_local' ORDER BY position")
    out["countries"] = q("SELECT count() FROM {d:Identifier}.countries")[0][0]
    out["catalog"] = q("SELECT count() FROM system.tables WHERE database = {d:String} || '_catalog'")[0][0]
    out["catalog_events_columns"] = q("SELECT count() FROM " + db + "_catalog.columns WHERE table = 'events'")[0][0]
    out["ttl"] = schema.events_ttl_days(client, db, "c")
    del ran[:]
    out["again"] = schema.ensure_schema(client, db, 30, "c")
    out["ran_again"] = list(ran)
    out["ttl_changed"] = schema.apply_ttl(client, db, 0, "c")
    out["ttl_after"] = schema.events_ttl_days(client, db, "c")
    out["n_catalog_tables"] = len(CATALOG_TABLES)
    print(json.dumps(out, default=str))
''')

_CONFIG = """<clickhouse>
  <remote_servers>
    <c>
      <shard><internal_replication>true</internal_replication>
        <replica><host>127.0.0.1</host><port>9000</port></replica></shard>
      <shard><internal_replication>true</internal_replication>
        <replica><host>127.0.0.2</host><port>9000</port></replica></shard>
    </c>
  </remote_servers>
  <macros><shard>01</shard><replica>ch-1a</replica></macros>
</clickhouse>
"""


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    """The cluster migrations rehearsed on a chDB of their own (chDB reads config.xml from its working
    directory, which defines cluster c)."""
    where = tmp_path_factory.mktemp("cluster")
    (where / "config.xml").write_text(_CONFIG)
    done = subprocess.run([sys.executable, "-c", _REHEARSAL, DB, str(where / "chdb")], capture_output=True,
                          text=True, timeout=300, cwd=where,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_rehearsal_creates_a_distributed_events_table_over_events_local(rehearsal):
    assert rehearsal["clusters"] == [["c"]]
    assert rehearsal["applied"] == [m.version for m in MIGRATIONS]
    # what ensure_schema ran is exactly what --print-sql prints
    assert rehearsal["ran"] == flat("c", 30)
    tables = {name: (engine, full) for name, engine, full in rehearsal["tables"]}
    assert tables["events"] == ("Distributed", "Distributed('c', 'tally', 'events_local', cityHash64(hash))")
    assert tables["events_local"][0] == "ReplacingMergeTree"
    assert "replicated_deduplication_window = 1000" in tables["events_local"][1]
    assert "min_age_to_force_merge_seconds = 691200" in tables["events_local"][1]
    for table in ("sites", "countries", "consumer_offsets", "schema_migrations"):
        assert tables[table][0] == "ReplacingMergeTree"
    assert tables["rejected_records"][0] == "MergeTree"
    assert rehearsal["countries"] > 240


def test_rehearsal_analysts_see_the_same_columns_and_comments_on_events(rehearsal):
    events, local = rehearsal["events"], rehearsal["events_local"]
    assert tuple(name for name, _, _ in events) == EVENT_COLUMNS
    assert events == local  # the Distributed table got every ADD COLUMN and COMMENT the local one did
    assert all(comment for _, _, comment in events)
    assert rehearsal["catalog"] == rehearsal["n_catalog_tables"]
    assert rehearsal["catalog_events_columns"] == len(EVENT_COLUMNS)


def test_rehearsal_ttl_lives_on_events_local_and_reruns_change_nothing(rehearsal):
    assert rehearsal["ttl"] == 30
    assert rehearsal["again"] == []
    assert rehearsal["ran_again"] == []  # no ON CLUSTER statement: a node down would not stop a start-up
    assert rehearsal["ttl_changed"] is True
    assert rehearsal["ttl_after"] == 0
