"""The dashboard's issue-17 view in a real browser (Debian's chromium via Playwright, one for the module) over
real HTTP (waitress), fed by the whole pipeline with pages, referrers, user agents and forwarded addresses of
five countries: every card, the chart and every breakdown panel show exactly what the API answers for the
URL the page asked; a click on a panel row filters the whole view (chips, URL), Back restores it; at 390 px
nothing is wider than the screen; the live card refreshes; nothing is loaded from another host.

Screenshots at 1280 and 390 px go to this run's temporary directory (printed by pytest's header);
TALLY_UPDATE_SCREENSHOT=1 also writes docs/img/dashboard-1280.png and docs/img/dashboard-390.png (README).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import psycopg
import pytest
import requests

from core.config import Settings
from infra.processes import free_port, tcp_open, wait_until
from oltp import sites, tokens
from tests.conftest import SECRET, chromium, serve_in_thread
from tests.test_pipeline import Pipeline

ROOT = Path(__file__).resolve().parent.parent
DIMENSIONS = ("page", "source", "country", "device", "browser", "os")
LONG_PAGE = "/blog/2026/12/a-rather-long-article-title-that-would-not-fit-on-a-phone-screen-in-one-line"
UA = {
    "win": "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0 "
           "Safari/537.36",
    "iphone": "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
              "Version/17.5 Mobile/15E148 Safari/604.1",
    "linux": "Mozilla/5.0 (X11; Linux x86_64; rv:133.0) Gecko/20100101 Firefox/133.0",
    "android": "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0 "
               "Mobile Safari/537.36",
    "mac": "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_5) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.5 "
           "Safari/605.1.15",
    "headless": "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) HeadlessChrome/131.0 "
                "Safari/537.36",
}
# (address, user agent, [(minutes ago, page, referrer, type, value), ...]): six visitors in five countries.
# Nothing younger than 46 minutes: the live card (the last 30 to 45 minutes) starts empty.
VISITS = [
    ("85.214.132.117", "win", [(m, "/", "https://www.google.com/", "pageview", None) for m in (50, 200, 400, 610)]
     + [(m, "/pricing", "/", "pageview", None) for m in (52, 205, 402)]
     + [(m, "/pricing", None, "impression", "10") for m in (53, 206, 403)]
     + [(m, "/", "https://www.google.com/", "pageview", None) for m in (26 * 60, 27 * 60, 28 * 60)]),
    ("5.9.0.1", "iphone", [(m, "/", "https://t.co/abc", "pageview", None) for m in (90, 300, 500)]
     + [(m, "/docs/start", None, "pageview", None) for m in (95, 305)] + [(100, "/pricing", None, "pageview", None)]),
    ("8.8.8.8", "linux", [(m, "/", "https://news.ycombinator.com/", "pageview", None) for m in (120, 700)]
     + [(m, LONG_PAGE, None, "pageview", None) for m in (125, 705)]
     + [(m, LONG_PAGE, None, "impression", "2.5") for m in (126, 706)]),
    ("133.242.0.1", "android", [(m, "/pricing", None, "pageview", None) for m in (150, 900)]),
    ("51.158.0.1", "mac", [(60 * 9, "/docs/start", "https://example.org/some/page", "pageview", None),
                           (60 * 9 + 1, "/list,all", None, "pageview", None)]),
    ("81.2.69.142", "linux", [(60 * 10 + i, f"/guide/{i}", None, "pageview", None) for i in range(1, 7)]
     + [(60 * 11, "/list,all", None, "pageview", None)]),
    ("8.8.4.4", "headless", [(m, "/", None, "pageview", None) for m in (47, 48)]),  # a bot: breakdowns skip it
]
READY = "document.body.dataset.state === 'ready'"
PANELS_SETTLED = "[...document.querySelectorAll('.panel.breakdown')].every(p => p.dataset.status !== 'loading')"


@dataclass
class Stack:
    base: str
    token: str  # the browser logs in with it
    checker: str  # the test reads the API with another token (the rate limit is per token)
    domain: str
    pipeline: Pipeline
    shots: Path
    foreign: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def api(self, url: str) -> dict:
        resp = requests.get(self.base + url, headers={"Authorization": f"Bearer {self.checker}"}, timeout=10)
        assert resp.status_code == 200, (url, resp.status_code, resp.text)
        return resp.json()

    def post(self, ip: str, agent: str, events: list[dict]) -> None:
        self.pipeline.post(events, **{"User-Agent": UA[agent], "X-Forwarded-For": ip})


def _event(domain: str, now: datetime, minutes: int, page: str, referrer: str | None, kind: str,
           value: str | None) -> dict:
    event = {"domain": domain, "url": f"https://{domain}{page}", "type": kind,
             "ts": (now - timedelta(minutes=minutes)).isoformat()}
    if referrer:
        event["referrer"] = referrer if "://" in referrer else f"https://{domain}{referrer}"
    if value:
        event["value"] = value
    return event


@pytest.fixture(scope="module")
def stack(servers, closed_port, tmp_path_factory):
    home = tmp_path_factory.mktemp("dashboard-panels")
    settings = Settings.from_env({
        "TALLY_HOME": str(home / "home"), "TALLY_SPOOL_DIR": str(home / "spool"), "TALLY_SECRET": SECRET,
        "TALLY_KAFKA_TOPIC": f"t-{uuid.uuid4().hex[:12]}", "TALLY_KAFKA_PARTITIONS": "3",
        "TALLY_CONSUMER_SESSION_TIMEOUT_MS": "2000", "TALLY_PG_DSN": servers.pg_dsn,
        "TALLY_KAFKA_BOOTSTRAP": servers.bootstrap, "TALLY_CLICKHOUSE_DSN": servers.chdb_dsn,
        "TALLY_ANALYST_URL": f"http://{closed_port.address}",
        "TALLY_TRUSTED_PROXIES": "127.0.0.1/32",  # the test client's peer forwards each visitor's address
    })
    domain = f"shop{uuid.uuid4().hex[:8]}.test"
    sites.add(settings.pg_dsn, domain, tz="Europe/Berlin", origins=[f"https://{domain}"])
    sites.add(settings.pg_dsn, f"quiet-{domain}", origins=[f"https://quiet-{domain}"])  # registered, no events
    pipeline = Pipeline(settings)
    port = free_port()
    server = None
    try:
        now = datetime.now(UTC)
        with psycopg.connect(settings.pg_dsn, autocommit=True) as conn:
            # the token also lists a registered site without events and a domain nobody registered
            _, token = tokens.create(conn, "customer", [domain, f"quiet-{domain}", f"unregistered-{domain}"],
                                     "dashboard panels test")
            _, checker = tokens.create(conn, "customer", [domain], "dashboard panels test: the API's answers")
        stack = Stack(f"http://127.0.0.1:{port}", token, checker, domain, pipeline, home / "screenshots")
        stack.shots.mkdir()
        for ip, agent, visits in VISITS:
            stack.post(ip, agent, [_event(domain, now, *v) for v in visits])
        pipeline.ship()
        pipeline.rollups.drain()  # the API reads PostgreSQL only: ClickHouse need not load
        server = serve_in_thread(pipeline.api_app, port)
        wait_until(lambda: tcp_open("127.0.0.1", port), what="api", timeout=10)
        yield stack
    finally:
        if server is not None:
            server.close()
        pipeline.close()


@pytest.fixture(autouse=True)
def fresh_logs(stack):
    """Each test judges its own pages: the request and problem logs start empty."""
    stack.foreign.clear()
    stack.problems.clear()


@pytest.fixture(scope="module")
def browser():
    with chromium() as browser:
        yield browser


def open_dashboard(stack: Stack, browser, width: int, height: int, query: str = "", fake_clock: bool = False,
                   route: tuple[str, Any] | None = None):
    """A new context at this size, logged in (POST /login, the form's request, with this page's origin),
    then the dashboard of the test's domain; every request and page error recorded on the stack. `route`:
    (URL glob, handler) installed on the page before it opens."""
    context = browser.new_context(viewport={"width": width, "height": height})
    page = context.new_page()
    if route:
        page.route(*route)
    if fake_clock:
        page.clock.install()
    page.on("pageerror", lambda exc: stack.problems.append(f"page error: {exc}"))
    page.on("console", lambda m: stack.problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.on("request", lambda req: None if req.url.startswith(stack.base) else stack.foreign.append(req.url))
    page.on("response", lambda r: stack.problems.append(f"{r.status} {r.url}") if r.status >= 400 else None)
    # The form's own path (fill, submit, redirect) is tests/test_dashboard.py's; here the context's request
    # client posts the same form (it shares the context's cookies), so a refused login names its status
    # instead of timing out on a navigation that never comes (a CI run lost 60 s and the test that way).
    answer = context.request.post(f"{stack.base}/login", form={"token": stack.token},
                                  headers={"Origin": stack.base}, max_redirects=0, timeout=60_000)
    assert answer.status == 303, f"POST /login answered {answer.status}: {answer.text()[:300]}"
    page.goto(f"{stack.base}/?domain={stack.domain}{query}")
    wait_settled(page)
    return context, page


def wait_settled(page, condition: str = "true") -> None:
    # Functions, not bare expressions: the page's CSP forbids eval, which Playwright uses for those.
    page.wait_for_function(f"() => ({READY}) && ({PANELS_SETTLED}) && ({condition})", timeout=60_000)


def shown_panels(page) -> dict[str, dict]:
    """Each panel as drawn: the URL it asked and its rows (key, label, count text)."""
    return page.evaluate("""(dimensions) => Object.fromEntries(dimensions.map(d => [d, {
        url: window.tally.panels[d] && window.tally.panels[d].url,
        status: window.tally.panels[d] && window.tally.panels[d].status,
        rows: [...document.querySelectorAll(`.tab-body[data-dimension="${d}"] tbody tr`)].map(tr => [
            tr.dataset.key, tr.querySelector('.row-key').textContent, tr.querySelector('td.n').textContent])}]))
        """, list(DIMENSIONS))


def count_text(metric: str, count) -> str:
    if metric == "value":
        return f"{float(count):,.2f}".rstrip("0").rstrip(".")
    return f"{int(count):,}"


def assert_panels_are_the_api(stack: Stack, page) -> dict[str, list]:
    """Every panel shows the API's rows for the URL it asked, in order, with country names: its rows."""
    shown = shown_panels(page)
    got = {}
    for dimension, panel in shown.items():
        assert panel["status"] == 200, (dimension, panel)
        answer = stack.api(panel["url"])
        assert answer["dimension"] == dimension
        expected = [[r["key"], count_text(answer["metric"], r["count"])] for r in answer["rows"]]
        assert [[key, n] for key, _, n in panel["rows"]] == expected, dimension
        if dimension == "country":
            names = {r["key"]: r.get("name") for r in answer["rows"]}
            assert all(label == names[key] for key, label, _ in panel["rows"] if key not in ("(none)", "(other)"))
        got[dimension] = panel["rows"]
    return got


