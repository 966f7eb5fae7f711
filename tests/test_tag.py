"""The JS tag (collector/static/tag.min.js) in a real browser (Debian's chromium via Playwright).

A stand-in collector (stdlib http.server on 127.0.0.1) serves tag.min.js at /tag.js, records every
request and checks every event against the real contract (core.event.event_from_hit); the test pages
are served from a different origin (another port), as on a customer's site. No Node is needed: the
built file is committed, and test_built_tag_is_current_and_small checks it matches tag.js.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import threading
import time
from collections import Counter
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from core.event import EventError, HitContext, Limits, event_from_hit, mac_key
from tests.conftest import chromium, until

ROOT = Path(__file__).resolve().parent.parent
TAG_SRC = ROOT / "collector" / "static" / "tag.js"
TAG_MIN = ROOT / "collector" / "static" / "tag.min.js"
SITE_KEY = "pk_test-0123456789abcdef"  # the public site key (`tally sites add` prints it)
SNIPPET = "window.tally = window.tally || function () { (tally.q = tally.q || []).push(arguments) };"
UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
# The browser itself logs a failed request ("Failed to load resource: ... 503"); the tests that make the
# stand-in fail on purpose allow exactly that line, which no script can suppress. Nothing else, ever.
BROWSER_NETWORK_LOG = "Failed to load resource"


class StandInCollector:
    """Records requests; answers POST /collect from `plan` (then 202), with CORS headers."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: list[dict] = []
        # per POST, in order: a status code, or "drop" (close without answering); a (Sec-Fetch-Mode, status) pair
        # is for the first POST of that mode (sendBeacon's is "no-cors"), whenever it comes
        self.plan: list = []
        self.tag = TAG_MIN.read_bytes()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _answer(self, status: int, body: bytes = b"", ctype: str = "application/json",
                        extra: dict | None = None) -> None:
                self.send_response(status)
                self.send_header("Access-Control-Allow-Origin", "*")
                self.send_header("Access-Control-Allow-Headers", "Content-Type")
                self.send_header("Access-Control-Expose-Headers", "Retry-After")
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                for k, v in (extra or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                outer._record(self, None)
                if urlsplit(self.path).path == "/tag.js":
                    self._answer(200, outer.tag, "text/javascript")
                else:
                    self._answer(404, b"{}")

            def do_OPTIONS(self) -> None:  # a preflight: the tag must never cause one
                outer._record(self, None)
                self._answer(204)

            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = raw.decode("utf-8", "replace")
                with outer.lock:
                    step = outer.next_step(self.headers.get("Sec-Fetch-Mode"))
                rec = outer._record(self, body, step)
                if step == "drop":
                    self.close_connection = True
                    return
                if step == 202:
                    events = body if isinstance(body, list) else [body]
                    ctx = HitContext(received_at=datetime.now(UTC), user_agent=self.headers.get("User-Agent"))
                    for index, event in enumerate(events):
                        try:
                            event_from_hit(event, ctx, Limits(), mac_key("stand-in-secret-0123456789"))
                        except EventError as exc:  # what the real collector would answer
                            rec["status"] = 400
                            rec["invalid"] = str(exc)
                            payload = {"error": {"code": "invalid_event", "message": f"event {index}: {exc}",
                                                 "index": index, **exc.as_dict()}}
                            self._answer(400, json.dumps(payload).encode())
                            return
                    self._answer(202, json.dumps({"accepted": len(events)}).encode())
                elif step == 400:  # the collector names the bad event: the second one
                    payload = {"error": {"code": "invalid_event", "message": "event 1: value: bad",
                                         "index": 1, "field": "value", "problem": "bad"}}
                    self._answer(400, json.dumps(payload).encode())
                else:
                    self._answer(step, b'{"error": {"code": "stand_in", "message": "planned"}}',
                                 extra={"Retry-After": "1"} if step in (429, 503) else None)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.origin = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def next_step(self, mode: str | None):
        """The planned answer to a POST made in `mode` (holding the lock)."""
        for i, step in enumerate(self.plan):
            if not isinstance(step, tuple):
                return self.plan.pop(i)
            if step[0] == mode:
                return self.plan.pop(i)[1]
        return 202

    def _record(self, handler: BaseHTTPRequestHandler, body, status=None) -> dict:
        parts = urlsplit(handler.path)
        rec = {"method": handler.command, "path": parts.path, "query": parse_qs(parts.query),
               "content_type": handler.headers.get("Content-Type"), "mode": handler.headers.get("Sec-Fetch-Mode"),
               "cookie": handler.headers.get("Cookie"), "body": body, "status": status}
        with self.lock:
            self.requests.append(rec)
        return rec

    def posts(self) -> list[dict]:
        with self.lock:
            return [r for r in self.requests if r["method"] == "POST"]

    def events(self, accepted_only: bool = True) -> list[dict]:
        out = []
        for r in self.posts():
            if not accepted_only or r["status"] == 202:
                out.extend(r["body"] if isinstance(r["body"], list) else [r["body"]])
        return out

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Site:
    """The customer's site: pages on another origin (port), by path."""

    def __init__(self, host: str = "localhost") -> None:
        self.pages: dict[str, str] = {}
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                html = outer.pages.get(urlsplit(self.path).path)
                body = (html or "not found").encode()
                self.send_response(200 if html is not None else 404)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        # `localhost` by default, not 127.0.0.1: without data-domain the tag sends location.hostname as the
        # domain, and the collector refuses IP literals as domains (ADR 15).
        self.origin = f"http://{host}:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def add(self, path: str, collector: StandInCollector | None, *, attrs: str = 'data-flush-ms="50"',
            before: str = "", body: str = "") -> str:
        """A page at `path` (with the tag from `collector` unless None); returns its URL."""
        tag = (f'<script defer src="{collector.origin}/tag.js" data-site="{SITE_KEY}" {attrs}></script>'
               if collector else "")
        self.pages[path] = (f'<!doctype html><html><head><meta charset="utf-8"><link rel="icon" href="data:,">'
                            f"<title>{path}</title>{before}{tag}</head><body>{body}</body></html>")
        return self.origin + path

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def browser():
    with chromium() as browser:
        yield browser


