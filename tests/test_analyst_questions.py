"""The design's analyst questions (issue 18 §3; olap/questions.py) answered over events sent through the collector.

One stack for the module: a seeded set of ~300 events over four accounts (seven sites, one without an account),
eight countries (forwarded public addresses, TALLY_TRUSTED_PROXIES), five browsers (user agents), values and
times (the last 6 days, yesterday included) goes collector -> spool -> shipper -> tansu -> loader -> chDB, into a
ClickHouse database of its own (so the session's other events cannot change an answer); the sites registry
reaches its `sites` table by the loader's sync. Each question, as the docs show it (the database renamed), is
asked once with clickhouse-connect on the ClickHouse-compatible endpoint and once with `tally sql`, and its
answer is checked against a recomputation in Python from what was sent.

Also: docs/analysts.md shows exactly these queries, and ClickHouse migration 5 (ADR 54) is applied.
"""

from __future__ import annotations

import random
import re
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import clickhouse_connect
import orjson
import psycopg
import pytest

from collector.ua import classify_user_agent
from core.config import Settings
from infra.processes import free_port, tcp_open, wait_until
from olap.client import connect
from olap.questions import QUESTIONS, markdown, sql_for
from oltp import sites, tokens
from tests.conftest import SECRET, serve_in_thread, start_analyst_server
from tests.test_pipeline import Pipeline

ROOT = Path(__file__).resolve().parent.parent
# Public addresses and their countries in the collector's embedded registry data (iptocc).
ADDRESSES = {"85.214.132.117": "DE", "51.158.0.1": "FR", "81.2.69.142": "GB", "193.0.14.129": "NL",
             "8.8.8.8": "US", "133.242.0.1": "JP", "200.160.0.1": "BR", "1.1.1.1": "AU"}
EUROPE = {"DE", "FR", "GB", "NL"}
AGENTS = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0 Safari/537.36",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.5 "
    "Mobile/15E148 Safari/604.1",
    "Mozilla/5.0 (X11; Linux x86_64; rv:133.0) Gecko/20100101 Firefox/133.0",
    "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0 Mobile "
    "Safari/537.36",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_5) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.5 "
    "Safari/605.1.15",
    "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",  # a bot: no visitor
)
ACCOUNTS = ("Acme Inc.", "Globex", "Initech", None)  # a site without an account: its events group under NULL
PAGES = ("/", "/", "/", "/pricing", "/pricing", "/blog/a", "/docs", "/docs/start", "/cart", "/about")
EVENTS = 300


@dataclass(frozen=True)
class Sent:
    domain: str
    account: str | None
    ts: datetime
    type: str
    value: Decimal | None
    page: str
    address: str
    agent: str


@dataclass
class Stack:
    database: str
    clickhouse_port: int
    api_url: str
    token: str
    sent: list[Sent] = field(default_factory=list)


def _events(rng: random.Random, domains: dict[str, str | None], now: datetime) -> list[Sent]:
    """EVENTS events: a third yesterday (UTC), the rest up to 6 days old (the collector takes 7); 1 in 4 valued."""
    yesterday = (now - timedelta(days=1)).date()
    out = []
    for i in range(EVENTS):
        domain = rng.choice(sorted(domains))
        if i % 3 == 0:
            ts = datetime.combine(yesterday, time(1), UTC) + timedelta(minutes=rng.randint(0, 21 * 60))
        else:
            ts = now - timedelta(minutes=rng.randint(2, 6 * 24 * 60))
        value = Decimal(rng.randint(1, 99_999)) / 100 if rng.random() < 0.25 else None
        kind = rng.choice(("impression", "impression", "impression", "pageview"))
        out.append(Sent(domain, domains[domain], ts.replace(microsecond=0), kind, value, rng.choice(PAGES),
                        rng.choice(sorted(ADDRESSES)), rng.choice(AGENTS)))
    return out