def assert_cards_and_chart_are_the_api(stack: Stack, page) -> dict:
    """The cards show the summary's numbers (the page's range is one of its periods) and the chart plots the
    series the page asked for, bucket by bucket."""
    tally = page.evaluate("() => ({cards: window.tally.cards, chart: window.tally.series.chart,"
                          " data: [...window.tally.chart.data[1]], x: [...window.tally.chart.data[0]]})")
    cards = tally["cards"]
    summary = stack.api(cards["urls"]["summary"])
    m = summary["metrics"]
    assert page.get_attribute("#total-pageviews", "data-value") == str(m["pageviews"]["total"])
    assert page.get_attribute("#total-impressions", "data-value") == str(m["impressions"]["total"])
    if summary["visitors"] is not None:
        assert page.get_attribute("#total-visitors", "data-value") == str(summary["visitors"])
    value_sum = float(m["pageviews"]["value_sum"]) + float(m["impressions"]["value_sum"])
    assert float(page.get_attribute("#value-sum", "data-value")) == pytest.approx(value_sum)
    p95 = (summary.get("percentiles") or {}).get("p95")
    shown_p95 = page.get_attribute("#value-p95", "data-value")
    assert (shown_p95 == "") if p95 is None else (float(shown_p95) == pytest.approx(p95))
    series = stack.api(tally["chart"]["url"])
    assert tally["x"] == [datetime.fromisoformat(b["start"]).timestamp() for b in series["buckets"]]
    if tally["chart"]["metric"] in ("pageviews", "impressions", "visitors"):
        assert tally["data"] == [b["count"] for b in series["buckets"]]
    return {"summary": summary, "chart": tally["data"]}