@pytest.fixture()
def collector():
    c = StandInCollector()
    yield c
    c.close()
    assert not [r for r in c.requests if r["method"] == "OPTIONS"], "the tag caused a CORS preflight"
    assert not [r for r in c.requests if r.get("invalid")], "the tag sent an event the collector refuses"
    assert not [r for r in c.requests if r["cookie"]], "a request to the collector carried cookies"


@pytest.fixture()
def site():
    s = Site()
    yield s
    s.close()


class Tab:
    """One browser context and page, recording every console message and page error."""

    def __init__(self, browser, init_script: str | None = None) -> None:
        self.context = browser.new_context()
        if init_script:
            self.context.add_init_script(init_script)
        self.page = self.context.new_page()
        self.console: list[str] = []
        self.errors: list[str] = []
        self.page.on("console", lambda m: self.console.append(f"{m.type}: {m.text}"))
        self.page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        self.allow_network_log = False

    def until(self, what: str, predicate, timeout: float = 10.0):
        """Poll `predicate` (keeping Playwright's event loop turning) until it is truthy."""
        return until(self.page, what, predicate, timeout)

    def check_clean(self) -> None:
        """(g) no cookies, no localStorage, nothing in the console, no page errors."""
        assert self.context.cookies() == []
        if not self.page.is_closed() and self.page.url.startswith("http"):
            assert self.page.evaluate("document.cookie") == ""
            assert self.page.evaluate("localStorage.length") == 0
        console = [m for m in self.console
                   if not (self.allow_network_log and m.startswith("error: " + BROWSER_NETWORK_LOG))]
        assert console == []
        assert self.errors == []

    def close(self) -> None:
        self.context.close()


@pytest.fixture()
def tab(browser):
    t = Tab(browser)
    yield t
    t.check_clean()
    t.close()


def pageviews(collector: StandInCollector) -> list[dict]:
    return [e for e in collector.events() if e["type"] == "pageview"]


