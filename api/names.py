"""Public names of the API's routes: the `endpoint` label of `tally_api_requests_total` and, with `_` for
`.`, the OpenAPI operationId.

The routes of the customers, sql, dashboard and ops blueprints keep the names they had when they were
one blueprint called `api` (`api.domain_series`, ADR 39): Prometheus queries and generated clients use
them, and where a route lives in the code is no business of theirs. Other endpoints (`tokens.*`,
`api_metrics.*`, `static`) are named as Flask names them.
"""

from __future__ import annotations

API_BLUEPRINTS = frozenset({"customers", "sql", "dashboard", "ops"})


def public_name(endpoint: str) -> str:
    """`customers.domain_series` -> `api.domain_series`; any other endpoint as it is."""
    blueprint, dot, view = endpoint.rpartition(".")
    return f"api.{view}" if dot and blueprint in API_BLUEPRINTS else endpoint