def _send(pipeline: Pipeline, sent: list[Sent]) -> None:
    """Each (address, agent, domain) group as one request, as a browser behind a trusted proxy sends it."""
    batches: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for e in sent:
        body: dict[str, Any] = {"domain": e.domain, "url": f"https://{e.domain}{e.page}", "type": e.type,
                                "ts": e.ts.isoformat()}
        if e.value is not None:
            body["value"] = str(e.value)
        batches[(e.address, e.agent, e.domain)].append(body)
    for (address, agent, _), events in sorted(batches.items()):
        pipeline.post(events, **{"User-Agent": agent, "X-Forwarded-For": address})


def _settings(servers, home: Path, database: str, analyst_url: str) -> Settings:
    return Settings.from_env({
        "TALLY_HOME": str(home / "home"), "TALLY_SPOOL_DIR": str(home / "spool"), "TALLY_SECRET": SECRET,
        "TALLY_KAFKA_TOPIC": f"t-{uuid.uuid4().hex[:12]}", "TALLY_KAFKA_PARTITIONS": "2",
        "TALLY_CONSUMER_SESSION_TIMEOUT_MS": "2000", "TALLY_PG_DSN": servers.pg_dsn,
        "TALLY_KAFKA_BOOTSTRAP": servers.bootstrap, "TALLY_CLICKHOUSE_DSN": servers.chdb_dsn,
        "TALLY_CLICKHOUSE_DATABASE": database, "TALLY_ANALYST_URL": analyst_url,
        "TALLY_TRUSTED_PROXIES": "127.0.0.1/32", "TALLY_REGISTRY_REFRESH_S": "0.5",
        "TALLY_API_RATE_LIMIT": "100000/minute;10000/second"})


@pytest.fixture(scope="module")
def stack(servers, tmp_path_factory):
    from tally.roots import build_clickhouse_http, start_sites_sync

    home = tmp_path_factory.mktemp("analyst-questions")
    database = f"q_{uuid.uuid4().hex[:10]}"
    analyst_url, analyst = start_analyst_server(servers, TALLY_CLICKHOUSE_DATABASE=database)
    settings = _settings(servers, home, database, analyst_url)
    suffix = uuid.uuid4().hex[:6]
    domains = {f"s{i}-{suffix}.test": ACCOUNTS[i % len(ACCOUNTS)] for i in range(7)}
    for domain, account in domains.items():
        sites.add(settings.pg_dsn, domain, origins=[f"https://{domain}"], account=account)
    with psycopg.connect(settings.pg_dsn, autocommit=True) as conn:
        _, token = tokens.create(conn, "analyst", [], "analyst questions test")
    pipeline = Pipeline(settings)
    servers_up = []
    try:
        sent = _events(random.Random(18), domains, datetime.now(UTC))
        _send(pipeline, sent)
        assert pipeline.ship() == len(sent)
        pipeline.loader.drain()
        _wait_for_sites(settings, set(domains))
        api_port, ch_port = free_port(), free_port()
        servers_up.append(serve_in_thread(pipeline.api_app, api_port))
        servers_up.append(serve_in_thread(build_clickhouse_http(settings), ch_port))
        for port in (api_port, ch_port):
            wait_until(lambda p=port: tcp_open("127.0.0.1", p), what="server", timeout=10)
        yield Stack(database, ch_port, f"http://127.0.0.1:{api_port}", token, sent)
    finally:
        for server in (*servers_up, analyst):
            server.close()
        pipeline.close()
        start_sites_sync(settings, settings.pg_dsn).set()  # the loader's sync thread (one per store pair) ends


def _wait_for_sites(settings: Settings, domains: set[str]) -> None:
    """Until the loader's sync has copied the module's sites (with their accounts) to ClickHouse."""
    client = connect(settings.clickhouse_dsn)
    db = settings.clickhouse_database

    def synced() -> bool:
        rows = client.query(f"SELECT domain FROM {db}.sites FINAL WHERE has({{d:Array(String)}}, domain)",
                            parameters={"d": sorted(domains)}).result_rows
        return {r[0] for r in rows} == domains

    wait_until(synced, what="tally.sites in sync", timeout=30)