def test_pageview_on_load(collector, site, tab):
    """(a) one page view on load: url, referrer, id, ts, domain, site key in the query, text/plain."""
    landing = site.add("/landing", collector)
    start = site.add("/from", None, body='<a id="go" href="/landing">go</a>')
    tab.page.goto(start)
    t0 = time.time() * 1000
    tab.page.click("#go")
    tab.page.wait_for_url(landing)
    views = tab.until("the page view", lambda: pageviews(collector))
    t1 = time.time() * 1000
    time.sleep(0.3)
    assert len(collector.posts()) == 1 and len(views) == 1
    post, view = collector.posts()[0], views[0]
    assert post["path"] == "/collect" and post["query"] == {"site": [SITE_KEY]}
    assert post["content_type"] == "text/plain" and post["mode"] == "cors"
    assert isinstance(post["body"], list)
    assert set(view) == {"id", "ts", "domain", "url", "type", "referrer"}
    assert view["url"] == landing and view["referrer"] == start and view["domain"] == "localhost"
    assert UUID_RE.match(view["id"])
    assert t0 - 1000 <= view["ts"] <= t1
    assert tab.page.evaluate("typeof tally") == "function"


def test_spa_navigations(collector, site, tab):
    """(b) pushState x2 and a URL-changing replaceState each send a page view; a hashchange alone, popstate
    back to the same path and replaceState to the same URL send nothing (fragments are never sent)."""
    url = site.add("/spa", collector)
    tab.page.goto(url)
    tab.until("the first view", lambda: pageviews(collector))
    tab.page.evaluate("history.pushState({}, '', '/spa/a')")
    tab.page.evaluate("history.pushState({}, '', '/spa/b')")
    tab.page.evaluate("location.hash = 'x'")
    tab.page.wait_for_url(site.origin + "/spa/b#x")
    tab.page.evaluate("history.replaceState({n: 1}, '', location.href)")  # same URL: not a view
    tab.page.evaluate("history.back()")  # popstate (and hashchange) back to /spa/b: the same URL sent
    tab.page.wait_for_url(site.origin + "/spa/b")
    tab.page.evaluate("history.replaceState({}, '', '/spa/c')")
    o = site.origin
    expected = [url, o + "/spa/a", o + "/spa/b", o + "/spa/c"]
    tab.until("four views", lambda: len(pageviews(collector)) >= 4)
    time.sleep(0.4)
    tab.page.wait_for_timeout(50)
    views = pageviews(collector)
    assert [v["url"] for v in views] == expected
    assert [v.get("referrer") for v in views[1:]] == expected[:-1]  # an SPA view's referrer: the last URL
    assert len({v["id"] for v in views}) == 4


SECRETS = ("s3cr3t", "t0k3n", "a%40b.c", "pw", "gclid")


def test_urls_keep_only_allowlisted_query_parameters_and_referrers_of_other_sites_their_origin(collector, site, tab):
    """(i) issue 15 item 11: no fragment, no user:password@, only utm_* (and data-keep-query) of the query;
    a same-origin referrer cut alike, another site's as its origin. The tag used to send location.href
    and document.referrer whole."""
    landing = site.add("/land", collector, attrs='data-flush-ms="50" data-keep-query="ref, lang"')
    start = site.add("/from", None, body='<a id="go" href="/land?utm_source=news&token=s3cr3t&ref=hn&utm_medium=mail'
                                           '&email=a%40b.c&lang=de&gclid=x1#access_token=t0k3n">go</a>')
    tab.page.goto(start + "?session=s3cr3t#frag")
    tab.page.click("#go")
    tab.until("the page view", lambda: pageviews(collector))
    tab.page.evaluate("""() => {
        tally('impression', {referrer: 'https://www.google.com/search?q=s3cr3t#t0k3n'});
        tally('impression', {url: 'http://user:pw@localhost/x?utm_campaign=c&gclid=1', referrer: 'http://localhost/'});
        history.pushState({}, '', '/land/next?token=s3cr3t&utm_term=t#t0k3n');
    }""")
    tab.until("four events", lambda: len(collector.events()) >= 4)
    time.sleep(0.3)
    tab.page.wait_for_timeout(50)
    events = collector.events()
    assert landing == site.origin + "/land"
    kept = f"{landing}?utm_source=news&ref=hn&utm_medium=mail&lang=de"
    assert [(e["type"], e["url"], e.get("referrer")) for e in events] == [
        ("pageview", kept, start),  # the same-origin referrer without its ?session= and #frag
        ("impression", kept, "https://www.google.com/"),
        ("impression", "http://localhost/x?utm_campaign=c", "http://localhost/"),
        ("pageview", f"{landing}/next?utm_term=t", kept)]
    sent = json.dumps([r["body"] for r in collector.posts()])
    assert not [word for word in SECRETS if word in sent]


