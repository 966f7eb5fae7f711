"""The JS tag in a real browser (Debian's chromium via Playwright) against the real pipeline.

The real collector app (`collector.app.create_app`, a real registered site, a real spool) is served
over HTTP by waitress on a free port as `http://collector-e2e.test:<port>`; the customer's page is a
stdlib http.server on another port, opened as `http://<run>.tally-e2e.test:<port>/shop` (Chromium
resolves both names to 127.0.0.1 with --host-resolver-rules, so the page's `location.hostname`, which
the tag sends as `domain`, is a host name and not an IP literal, which the collector refuses). The site
registers exactly that page origin. The page loads, makes two SPA navigations (pushState) and sends
`tally('impression', {value: 1.5})`, and is closed; then the Pipeline of tests/test_pipeline.py ships
the spool to tansu and drains both workers, and PostgreSQL (`rollup_15m`, and the API) and ClickHouse
(`tally.events FINAL`) must hold exactly those four events, once each.

Runs: `clean` (nothing fails; the impression leaves by sendBeacon when the page closes), `refused`
(the first POST /collect is answered 503 Retry-After: 1 before the collector sees it) and
`answer_lost` (the collector spools the first POST, but the page gets a 503 instead of the 202: the
tag resends the same events with the same ids, the spool holds them twice, the stores count them once).
"""

from __future__ import annotations

import io
import json
import threading
import time
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import psycopg
import pytest

from collector.app import create_app
from collector.registry import SiteRegistry
from infra.processes import free_port, tcp_open, wait_until
from olap.client import connect
from oltp import sites
from tests.conftest import chromium, serve_in_thread, until
from tests.test_pipeline import Pipeline
from tests.test_tag import BROWSER_NETWORK_LOG, SNIPPET

PAGE_ZONE = "tally-e2e.test"  # each run's page is <run>.tally-e2e.test: a fresh domain per run
COLLECTOR_HOST = "collector-e2e.test"
RESOLVER = (f"--host-resolver-rules=MAP {PAGE_ZONE} 127.0.0.1, MAP *.{PAGE_ZONE} 127.0.0.1,"
            f" MAP {COLLECTOR_HOST} 127.0.0.1")


class Recorder:
    """WSGI middleware in front of the real collector: records every POST /collect (body, Origin,
    what the app answered, what the page got) and can fail the first one (`refused` / `answer_lost`)."""

    def __init__(self, app, failure: str | None) -> None:
        self.app = app
        self.failure = failure
        self.lock = threading.Lock()
        self.posts: list[dict] = []

    def __call__(self, environ, start_response):
        if environ.get("REQUEST_METHOD") != "POST" or environ.get("PATH_INFO") != "/collect":
            return self.app(environ, start_response)
        raw = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
        environ["wsgi.input"] = io.BytesIO(raw)
        rec = {"body": json.loads(raw), "origin": environ.get("HTTP_ORIGIN"),
               "content_type": environ.get("CONTENT_TYPE"), "mode": environ.get("HTTP_SEC_FETCH_MODE"),
               "cookie": environ.get("HTTP_COOKIE"), "app_status": None, "status": None, "answer": None}
        with self.lock:
            first = not self.posts
            self.posts.append(rec)
        cors = [("Access-Control-Allow-Origin", rec["origin"] or ""), ("Vary", "Origin"),
                ("Access-Control-Expose-Headers", "Retry-After")]
        if first and self.failure == "refused":  # the collector never sees it
            body = b'{"error": {"code": "unavailable", "message": "planned by the test"}}'
            start_response("503 Service Unavailable", [("Content-Type", "application/json"), ("Retry-After", "1"),
                                                       ("Content-Length", str(len(body))), *cors])
            rec["status"] = 503
            return [body]
        captured: dict = {}

        def capture(status, headers, exc_info=None):
            captured["status"], captured["headers"] = status, headers
            return lambda data: None

        chunks = self.app(environ, capture)
        try:
            body = b"".join(chunks)
        finally:
            getattr(chunks, "close", lambda: None)()
        rec["app_status"] = int(captured["status"].split()[0])
        rec["answer"] = json.loads(body) if body else None
        if first and self.failure == "answer_lost":  # spooled, but the 202 never reaches the page
            headers = [(k, v) for k, v in captured["headers"] if k.lower() != "content-length"]
            body = b'{"error": {"code": "unavailable", "message": "planned by the test"}}'
            start_response("503 Service Unavailable", headers + [("Retry-After", "1"),
                                                                 ("Content-Length", str(len(body)))])
            rec["status"] = 503
            return [body]
        start_response(captured["status"], captured["headers"])
        rec["status"] = rec["app_status"]
        return [body]

    def accepted(self) -> list[dict]:
        """Every event the real collector spooled (202), in order, duplicates included."""
        with self.lock:
            return [e for r in self.posts if r["app_status"] == 202 for e in r["body"]]


