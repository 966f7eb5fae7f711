"""Filters on the dimension rollups: `?filter=dimension:value` (ADR 48).

A filter names one dimension of the spec'd set and one value as the API shows it: `(none)` stands for a
missing value (stored as ''), `(other)` for the values past the cardinality cap. Several filters are
ANDed; one dimension may be filtered once (two values of one dimension can never both hold). One filter
is answered from `rollup_dim_*` (that dimension's key); two or more, or a breakdown of one dimension
filtered on another, from `rollup_cube_*` (every non-bot event under its full tuple).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

DIMENSIONS = ("page", "source", "country", "device", "browser", "os")
NONE_KEY = "(none)"  # the API's name of the stored ''
MAX_FILTERS = len(DIMENSIONS)
MAX_VALUE = 2048  # the longest stored key (a page, core.event.MAX_PAGE)


class FilterError(ValueError):
    """A `filter` parameter the API refuses; the message names it."""


@dataclass(frozen=True, slots=True)
class Filter:
    dimension: str
    key: str  # the stored key ('' for `(none)`)


def stored_key(shown: str) -> str:
    """The stored key of a value as the API shows it."""
    return "" if shown == NONE_KEY else shown


def shown_key(stored: str) -> str:
    """The API's name of a stored key."""
    return NONE_KEY if stored == "" else stored


def filter_text(f: Filter) -> str:
    """A filter as the API takes and shows it: `country:DE`, `source:(none)`."""
    return f"{f.dimension}:{shown_key(f.key)}"


def parse_filters(values: Iterable[str]) -> tuple[Filter, ...]:
    """`filter` parameters (repeatable; each may hold several comma-separated `dimension:value`; a comma is
    a separator only when a known `dimension:` follows it, so `page:/a,b` is the page `/a,b`) ->
    filters ordered by dimension. Raises FilterError naming the bad one."""
    found: dict[str, Filter] = {}
    for value in values:
        for part in _SEPARATOR.split(value):
            dimension, colon, shown = part.partition(":")
            dimension = dimension.strip()
            if not colon or not dimension:
                raise FilterError(f"filter {part[:80]!r} must be dimension:value, e.g. country:DE")
            if dimension not in DIMENSIONS:
                raise FilterError(f"unknown filter dimension {dimension[:40]!r}; one of {', '.join(DIMENSIONS)}")
            if _CONTROL.search(shown):
                raise FilterError(f"the {dimension} filter value holds a control character (no stored value does)")
            if not shown or len(shown) > MAX_VALUE:
                raise FilterError(f"the {dimension} filter needs a value of 1 to {MAX_VALUE} characters "
                                  f"({NONE_KEY} for none)")
            if dimension in found:
                raise FilterError(f"the {dimension} filter is given twice (filters are ANDed)")
            found[dimension] = Filter(dimension, stored_key(shown))
    return tuple(found[d] for d in DIMENSIONS if d in found)


_SEPARATOR = re.compile(r",(?=\s*(?:" + "|".join(DIMENSIONS) + r"):)")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def cube_where(filters: Iterable[Filter], alias: str = "r") -> tuple[str, dict[str, str]]:
    """The SQL condition (" AND r.page = %(f_page)s ...") and its parameters for the cube tables; the
    column names come from DIMENSIONS (an allowlist), never from the request."""
    sql, params = "", {}
    for f in filters:
        assert f.dimension in DIMENSIONS
        sql += f" AND {alias}.{f.dimension} = %(f_{f.dimension})s"
        params[f"f_{f.dimension}"] = f.key
    return sql, params


def filtered_table(tier: str, filters: tuple[Filter, ...]) -> tuple[str, str, dict[str, str]]:
    """(table, extra condition on alias r, its parameters) for a tier's rows under `filters`: the tier's
    rollup without, `rollup_dim_<tier>` for one, `rollup_cube_<tier>` for two or more (1h and 1d only;
    FilterError for 15m)."""
    if tier not in ("15m", "1h", "1d"):
        raise ValueError(f"no tier {tier!r}")
    if not filters:
        return f"rollup_{tier}", "", {}
    if len(filters) == 1:
        return (f"rollup_dim_{tier}", " AND r.dimension = %(f_dim)s AND r.key = %(f_key)s",
                {"f_dim": filters[0].dimension, "f_key": filters[0].key})
    if tier == "15m":
        raise FilterError("two or more filters are answered from the hourly and daily tiers only (combinations "
                          "are not kept per quarter hour): ask granularity=1h or 1d")
    extra, params = cube_where(filters)
    return f"rollup_cube_{tier}", extra, params
