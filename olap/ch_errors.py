"""ClickHouse error codes and names for what the analyst endpoint answers (ADR 50), so ClickHouse clients
raise their usual exceptions: `Code: <n>. DB::Exception: <message>. (<NAME>) (version <v>)`.

Pure Python: the API process imports it.
"""

from __future__ import annotations

import re

NAMES = {
    36: "BAD_ARGUMENTS", 46: "UNKNOWN_FUNCTION", 60: "UNKNOWN_TABLE", 62: "SYNTAX_ERROR", 73: "UNKNOWN_FORMAT",
    81: "UNKNOWN_DATABASE", 115: "UNKNOWN_SETTING", 159: "TIMEOUT_EXCEEDED", 160: "TOO_SLOW", 164: "READONLY",
    202: "TOO_MANY_SIMULTANEOUS_QUERIES", 209: "SOCKET_TIMEOUT", 210: "NETWORK_ERROR",
    396: "TOO_MANY_ROWS_OR_BYTES", 497: "ACCESS_DENIED", 516: "AUTHENTICATION_FAILED",
    1000: "POCO_EXCEPTION", 1001: "STD_EXCEPTION",
}
BY_KIND = {"timeout": 159, "too_large": 396, "busy": 202}
INTERNAL = 1001  # what ClickHouse calls an unexpected failure

# An allowlist refusal that names a table, table function or function analysts may not use: ACCESS_DENIED.
_NAMES_WHAT = re.compile(r"(table|table function|function|aggregate function|APPLY\().*not (allowed|available)")
_NOT_A_SELECT = re.compile(r"only SELECT queries are allowed")


def code_for(kind: str, message: str, ch_code: int | None) -> int:
    """The ClickHouse code for an analyst query that ended as `kind` (refused | failed | timeout |
    too_large | busy), ClickHouse's own when it raised one."""
    if ch_code:
        return ch_code
    if kind in BY_KIND:
        return BY_KIND[kind]
    if kind == "refused":
        if _NAMES_WHAT.search(message):
            return 497
        return 164 if _NOT_A_SELECT.search(message) else 36
    return INTERNAL


def exception_text(code: int, message: str, version: str) -> str:
    """ClickHouse's text shape of an exception, one line."""
    message = " ".join(message.split()).rstrip(".")
    return f"Code: {code}. DB::Exception: {message}. ({NAMES.get(code, 'UNKNOWN_EXCEPTION')}) (version {version})\n"
