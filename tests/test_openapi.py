"""The OpenAPI 3.1 contract at /api/v1/openapi.json: complete, valid, and kept by a live server.

schemathesis generates requests for every operation from the document and sends them, with a valid
admin token, to the real API (waitress in a thread, real PostgreSQL, the session's analyst server):
no answer may be a 5xx and every answer must conform to the document (status, content type, headers,
body schema). The number of examples is bounded so the whole file runs in well under a minute.
"""

from __future__ import annotations

import psycopg
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import checks

from infra.processes import free_port, tcp_open, wait_until
from oltp import tokens
from tally.roots import build_api
from tests.conftest import registered, serve_in_thread


@pytest.fixture(scope="module")
def live_api(servers, analyst_url, tmp_path_factory):
    """A real waitress server for the API, with an admin token: (base url, token, app)."""
    from core.config import Settings
    from tests.conftest import SECRET

    home = tmp_path_factory.mktemp("openapi")
    settings = Settings.from_env({
        "TALLY_HOME": str(home), "TALLY_PG_DSN": servers.pg_dsn, "TALLY_CLICKHOUSE_DSN": servers.chdb_dsn,
        "TALLY_SECRET": SECRET, "TALLY_ANALYST_URL": analyst_url,
        "TALLY_API_RATE_LIMIT": "100000/minute",  # schemathesis is fast; the limiter is tests/test_auth.py's
    })
    app = build_api(settings)
    with psycopg.connect(servers.pg_dsn, autocommit=True) as conn:
        _, token = tokens.create(conn, "admin", name="test_openapi")
    registered(servers.pg_dsn, SITE)
    port = free_port()
    server = serve_in_thread(app, port)
    wait_until(lambda: tcp_open("127.0.0.1", port), what="api", timeout=10)
    yield f"http://127.0.0.1:{port}", token, app
    server.close()
    app.extensions["tally_backends"].rollups.pool.close()


# What "keeps the contract" means here. Left out: positive_data_acceptance (a schema cannot say that
# `from` must precede `to`, that a zone is in the tz database, or that SQL parses: such schema-valid
# requests rightly get a documented 400) and the checks for negative and stateful testing.
CHECKS = [checks.not_a_server_error, checks.status_code_conformance, checks.content_type_conformance,
          checks.response_headers_conformance, checks.response_schema_conformance, checks.ignored_auth]
MAX_EXAMPLES = 15  # per operation: 15 operations, a few hundred requests, well under a minute
SITE = "openapi.example.com"  # registered: every other case names it, so 200 answers are checked too (ADR 48)


def test_every_operation_keeps_the_contract(live_api):
    """schemathesis' default checks on every generated request: no 5xx, and status code, content type,
    headers and body conform to the document. (Driven by hand, not through schemathesis' pytest plugin,
    which does not run under pytest 9: it reads a private `Function._nodeid`.)"""
    url, token, _app = live_api
    schema = schemathesis.openapi.from_url(f"{url}/api/v1/openapi.json")
    failures: list[str] = []
    calls = 0
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 15

    for operation in operations:
        @given(case=operation.as_strategy())
        @settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])
        def run(case):
            nonlocal calls
            calls += 1
            if "domain" in (case.path_parameters or {}) and calls % 2:
                case.path_parameters["domain"] = SITE  # a random domain is 404 unknown_domain
            case.call_and_validate(base_url=url, headers={"Authorization": f"Bearer {token}"}, checks=CHECKS)

        try:
            run()
        except Exception as exc:  # one report per operation, then the next operation
            failures.append(f"{operation.label}: {type(exc).__name__}: {str(exc)[:2000]}")
    assert not failures, "\n\n".join(failures)
    assert calls >= len(operations) * 3


def test_the_document_is_public_valid_3_1_and_covers_every_route(live_api):
    import re

    import requests

    url, _token, app = live_api
    resp = requests.get(f"{url}/api/v1/openapi.json", timeout=10)  # no token: the document is public
    assert resp.status_code == 200 and resp.headers["Content-Type"].startswith("application/json")
    doc = resp.json()
    assert doc["openapi"] == "3.1.0"
    # every URL rule and method of the app is an operation of the document
    for rule in app.url_map.iter_rules():
        path = re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule.rule)
        assert path in doc["paths"], path
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            assert method.lower() in doc["paths"][path], (path, method)
    # the auth schemes, and the security each route gets from its @allow / @public declaration
    schemes = doc["components"]["securitySchemes"]
    assert schemes["bearerAuth"]["type"] == "http" and schemes["bearerAuth"]["scheme"] == "bearer"
    assert schemes["sessionCookie"]["in"] == "cookie" and schemes["sessionCookie"]["name"] == "tally_session"
    series = doc["paths"]["/api/v1/domains/{domain}/{metric}"]["get"]
    assert series["security"] == [{"bearerAuth": []}, {"sessionCookie": []}]
    assert series["x-tally-roles"] == ["admin", "analyst", "customer"]
    assert {"400", "401", "403", "429", "503"} <= set(series["responses"])
    shared = doc["components"]["parameters"]

    def names(op):
        return {(shared[p["$ref"].rsplit("/", 1)[1]] if "$ref" in p else p)["name"] for p in op["parameters"]}

    assert names(series) == {"domain", "metric", "from", "to", "granularity", "tz", "format", "filter", "percentiles"}
    breakdown = doc["paths"]["/api/v1/domains/{domain}/breakdown"]["get"]
    assert names(breakdown) == {"domain", "dimension", "metric", "last", "from", "to", "tz", "limit", "offset",
                                "filter", "format"}
    assert shared["filter"]["schema"]["type"] == "array" and shared["filter"]["explode"] is True
    for path in ("breakdown", "visitors", "summary", "status", "{metric}"):
        assert "404" in doc["paths"][f"/api/v1/domains/{{domain}}/{path}"]["get"]["responses"], path
    assert doc["components"]["schemas"]["Summary"]["properties"]["visitors"]["type"] == ["integer", "null"]
    assert "text/csv" in series["responses"]["200"]["content"]
    sql = doc["paths"]["/api/v1/sql"]["post"]
    assert sql["security"] == [{"bearerAuth": []}]  # no cookie auth for anything but GET
    assert sql["x-tally-roles"] == ["admin", "analyst"]
    assert doc["paths"]["/api/v1/tokens"]["post"]["x-tally-roles"] == ["admin"]
    health = doc["paths"]["/healthz"]["get"]
    assert health["security"] == [] and "429" not in health["responses"]  # probes: no token, no limit
    error = doc["components"]["schemas"]["Error"]
    assert error["required"] == ["error"] and error["properties"]["error"]["required"] == ["code", "message"]
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            for status, answer in op["responses"].items():
                if status.startswith(("4", "5")) and "application/json" in answer.get("content", {}):
                    assert answer["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Error"}, \
                        (path, method, status)


def test_a_route_without_a_documented_operation_is_refused(make_settings):
    """A route added without its docstring contract breaks the document (and so this suite) at once."""
    from api.openapi import build_spec

    app = build_api(make_settings())
    try:
        @app.get("/api/v1/undocumented")
        def undocumented():  # pragma: no cover - never called
            return "x"

        with pytest.raises(ValueError, match="undocumented"):
            build_spec(app)
    finally:
        app.extensions["tally_backends"].rollups.pool.close()