class Page:
    """The customer's site: one HTML page, on its own port (another origin than the collector)."""

    def __init__(self) -> None:
        self.html = ""
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                found = urlsplit(self.path).path.startswith("/shop")
                body = (outer.html if found else "not found").encode()
                self.send_response(200 if found else 404)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def browser():
    with chromium(RESOLVER) as browser:
        yield browser


class Run:
    """One run: a fresh site `<run>.tally-e2e.test`, the real collector over HTTP, the page, the pipeline."""

    def __init__(self, make_settings, failure: str | None) -> None:
        self.settings = make_settings(TALLY_ALLOWED_HOSTS=f"{COLLECTOR_HOST},localhost,127.0.0.1")
        self.pipeline = Pipeline(self.settings)
        self.page_server = Page()
        self.domain = f"r{uuid.uuid4().hex[:10]}.{PAGE_ZONE}"
        self.page_origin = f"http://{self.domain}:{self.page_server.port}"
        self.site = sites.add(self.settings.pg_dsn, self.domain, origins=[self.page_origin])
        self.registry = SiteRegistry.from_settings(self.settings).start(background=False)
        app = create_app(self.settings, self.pipeline.spool, start_sealer=False, registry=self.registry)
        self.recorder = Recorder(app, failure)
        self.port = free_port()
        self.server = serve_in_thread(self.recorder, self.port)
        wait_until(lambda: tcp_open("127.0.0.1", self.port), what="collector", timeout=10)
        self.collector = f"http://{COLLECTOR_HOST}:{self.port}"
        self.page_server.html = (
            '<!doctype html><html><head><meta charset="utf-8"><link rel="icon" href="data:,"><title>shop</title>'
            f'<script defer src="{self.collector}/tag.js" data-site="{self.site.site_key}" data-flush-ms="200">'
            f"</script><script>{SNIPPET}</script></head><body>"
            "<button id=\"buy\" onclick=\"tally('impression', {value: 1.5})\">buy</button></body></html>")
        # What a page URL may carry that analytics must not keep (issue 15 item 11): the tag sends the
        # campaign tag only, and neither store ever sees the rest.
        self.url = f"{self.page_origin}/shop?utm_campaign=spring&token=s3cr3t#access_token=t0k3n"

    def close(self) -> None:
        self.server.close()
        self.page_server.close()
        self.registry.stop()
        self.pipeline.close()


@pytest.fixture()
def run_factory(make_settings):
    runs: list[Run] = []

    def make(failure: str | None) -> Run:
        runs.append(Run(make_settings, failure))
        return runs[-1]

    yield make
    for r in runs:
        r.close()