def test_the_tag_cuts_urls_exactly_as_the_collector_does(collector, site, tab):
    """(i) the tag's URL rule and core/urls.py agree on a table of URLs and referrers (the collector applies
    its rule again: a URL the tag sent comes out unchanged, so the event's hash is the tag's content's)."""
    from core.urls import rule_for

    rule = rule_for(("ref",), False)
    hosts = ["https://a.example.com", "http://a.example.com:8080", "https://u:p@A.example.com", "https://b.example.org"]
    tails = ["", "/", "/x/y", "/@me", "?utm_source=1&x=2", "/p?ref=r&gclid=g&utm_term#f?utm_source=9",
             "/p?=3&&utm_medium=m&a=b=c", "/p#", "/p?", "/p?utm_content=%20c&UTM_CONTENT=d"]
    urls = [h + t for h in hosts for t in tails]
    pairs = [(u, urls[(i * 7 + 3) % len(urls)]) for i, u in enumerate(urls)]
    page = site.add("/same", collector, attrs='data-flush-ms="50" data-keep-query="ref"')
    tab.page.goto(page)
    tab.until("the page view", lambda: pageviews(collector))
    tab.page.evaluate("pairs => pairs.forEach(([url, referrer]) => tally('impression', {url, referrer}))", pairs)
    tab.until("every event", lambda: len(collector.events()) >= 1 + len(pairs))
    got = [(e["url"], e.get("referrer")) for e in collector.events() if e["type"] == "impression"]
    want = [(rule.page(u), rule.referrer(r, rule.page(u))) for u, r in pairs]
    assert got == want
    assert all((rule.page(u), rule.referrer(r, u)) == (u, r) for u, r in got)  # the collector keeps them as sent


def test_raw_urls_send_what_the_page_says(collector, site, tab):
    """(i) data-raw-urls="true" (a site registered with --raw-urls): URLs and referrers as they are."""
    url = site.add("/raw", collector, attrs='data-flush-ms="50" data-raw-urls="true"')
    tab.page.goto(url + "?token=s3cr3t#t0k3n")
    tab.until("the page view", lambda: pageviews(collector))
    tab.page.evaluate("tally('impression', {referrer: 'https://www.google.com/search?q=x'})")
    tab.until("two events", lambda: len(collector.events()) >= 2)
    assert [(e["url"], e.get("referrer")) for e in collector.events()] == [
        (url + "?token=s3cr3t#t0k3n", None), (url + "?token=s3cr3t#t0k3n", "https://www.google.com/search?q=x")]


def test_queue_before_load_and_custom_events(collector, site, tab):
    """(c) calls queued by the snippet before the tag loads are sent; tally('impression', {value: 1.5})
    after load is sent; calls the collector would refuse are dropped without poisoning the batch."""
    url = site.add("/shop", collector, before=f"<script>{SNIPPET} tally('impression', {{value: 2}});"
                                              "tally('impression');</script>")
    tab.page.goto(url)
    tab.until("the queued events", lambda: len(collector.events()) >= 3)
    assert tab.page.evaluate("tally.q === undefined && typeof tally === 'function'")
    tab.page.evaluate("""() => {
        tally('impression', {value: 1.5});
        tally('impression', {value: -1});          // refused by the collector: not sent
        tally('impression', {value: 'abc'});       // idem
        tally('click');                            // not an event type: not sent
        tally('impression', {value: '0.1234567'}); // rounded to 6 places
    }""")
    tab.until("the custom events", lambda: len(collector.events()) >= 5)
    time.sleep(0.3)
    tab.page.wait_for_timeout(50)
    events = collector.events()
    assert [(e["type"], e.get("value")) for e in events] == [
        ("pageview", None), ("impression", 2), ("impression", None), ("impression", 1.5),
        ("impression", 0.123457)]
    assert all(e["url"] == url and e["domain"] == "localhost" for e in events)
    assert "referrer" not in events[1]


