"""The API's routes in blueprints, with the errors the routes raise mapped once for the app (ADR 39).

The refactor keeps every answer as it was (tests/test_openapi.py and the other API tests are the
contract); these tests pin the layout and the mapping: which blueprint holds which route, the public
route names that metrics and the OpenAPI document keep, and the 503s a store that stops answering
gives on each blueprint - with a real PostgreSQL whose tables are locked, so the token check (another
table) passes and the route's own query is cancelled by `statement_timeout` (an OperationalError).
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
from collections.abc import Iterator

import psycopg
import pytest
from flask import Flask
from psycopg_pool import ConnectionPool

from api.app import create_app
from api.errors import ApiError
from api.names import public_name
from oltp import tokens
from oltp.queries import OutsideRetention, QueryError, RollupReader
from tally.roots import build_api

API_DIR = pathlib.Path(__file__).resolve().parent.parent / "api"


@pytest.fixture()
def app(make_settings) -> Iterator[Flask]:
    app = build_api(make_settings())
    yield app
    app.extensions["tally_backends"].rollups.pool.close()


def test_each_route_lives_in_its_blueprint(app):
    endpoints = {(rule.rule, tuple(sorted(rule.methods - {"HEAD", "OPTIONS"}))): rule.endpoint
                 for rule in app.url_map.iter_rules()}
    assert endpoints[("/api/v1/domains", ("GET",))] == "customers.list_domains"
    assert endpoints[("/api/v1/domains/<domain>/summary", ("GET",))] == "customers.domain_summary"
    assert endpoints[("/api/v1/domains/<domain>/status", ("GET",))] == "customers.domain_status"
    assert endpoints[("/api/v1/domains/<domain>/<metric>", ("GET",))] == "customers.domain_series"
    assert endpoints[("/api/v1/sql", ("POST",))] == "sql.analyst_sql"
    assert endpoints[("/", ("GET",))] == "dashboard.dashboard"
    assert endpoints[("/login", ("GET",))] == "dashboard.login_form"
    assert endpoints[("/login", ("POST",))] == "dashboard.login"
    assert endpoints[("/logout", ("POST",))] == "dashboard.logout"
    assert endpoints[("/healthz", ("GET",))] == "ops.healthz"
    assert endpoints[("/readyz", ("GET",))] == "ops.readyz"
    assert endpoints[("/api/v1/openapi.json", ("GET",))] == "ops.openapi_document"
    assert set(app.blueprints) == {"customers", "sql", "dashboard", "ops", "tokens", "api_metrics"}


def test_routes_keep_their_public_names_for_metrics_and_operation_ids(app):
    assert public_name("customers.domain_series") == "api.domain_series"
    assert public_name("ops.healthz") == "api.healthz"
    assert public_name("tokens.create_token") == "tokens.create_token"
    assert public_name("static") == "static"
    doc = app.test_client().get("/api/v1/openapi.json").json
    ids = {op["operationId"] for ops in doc["paths"].values() for op in ops.values()}
    assert {"api_list_domains", "api_domain_series", "api_analyst_sql", "api_login", "api_login_form",
            "api_healthz", "api_readyz", "api_openapi_document", "tokens_create_token", "static"} <= ids
    assert not any(i.startswith(("customers_", "sql_", "dashboard_", "ops_")) for i in ids)


def test_errors_are_mapped_once_for_the_app(app):
    handlers = app.error_handler_spec[None][None]
    for raised in (ApiError, psycopg.OperationalError):
        assert raised in handlers, raised
    # a QueryError is the caller's range only where routes read a range: the customers' blueprint
    assert OutsideRetention not in handlers and QueryError not in handlers
    assert set(app.error_handler_spec["customers"][None]) == {OutsideRetention, QueryError}
    # the dashboard answers HTML, so it maps a store outage itself; no other blueprint does
    assert psycopg.OperationalError in app.error_handler_spec["dashboard"][None]
    assert not any(app.error_handler_spec[name] for name in ("sql", "ops", "tokens"))
    # ... and no route module writes the store-unavailable or outside-retention answer itself
    for path in API_DIR.glob("*.py"):
        source = path.read_text()
        if path.name != "errors.py":
            assert '"outside_retention"' not in source, path.name
            assert not re.search(r"except psycopg\.OperationalError:\s*\n\s*return error\(", source), path.name


def _a_route_with_a_bug() -> str:
    raise QueryError("a bug, not the caller's range")


def test_a_query_error_outside_the_customers_routes_is_a_500_not_a_400(make_settings, servers):
    """The handler answering 400 `invalid_range` was the app's: any route's unexpected QueryError became
    the caller's fault. Only the customers' routes (summary, series) answer it so."""
    app = build_api(make_settings())
    try:
        app.add_url_rule("/test-only/query-error", "query_error", _a_route_with_a_bug)
        app.testing = False  # answer as in production: the 500 handler, not the exception re-raised
        with psycopg.connect(servers.pg_dsn, autocommit=True) as conn:
            _, token = tokens.create(conn, "admin", name="test_api_blueprints")
        client = app.test_client()
        client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {token}"
        resp = client.get("/test-only/query-error")
        assert resp.status_code == 500, resp.data[:300]
        assert resp.json["error"]["code"] == "internal_error" and "range" not in resp.json["error"]["message"]
        # ... while the customers' routes still answer a bad range as the caller's
        bad = client.get("/api/v1/domains/example.com/impressions?from=2026-01-02T00:00:00Z&to=2026-01-01T00:00:00Z")
        assert bad.status_code == 400 and bad.json["error"]["code"] == "invalid_range", bad.json
    finally:
        app.extensions["tally_backends"].rollups.pool.close()


def _locking_client(make_settings, servers, tables: str, *, bearer: str | None = None):
    """An API app whose PostgreSQL statements give up after 300 ms, and a connection holding `tables` locked."""
    settings = make_settings()
    real = build_api(settings)
    pool = ConnectionPool(servers.pg_dsn, min_size=0, max_size=2, open=True,
                          kwargs={"options": "-c statement_timeout=300", "prepare_threshold": None})
    backends = dataclasses.replace(real.extensions["tally_backends"], rollups=RollupReader(pool))
    real.extensions["tally_backends"].rollups.pool.close()
    client = create_app(settings, backends).test_client()
    if bearer:
        client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {bearer}"
    locker = psycopg.connect(servers.pg_dsn)
    locker.execute(f"LOCK TABLE {tables} IN ACCESS EXCLUSIVE MODE")
    return client, pool, locker


@pytest.mark.parametrize("path", ["/api/v1/domains", "/api/v1/domains/example.com/summary",
                                  "/api/v1/domains/example.com/status",
                                  "/api/v1/domains/example.com/impressions",
                                  "/api/v1/domains/example.com/pageviews?format=csv"])
def test_a_store_that_stops_answering_is_a_json_503_on_every_customer_route(make_settings, servers, path):
    with psycopg.connect(servers.pg_dsn, autocommit=True) as conn:
        _, token = tokens.create(conn, "admin", name="test_api_blueprints")
    client, pool, locker = _locking_client(
        make_settings, servers, "sites, rollup_15m, rollup_1h, rollup_1d, ingestion_15m", bearer=token)
    try:
        resp = client.get(path)
    finally:
        locker.close()
        pool.close()
    assert resp.status_code == 503, resp.data[:300]
    assert resp.content_type == "application/json"
    assert resp.json == {"error": {"code": "store_unavailable", "message": "PostgreSQL is unavailable; retry shortly"}}


def test_a_store_that_stops_answering_is_the_login_page_with_503_on_the_dashboard(make_settings, servers):
    client, pool, locker = _locking_client(make_settings, servers, "api_tokens")
    try:
        resp = client.post("/login", data={"token": "tly_tok_0123456789_" + "A" * 43},
                           headers={"Origin": "http://localhost"})
    finally:
        locker.close()
        pool.close()
    assert resp.status_code == 503 and resp.content_type.startswith("text/html")
    assert "PostgreSQL is unavailable; retry shortly" in resp.get_data(as_text=True)
    assert resp.headers["Content-Security-Policy"].startswith("default-src 'self'")