@pytest.mark.parametrize("failure", [None, "refused", "answer_lost"], ids=["clean", "refused", "answer_lost"])
def test_tag_events_reach_both_stores_exactly_once(browser, run_factory, failure):
    run = run_factory(failure)
    context = browser.new_context()
    page = context.new_page()
    console: list[str] = []
    errors: list[str] = []
    page.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
    page.on("pageerror", lambda exc: errors.append(str(exc)))

    def ids() -> set[str]:
        return {e["id"] for e in run.recorder.accepted()}

    try:
        page.goto(run.url)
        assert page.evaluate("location.hostname") == run.domain
        page.wait_for_function("() => window.tally && window.tally.l === 1")
        if failure is None:
            until(page, "the load page view", lambda: len(ids()) == 1)
        page.evaluate("history.pushState({}, '', '/shop/a')")
        page.evaluate("history.pushState({}, '', '/shop/b')")
        if failure is None:  # the navigations by fetch; the impression by sendBeacon as the page closes
            until(page, "the navigations", lambda: len(ids()) == 3)
            until(page, "the confirmations", lambda: page.evaluate("sessionStorage.length") == 0)
        page.click("#buy")
        if failure is not None:  # wait for the retry to be confirmed, then close
            until(page, "all four events", lambda: len(ids()) == 4)
            until(page, "the confirmations", lambda: page.evaluate("sessionStorage.length") == 0)
        assert page.evaluate("document.cookie") == "" and page.evaluate("localStorage.length") == 0
        page.close(run_before_unload=True)
        until(None, "the beacon", lambda: len(ids()) == 4)
        time.sleep(0.5)  # anything still in flight would arrive now (and must not change the result)
        assert context.cookies() == []
    finally:
        context.close()

    # The page: no console output at all, except the browser's own line for a planned 503.
    allowed = [m for m in console if failure and m.startswith(f"error: {BROWSER_NETWORK_LOG}") and "503" in m]
    assert [m for m in console if m not in allowed] == [] and errors == []
    if failure:
        assert len(allowed) <= 1

    posts = run.recorder.posts
    page_origin = run.page_origin
    assert all(p["origin"] == page_origin and p["content_type"] == "text/plain" and not p["cookie"] for p in posts)
    statuses = [(p["app_status"], p["status"]) for p in posts]
    if failure is None:
        assert all(s == (202, 202) for s in statuses), statuses
        # the impression left on its own, as the page closed (sendBeacon; an http:// collector that is not
        # localhost gets no Sec-Fetch-* headers, so the request itself cannot say which API sent it)
        assert [e["type"] for e in posts[-1]["body"]] == ["impression"]
    elif failure == "refused":
        assert statuses[0] == (None, 503) and all(s == (202, 202) for s in statuses[1:]), statuses
    else:
        assert statuses[0] == (202, 503) and all(s == (202, 202) for s in statuses[1:]), statuses
        # the resend carries the first batch again, same ids and content
        assert posts[1]["body"][:len(posts[0]["body"])] == posts[0]["body"]

    accepted = run.recorder.accepted()
    sent = {e["id"]: e for e in accepted}
    assert len(sent) == 4
    duplicates = len(accepted) - 4
    assert duplicates == (len(posts[0]["body"]) if failure == "answer_lost" else 0)
    # The 202 answers' hashes: one per distinct event (a resend gets the same hash).
    hashes = {h for p in posts if p["app_status"] == 202 for h in p["answer"]["hashes"]}
    assert len(hashes) == 4

    assert run.pipeline.ship() == len(accepted)
    run.pipeline.drain()

    o = page_origin
    shop = o + "/shop?utm_campaign=spring"
    assert all("s3cr3t" not in json.dumps(p["body"]) and "t0k3n" not in json.dumps(p["body"]) for p in posts)
    expected = Counter([("pageview", shop, None, None), ("pageview", o + "/shop/a", shop, None),
                        ("pageview", o + "/shop/b", o + "/shop/a", None),
                        ("impression", o + "/shop/b", None, Decimal("1.5"))])
    assert Counter((e["type"], e["url"], e.get("referrer"),
                    None if e.get("value") is None else Decimal(str(e["value"])))
                   for e in sent.values()) == expected

    # ClickHouse: exactly the four events, once each (FINAL), with the tag's urls, referrers, value and times.
    ch = connect(run.settings.clickhouse_dsn)
    rows = ch.query("SELECT toString(hash), type, url, referrer, value, toUnixTimestamp64Milli(ts), browser, os, device"
                    f" FROM {run.settings.clickhouse_database}.events FINAL WHERE domain = {{d:String}}",
                    parameters={"d": run.domain}).result_rows
    assert len(rows) == 4
    assert {r[0] for r in rows} == hashes
    assert Counter((r[1], r[2], r[3], None if r[4] is None else Decimal(r[4]).normalize()) for r in rows) == expected
    assert sorted(r[5] for r in rows) == sorted(e["ts"] for e in sent.values())
    # Headless Chromium announces itself (HeadlessChrome): a bot since issue 17 (ADR 44), counted in the
    # rollups and the ingestion panel, kept out of visitors and breakdowns.
    assert all(r[6] and r[7] and r[8] == "bot" for r in rows)

    # PostgreSQL: rollup_15m per type, and the same through the customer API.
    with psycopg.connect(run.settings.pg_dsn) as conn:
        got = {t: (int(n), int(v), s) for t, n, v, s in conn.execute(
            "SELECT event_type, sum(events), sum(valued), sum(value_sum) FROM rollup_15m WHERE domain = %s"
            " GROUP BY event_type", (run.domain,))}
    assert got == {"pageview": (3, 0, None), "impression": (1, 1, Decimal("1.5"))}
    now = datetime.now(UTC)
    imp = run.pipeline.impressions(run.domain, now - timedelta(hours=1), now + timedelta(minutes=15))
    assert (imp["total"], imp["valued"], Decimal(imp["value_sum"])) == (1, 1, Decimal("1.5"))
    views = run.pipeline.impressions(run.domain, now - timedelta(hours=1), now + timedelta(minutes=15),
                                     metric="pageviews")
    assert views["total"] == 3
