"""Query parameters of analyst SQL: the `params` field of a query request, checked for shape (ADR 53).

A query names a parameter as ClickHouse does, `{name:Type}` (`WHERE domain = {d:String}`), and the request
carries its value as text: `{"sql": "...", "params": {"d": "example.com"}}`. ClickHouse binds it (it reads
the text as a value of that type and substitutes it into its parse tree); nothing is pasted into the
query text. The text is what ClickHouse's own `param_<name>=` (HTTP) and `--param_<name>` (clickhouse-client)
take: a number or a date as written, a string as is, except that a backslash starts an escape (`\\t`, `\\n`,
`\\\\`, `\\N` for NULL), arrays as `['a','b']`.

This module has no ClickHouse client and is cheap to import: the API checks a request's params with
`parse_params` before relaying it, the analyst server again when it arrives, and the ClickHouse-compatible
endpoint uses it for its `param_<name>=` URL arguments. Which parameters a query uses, their types and
their values' contents are checked against the parse tree by `olap.allowlist.check_parameters`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

# At most this many parameters per query, each value at most MAX_PARAM_BYTES of UTF-8 (as the query text).
MAX_PARAMS = 64
MAX_PARAM_BYTES = 16 * 1024
MAX_PARAM_NAME = 64
# ClickHouse's substitution names are identifiers; we take the plain ASCII ones.
PARAM_NAME = re.compile(rf"[A-Za-z_][A-Za-z0-9_]{{0,{MAX_PARAM_NAME - 1}}}")


class ParamsError(ValueError):
    """The request's params are not an object of valid names to string values; the message says which."""


def parse_params(value: object) -> dict[str, str]:
    """The query parameters of a request (`None` or missing: none), or ParamsError naming what is wrong:
    not a JSON object, more than MAX_PARAMS, a name that is not an identifier of at most MAX_PARAM_NAME
    characters, a value that is not a string or is longer than MAX_PARAM_BYTES."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ParamsError('params must be a JSON object of names to string values, e.g. {"d": "example.com"}')
    if len(value) > MAX_PARAMS:
        raise ParamsError(f"at most {MAX_PARAMS} query parameters per query ({len(value)} sent)")
    params: dict[str, str] = {}
    for name, text in value.items():
        check_param_name(name)
        if not isinstance(text, str):
            raise ParamsError(f"query parameter {name}: the value must be a string (ClickHouse's text form, e.g. "
                              f'"42", "2026-01-31" or "example.com"), not {type(text).__name__}')
        try:
            size = len(text.encode("utf-8"))
        except UnicodeEncodeError:
            raise ParamsError(f"query parameter {name}: the value is not valid Unicode (a lone surrogate)") from None
        if size > MAX_PARAM_BYTES:
            raise ParamsError(f"query parameter {name}: the value is {size} bytes; at most {MAX_PARAM_BYTES} "
                              "bytes of UTF-8")
        params[name] = text
    return params


def check_param_name(name: object) -> str:
    """`name` if it is a valid parameter name, else ParamsError."""
    if not isinstance(name, str) or not PARAM_NAME.fullmatch(name):
        shown = repr(name)[:80]
        raise ParamsError(f"query parameter name {shown} is not valid: letters, digits and _, starting with a "
                          f"letter or _, at most {MAX_PARAM_NAME} characters")
    return name