# --- the answers, recomputed from what was sent ------------------------------------------------------


def _revenue_by_account(sent: list[Sent], now: datetime) -> list[tuple]:
    revenue: dict[str | None, Decimal] = defaultdict(Decimal)
    for e in sent:
        if e.ts >= now - timedelta(days=90):
            revenue[e.account] += e.value or Decimal(0)
    return sorted(revenue.items(), key=lambda kv: (-kv[1], kv[0] is None, kv[0] or ""))


def _impressions_from_europe(sent: list[Sent], now: datetime) -> list[tuple]:
    return [(sum(1 for e in sent if e.type == "impression" and ADDRESSES[e.address] in EUROPE),)]


def _avg_impressions_per_browser(sent: list[Sent], now: datetime) -> list[tuple]:
    per_day: dict[tuple[str | None, str, date], int] = defaultdict(int)
    for e in sent:
        if e.type == "impression":
            per_day[(classify_user_agent(e.agent)[0], e.domain, e.ts.date())] += 1
    days: dict[str | None, list[int]] = defaultdict(list)
    for (browser, _, _), count in per_day.items():
        days[browser].append(count)
    rows = [(b, sum(c) / len(c), len(c)) for b, c in days.items()]
    return sorted(rows, key=lambda r: (-r[1], r[0] is None, r[0] or ""))


def _impressions_last_week(sent: list[Sent], now: datetime) -> list[tuple]:
    week = [e for e in sent if e.type == "impression" and e.ts >= now - timedelta(days=7)]
    return [(len(week), len({e.domain for e in week}))]


def _top_pages_yesterday(sent: list[Sent], now: datetime) -> list[tuple]:
    yesterday = (now - timedelta(days=1)).date()
    visitors: dict[tuple[str, str], set[tuple[str, str]]] = defaultdict(set)
    for e in sent:
        if e.ts.date() == yesterday and classify_user_agent(e.agent)[2] != "bot":
            visitors[(e.domain, e.page)].add((e.address, e.agent))  # the visitor key: address and agent, per day
    rows = [(domain, page, len(v)) for (domain, page), v in visitors.items()]
    return sorted(rows, key=lambda r: (-r[2], r[0], r[1]))[:10]


EXPECTED = {"revenue_by_account": _revenue_by_account, "impressions_from_europe": _impressions_from_europe,
            "avg_impressions_per_browser": _avg_impressions_per_browser,
            "impressions_last_week": _impressions_last_week, "top_pages_yesterday": _top_pages_yesterday}


def _same(got: list, expected: list[tuple]) -> bool:
    """Row by row, cell by cell: numbers as numbers (Decimal strings, ints, floats to 1e-9), the rest equal."""
    if len(got) != len(expected):
        return False
    for row, want in zip(got, expected, strict=True):
        for g, w in zip(row, want, strict=True):
            if isinstance(w, float):
                if abs(float(g) - w) > 1e-9:
                    return False
            elif isinstance(w, Decimal | int) and not isinstance(w, bool):
                if g is None or Decimal(str(g)) != Decimal(w):
                    return False
            elif g != w:
                return False
    return True


def _ask(stack: Stack, name: str, run) -> tuple[list, list[tuple]]:
    """The answer and its recomputation at the same clock (asked again when a UTC day ended in between)."""
    for _ in range(3):
        before = datetime.now(UTC)
        got = run()
        after = datetime.now(UTC)
        if before.date() == after.date():
            return got, EXPECTED[name](stack.sent, after)
    raise AssertionError("the UTC day kept changing")


QUESTION_IDS = [q.name for q in QUESTIONS]


def test_every_question_has_a_recomputation():
    assert set(EXPECTED) == set(QUESTION_IDS)


