"""Reading the one row of a query that always returns exactly one (an aggregate, EXISTS, to_regclass)."""

from __future__ import annotations

from typing import TypeVar

import psycopg

Row = TypeVar("Row")


def one(cursor: psycopg.Cursor[Row]) -> Row:
    """The cursor's single row; RuntimeError if the query returned none (a bug, not a data condition)."""
    row = cursor.fetchone()
    if row is None:
        raise RuntimeError("the query returned no row where it always returns one")
    return row