def url_filters(page) -> list[str]:
    return parse_qs(urlsplit(page.url).query).get("filter", [])


def test_every_panel_is_the_api_and_a_row_click_filters_everything(stack, browser):
    context, page = open_dashboard(stack, browser, 1280, 800)
    try:
        before = assert_panels_are_the_api(stack, page)
        figures = assert_cards_and_chart_are_the_api(stack, page)
        # 28 page views of people and 2 of a headless browser (the day before aside): totals count bots, as
        # the rollups always have; breakdowns and visitors do not.
        assert figures["summary"]["metrics"]["pageviews"]["total"] == 30
        # The API splits `filter` at a comma only before a known `dimension:`: a page holding a comma is a filter.
        assert page.locator('#panel-page tr[data-key="/list,all"] .row-key').is_enabled()
        assert page.locator('#panel-page tr[data-key="/pricing"] .row-key').is_enabled()
        assert {key for key, *_ in before["country"]} == {"DE", "US", "JP", "FR", "GB"}
        assert len(before["page"]) == 10  # 12 pages: the top 10
        assert [label for key, label, _ in before["country"] if key == "DE"] == ["Germany"]
        assert "bot" not in {key for key, *_ in before["device"]}
        # Visitors per value are kept per local day: the panels say what they counted (the API's from/to).
        counted = stack.api(page.evaluate("() => window.tally.panels.page.url"))
        assert page.inner_text("#panel-page th.n") == "Visitors *"
        assert "(visitors are kept per day)" in page.inner_text("#panels-note")
        assert counted["from"][:10] in page.inner_text("#panels-note")
        # The first screen at 1280 px holds the cards, the chart and the first two panels (10 rows each).
        boxes = page.evaluate("""() => ['.cards', '#chart', '#panel-page', '#panel-source'].map(
            s => document.querySelector(s).getBoundingClientRect().bottom)""")
        assert max(boxes) <= 800, boxes
        page.screenshot(path=str(stack.shots / "dashboard-1280.png"))
        if os.environ.get("TALLY_UPDATE_SCREENSHOT") == "1":
            (ROOT / "docs" / "img").mkdir(exist_ok=True)
            shutil.copy(stack.shots / "dashboard-1280.png", ROOT / "docs" / "img" / "dashboard-1280.png")

        # A click on Germany filters every panel, the cards and the chart; the URL and a chip say so.
        assert page.get_attribute('#panel-country tr[data-key="DE"] .row-key', "title") == "filter by country: Germany"
        page.click('#panel-country tr[data-key="DE"] .row-key')
        wait_settled(page, "window.tally.view.filters.length === 1")
        assert url_filters(page) == ["country:DE"]
        assert page.inner_text("#filters .chip-text") == "Country is Germany"
        after = assert_panels_are_the_api(stack, page)
        for dimension in DIMENSIONS:
            assert after[dimension] != before[dimension], dimension
            assert "filter=country:DE" in page.evaluate(f"() => window.tally.panels['{dimension}'].url")
        filtered = assert_cards_and_chart_are_the_api(stack, page)
        assert filtered["summary"]["filters"] == ["country:DE"]
        assert (filtered["summary"]["metrics"]["pageviews"]["total"]
                < figures["summary"]["metrics"]["pageviews"]["total"])
        assert [key for key, *_ in after["country"]] == ["DE"]
        # filtered, visitors are counted per day and the other panels per hour: each note has a mark of its own
        marked = page.evaluate("""() => [...document.querySelectorAll('.panel.breakdown th[data-note]')].map(
            th => [th.dataset.note, th.textContent.split(' ').pop()])""")
        marks = {note: {m for n, m in marked if n == note} for note, _ in marked}
        assert len(marks) == 2 and sorted(len(m) for m in marks.values()) == [1, 1], marked
        assert sorted(m for (m,) in marks.values()) == ["*", "**"]
        assert all(f"{m} {note}" in page.inner_text("#panels-note") for note, (m,) in marks.items())

        # A second filter (a page) narrows further; Back undoes one click at a time, Forward redoes it.
        page.click('#panel-page tr[data-key="/pricing"] .row-key')
        wait_settled(page, "window.tally.view.filters.length === 2")
        assert sorted(url_filters(page)) == ["country:DE", "page:/pricing"]
        assert page.locator("#filters .chip").count() == 2
        two = assert_panels_are_the_api(stack, page)
        page.go_back()
        wait_settled(page, "window.tally.view.filters.length === 1")
        assert url_filters(page) == ["country:DE"]
        assert assert_panels_are_the_api(stack, page) == after
        page.go_back()
        wait_settled(page, "window.tally.view.filters.length === 0")
        assert url_filters(page) == [] and page.locator("#filters").is_hidden()
        assert assert_panels_are_the_api(stack, page) == before
        page.go_forward()
        wait_settled(page, "window.tally.view.filters.length === 1")
        page.go_forward()
        wait_settled(page, "window.tally.view.filters.length === 2")
        assert assert_panels_are_the_api(stack, page) == two

        # The URL is the view: opened afresh it shows the same; removing a chip drops that filter.
        page.goto(page.url)
        wait_settled(page, "window.tally.view.filters.length === 2")
        assert assert_panels_are_the_api(stack, page) == two
        page.click('#filters .chip[data-filter="country:DE"] .chip-remove')
        wait_settled(page, "window.tally.view.filters.length === 1")
        assert url_filters(page) == ["page:/pricing"]
        assert_panels_are_the_api(stack, page)
        assert stack.foreign == [] and stack.problems == [], "\n".join(stack.problems)
    finally:
        context.close()