@pytest.mark.parametrize("question", QUESTIONS, ids=QUESTION_IDS)
def test_through_clickhouse_connect_on_the_compatible_endpoint(stack, question):
    client = clickhouse_connect.get_client(host="127.0.0.1", port=stack.clickhouse_port, username="analyst",
                                           password=stack.token, database=stack.database)
    try:
        got, expected = _ask(stack, question.name,
                             lambda: [list(r) for r in client.query(sql_for(question, stack.database)).result_rows])
    finally:
        client.close()
    assert expected and expected[0][-1], "the seeded events must give the question a non-empty answer"
    assert _same(got, expected), (got, expected)


@pytest.mark.parametrize("question", QUESTIONS, ids=QUESTION_IDS)
def test_through_tally_sql(stack, question, monkeypatch, capfdbinary):
    from tally.cli import main

    monkeypatch.setenv("TALLY_TOKEN", stack.token)
    sql = sql_for(question, stack.database)

    def run() -> list:
        capfdbinary.readouterr()
        assert main(["sql", "--api-url", stack.api_url, "--format", "json", sql]) == 0
        return orjson.loads(capfdbinary.readouterr().out)["rows"]

    got, expected = _ask(stack, question.name, run)
    assert _same(got, expected), (got, expected)


def test_the_seed_covers_every_dimension(stack):
    """The recomputations are not vacuous: several accounts with revenue, Europe and elsewhere, browsers, pages."""
    revenue = _revenue_by_account(stack.sent, datetime.now(UTC))
    assert sum(1 for _, r in revenue if r > 0) >= 3 and None in dict(revenue)
    assert {ADDRESSES[e.address] for e in stack.sent} - EUROPE and EUROPE <= {ADDRESSES[e.address] for e in stack.sent}
    assert len(_avg_impressions_per_browser(stack.sent, datetime.now(UTC))) >= 4
    assert len(_top_pages_yesterday(stack.sent, datetime.now(UTC))) == 10


def test_docs_show_exactly_these_queries():
    text = (ROOT / "docs" / "analysts.md").read_text()
    section = re.search(r"<!-- questions:begin -->\n(.*?)<!-- questions:end -->", text, re.S)
    assert section is not None, "docs/analysts.md has no questions section"
    assert section.group(1) == markdown(), "regenerate the section from olap.questions.markdown()"
    for question in QUESTIONS:
        assert f"```sql\n{question.sql}\n```" in section.group(1)


def test_sql_for_renames_only_the_analyst_tables():
    question = QUESTIONS[0]
    assert sql_for(question, "tally") == question.sql
    renamed = sql_for(question, "q_x")
    assert "q_x.events" in renamed and "q_x.sites" in renamed and "tally." not in renamed
    with pytest.raises(ValueError, match="not a database identifier"):
        sql_for(question, "x; DROP")


def test_migration_5_merges_closed_months_into_one_part(servers):
    """ADR 54: events partitions force-merge once all their parts are 8 days old; applying it twice is harmless."""
    from olap.schema import FORCE_MERGE_AGE_S, MIGRATIONS, ensure_schema

    client = connect(servers.chdb_dsn)
    db = f"m5_{uuid.uuid4().hex[:8]}"
    ensure_schema(client, db)
    engine = str(client.command(f"SELECT engine_full FROM system.tables WHERE database = '{db}' AND name = 'events'"))
    assert f"min_age_to_force_merge_seconds = {FORCE_MERGE_AGE_S}" in engine
    assert "min_age_to_force_merge_on_partition_only = 1" in engine
    assert "ORDER BY (toDate(ts), domain, hash)" in engine and "PARTITION BY toYYYYMM(ts)" in engine
    (five,) = [m for m in MIGRATIONS if m.version == 5]
    for statement in five.statements(db):  # a crash before its record re-applies it
        client.command(statement)
    client.command(f"DROP DATABASE {db}")
