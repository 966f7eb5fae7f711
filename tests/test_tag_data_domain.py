"""The tag's `data-domain` against the real collector (issue 17 item 5): a page served from 127.0.0.1 (an IP
literal, which the collector refuses as an event's domain) sends for its registered site when its tag says
`data-domain="<site>"`; without it, the tag sends the page's host as before and the collector refuses it.

Debian's Chromium via Playwright; the collector is the real Flask app under waitress, spooling to disk;
the page is on another port of 127.0.0.1 (a cross-origin page, as on a customer's site).
"""

from __future__ import annotations

import pytest

from infra.processes import free_port
from tests.conftest import chromium, register, serve_in_thread, until
from tests.test_collector import spooled
from tests.test_tag import Site

pytestmark = pytest.mark.servers("postgres")


@pytest.fixture()
def collector_url(app):
    port = free_port()
    server = serve_in_thread(app, port)
    yield f"http://127.0.0.1:{port}"
    server.close()


@pytest.fixture()
def pages():
    p = Site(host="127.0.0.1")  # an IP-literal page host, which only data-domain makes sendable
    yield p
    p.close()


@pytest.fixture(scope="module")
def browser():
    with chromium() as browser:
        yield browser


def _visit(browser, url: str, collector_url: str) -> list[int]:
    """Open `url`, wait for the tag's first POST to /collect to be answered; the answers' statuses."""
    statuses: list[int] = []
    context = browser.new_context()
    try:
        page = context.new_page()
        page.on("response", lambda r: statuses.append(r.status) if r.url.startswith(collector_url + "/collect")
                else None)
        page.goto(url)
        until(page, "the tag's request", lambda: statuses)
    finally:
        context.close()
    return statuses


def test_data_domain_sends_for_the_registered_site_from_an_ip_page(app, settings, registry, domain, pages,
                                                                  collector_url, browser):
    key = register(settings, registry, domain, origins=[pages.origin])
    url = pages.add("/p", None, before=f'<script defer src="{collector_url}/tag.js" data-site="{key}"'
                                      f' data-domain="{domain}" data-flush-ms="0"></script>')
    assert _visit(browser, url, collector_url) == [202]
    (event,) = spooled(settings)
    assert event.domain == domain and event.type == "pageview"
    assert event.url == url  # the page's own URL, on 127.0.0.1


def test_without_data_domain_the_pages_host_is_sent_as_before(app, settings, registry, domain, pages,
                                                             collector_url, browser):
    key = register(settings, registry, domain, origins=[pages.origin])
    url = pages.add("/q", None, before=f'<script defer src="{collector_url}/tag.js" data-site="{key}"'
                                      ' data-flush-ms="0"></script>')
    assert _visit(browser, url, collector_url) == [400]  # 127.0.0.1 is no domain (ADR 15)
    assert spooled(settings) == []