def test_range_granularity_and_zone_live_in_the_url(stack, browser):
    context, page = open_dashboard(stack, browser, 1280, 800)
    try:
        query = lambda: parse_qs(urlsplit(page.url).query)  # noqa: E731
        assert query()["range"] == ["24h"] and query()["granularity"] == ["1h"] and "tz" not in query()
        page.select_option("#range", "30d")
        wait_settled(page, "window.tally.view.range === '30d'")
        assert query()["range"] == ["30d"] and query()["granularity"] == ["1d"]
        # Not one of the summary's periods: the cards are the series' totals and the visitors series' total.
        t = page.evaluate("() => ({cards: window.tally.cards, urls: window.tally.series.urls})")
        assert page.get_attribute("#total-pageviews", "data-value") == str(stack.api(t["urls"]["pageviews"])["total"])
        assert page.get_attribute("#total-impressions", "data-value") == str(
            stack.api(t["urls"]["impressions"])["total"])
        visitors = stack.api(t["cards"]["urls"]["visitors"][0])
        assert visitors["granularity"] == "1d" and page.get_attribute("#total-visitors", "data-value") == str(
            visitors["total"])
        assert_panels_are_the_api(stack, page)
        page.select_option("#tzmode", "other")
        page.fill("#tz", "Asia/Tokyo")
        page.dispatch_event("#tz", "change")
        wait_settled(page, "window.tally.params.tz === 'Asia/Tokyo'")
        assert query()["tz"] == ["Asia/Tokyo"]
        tokyo = stack.api(page.evaluate("() => window.tally.series.urls.pageviews"))
        assert all(b["start"].endswith("T00:00:00+09:00") for b in tokyo["buckets"])
        assert page.get_attribute("#total-pageviews", "data-value") == str(tokyo["total"])
        page.click('.card[data-metric="pageviews"]')
        wait_settled(page, "window.tally.series.chart.metric === 'pageviews'")
        assert query()["metric"] == ["pageviews"]
        assert page.inner_text("#panel-page th.n") == "Page views"
        assert_panels_are_the_api(stack, page)
        page.go_back()
        wait_settled(page, "window.tally.view.metric === 'visitors'")
        page.go_back()
        wait_settled(page, "window.tally.params.tz === 'Europe/Berlin'")
        assert page.input_value("#tzmode") == "site" and page.input_value("#range") == "30d"
        page.go_back()
        wait_settled(page, "window.tally.view.range === '24h'")
        assert page.input_value("#granularity") == "1h"
        assert_cards_and_chart_are_the_api(stack, page)
        assert stack.foreign == [] and stack.problems == [], "\n".join(stack.problems)
    finally:
        context.close()


