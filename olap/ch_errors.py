"""ClickHouse error codes and names for what the analyst endpoint answers (ADR 50), so ClickHouse clients
raise their usual exceptions: `Code: <n>. DB::Exception: <message>. (<NAME>) (version <v>)`.

Pure Python: the API process imports it.
"""

from __future__ import annotations

import re

# ClickHouse's own names (its ErrorCodes.cpp; tests check each against chDB's errorCodeToName) for the codes
# tally raises itself and those ClickHouse raises most for analyst SQL. A message from ClickHouse carries its
# name at its end, `(NAME)`, which wins over this table.
NAMES = {
    6: "CANNOT_PARSE_TEXT", 27: "CANNOT_PARSE_INPUT_ASSERTION_FAILED", 36: "BAD_ARGUMENTS",
    38: "CANNOT_PARSE_DATE", 41: "CANNOT_PARSE_DATETIME", 42: "NUMBER_OF_ARGUMENTS_DOESNT_MATCH",
    43: "ILLEGAL_TYPE_OF_ARGUMENT", 44: "ILLEGAL_COLUMN", 46: "UNKNOWN_FUNCTION", 47: "UNKNOWN_IDENTIFIER",
    53: "TYPE_MISMATCH", 60: "UNKNOWN_TABLE", 62: "SYNTAX_ERROR", 69: "ARGUMENT_OUT_OF_BOUND",
    70: "CANNOT_CONVERT_TYPE", 72: "CANNOT_PARSE_NUMBER", 73: "UNKNOWN_FORMAT", 81: "UNKNOWN_DATABASE",
    115: "UNKNOWN_SETTING", 159: "TIMEOUT_EXCEEDED", 160: "TOO_SLOW", 164: "READONLY",
    179: "MULTIPLE_EXPRESSIONS_FOR_ALIAS", 184: "ILLEGAL_AGGREGATION", 202: "TOO_MANY_SIMULTANEOUS_QUERIES",
    209: "SOCKET_TIMEOUT", 210: "NETWORK_ERROR", 215: "NOT_AN_AGGREGATE", 241: "MEMORY_LIMIT_EXCEEDED",
    271: "CANNOT_DECOMPRESS",
    352: "AMBIGUOUS_COLUMN_NAME", 386: "NO_COMMON_TYPE", 394: "QUERY_WAS_CANCELLED",
    395: "FUNCTION_THROW_IF_VALUE_IS_NON_ZERO", 396: "TOO_MANY_ROWS_OR_BYTES", 407: "DECIMAL_OVERFLOW",
    457: "BAD_QUERY_PARAMETER", 497: "ACCESS_DENIED", 516: "AUTHENTICATION_FAILED",
    1000: "POCO_EXCEPTION", 1001: "STD_EXCEPTION",
}
UNKNOWN_NAME = "UNKNOWN_EXCEPTION"
BY_KIND = {"timeout": 159, "too_large": 396, "busy": 202}
INTERNAL = 1001  # what ClickHouse calls an unexpected failure

# An allowlist refusal that names a table, table function or function analysts may not use: ACCESS_DENIED.
_NAMES_WHAT = re.compile(r"(table|table function|function|aggregate function|APPLY\().*not (allowed|available)")
_NOT_A_SELECT = re.compile(r"only SELECT queries are allowed")
# ClickHouse's own text around a message it raised: `Code: <n>. DB::Exception: ` in front, `(NAME)` and maybe
# `(version ...)` at the end. Taken off so the endpoint's answer says each once.
_THEIR_HEAD = re.compile(r"^(?:Code: \d+\. )?DB::Exception: ")
_THEIR_TAIL = re.compile(r"[.\s]*\(([A-Z][A-Z0-9_]*)\)(?:\s*\(version [^)]*\))?[.\s]*$")


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


def split_message(code: int, message: str) -> tuple[str, str]:
    """(the message without ClickHouse's own `Code: n. DB::Exception:` head and `(NAME)` tail, the name):
    the name ClickHouse gave it if it did, else NAMES', else UNKNOWN_EXCEPTION."""
    message = _THEIR_HEAD.sub("", " ".join(message.split()))
    name = NAMES.get(code, UNKNOWN_NAME)
    tail = _THEIR_TAIL.search(message)
    if tail is not None:
        message, name = message[:tail.start()], tail.group(1)
    return message.rstrip(" ."), name


def exception_text(code: int, message: str, version: str) -> str:
    """ClickHouse's text shape of an exception, one line: `Code: <n>. DB::Exception: <message>. (<NAME>)
    (version <v>)`, each part once even when `message` is ClickHouse's own text."""
    message, name = split_message(code, message)
    return f"Code: {code}. DB::Exception: {message}. ({name}) (version {version})\n"
