"""`tally rollup-worker` runs TALLY_ROLLUP_CONSUMERS consumer loops in one process (tally.roots,
ADR 27): one maintenance thread for all, and if one loop ends without being asked to, all stop and
the process fails (for its supervisor to restart it) instead of running on with part of its group."""

from __future__ import annotations

import threading

import pytest

from core.config import Settings
from tally import roots


class FakeLoop:
    def __init__(self, ends_by_itself: bool = False) -> None:
        self.ends_by_itself, self.stopped = ends_by_itself, False

    def run(self, stop: threading.Event) -> None:
        if self.ends_by_itself:
            return
        stop.wait(30)
        self.stopped = stop.is_set()


def test_a_loop_ending_on_its_own_stops_the_others_and_fails(monkeypatch):
    loops = [FakeLoop(), FakeLoop(ends_by_itself=True), FakeLoop()]
    monkeypatch.setattr(roots, "stop_on_signals", threading.Event)  # no signal handlers in a test thread
    monkeypatch.setattr("workers.gc_policy.tune_for_streaming", lambda: None)
    with pytest.raises(RuntimeError, match="ended without being asked"):
        roots.run_loops_forever(lambda settings: loops, Settings.from_env({"TALLY_HOME": "/tmp/unused"}))
    assert loops[0].stopped and loops[2].stopped


def test_one_maintenance_thread_for_all_loops(monkeypatch):
    built = []
    monkeypatch.setattr(roots, "build_rollup_loop",
                        lambda settings, group, maintenance: built.append(maintenance) or object())
    loops = roots.build_rollup_loops(Settings.from_env({"TALLY_HOME": "/tmp/unused", "TALLY_ROLLUP_CONSUMERS": "3"}))
    assert len(loops) == 3 and built == [True, False, False]
    assert Settings.from_env({"TALLY_HOME": "/tmp/unused"}).rollup_consumers == 2