def test_phone_width_has_no_horizontal_overflow(stack, browser):
    context, page = open_dashboard(stack, browser, 390, 844, f"&filter=page:{LONG_PAGE}")
    try:
        assert page.evaluate("() => document.documentElement.scrollWidth <= window.innerWidth")
        assert page.locator("#filters .chip").count() == 1
        page.screenshot(path=str(stack.shots / "filtered-390.png"))
        page.click("#filters .chip-remove")
        wait_settled(page, "window.tally.view.filters.length === 0")
        assert page.evaluate("() => document.documentElement.scrollWidth <= window.innerWidth")
        # Readable: panels one per row, full width, rows at least 12 px text.
        widths = page.evaluate("() => [...document.querySelectorAll('.panel.breakdown')].map("
                               "p => p.getBoundingClientRect().width)")
        assert all(w >= 340 for w in widths), widths
        size = page.evaluate("() => parseFloat(getComputedStyle(document.querySelector('.row-key')).fontSize)")
        assert size >= 12
        assert_panels_are_the_api(stack, page)
        page.screenshot(path=str(stack.shots / "dashboard-390.png"), full_page=True)
        if os.environ.get("TALLY_UPDATE_SCREENSHOT") == "1":
            (ROOT / "docs" / "img").mkdir(exist_ok=True)
            shutil.copy(stack.shots / "dashboard-390.png", ROOT / "docs" / "img" / "dashboard-390.png")
        # The empty states fit too: a registered site's tag, and a domain nobody registered (404 unknown_domain).
        for other, shown in ((f"quiet-{stack.domain}", "#empty-registered"),
                             (f"unregistered-{stack.domain}", "#empty-unregistered")):
            page.select_option("#domain", other)
            wait_settled(page, f"window.tally.domain === '{other}'")
            assert page.locator(shown).is_visible(), other
            assert page.locator(".cards").is_visible() == (shown == "#empty-registered")  # nothing to count yet
            assert page.evaluate("() => document.documentElement.scrollWidth <= window.innerWidth"), other
            page.screenshot(path=str(stack.shots / f"empty-390-{shown[7:]}.png"), full_page=True)
        assert stack.foreign == [] and stack.problems == [], "\n".join(stack.problems)
        assert stack.foreign == [] and stack.problems == [], "\n".join(stack.problems)
    finally:
        context.close()


