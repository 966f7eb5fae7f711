"""The dashboard in a real browser (Debian's chromium via Playwright) over real HTTP (waitress)."""

from __future__ import annotations

import shutil
import threading
from datetime import datetime, timedelta, timezone

import psycopg
import pytest
import waitress

from infra.processes import free_port
from oltp import tokens
from tests.test_pipeline import Pipeline

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture()
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def test_dashboard_shows_the_domains_impressions(settings, domain, browser, tmp_path):
    pipeline = Pipeline(settings)
    try:
        ts = (datetime.now(timezone.utc) - timedelta(minutes=30)).isoformat()
        pipeline.post([{"domain": domain, "url": f"https://{domain}/", "type": "impression", "ts": ts}] * 17)
        pipeline.ship()
        pipeline.drain()
        port = free_port()
        server = waitress.create_server(pipeline.api_app, host="127.0.0.1", port=port, threads=4)
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(f"http://127.0.0.1:{port}/?domain={domain}")
            # No token yet: the page asks for one and shows no numbers.
            page.wait_for_function("document.getElementById('error').textContent.includes('API token')",
                                   timeout=15_000)
            page.fill("#token", "tly_tok_ffffffffff_" + "A" * 43)
            page.click("button[type=submit]")
            page.wait_for_function("document.getElementById('error').textContent.includes('revoked')",
                                   timeout=15_000)
            assert page.locator("#total").inner_text() == "–"
            # A customer token for this domain, sent as a Bearer header and kept for the tab only.
            with psycopg.connect(settings.pg_dsn, autocommit=True) as conn:
                _, token = tokens.create(conn, "customer", [domain], "dashboard test")
            page.fill("#token", token)
            page.click("button[type=submit]")
            page.wait_for_function("document.getElementById('total').textContent === '17'", timeout=15_000)
            assert page.evaluate("sessionStorage.getItem('tally-token')") == token
            assert token not in page.url
            page.reload()
            page.wait_for_function("document.getElementById('total').textContent === '17'", timeout=15_000)
            assert page.locator("#chart rect.bar").count() >= 24  # one bar per bucket, zero-filled
            assert domain in page.locator("#caption").inner_text()
            page.screenshot(path=str(tmp_path / "dashboard.png"))

            page.fill("#domain", "not a domain")
            page.click("button[type=submit]")
            page.wait_for_function("document.getElementById('error').textContent.includes('not a valid host')",
                                   timeout=15_000)
            assert errors == []
        finally:
            server.close()
    finally:
        pipeline.close()
