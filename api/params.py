"""Query parameters of the customers' routes (api/customers.py, api/insights.py): each bad one is refused
with a 400 naming it; a domain that is not a registered site with 404 `unknown_domain` (ADR 48)."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from decimal import Decimal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from flask import request
from werkzeug.datastructures import MultiDict

from api.auth import current_principal
from api.backends import backends
from api.errors import ApiError
from core.event import EventError, normalize_domain
from oltp.filters import Filter, FilterError, parse_filters
from oltp.percentiles import PercentileError, parse_percentiles
from oltp.queries import QueryError


def parse_time(name: str, value: str | None, default: datetime) -> datetime:
    if value is None or value == "":
        return default
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise QueryError(f"'{name}' is not an ISO-8601 time: {value[:40]!r}") from None
    if parsed.tzinfo is None:
        raise QueryError(f"'{name}' must carry a UTC offset, e.g. 2026-01-01T00:00:00Z")
    if not 1970 <= parsed.year <= 9000:
        raise QueryError(f"'{name}' must be between the years 1970 and 9000")
    return parsed.astimezone(UTC)


def tz_arg(args: MultiDict[str, str]) -> ZoneInfo:
    try:
        return ZoneInfo(args.get("tz", "UTC"))
    except (ZoneInfoNotFoundError, ValueError, OSError):  # OSError: 'America' is a directory, names too long
        raise ApiError(400, "invalid_tz", f"unknown time zone {args.get('tz', '')[:64]!r}") from None


def domain_arg(domain: str) -> str:
    try:
        return normalize_domain(domain)
    except EventError as exc:
        raise ApiError(400, "invalid_domain", str(exc)) from None


def require_registered(domain: str) -> None:
    """404 `unknown_domain` unless the domain is known: a registered site, or one the caller's customer token
    lists (an admin granted it, e.g. before registering the site; `GET /api/v1/domains` lists it too). Asked
    after the parameters are checked (a bad parameter is named whatever the domain), and after api/auth.py
    let the caller read the domain: a customer token that does not list it got 403 already, whether or not
    it exists, so a customer never learns which domains exist (ADR 48)."""
    principal = current_principal()
    if principal is not None and principal.role == "customer" and domain in principal.domains:
        return
    if not backends().rollups.is_registered(domain):
        raise ApiError(404, "unknown_domain", f"{domain} is not a registered site (`tally sites add {domain}`)")


def only_parameters(*allowed: str) -> None:
    unknown = sorted(set(request.args) - set(allowed))
    if unknown:
        raise ApiError(400, "unknown_parameter", f"unknown query parameter {unknown[0]!r}")


def filters_arg(args: MultiDict[str, str]) -> tuple[Filter, ...]:
    """`filter` (repeatable, comma-separated dimension:value) -> filters; 400 `invalid_filter` naming it."""
    try:
        return parse_filters(args.getlist("filter"))
    except FilterError as exc:
        raise ApiError(400, "invalid_filter", str(exc)) from None


def percentiles_arg(args: MultiDict[str, str]) -> tuple[float, ...]:
    """`percentiles=50,95,99` -> (50.0, 95.0, 99.0); () when absent; 400 `invalid_percentiles` naming it."""
    if "percentiles" not in args:
        return ()
    try:
        return parse_percentiles(args.get("percentiles", ""))
    except PercentileError as exc:
        raise ApiError(400, "invalid_percentiles", str(exc)) from None


def int_arg(args: MultiDict[str, str], name: str, default: int, lo: int, hi: int) -> int:
    text = args.get(name)
    if text is None:
        return default
    if not re.fullmatch(r"[0-9]{1,9}", text) or not lo <= int(text) <= hi:
        raise ApiError(400, f"invalid_{name}", f"{name} must be an integer from {lo} to {hi}")
    return int(text)


def decimal_text(value: Decimal | None) -> str | None:
    return None if value is None else f"{value:.6f}"


def iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None
