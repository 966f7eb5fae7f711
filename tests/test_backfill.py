"""`tally backfill`: historical events through the collector's validation, hashing and spool, into both stores.

Real pieces: the spool on disk, the shipper, tansu, the rollup worker into PostgreSQL and the loader into
chDB (tests/test_pipeline.py's `Pipeline`), and the `tally` CLI entry point.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest

from collector.backfill import BackfillError, Progress, backfill, fingerprint
from olap.client import connect
from spool.recovery import recover_orphans
from spool.segments import SpoolWriter, read_record, sealed_segments, segment_records
from tally.cli import main
from tally.cmd_backfill import PROGRESS_DIR, limits_for
from tests.test_pipeline import Pipeline

pytestmark = pytest.mark.servers("postgres", "broker", "chdb")


@pytest.fixture()
def pipeline(settings):
    p = Pipeline(settings)
    yield p
    p.close()


@pytest.fixture()
def cli_env(settings, monkeypatch):
    """The test's settings as the environment `tally` reads."""
    for name, value in settings.raw.items():
        monkeypatch.setenv(name, value)
    return settings


def register(pipeline: Pipeline, domain: str) -> None:
    from oltp import sites

    sites.add(pipeline.settings.pg_dsn, domain)


def in_both_stores(settings, domain: str) -> tuple[int, int]:
    """(events in PostgreSQL's 15-minute rollups, events in ClickHouse `FINAL`) for `domain`."""
    with psycopg.connect(settings.pg_dsn) as conn:
        pg = conn.execute("SELECT coalesce(sum(events), 0) FROM rollup_15m WHERE domain = %s", (domain,)).fetchone()[0]
    ch = connect(settings.clickhouse_dsn).query("SELECT count() FROM tally.events FINAL WHERE domain = {d:String}",
                                                parameters={"d": domain}).result_rows[0][0]
    return int(pg), int(ch)


def spooled(settings) -> list[dict]:
    """Every event record in the spool's sealed segments (not shipped yet)."""
    out = []
    for segment in sealed_segments(settings.spool_dir):
        out += [json.loads(read_record(line)) for line in segment_records(segment.read_bytes())]
    return out


def days_ago(days: float, **extra) -> str:
    return (datetime.now(UTC) - timedelta(days=days, **extra)).replace(microsecond=0).isoformat()


def write_jsonl(path: Path, events: list) -> Path:
    path.write_text("".join((e if isinstance(e, str) else json.dumps(e)) + "\n" for e in events))
    return path


def test_historical_events_reach_both_stores_once_and_a_second_import_is_refused(pipeline, domain, cli_env,
                                                                                  tmp_path, capsys):
    register(pipeline, domain)
    # 20 days old: far beyond the collector's 7-day window, within what both stores keep.
    events = [{"domain": domain, "url": f"https://{domain}/{i}", "type": "impression", "ts": days_ago(20, minutes=i),
               "value": "1.5"} for i in range(25)]
    events += [{"domain": domain, "url": f"https://{domain}/own?utm_campaign=spring", "id": f"own-{i}",
                "ts": days_ago(3, minutes=i), "referrer": "https://news.ycombinator.com/item?id=1"} for i in range(5)]
    path = write_jsonl(tmp_path / "events.jsonl", events)

    assert main(["backfill", str(path)]) == 0
    out = capsys.readouterr().out
    assert "30 events spooled" in out and "0 bad lines" in out
    records = spooled(pipeline.settings)
    assert len(records) == 30 and len({r["hash"] for r in records}) == 30
    assert pipeline.shipper.ship_once() == 30
    pipeline.drain()
    assert in_both_stores(pipeline.settings, domain) == (30, 30)
    # Issue 17 (ADR 45): backfilled events are enriched like the collector's, and ClickHouse keeps the fields.
    enriched = connect(pipeline.settings.clickhouse_dsn).query(
        "SELECT page, source, utm_campaign, count() FROM tally.events FINAL WHERE domain = {d:String}"
        " AND page IN ('/0', '/own') GROUP BY page, source, utm_campaign ORDER BY page",
        parameters={"d": domain}).result_rows
    assert enriched == [("/0", None, None, 1), ("/own", "Hacker News", "spring", 5)]

    # The same file again: refused, nothing written (its events older than the dedup window would count twice).
    assert main(["backfill", str(path)]) == 2
    err = capsys.readouterr().err
    assert "imported completely" in err and "--force" in err and "dedup window" in err
    assert spooled(pipeline.settings) == []

    # Forced, a file of events within the dedup window gets the same hashes: counted once in both stores.
    recent = write_jsonl(tmp_path / "recent.jsonl", events[25:])
    assert main(["backfill", str(recent)]) == 0
    hashes = {r["hash"] for r in spooled(pipeline.settings)}
    assert hashes == {r["hash"] for r in records if "/own" in r["url"]}  # own ids: the same hashes
    assert main(["backfill", "--force", str(recent)]) == 0
    assert pipeline.shipper.ship_once() == 10
    pipeline.drain()
    assert in_both_stores(pipeline.settings, domain) == (30, 30)


