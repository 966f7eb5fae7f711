"""ClickHouse freshness (issue 19 §1, ADR 56 "ClickHouse freshness"): the loader in the analyst server's process
keeps the other workers' CPU priority; only the analyst's own threads run at ANALYST_NICE below it."""

from __future__ import annotations

import os
import threading
import types
from typing import Any

import pytest

from tally import cli, cmd_reconcile


def _nice() -> int:
    """The calling thread's nice value (on Linux a per-thread attribute)."""
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


def test_loader_thread_keeps_priority_while_the_analyst_threads_are_lowered(monkeypatch: pytest.MonkeyPatch) -> None:
    import tally.roots
    import workers.gc_policy

    seen: dict[str, int] = {}
    loader_running = threading.Event()

    class Loop:
        def run(self, stop: threading.Event) -> None:
            seen["loader"] = _nice()
            loader_running.set()
            stop.wait(30)

    def serve(app: object, host: str, port: int, **kw: Any) -> None:
        loader_running.wait(30)
        seen["serving"] = _nice()
        started_here = threading.Thread(target=lambda: seen.__setitem__("request thread", _nice()))
        started_here.start()
        started_here.join()

    monkeypatch.setattr(tally.roots, "build_analyst_server", lambda settings: object())
    monkeypatch.setattr(tally.roots, "build_loader_loop", lambda settings: Loop())
    monkeypatch.setattr(workers.gc_policy, "tune_for_streaming", lambda: None)
    monkeypatch.setattr(cmd_reconcile, "start_schedule", lambda settings, stop: None)
    monkeypatch.setattr(cli, "_serve", serve)
    settings = types.SimpleNamespace(clickhouse_dsn="chdb:///nowhere", analyst_url="http://127.0.0.1:1",
                                     analyst_port=1, sql_max_concurrent=1)
    result: dict[str, int] = {}

    def main_thread() -> None:  # os.nice lowers this thread only: not the test runner's
        result["before"] = _nice()
        result["rc"] = cli.cmd_analyst_server(settings, types.SimpleNamespace(with_loader=True))  # type: ignore[arg-type]

    runner = threading.Thread(target=main_thread)
    runner.start()
    runner.join(60)
    assert result["rc"] == 0
    lowered = min(19, result["before"] + cli.ANALYST_NICE)
    assert seen["loader"] == result["before"], "the loader must run at the other workers' priority"
    assert seen["serving"] == lowered and seen["request thread"] == lowered, "analyst threads run below it"
    assert _nice() == result["before"]  # the test runner's thread is untouched


DB = "tally_fresh_offsets"  # a database of its own on the session's chDB (one engine per process)


@pytest.fixture(scope="module")
def ch(servers: Any) -> Any:
    from olap.client import connect
    from olap.schema import ensure_schema

    client = connect(servers.chdb_dsn)
    ensure_schema(client, DB, 0)
    return client


def test_offsets_are_json_lines_in_partition_order_to_the_microsecond() -> None:
    from datetime import UTC, datetime

    from olap.loader_sink import offsets_json_lines

    now = datetime(2026, 12, 6, 23, 0, 1, 123456, tzinfo=UTC)
    lines = offsets_json_lines("g", "t", "id-1", {2: 7, 0: 5}, now).splitlines()
    assert [line.split(b'"partition":')[1][:1] for line in lines] == [b"0", b"2"]
    assert all(b'"written_at":"2026-12-06 23:00:01.123456"' in line for line in lines)


def test_stored_offsets_round_trip_and_a_rewind_written_later_wins(ch: Any) -> None:
    """What `write` stores is what `committed` resumes from, per partition, for this topic incarnation; a rewind's
    lower offsets, written later (even within the same millisecond), win (workers/rewind.py)."""
    import uuid

    from core.batch import Batch
    from olap.loader_sink import LoaderSink

    sink = LoaderSink(ch, DB, f"g-{uuid.uuid4().hex[:6]}")
    batch = Batch(topic="t", topic_id="inc-1")
    batch.next_offsets.update({0: 10, 3: 42})
    sink.write(batch)
    assert sink.committed("t", "inc-1", [0, 1, 3]) == {0: 10, 3: 42}
    sink.store_rewound_offsets("t", "inc-1", {3: 5})
    assert sink.committed("t", "inc-1", [0, 3]) == {0: 10, 3: 5}
    assert sink.committed("t", "inc-2", [0, 3]) == {}  # another incarnation's positions are not these


class _Counting:
    """A real ClickHouse client that counts the queries sent through it."""

    def __init__(self, client: Any) -> None:
        self.client, self.queries = client, 0

    def query(self, *args: Any, **kw: Any) -> Any:
        self.queries += 1
        return self.client.query(*args, **kw)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)


def test_an_accepted_statement_is_prepared_once_a_refused_one_every_time(ch: Any) -> None:
    """The freshness probe (and any dashboard) asks the same SQL again and again: the second time it is not parsed
    by ClickHouse again. Different parameter values are another statement; refusals are never remembered."""
    from olap.analyst import AnalystQueryError, prepare

    counting = _Counting(ch)
    sql = f"SELECT count() FROM {DB}.events WHERE domain = 'fresh-{os.getpid()}.test'"
    first = prepare(counting, sql, DB)
    asked = counting.queries
    assert asked >= 1
    assert prepare(counting, sql, DB) == first and counting.queries == asked
    with_param = f"SELECT count() FROM {DB}.events WHERE domain = {{d:String}} AND {os.getpid()} > 0"
    prepare(counting, with_param, DB, {"d": "a.test"})
    asked = counting.queries
    prepare(counting, with_param, DB, {"d": "b.test"})
    assert counting.queries > asked  # other values: checked again
    for _ in range(2):
        asked = counting.queries
        with pytest.raises(AnalystQueryError):
            prepare(counting, f"SELECT * FROM system.users WHERE {os.getpid()} > 0", DB)
        assert counting.queries > asked


def test_a_statement_too_big_to_remember_is_checked_every_time(ch: Any) -> None:
    """The remembered statements are bounded in bytes, not only in number: one with parameter values past
    PREPARED_MAX_BYTES (64 values of 16 KiB would pin ~1 MiB an entry) is checked again each time."""
    from olap.analyst import PREPARED_MAX_BYTES, prepare

    counting = _Counting(ch)
    sql = (f"SELECT count() FROM {DB}.events WHERE domain IN ({{a:String}}, {{b:String}}, {{c:String}})"
           f" AND {os.getpid()} > 1")
    big = {name: "x" * (PREPARED_MAX_BYTES // 3 + 1) for name in "abc"}
    prepare(counting, sql, DB, big)
    asked = counting.queries
    prepare(counting, sql, DB, big)
    assert counting.queries > asked


def test_a_statement_remembered_for_one_server_is_checked_again_on_another(ch: Any) -> None:
    """The check depends on the server's parser: what one client's server accepted is not taken as accepted
    for another client (an older server without parseQueryToJSON refuses everything)."""
    from clickhouse_connect.driver.exceptions import DatabaseError

    from olap.analyst import AnalystQueryError, prepare

    sql = f"SELECT {os.getpid()} + 1"
    prepare(ch, sql, DB)

    class OldServer:
        def query(self, *args: Any, **kwargs: Any) -> Any:
            raise DatabaseError("Code: 46. DB::Exception: Unknown function parseQueryToJSON. (UNKNOWN_FUNCTION)")

    with pytest.raises(AnalystQueryError) as info:
        prepare(OldServer(), sql, DB)
    assert info.value.code == "refused"
