"""The embedded broker is recycled before its memory storage slows fetches to a stop (ADR 64).

The rule (`recycle_verdict`) and its timing (`BrokerRecycler`) alone; `Supervisor.recycle` with real child
processes; and a real `tally up` with a low threshold, recycled while events flow: every accepted event in
PostgreSQL and in ClickHouse once.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from infra.supervisor import Supervisor
from tally.broker_recycle import FORCE_FACTOR, FORCED, MAX_LAG_SHARE, BrokerRecycler, Probed, recycle_verdict
from tests.test_broker_restart import Stack, wait_pid_change

UP = {"state": "up", "end_offsets": {"0": 120, "1": 9_000, "2": 10_000, "3": 4}}


def lags(pg: int | None = 0, ch: int | None = 0) -> dict[str, dict[str, object]]:
    def one(total: int | None) -> dict[str, object]:
        return {"state": "ok", "total": total} if total is not None else {"state": "unknown", "detail": "down"}
    return {"tally-rollup": one(pg), "tally-loader": one(ch)}


def test_under_the_limit_or_off_nothing_is_asked():
    assert recycle_verdict(UP, None, 10_001) == (False, "partition 2 holds 10,000 records, under 10,001")
    assert recycle_verdict(UP, lags(), 0) == (False, "recycling is off")
    assert recycle_verdict({"state": "down", "end_offsets": {}}, lags(), 10)[0] is False


def test_over_the_limit_the_groups_lag_decides():
    due, why = recycle_verdict(UP, None, 10_000)
    assert not due and why.endswith("not known yet") and "partition 2 holds 10,000 records" in why
    assert recycle_verdict(UP, lags(0, 0), 10_000) == (
        True, "partition 2 holds 10,000 records (TALLY_BROKER_RECYCLE_RECORDS=10,000)")
    most = int(10_000 * MAX_LAG_SHARE)
    assert recycle_verdict(UP, lags(most, most), 10_000)[0] is True
    due, why = recycle_verdict(UP, lags(0, most + 1), 10_000)
    assert not due and f"tally-loader is {most + 1:,} records behind" in why
    due, why = recycle_verdict(UP, lags(None, 0), 10_000)  # the loader's offsets unreadable: no recycle
    assert not due and "tally-rollup's stored offsets are unknown (down)" in why


def test_a_spool_near_its_byte_cap_holds_the_recycle():
    cap = 1 << 30
    ok = {"spool": {"retained_bytes": cap // 2}}
    assert recycle_verdict(UP, lags(), 10_000, ok, cap)[0] is True
    two = {"c1": {"retained_bytes": 1}, "c2": {"retained_bytes": cap // 2 + 1}}
    due, why = recycle_verdict(UP, lags(), 10_000, two, cap)
    assert not due and "the c2 spool retains" in why
    due, why = recycle_verdict(UP, lags(), 10_000, {"spool": {"retained_bytes": None, "detail": "gone"}}, cap)
    assert not due and "unknown (gone)" in why
    assert recycle_verdict(UP, lags(), 10_000, {"spool": {"retained_bytes": 5 * cap}}, 0)[0] is True  # no cap


def test_far_over_the_threshold_a_lagging_group_no_longer_holds_it():
    """Waiting longer would take the partition past tansu's cliff, where no group reads anything again."""
    limit = 10_000
    near = {"state": "up", "end_offsets": {"0": FORCE_FACTOR * limit - 1}}
    far = {"state": "up", "end_offsets": {"0": FORCE_FACTOR * limit}}
    assert recycle_verdict(near, lags(pg=None), limit)[0] is False
    due, why = recycle_verdict(far, lags(pg=None), limit)
    assert due and FORCED in why and "tally-rollup's stored offsets are unknown" in why
    assert recycle_verdict(far, lags(ch=10 * limit), limit)[0] is True


class Probe:
    def __init__(self, broker: dict, lag: dict | None) -> None:
        self.broker, self.lag, self.asked = broker, lag, []
        self.done = threading.Event()

    def __call__(self, ask_lags: bool) -> Probed:
        self.asked.append(ask_lags)
        self.done.set()
        return Probed(self.broker, self.lag, {}) if ask_lags else Probed(self.broker)


def run_check(recycler: BrokerRecycler, probe: Probe, pid: int = 7) -> None:
    probe.done.clear()
    recycler.maybe_check(pid)
    assert probe.done.wait(5)
    with recycler._busy:  # the check thread has finished
        pass


def test_the_recycler_checks_every_interval_and_hands_the_verdict_over_once():
    now = [0.0]
    probe = Probe(UP, lags())
    recycler = BrokerRecycler(10_000, probe, every_s=15, clock=lambda: now[0])
    recycler.maybe_check(7)
    assert probe.asked == []  # not before the first interval
    now[0] = 15
    run_check(recycler, probe, pid=7)
    assert probe.asked == [False, True]
    assert recycler.take_due() == (7, "partition 2 holds 10,000 records (TALLY_BROKER_RECYCLE_RECORDS=10,000)")
    assert recycler.take_due() is None
    recycler.maybe_check(7)  # the next check waits another interval
    recycler.maybe_check(None)  # and none without a broker process
    assert probe.asked == [False, True]