def test_bad_lines_are_listed_by_number_and_nothing_of_them_is_imported(pipeline, domain, cli_env, tmp_path, capsys):
    register(pipeline, domain)
    good = lambda i: {"domain": domain, "url": f"https://{domain}/good{i}", "ts": days_ago(30)}  # noqa: E731
    lines = [
        good(1),                                                                   # 1
        "{not json",                                                               # 2
        {"domain": domain, "url": f"https://{domain}/bad3", "ts": days_ago(1), "colour": "red"},  # 3 unknown field
        {"domain": domain, "url": f"https://{domain}/bad4"},                       # 4 no ts
        good(5),                                                                   # 5
        {"domain": "unregistered.example.org", "url": "https://unregistered.example.org/", "ts": days_ago(1)},  # 6
        {"domain": domain, "url": f"https://{domain}/bad7", "ts": days_ago(1), "value": "1e3"},  # 7 value
        f'{{"domain": "{domain}", "url": "https://{domain}/bad8", "url": "https://{domain}/x", "ts": "{days_ago(1)}"}}',
        {"domain": domain, "url": f"https://{domain}/bad9", "ts": days_ago(500)},  # 9 older than the TTL (400 d)
        "[1, 2]",                                                                  # 10 not an object
        "",                                                                        # 11 blank: skipped, not bad
        good(12),                                                                  # 12
    ]
    path = write_jsonl(tmp_path / "mixed.jsonl", lines)
    assert main(["backfill", "--chunk-lines", "4", str(path)]) == 1
    captured = capsys.readouterr()
    for expected in ("line 2: $: not valid JSON", "line 3: colour: unknown field", "line 4: ts: is required",
                     "line 6: domain: unregistered.example.org is not a registered site", "line 7: value:",
                     "line 8: url: appears more than once", "line 9: ts: is older than", "line 10: $: each line"):
        assert expected in captured.err, expected
    assert "line 1:" not in captured.err and "line 11" not in captured.err
    assert "3 events spooled" in captured.out and "8 bad lines (lines 2, 3, 4, 6, 7, 8, 9, 10)" in captured.out
    urls = sorted(r["url"] for r in spooled(pipeline.settings))
    assert urls == [f"https://{domain}/good{i}" for i in (1, 12, 5)]
    pipeline.shipper.ship_once()
    pipeline.drain()
    assert in_both_stores(pipeline.settings, domain) == (3, 3)


