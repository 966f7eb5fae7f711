"""The chaos harness (tally/chaos/, ADR 24): its short form against a real `tally up`, and its parts.

The short form (marked `slow`, so it runs in `make test` and CI like the other whole-platform tests) kills a
few processes at seeded random points under a load with client retries and exact duplicates, then requires
every acknowledged event in PostgreSQL and in ClickHouse exactly once. The long form is `tally chaos
--minutes N` / `make chaos`, never part of the tests. The unit tests check that the comparison really finds
a loss and a double count (so a passing chaos run means something), and that bad arguments are refused
before anything is started.
"""

from __future__ import annotations

import io
import os

import pytest

from tally.chaos import DOMAIN, FAULTS, ChaosError, ChaosPlan, ChaosRun, Ledger, check_store, parse_faults
from tally.cli import main


def _url(kind: str, n: int) -> str:
    return f"https://{DOMAIN}{kind}{n}"


def _ledger() -> Ledger:
    """Two id events (the first re-sent after a failure), one id-less event acknowledged twice (an exact
    duplicate: two hashes), one id-less event with a failed attempt before its 202, one never acknowledged."""
    ledger = Ledger()
    for url, t in ((_url("/e/", 1), "impression"), (_url("/e/", 2), "pageview"), (_url("/n/", 3), "pageview"),
                   (_url("/n/", 4), "impression"), (_url("/e/", 5), "impression")):
        ledger.types[url] = t
    ledger.attempt_failed([_url("/e/", 1)])
    ledger.acknowledged([_url("/e/", 1), _url("/e/", 2)], ["a" * 32, "b" * 32])
    ledger.acknowledged([_url("/e/", 1), _url("/e/", 2)], ["a" * 32, "b" * 32])  # a retry: same hashes
    ledger.acknowledged([_url("/n/", 3)], ["c" * 32])
    ledger.acknowledged([_url("/n/", 3)], ["d" * 32])  # the exact duplicate: a second event
    ledger.attempt_failed([_url("/n/", 4)])
    ledger.acknowledged([_url("/n/", 4)], ["e" * 32])
    ledger.attempt_failed([_url("/e/", 5)])  # never acknowledged
    return ledger


def _stored(ledger: Ledger) -> dict[str, str | None]:
    return dict(ledger.acked)


def test_a_store_holding_exactly_the_acknowledged_events_passes():
    ledger = _ledger()
    check = check_store("X", ledger, _stored(ledger))
    assert (check.stored, check.lost, check.duplicated, check.maybe, check.ok) == (5, 0, 0, 0, True)


def test_a_missing_acknowledged_event_is_lost_and_named():
    ledger = _ledger()
    stored = _stored(ledger)
    del stored["d" * 32]  # the exact duplicate's second event
    check = check_store("X", ledger, stored)
    assert (check.lost, check.duplicated, check.ok) == (1, 0, False)
    assert "d" * 32 in check.detail[0] and "/n/3" in check.detail[0]


def test_an_id_event_under_a_second_hash_is_counted_twice():
    ledger = _ledger()
    stored = {**_stored(ledger), "f" * 32: _url("/e/", 2)}
    check = check_store("X", ledger, stored)
    assert (check.lost, check.duplicated, check.ok) == (0, 1, False)
    assert any("/e/2" in line for line in check.detail)


def test_a_resent_id_event_acknowledged_under_a_new_hash_is_counted_twice_when_both_are_stored():
    ledger = _ledger()
    ledger.acknowledged([_url("/e/", 2)], ["7" * 32])  # the collector's dedup key broke: a new hash for a resend
    check = check_store("X", ledger, _stored(ledger))
    assert (check.lost, check.duplicated, check.ok) == (0, 1, False)
    assert f"{_url('/e/', 2)}: one id event acknowledged and stored under 2 hashes" in check.detail