def test_a_lagging_group_holds_the_recycle_and_under_the_limit_the_lags_are_not_asked():
    lagging = Probe(UP, lags(pg=5_000))
    recycler = BrokerRecycler(10_000, lagging, every_s=0)
    run_check(recycler, lagging)
    assert recycler.take_due() is None and lagging.asked == [False, True]
    small = Probe({"state": "up", "end_offsets": {"0": 3}}, lags())
    recycler = BrokerRecycler(10_000, small, every_s=0)
    run_check(recycler, small)
    assert small.asked == [False] and recycler.take_due() is None


@pytest.fixture()
def started() -> Iterator[list[subprocess.Popen[bytes]]]:
    """The processes a test's supervisor started (by `sleeper`), killed when the test ends."""
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        proc.kill()
        proc.wait()


def sleeper(started: list) -> subprocess.Popen[bytes]:
    started.append(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]))
    return started[-1]


def test_supervisor_recycle_restarts_at_once_and_is_not_a_crash(started):
    sup = Supervisor(backoff_s=5.0)
    sup.add("broker", lambda: sleeper(started), None)
    first = started[0]
    assert sup.recycle("broker", "a test", pid=first.pid) is True
    assert len(started) == 2 and first.poll() is not None and started[1].poll() is None
    child = sup.children["broker"]
    assert (child.proc, child.restarts, child.recycles, child.crashes, child.restart_at) == (
        started[1], 0, 1, 0, None)
    sup.check()
    assert sup.describe()["broker"]["state"] == "up" and len(started) == 2
    with pytest.raises(KeyError):
        sup.recycle("nobody", "a test")


def test_a_stale_verdict_recycles_nothing(started):
    """The process the check was about died meanwhile: its restart is the crash path's (with its backoff)."""
    sup = Supervisor(backoff_s=30.0)
    sup.add("broker", lambda: sleeper(started), None)
    old = started[0]
    assert sup.recycle("broker", "stale", pid=old.pid + 100_000) is False  # another process
    old.kill()
    old.wait()
    assert sup.recycle("broker", "dead") is False  # died, not yet noticed
    sup.check()  # noticed: down, restart scheduled in 30 s
    assert sup.children["broker"].restart_at is not None
    assert sup.recycle("broker", "waiting out its backoff") is False
    sup.hold("broker")
    assert sup.recycle("broker", "held") is False
    assert len(started) == 1


def test_a_failed_start_after_a_recycle_is_a_crash_with_its_backoff(started):
    fail = [False]

    def start() -> subprocess.Popen[bytes]:
        if fail[0]:
            raise OSError("no port")
        return sleeper(started)

    sup = Supervisor(backoff_s=30.0)
    sup.add("broker", start, None)
    fail[0] = True
    assert sup.recycle("broker", "a test") is True
    child = sup.children["broker"]
    assert child.proc is None and child.crashes == 1 and child.restart_at is not None
    assert sup.describe()["broker"]["state"] == "down"


@pytest.mark.slow
def test_tally_up_recycles_its_broker_under_load_and_every_event_is_stored_once(tmp_path):
    domain = "recycle.example.com"
    stack = Stack(tmp_path)
    stack.env.update(TALLY_BROKER_RECYCLE_RECORDS="40", TALLY_SITE_RATE_PER_S="100000")
    try:
        stack.up()
        stack.add_site(domain)
        broker = stack.pids()["broker"]
        for start in range(0, 500, 10):  # one record (at least) per post: over 40 records in the domain's partition
            stack.post(domain, range(start, start + 10))
            time.sleep(0.05)
        stack.wait_for("PostgreSQL", lambda: stack.pg_total(domain), 500)
        stack.wait_for("ClickHouse", lambda: stack.ch_count(domain), 500)
        recycled = wait_pid_change(stack, "broker", broker, timeout_s=90)  # checked every 15 s
        flowing, sent = threading.Event(), [500]

        def load() -> None:  # until the broker was recycled again, while these flow
            while not flowing.is_set() and sent[0] < 20_000:  # ~10 records a second, up to ~3 minutes
                stack.post(domain, range(sent[0], sent[0] + 10))
                sent[0] += 10
                time.sleep(0.1)

        sender = threading.Thread(target=load)
        sender.start()
        try:
            wait_pid_change(stack, "broker", recycled, timeout_s=90)
            assert sender.is_alive() and sent[0] < 20_000  # recycled while events flowed
        finally:
            flowing.set()
            sender.join(120)
        stack.wait_for("PostgreSQL after the recycles", lambda: stack.pg_total(domain), sent[0])
        stack.wait_for("ClickHouse after the recycles", lambda: stack.ch_count(domain), sent[0])
        log = "".join(stack.output) + stack.log_tails()
        assert "recycling broker: partition" in log and "TALLY_BROKER_RECYCLE_RECORDS=40" in log
    finally:
        if stack.proc is not None and stack.proc.poll() is None:
            try:
                stack.down()
            except subprocess.TimeoutExpired:
                stack.kill_all()