def test_csv_with_a_header_row_and_a_bad_header_writes_nothing(pipeline, domain, cli_env, tmp_path, capsys):
    register(pipeline, domain)
    ms = int((datetime.now(UTC) - timedelta(days=15)).timestamp() * 1000)
    path = tmp_path / "events.csv"
    path.write_text("domain,url,ts,type,value,id\n"
                    f"{domain},https://{domain}/a,{days_ago(15)},impression,2.25,\n"
                    f'{domain},"https://{domain}/b?x=1,2",{ms},pageview,,client-1\n'
                    f"{domain},https://{domain}/c,{days_ago(15)},click,,\n"
                    f"{domain},https://{domain}/d,{days_ago(15)}\n")
    assert main(["backfill", str(path)]) == 1
    captured = capsys.readouterr()
    assert "line 4: type: must be one of impression, pageview" in captured.err
    assert "line 5: $: has 3 cells, the header names 6" in captured.err
    records = sorted(spooled(pipeline.settings), key=lambda r: r["url"])
    assert [(r["url"], r["type"], r["value"]) for r in records] == [
        (f"https://{domain}/a", "impression", "2.25"), (f"https://{domain}/b?x=1,2", "pageview", None)]
    assert records[1]["ts"].startswith(datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S"))

    bad_header = tmp_path / "bad.csv"
    bad_header.write_text(f"domain,url,ts,colour\n{domain},https://{domain}/,{days_ago(1)},red\n")
    before = len(spooled(pipeline.settings))
    assert main(["backfill", str(bad_header)]) == 2
    assert "CSV header: unknown column 'colour'" in capsys.readouterr().err
    assert len(spooled(pipeline.settings)) == before
    assert not (pipeline.settings.home / PROGRESS_DIR / f"{fingerprint(bad_header)[0]}.json").exists()
    missing = tmp_path / "missing.csv"
    missing.write_text(f"domain,url\n{domain},https://{domain}/\n")
    assert main(["backfill", str(missing)]) == 2
    assert "required column 'ts' is missing" in capsys.readouterr().err
    assert main(["backfill", str(tmp_path / "events.txt")]) == 2
    assert "no such file" in capsys.readouterr().err
    (tmp_path / "events.txt").write_text(path.read_text())
    assert main(["backfill", str(tmp_path / "events.txt")]) == 2
    assert "cannot tell the format from the name; use --format jsonl or csv" in capsys.readouterr().err


class Crash(BaseException):
    """A process death at a chosen point (not an Exception: nothing may catch it on the way)."""


class CrashingSpool:
    """The real spool writer, dying before or after the durable append of chunk number `at`."""

    def __init__(self, real: SpoolWriter, at: int, after_write: bool) -> None:
        self.real, self.at, self.after_write, self.calls = real, at, after_write, 0

    def append(self, lines) -> None:
        self.calls += 1
        if self.calls == self.at and not self.after_write:
            raise Crash("before the write")
        self.real.append(lines)
        if self.calls == self.at:
            raise Crash("after the durable write, before the progress file")


@pytest.mark.parametrize("after_write", [False, True], ids=["before-append", "after-append"])
def test_a_crash_mid_import_resumes_after_the_last_durable_chunk(pipeline, domain, tmp_path, after_write):
    register(pipeline, domain)
    settings = pipeline.settings
    events = [{"domain": domain, "url": f"https://{domain}/{i}", "ts": days_ago(12, seconds=i)} for i in range(50)]
    path = write_jsonl(tmp_path / "big.jsonl", events)
    progress_dir = settings.home / PROGRESS_DIR
    kwargs = dict(progress_dir=progress_dir, registered=lambda d: d == domain, limits=limits_for(settings),
                  chunk_lines=10)

    spool = SpoolWriter(settings.spool_dir, max_bytes=1 << 20, max_age_s=3600)
    with pytest.raises(Crash):
        backfill(path, spool=CrashingSpool(spool, at=3, after_write=after_write), **kwargs)
    spool.close()
    (progress_file,) = progress_dir.glob("*.json")
    progress = Progress.load(progress_file)
    assert (progress.next_line, progress.imported, progress.done) == (21, 20, False)  # two durable chunks
    assert len(spooled(settings)) == (30 if after_write else 20)

    spool = SpoolWriter(settings.spool_dir, max_bytes=1 << 20, max_age_s=3600)
    summary = backfill(path, spool=spool, **kwargs)
    spool.close()
    assert summary.resumed_from == 21 and summary.imported_now == 30
    assert Progress.load(progress_file).done and Progress.load(progress_file).imported == 50
    records = spooled(settings)
    assert len(records) == (60 if after_write else 50)  # chunk 3 twice: written, then re-sent on resume
    assert len({r["hash"] for r in records}) == 50
    pipeline.shipper.ship_once()
    pipeline.drain()
    assert in_both_stores(settings, domain) == (50, 50)

    with pytest.raises(BackfillError, match="imported completely"):
        backfill(path, spool=spool, **kwargs)


def test_tally_backfill_killed_mid_import_resumes_and_counts_each_event_once(pipeline, domain, settings, tmp_path):
    """A real crash: the `tally backfill` process gets SIGKILL between chunks; the same command resumes."""
    import os
    import signal
    import subprocess
    import sys

    register(pipeline, domain)
    n = 20_000
    path = write_jsonl(tmp_path / "many.jsonl", [
        {"domain": domain, "url": f"https://{domain}/{i % 97}", "ts": days_ago(5, seconds=i)} for i in range(n)])
    env = {k: v for k, v in os.environ.items() if not k.startswith("TALLY_")} | dict(settings.raw)
    argv = [sys.executable, "-m", "tally.cli", "backfill", "--chunk-lines", "100", str(path)]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    progress_dir = settings.home / PROGRESS_DIR
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        files = list(progress_dir.glob("*.json"))
        if files and Progress.load(files[0]).next_line > 2000:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    (progress_file,) = progress_dir.glob("*.json")
    killed_at = Progress.load(progress_file)
    assert not killed_at.done and 2000 < killed_at.next_line <= n, "killed too late: make the file bigger"

    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"resumed at line {killed_at.next_line}" in done.stdout and f"{n} in all, 0 bad lines" in done.stdout
    assert Progress.load(progress_file).done
    recover_orphans(settings.spool_dir)  # the killed run's open segment, sealed as the shipper does it
    records = spooled(settings)
    assert len({r["hash"] for r in records}) == n and len(records) >= n
    pipeline.shipper.ship_once()
    pipeline.drain()
    assert in_both_stores(settings, domain) == (n, n)