@pytest.mark.parametrize("failure", [503, 429, "drop"])
def test_failed_send_is_retried_with_the_same_ids(collector, site, tab, failure):
    """(d) a 5xx, a 429 or a network error: the retry carries the same ids; each event is accepted once."""
    tab.allow_network_log = True
    collector.plan = [failure]
    url = site.add("/retry", collector, before=f"<script>{SNIPPET} tally('impression', {{value: 1}});</script>")
    tab.page.goto(url)
    tab.until("the retry", lambda: len(collector.posts()) >= 2)
    time.sleep(1.5)  # nothing more: accepted events are never sent again
    tab.page.wait_for_timeout(50)
    first, second = collector.posts()
    assert first["status"] == failure and second["status"] == 202
    ids = [e["id"] for e in first["body"]]
    assert len(ids) == 2 and [e["id"] for e in second["body"]] == ids
    assert first["body"] == second["body"]  # same ts too: the same event
    assert Counter(e["id"] for e in collector.events()) == Counter(ids)


def test_refused_events_are_dropped_not_retried(collector, site, tab):
    """(d) a 400 naming one event drops only that one; any other 4xx (here 401) drops the batch for good."""
    tab.allow_network_log = True
    collector.plan = [400]
    url = site.add("/bad", collector, before=f"<script>{SNIPPET} tally('impression', {{value: 1}});"
                                             "tally('impression', {value: 2});</script>")
    tab.page.goto(url)
    tab.until("the resend", lambda: len(collector.posts()) >= 2)
    first, second = collector.posts()
    assert first["status"] == 400 and second["status"] == 202
    assert second["body"] == [first["body"][0], first["body"][2]]

    collector.plan = [401]
    tab.page.evaluate("tally('impression', {value: 3})")
    tab.until("the refused send", lambda: len(collector.posts()) >= 3)
    time.sleep(1.5)
    tab.page.wait_for_timeout(50)
    assert len(collector.posts()) == 3 and collector.posts()[2]["status"] == 401
    assert tab.page.evaluate("sessionStorage.length") == 0


@pytest.mark.parametrize("leave", ["navigate", "close"])
def test_leaving_right_after_an_event_delivers_it_by_beacon(collector, site, tab, leave):
    """(e) an event right before navigating away or closing the tab goes out with sendBeacon on pagehide."""
    url = site.add("/leave", collector, attrs='data-flush-ms="60000"')  # only pagehide can send it
    away = site.add("/elsewhere", None)
    tab.page.goto(url)
    tab.page.evaluate("tally('impression', {value: 4})")
    if leave == "navigate":
        tab.page.goto(away)
    else:
        tab.page.close()
    deadline = time.monotonic() + 10
    while len(collector.events()) < 2 and time.monotonic() < deadline:
        time.sleep(0.025)
    assert len(collector.events()) == 2
    post = collector.posts()[0]
    assert post["mode"] == "no-cors" and post["content_type"] == "text/plain"  # sendBeacon's request
    assert post["query"] == {"site": [SITE_KEY]}
    assert [(e["type"], e["url"]) for e in post["body"]] == [("pageview", url), ("impression", url)]


