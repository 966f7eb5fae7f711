"""Test reports that pytest-xdist can always send.

A worker sends each report to the controller through execnet, which refuses a string that is not UTF-8
encodable (a lone surrogate: text a test decoded with `surrogateescape`, or a JavaScript string cut mid-pair,
in a failure message or in a captured log line from any thread). The refusal is raised outside the test, so
the worker's session ends and the controller aborts the whole run with `assert not crashitem` naming whatever
test was running, with none of its output (the likeliest cause of one CI run that ended so at
test_dashboard_end_to_end: its log kept only the controller's side). Here every such string
is sent with its bad code points escaped (`\\udcff`), and any value execnet cannot send (an object a plugin
put in `user_properties`) as its repr, so the test reports as itself, passed or failed. A warning whose text
holds a lone surrogate ended the worker the same way (xdist sends `str(warning)` in a `warning_recorded` event):
it is recorded with its text escaped.
"""

from __future__ import annotations

import warnings
from collections.abc import Generator
from typing import Any

import pytest


def utf8_safe(value: Any) -> Any:
    """`value` (a report's JSON-ready data) with every string UTF-8 encodable and every other value one execnet
    can send: execnet picks its encoder by the exact type, so a str subclass is sent as its text, an enum or a
    namedtuple as its repr."""
    kind = type(value)
    if isinstance(value, str):
        text = str.__str__(value)  # a subclass's plain text
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            return text.encode("utf-8", "backslashreplace").decode("utf-8")
        return text
    if kind is dict:
        return {utf8_safe(k): utf8_safe(v) for k, v in value.items()}
    if kind is list or kind is tuple:
        return kind(utf8_safe(v) for v in value)
    if value is None or kind in (bool, int, float, bytes):
        return value
    return utf8_safe(repr(value))


@pytest.hookimpl(wrapper=True)
def pytest_report_to_serializable(config: pytest.Config, report: Any) -> Generator[None, Any, Any]:
    return utf8_safe((yield))


@pytest.hookimpl(tryfirst=True)
def pytest_warning_recorded(warning_message: warnings.WarningMessage) -> None:
    """Before xdist's worker sends it: a warning whose text is not UTF-8 encodable becomes one of the same
    category with the text escaped."""
    text = str(warning_message.message)
    safe = utf8_safe(text)
    if safe != text:
        category = warning_message.category if issubclass(warning_message.category, Warning) else UserWarning
        warning_message.message = category(safe)