def test_unacknowledged_attempts_may_be_stored_but_no_more_often_than_they_were_sent():
    ledger = _ledger()
    # /n/4 had one failed attempt: one extra event is a "maybe"; /e/5 was never acknowledged: its one hash too
    fine = {**_stored(ledger), "1" * 32: _url("/n/", 4), "2" * 32: _url("/e/", 5)}
    check = check_store("X", ledger, fine)
    assert (check.lost, check.duplicated, check.maybe, check.ok) == (0, 0, 2, True)
    too_many = {**fine, "3" * 32: _url("/n/", 4), "4" * 32: _url("/e/", 5)}
    check = check_store("X", ledger, too_many)
    assert (check.duplicated, check.maybe, check.ok) == (2, 2, False)


def test_an_event_nobody_sent_and_a_count_without_a_hash_are_double_counts():
    ledger = _ledger()
    check = check_store("X", ledger, {**_stored(ledger), "9" * 32: "https://elsewhere.example/x"})
    assert (check.duplicated, check.ok) == (1, False) and "never sent" in check.detail[0]
    check = check_store("PostgreSQL", ledger, _stored(ledger), counted=7)  # rollups count 7, 5 hashes seen
    assert (check.stored, check.duplicated, check.lost, check.ok) == (7, 2, 0, False)
    check = check_store("PostgreSQL", ledger, _stored(ledger), counted=4)
    assert (check.lost, check.ok) == (1, False) and "counts 4 events but holds 5" in check.detail[-1]


def test_the_verdict_names_the_stage_where_an_event_went_missing():
    """Never in the spool: the collector acknowledged what it did not keep. In the spool but not in a store:
    lost after the spool. Both are losses; the stage is named."""
    from tally.chaos.verdict import check_spool

    ledger = _ledger()
    spooled = set(ledger.acked) - {"c" * 32}
    spool = check_spool(ledger, spooled)
    assert (spool.lost, spool.ok) == (1, False) and "never in a spool segment" in spool.detail[0]
    assert "c" * 32 in spool.detail[0]
    stored = _stored(ledger)
    del stored["b" * 32], stored["c" * 32]
    pg = check_store("PostgreSQL", ledger, stored, spooled=spooled)
    assert (pg.lost, pg.lost_in_spool) == (2, 1)  # b was spooled, then lost; c never reached the spool
    assert "1 of them were in the spool" in pg.detail[0]
    assert check_spool(ledger, set(ledger.acked)).ok


def test_the_spool_tap_keeps_every_segment_the_platform_deletes(tmp_path):
    """The tap's hard links keep what was appended after the link, and survive the seal (rename), shipping
    (move to shipped/) and deletion of the spool's own names."""
    import json
    import time

    from spool.segments import SpoolWriter, sealed_segments
    from tally.chaos.spool_tap import SpoolTap

    spool = tmp_path / "spool"
    writer = SpoolWriter(spool, max_bytes=1 << 20, max_age_s=3600)
    tap = SpoolTap(spool, tmp_path / "tap")
    event = {"v": 1, "domain": "a.example", "url": "https://a.example/"}
    writer.append([json.dumps({**event, "hash": "1" * 32}).encode()])
    tap.scan()  # the open segment is linked here ...
    writer.append([json.dumps({**event, "hash": "2" * 32}).encode()])  # ... and this is appended after
    writer.close()
    (sealed,) = sealed_segments(spool)
    (spool / "shipped").mkdir()
    sealed.rename(spool / "shipped" / sealed.name)
    tap.start()
    writer = SpoolWriter(spool, max_bytes=1 << 20, max_age_s=3600)
    writer.append([json.dumps({**event, "hash": "3" * 32}).encode(), b'{"kind": "refusals"}'])
    writer.close()
    while tap.scans < 3:
        time.sleep(0.01)
    tap.stop.set()
    tap.join(10)
    for path in [*spool.glob("*.seg"), *(spool / "shipped").glob("*.seg")]:
        path.unlink()  # the shipper's retention
    assert tap.hashes() == {"1" * 32, "2" * 32, "3" * 32}
    assert tap.errors == []