def live(page) -> dict:
    return page.evaluate("() => ({loads: window.tally.liveLoads, ticks: [...window.tally.liveTicks], shown:"
                         " document.getElementById('live-pageviews').dataset.value, live: window.tally.live})")


def test_live_card_refreshes_every_15_seconds(stack, browser):
    context, page = open_dashboard(stack, browser, 1280, 800, fake_clock=True)
    try:
        page.wait_for_function("() => window.tally.liveLoads >= 1")
        first = live(page)
        answer = stack.api(first["live"]["urls"]["pageviews"])
        assert first["shown"] == str(answer["total"]) == "0" and answer["granularity"] == "15m"
        assert len(answer["buckets"]) == 3  # the two last whole quarter hours and the one filling
        stack.post("81.2.69.142", "mac", [_event(stack.domain, datetime.now(UTC), 0, "/", None, "pageview", None)] * 3)
        stack.pipeline.ship()
        stack.pipeline.rollups.drain()
        # Page time runs on Playwright's clock (with real time, and jumps): the card asks again every 15 s.
        ticks = len(live(page)["ticks"])
        page.clock.run_for(15_000)
        page.wait_for_function(f"() => window.tally.liveTicks.length > {ticks} && "
                               f"document.getElementById('live-pageviews').dataset.value === '3'")
        page.clock.run_for(15_000)
        page.wait_for_function(f"() => window.tally.liveTicks.length > {ticks + 1}")
        again = live(page)
        assert again["ticks"][-1] - again["ticks"][-2] == 15_000
        assert again["shown"] == "3" == str(stack.api(again["live"]["urls"]["pageviews"])["total"])
        assert stack.foreign == [] and stack.problems == [], "\n".join(stack.problems)
    finally:
        context.close()


def test_a_429_is_waited_out_as_its_retry_after_says_not_shown(stack, browser):
    """The token's per-second budget (TALLY_API_RATE_LIMIT) can run out when views change quickly: the dashboard
    waits the answer's Retry-After and asks again, instead of showing an error (the end-to-end test once failed
    on its empty state that way). Here the first summary answer is a 429."""
    asked: list[str] = []

    def first_refused(route) -> None:
        asked.append(route.request.url)
        if len(asked) == 1:
            route.fulfill(status=429, headers={"Retry-After": "1", "Content-Type": "application/json"},
                          body=json.dumps({"error": {"code": "rate_limited", "message": "rate limit exceeded",
                                                     "retry_after_s": 1}}))
        else:
            route.continue_()

    context, page = open_dashboard(stack, browser, 1280, 800, route=("**/api/v1/domains/*/summary?*", first_refused))
    try:
        assert len(asked) == 2 and asked[0] == asked[1], asked
        assert page.inner_text("#error") == ""
        assert_cards_and_chart_are_the_api(stack, page)
        # the one refused, seen once (its answer, and the browser's console line for it)
        assert sorted(stack.problems) == sorted([f"429 {asked[0]}", "console error: Failed to load resource: the "
                                                 "server responded with a status of 429 (Too Many Requests)"]), \
            "\n".join(stack.problems)
        stack.problems.clear()
    finally:
        context.close()
