"""One `tally up` shared by the modules that look at a running stack and break one part of it at a time
(tests/test_platform_hardening.py, tests/test_status.py): the session fixture `platform_stack` (tests/conftest.py).

A whole stack costs about 10 s of CPU to start, a fifth of a core while it idles, and seconds to stop; the two
modules used to start one each. It starts when the first of them asks and stops as soon as the last module of
this session that asks for it is done (not at the end of the session: under `make test` their worker goes on
with other modules). The two modules run in one platform lane (tests/stack.py), so on one worker, hardening
first: its crash loop wants a shipper with no crash before it (a later one, in tests/test_status.py, only waits
its longer backoff).

What the modules share: `TALLY_SPOOL_SEGMENT_AGE_S=0.2` (segments sealed, shipped and retained soon) and
`TALLY_SUPERVISOR_BACKOFF_S=0.2` (the crash loop's restarts after 0.2 to 3.2 s instead of 0.5 to 8 s; its 6th
crash keeps the shipper down 6.4 s, time enough to see it down on a slow machine). Each module registers its own
site and sends its own events.
"""

from __future__ import annotations

import subprocess

import pytest

from tests.test_broker_restart import Stack

ENV = {"TALLY_SPOOL_SEGMENT_AGE_S": "0.2", "TALLY_SUPERVISOR_BACKOFF_S": "0.2"}


def users(items: list[pytest.Item]) -> set[str]:
    """The modules among `items` (what this session runs) with a test that uses the shared stack."""
    return {item.nodeid.split("::", 1)[0] for item in items if "platform_stack" in getattr(item, "fixturenames", ())}


class SharedPlatform:
    """The session's shared `tally up`: `acquire()` from a module fixture, `release(module)` at its end."""

    def __init__(self, tmp_path_factory: pytest.TempPathFactory, users: set[str]) -> None:
        self.tmp_path_factory = tmp_path_factory
        self.waiting = set(users)  # modules that have not released it yet
        self.stack: Stack | None = None

    def acquire(self) -> Stack:
        if self.stack is None:
            self.stack = start(self.tmp_path_factory)
        return self.stack

    def release(self, module: str) -> None:
        self.waiting.discard(module)
        if not self.waiting:
            self.close()

    def close(self) -> None:
        stack, self.stack = self.stack, None
        if stack is not None and stack.proc is not None and stack.proc.poll() is None:
            try:
                stack.down()
            except subprocess.TimeoutExpired:
                stack.kill_all()


def start(tmp_path_factory: pytest.TempPathFactory) -> Stack:
    """`tally up` on free ports, started again on new ones when a port was taken between `free_port()` finding
    it free and the server binding it (another worker's processes pick ports too)."""
    for attempt in range(3):
        stack = Stack(tmp_path_factory.mktemp("up"))
        stack.env.update(ENV)
        try:
            stack.up()
            return stack
        except AssertionError as exc:
            if "Address already in use" not in str(exc) or attempt == 2:
                raise
    raise AssertionError("unreachable")