def test_a_202_naming_fewer_hashes_than_events_is_refused():
    ledger = Ledger()
    with pytest.raises(ChaosError, match="1 hashes for 2 events"):
        ledger.acknowledged([_url("/e/", 1), _url("/e/", 2)], ["a" * 32])
    assert ledger.acked == {} and ledger.accepted_requests == 0


def test_fault_names_are_checked_and_the_unknown_ones_named():
    assert parse_faults("broker, postgres-down") == ["broker", "postgres-down"]
    with pytest.raises(ValueError, match="unknown fault\\(s\\) nope, brokr; known: collector-master"):
        parse_faults("broker,nope,brokr")
    with pytest.raises(ValueError, match="no fault named"):
        parse_faults(" , ")


def test_the_schedule_follows_the_seed_and_every_round_has_every_fault():
    a, b = ChaosPlan(seed=3, load_s=60).order(), ChaosPlan(seed=3, load_s=60).order()
    assert a == b and a != ChaosPlan(seed=4, load_s=60).order()
    n = len(FAULTS)
    assert all(sorted(a[i:i + n]) == sorted(FAULTS) for i in range(0, 3 * n, n))
    plan = ChaosPlan.long_form(10, seed=1)
    assert (plan.load_s, plan.outage_s, plan.pause_s) == (600, 60, 120)


