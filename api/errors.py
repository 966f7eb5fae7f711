"""The API's error answers for conditions the routes raise, each mapped once (ADR 39).

Routes raise; these handlers answer in the JSON error shape of core/http.py. For the whole app
(`install_error_handlers`):

- `ApiError(status, code, message)`: a refused request (bad parameter, unknown metric, ...), as given;
- `psycopg.OperationalError` (PoolTimeout included): 503 `store_unavailable`, PostgreSQL is unavailable.

For the blueprint whose routes read a range of the rollups (`install_range_handlers`: the customers'
summary and series), where a `QueryError` is the caller's range and so the caller's mistake:

- `OutsideRetention`: 400 `outside_retention`, with `tier`, `retention_days`, `retained_from` and
  `alternatives`;
- any other `QueryError`: 400 `invalid_range`.

Anywhere else a `QueryError` is a bug: 500 `internal_error`, as any unexpected exception. A blueprint may
answer one of them its own way (the dashboard's HTML pages do: api/dashboard.py); Flask asks the
blueprint's handlers before the app's.
"""

from __future__ import annotations

from typing import Any

import psycopg
from flask import Blueprint, Flask, Response

from core.http import error
from oltp.queries import OutsideRetention, QueryError

STORE_UNAVAILABLE = "PostgreSQL is unavailable; retry shortly"


class ApiError(Exception):
    """A request the API refuses: answered as `status` with the error `code`, `message` and `extra` fields."""

    def __init__(self, status: int, code: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.extra = status, code, message, extra


def _api_error(exc: ApiError) -> Response:
    return error(exc.status, exc.code, exc.message, **exc.extra)


def _store_unavailable(_exc: psycopg.OperationalError) -> Response:
    return error(503, "store_unavailable", STORE_UNAVAILABLE)


def _outside_retention(exc: OutsideRetention) -> Response:
    return error(400, "outside_retention", str(exc), tier=exc.tier, retention_days=exc.retention_days,
                 retained_from=exc.retained_from.isoformat(), alternatives=exc.alternatives)


def _invalid_range(exc: QueryError) -> Response:
    return error(400, "invalid_range", str(exc))


def install_error_handlers(app: Flask) -> None:
    app.register_error_handler(ApiError, _api_error)
    app.register_error_handler(psycopg.OperationalError, _store_unavailable)


def install_range_handlers(bp: Blueprint) -> None:
    """A `QueryError` from `bp`'s routes is the caller's range: 400 (both, so the subclass keeps its answer)."""
    bp.register_error_handler(OutsideRetention, _outside_retention)
    bp.register_error_handler(QueryError, _invalid_range)