def test_unsent_events_are_resent_on_the_next_page_load(collector, site, tab):
    """(e) the beacon fails (503): the next page of the same tab resends the events from sessionStorage,
    with the same ids, and each is accepted once."""
    tab.allow_network_log = True
    # the beacon, not whichever POST comes first: under load the next page's fetch can reach the stand-in first
    collector.plan = [("no-cors", 503)]
    first = site.add("/one", collector, attrs='data-flush-ms="60000"')
    second = site.add("/two", collector)
    tab.page.goto(first)
    tab.page.evaluate("tally('impression', {value: 5})")
    stored = tab.page.evaluate(f"JSON.parse(sessionStorage.getItem('tally:' + {json.dumps(SITE_KEY)}))")
    assert [entry[0]["type"] for entry in stored] == ["pageview", "impression"]
    tab.page.goto(second)
    tab.until("the resend", lambda: len(collector.events()) >= 3)
    time.sleep(0.3)
    tab.page.wait_for_timeout(50)
    beacon, resend = sorted(collector.posts(), key=lambda post: post["mode"] != "no-cors")
    assert beacon["mode"] == "no-cors" and resend["mode"] != "no-cors"
    assert beacon["status"] == 503 and resend["status"] == 202
    assert resend["body"][:2] == beacon["body"]
    assert [e["url"] for e in resend["body"]] == [first, first, second]
    assert Counter(e["id"] for e in collector.events()).most_common(1)[0][1] == 1
    tab.until("the queue to empty", lambda: tab.page.evaluate("sessionStorage.length") == 0)


def test_hidden_tab_beacons_then_confirms_when_visible_again(collector, site, tab):
    """(e) a tab going to the background beacons what is pending; when it is visible again the same
    events (same ids: the collector counts them once) are confirmed by a normal send, then forgotten."""
    url = site.add("/bg", collector, attrs='data-flush-ms="2000"')
    tab.page.goto(url)
    set_visibility = """state => {
        Object.defineProperty(document, 'visibilityState', {configurable: true, get: () => state});
        document.dispatchEvent(new Event('visibilitychange'));
    }"""
    tab.page.evaluate(set_visibility, "hidden")
    tab.until("the beacon", lambda: collector.posts())
    assert tab.page.evaluate("sessionStorage.length") == 1  # kept until a fetch confirms it
    tab.page.evaluate(set_visibility, "visible")
    tab.until("the confirming send", lambda: len(collector.posts()) >= 2)
    beacon, confirm = collector.posts()
    assert (beacon["mode"], confirm["mode"]) == ("no-cors", "cors")
    assert beacon["body"] == confirm["body"] and len(beacon["body"]) == 1
    tab.until("the queue to empty", lambda: tab.page.evaluate("sessionStorage.length") == 0)


PRIVACY_SIGNALS = {
    "dnt": "Object.defineProperty(Navigator.prototype, 'doNotTrack', {get: () => '1'});",
    "gpc": "Object.defineProperty(Navigator.prototype, 'globalPrivacyControl', {get: () => true});",
}


@pytest.mark.parametrize("signal", sorted(PRIVACY_SIGNALS))
@pytest.mark.parametrize("respect", [True, False])
def test_do_not_track_and_gpc(collector, site, browser, signal, respect):
    """(f) with data-respect-dnt="true" a DNT or GPC browser sends nothing; without it, it sends."""
    tab = Tab(browser, PRIVACY_SIGNALS[signal])
    try:
        attrs = 'data-flush-ms="50"' + (' data-respect-dnt="true"' if respect else "")
        url = site.add("/private", collector, attrs=attrs, before=f"<script>{SNIPPET} tally('impression');</script>")
        tab.page.goto(url)
        tab.page.evaluate("tally('impression', {value: 1})")
        tab.page.wait_for_timeout(400)
        tab.page.goto(site.add("/after", None))  # pagehide: would beacon anything pending
        tab.page.wait_for_timeout(200)
        if respect:
            assert collector.posts() == []
        else:
            tab.until("the events", lambda: len(collector.events()) >= 3)
        tab.check_clean()
    finally:
        tab.close()


def test_built_tag_is_current_and_small():
    """(h) tag.min.js is built from the current tag.js (scripts/build-tag) and is at most 3 KB gzipped."""
    source_hash = hashlib.sha256(TAG_SRC.read_bytes()).hexdigest()
    built = TAG_MIN.read_bytes()
    header = built.split(b"\n", 1)[0].decode()
    assert f"source sha256:{source_hash}" in header, "tag.min.js is stale: run scripts/build-tag"
    assert len(gzip.compress(built, compresslevel=9)) <= 3072
    text = built.decode("ascii")
    for word in ("console", "cookie", "localStorage"):
        assert word not in text