@pytest.mark.parametrize("argv, message", [
    (["--minutes", "0"], "--minutes must be more than 0"),
    (["--minutes", "-2"], "--minutes must be more than 0"),
    (["--faults", "broker,kill-everything"], "unknown fault(s) kill-everything"),
    (["--faults", ""], "no fault named"),
])
def test_tally_chaos_refuses_bad_arguments_before_starting_anything(argv, message, capsys, tmp_path):
    home = tmp_path / "home"
    assert main(["chaos", "--home", str(home), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not home.exists()


def test_tally_chaos_refuses_a_home_that_is_not_empty(capsys, tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    assert main(["chaos", "--minutes", "1", "--home", str(tmp_path)]) == 2
    assert f"--home {tmp_path} is not empty" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_short_chaos_run_loses_nothing_and_counts_nothing_twice(tmp_path):
    """A few kill -9s at seeded random points under load (the load runs until the five faults are done, at
    least 35 s: with gaps of 2-5 s the faults take about that, each one's restart and next acknowledgement
    waited for before the next gap; about 1 minute on a quiet machine; 35 s are also at least five
    collector-worker kills at their 3-6 s), all of it with
    collector-worker churn (a kill -9 every 3-6 s, short pauses), single-event requests into segments sealed
    every 50 ms, and a busy loop taking a core; the verdict also checks the spool (what was acknowledged
    went through a segment). Under `make test` the other pytest-xdist workers already keep both cores busy,
    so the busy loop runs only when this test runs alone (it would add a core's worth of CPU to a suite that
    is CPU-bound, ADR 42); `tally chaos` keeps it."""
    from rich.console import Console

    from tally.cmd_chaos import render

    plan = ChaosPlan(seed=20261123, load_s=35, faults=("broker", "collector-worker", "postgres", "loader",
                                                       "collector-master"),
                     gap_s=(2.0, 5.0), fault_count=5, settle_timeout_s=420, restart_timeout_s=180,
                     burners=0 if os.environ.get("PYTEST_XDIST_WORKER") else 1)
    lines: list[str] = []
    report = ChaosRun(plan, tmp_path / "home", progress=lines.append).run()
    out = io.StringIO()
    Console(file=out, width=220).print(*render(report))
    table = out.getvalue()
    print(table)
    assert report.passed, table
    assert report.error is None
    assert sorted(f.name for f in report.faults) == sorted(plan.faults)  # one round: each once
    assert all(f.restart_s is not None and f.error is None for f in report.faults), table
    ledger = report.ledger
    assert ledger.retries > 0 and ledger.duplicates > 0, "the load sent no retries or no duplicates"
    assert report.churn is not None and report.churn.kills >= 5 and report.churn.pauses > 100, table
    assert any("/e/s" in url for url in ledger.acked.values()), "no single-event requests were acknowledged"
    assert report.spool is not None and report.spool.ok and report.spool.stored == len(ledger.acked), table
    assert report.pg is not None and report.ch is not None
    assert report.pg.stored >= len(ledger.acked) > 0 and report.ch.stored >= len(ledger.acked)
    for f in report.faults:
        assert f.name in table
    assert "PASS" in table


def _fake_run(monkeypatch, lose: bool) -> list:
    """`tally chaos` with ChaosRun.run replaced by a report of a run that did (not) lose an event."""
    from tally.chaos import ChaosReport, ChaosRun, FaultRecord

    plans = []

    def run(self):
        plans.append((self.plan, self.stack.home))
        ledger = _ledger()
        stored = _stored(ledger)
        if lose:
            del stored["b" * 32]
        faults = [FaultRecord("broker", target="broker pid 123", at_s=12.0, restart_s=0.8, next_ack_s=0.1)]
        self.stack.home.mkdir(parents=True, exist_ok=True)
        return ChaosReport(self.plan, faults, ledger, pg=check_store("PostgreSQL", ledger, stored),
                           ch=check_store("ClickHouse", ledger, _stored(ledger)), settle_s=3.0)

    monkeypatch.setattr(ChaosRun, "run", run)
    return plans


def test_tally_chaos_exits_1_and_names_the_loss_when_a_store_lost_an_event(monkeypatch, capsys, tmp_path):
    plans = _fake_run(monkeypatch, lose=True)
    home = tmp_path / "home"
    assert main(["chaos", "--minutes", "2", "--seed", "5", "--faults", "broker,postgres-down",
                 "--home", str(home)]) == 1
    out = capsys.readouterr()
    assert "Summary: FAIL" in out.out and "PostgreSQL: lost / counted twice" in out.out
    assert "1 acknowledged events missing" in out.out and "/e/2" in out.out
    assert "broker pid 123" in out.out
    assert f"logs kept in {home / 'logs'}" in out.err
    plan, run_home = plans[0]
    assert plan.seed == 5 and plan.faults == ("broker", "postgres-down") and plan.load_s == 120
    assert run_home == home and home.exists()


def test_tally_chaos_exits_0_on_a_clean_run_and_removes_its_temporary_home(monkeypatch, capsys):
    plans = _fake_run(monkeypatch, lose=False)
    assert main(["chaos", "--minutes", "0.5"]) == 0
    assert "Summary: PASS" in capsys.readouterr().out
    [(plan, run_home)] = plans
    assert plan.faults == tuple(FAULTS) and plan.load_s == 30
    assert run_home.name == "home" and run_home.parent.name.startswith("tally-chaos-")
    assert not run_home.parent.exists()


def test_the_verdict_checks_every_rollup_by_dimension_against_clickhouses_non_bot_events():
    """ADR 46: each dimension of each tier, the cubes and the value bins must count what ClickHouse holds
    (non-bot events; with a value for the bins); one event too many in one dimension, or a missing
    dimension, is named."""
    from tally.chaos.verdict import dimension_totals

    class Stack:
        def __init__(self, dims: dict[str, int]) -> None:
            self.dims = dims

        def sql(self, query: str) -> list[tuple[int, int]]:
            return [(10, 4)]  # non-bot events, of which with a value

        def pg_query(self, query: str, params: tuple = ()) -> list[tuple]:
            if "value_bins" in query:
                return [("valued", 4)]
            if "rollup_cube" in query:
                return [("all", 10)]
            return list(self.dims.items()) if "rollup_dim_1h" in query else [
                (d, 10) for d in ("page", "source", "country", "device", "browser", "os")]

    every = dict.fromkeys(("page", "source", "country", "device", "browser", "os"), 10)
    assert dimension_totals(Stack(every)) == []
    wrong = dimension_totals(Stack({**every, "device": 11}))
    assert len(wrong) == 1 and wrong[0].startswith("rollup_dim_1h counts") and "'device': 11" in wrong[0]
    assert dimension_totals(Stack({k: v for k, v in every.items() if k != "os"}))[0].startswith("rollup_dim_1h")
