"""The site owner's setup path on the dashboard (issue 17 item 5), in a real browser over real HTTP, fed by
the pipeline: the ingestion panel names each refusal's offending value (the domain an event named, the page
origin), and the empty state says which page origins are registered."""

from __future__ import annotations

import psycopg
import pytest

from collector.sealer import flush_refusals
from infra.processes import free_port, tcp_open, wait_until
from oltp import sites, tokens
from tests.conftest import chromium, serve_in_thread
from tests.test_dashboard import wait_ready
from tests.test_pipeline import Pipeline


@pytest.fixture()
def browser():
    with chromium() as browser:
        yield browser


def test_panel_names_offending_values_and_empty_state_the_origins(settings, domain, browser):
    quiet, bare = f"new-{domain}", f"bare-{domain}"
    sites.add(settings.pg_dsn, domain, origins=["https://" + domain])
    sites.add(settings.pg_dsn, quiet, origins=["https://" + quiet, "http://localhost:8000"])
    sites.add(settings.pg_dsn, bare)
    pipeline = Pipeline(settings)
    try:
        ev = {"domain": domain, "url": f"https://{domain}/", "type": "pageview"}
        pipeline.post(ev)
        q = pipeline.site_query(ev)
        resp = pipeline.collector.post("/collect", json={**ev, "domain": "localhost"}, query_string=q)
        assert resp.status_code == 403
        assert pipeline.collector.post("/collect", json=ev, query_string=q,
                                       headers={"Origin": "http://127.0.0.1:5500"}).status_code == 403
        assert flush_refusals(pipeline.collector.application) == 2
        pipeline.ship()
        pipeline.drain()
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        server = serve_in_thread(pipeline.api_app, port)
        wait_until(lambda: tcp_open("127.0.0.1", port), what="api", timeout=10)
        with psycopg.connect(settings.pg_dsn, autocommit=True) as conn:
            _, token = tokens.create(conn, "customer", [domain, quiet, bare], "setup test")
        try:
            context = browser.new_context(viewport={"width": 1280, "height": 900})
            page = context.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(f"{base}/?domain={domain}")
            page.fill("#token", token)
            page.click("button[type=submit]")
            wait_ready(page, "window.tally.chart !== null")
            page.wait_for_function("() => document.getElementById('ingestion-status').dataset.status === 'ok'")
            labels = page.evaluate("() => [...document.querySelectorAll('#ingestion-table tbody th')]"
                                   ".map(th => th.textContent.trim())")
            assert "refused: origin not allowed (last: http://127.0.0.1:5500)" in labels, labels
            assert "refused: site mismatch (last: localhost)" in labels, labels

            page.select_option("#domain", quiet)
            wait_ready(page, f"window.tally.params && window.tally.domain === '{quiet}'")
            assert page.locator("#empty").is_visible()
            page.wait_for_function(f"() => document.getElementById('empty-origins').textContent.includes('{quiet}')")
            text = page.inner_text("#empty-origins")
            assert f"https://{quiet}, http://localhost:8000 may send" in text
            assert f'data-domain="{quiet}"' in text

            page.select_option("#domain", bare)
            wait_ready(page, f"window.tally.params && window.tally.domain === '{bare}'")
            page.wait_for_function("() => document.getElementById('empty-origins').textContent"
                                   ".includes('No page origin')")
            assert f"tally sites update {bare} --add-origin https://{bare}" in page.inner_text("#empty-origins")
            assert errors == []
            context.close()
        finally:
            server.close()
    finally:
        pipeline.close()
