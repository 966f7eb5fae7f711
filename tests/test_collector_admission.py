"""The one admission pipeline (collector/admission.py, ADR 37) and the faults its shape removed.

- A body that does not parse is parsed once under RSGI (it was parsed three times: the native path,
  then the WSGI fast path behind the bridge, then Flask), and refused alike.
- No admission step needs Flask: the native RSGI path pushes no app context (it pushed one for part of
  the admission and called `admitted()` outside it), and the whole pipeline admits a browser's batch
  (with an `Origin`) from a thread that has no Flask context at all.
- The sealer thread stops before shutdown seals the spool: a refusal counted afterwards opens no new
  spool segment (the thread used to flush it into a fresh `.open` segment nobody would seal).
- Each step refuses with its own reason, and the pipeline's steps run in the documented order.
"""

from __future__ import annotations

import asyncio
import threading
import time
from types import SimpleNamespace

import orjson
import pytest
from flask import appcontext_pushed
from werkzeug.test import EnvironBuilder

import collector.body as body_module
import collector.sealer as sealer_module
from collector import admission as admission_module
from collector.admission import SCREEN, Intake, Refusal
from collector.app import create_app
from collector.rsgi import CollectorRSGI
from spool.segments import SpoolWriter
from tests.conftest import register
from tests.test_collector_fast_path import hit, spooled
from tests.test_collector_rsgi import FakeProto, FakeScope


@pytest.fixture()
def rsgi(settings, registry, tmp_path):
    directory = tmp_path / "spool"
    spool = SpoolWriter(directory, max_bytes=1 << 20, max_age_s=3600)
    app = create_app(settings.with_overrides(spool_dir=directory), spool, start_sealer=False, registry=registry)
    native = CollectorRSGI(app, bridge_threads=2)
    yield native, directory
    native.__rsgi_del__(None)


def rsgi_post(native: CollectorRSGI, **kwargs) -> tuple[int, dict, dict]:
    environ = EnvironBuilder(path="/collect", method="POST", environ_base={"REMOTE_ADDR": "203.0.113.9"},
                             **kwargs).get_environ()
    proto = FakeProto(environ["wsgi.input"].read())
    asyncio.run(native.__rsgi__(FakeScope(environ), proto))
    assert proto.answer is not None
    status, headers, data = proto.answer
    return status, {k.lower(): v for k, v in headers}, orjson.loads(data)


def test_a_body_that_does_not_parse_is_parsed_once_under_rsgi(rsgi, monkeypatch):
    native, directory = rsgi
    parses: list[bytes] = []

    def loads(raw):
        parses.append(raw)
        return orjson.loads(raw)

    monkeypatch.setattr(body_module, "orjson", SimpleNamespace(loads=loads, JSONDecodeError=orjson.JSONDecodeError))
    status, headers, body = rsgi_post(native, data=b"{not json", content_type="application/json")
    assert (status, body["error"]["code"]) == (400, "malformed_json")
    assert headers["vary"] == "Origin"
    assert parses == [b"{not json"]
    assert native.app.extensions["tally_refusals"].snapshot() == {(None, "malformed_json"): 1}
    assert spooled(directory) == []


def test_the_native_path_admits_without_any_flask_context(rsgi, settings, registry, domain):
    native, directory = rsgi
    key = register(settings, registry, domain)
    pushed: list[object] = []

    def on_push(sender, **extra):
        pushed.append(sender)

    appcontext_pushed.connect(on_push, native.app)
    try:
        accepted = rsgi_post(native, json=[hit(domain), hit(domain)], query_string={"site": key})
        refused = rsgi_post(native, json=hit(domain, url="nope"), query_string={"site": key})
    finally:
        appcontext_pushed.disconnect(on_push, native.app)
    assert accepted[0] == 202 and accepted[2]["accepted"] == 2
    assert refused[0] == 400 and refused[2]["error"]["code"] == "invalid_event"
    assert pushed == []  # every step, `accept` included, ran without Flask
    assert len(spooled(directory)) == 2


def test_the_pipeline_admits_a_browsers_batch_from_a_thread_without_flask(app, settings, registry, domain):
    """The step after the spool (`accept`, once `admitted()`) sets what the page may read: it used to
    write Flask's `g`, which raised outside an app context (how collector/rsgi.py called it)."""
    origin = f"https://{domain}"
    key = register(settings, registry, domain, origins=[origin])
    admission = app.extensions["tally_admission"]
    outcome: list[object] = []

    def run() -> None:
        intake = Intake(orjson.dumps([hit(domain)]), key, user_agent="UA/1", client_ip="203.0.113.9",
                        origin=origin, cors_origin=origin)
        try:
            outcome.append(admission.admit(intake))
            outcome.append(intake.cors)
        except Exception as exc:  # what the old code raised (RuntimeError: no app context) is the finding
            outcome.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(30)
    assert not isinstance(outcome[0], Exception), outcome[0]
    assert [e.domain for e in outcome[0]] == [domain] and outcome[1] == origin


def test_no_segment_is_opened_after_shutdown_sealed_the_spool(settings, registry, domain, tmp_path, monkeypatch):
    monkeypatch.setattr(sealer_module, "REFUSALS_FLUSH_S", 0.05)
    directory = tmp_path / "spool"
    spool = SpoolWriter(directory, max_bytes=1 << 20, max_age_s=0.1)
    app = create_app(settings.with_overrides(spool_dir=directory, spool_segment_age_s=0.1), spool, registry=registry)
    register(settings, registry, domain)
    counts = app.extensions["tally_refusals"]
    counts.add(domain, "invalid_event", 2)
    CollectorRSGI(app, bridge_threads=1).__rsgi_del__(None)  # granian's worker stop: seals the spool
    assert not list(directory.glob("*.open"))
    sealed = sorted(p.name for p in directory.glob("*.seg"))
    assert [r["count"] for r in spooled(directory)] == [2]  # counted before the stop: spooled as it stopped
    counts.add(domain, "invalid_event", 1)  # a Flask request still running as the worker stops
    time.sleep(0.5)  # ten flush periods
    assert not list(directory.glob("*.open")), "the sealer opened a segment after shutdown sealed the spool"
    assert sorted(p.name for p in directory.glob("*.seg")) == sealed


class HeldSpool(SpoolWriter):
    """A real spool whose appends wait for `release` once `hold` is set, then note whether `stopped` was set
    as they write."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.hold, self.entered, self.release, self.stopped, self.done = (threading.Event() for _ in range(5))
        self.written_after_stop: list[bool] = []

    def append(self, lines) -> None:
        lines = list(lines)
        held = self.hold.is_set()
        if held:
            self.entered.set()
            assert self.release.wait(30)
        try:
            self.written_after_stop.append(self.stopped.is_set())
            super().append(lines)
        finally:
            if held:
                self.done.set()


def test_a_sealer_round_outlasting_the_stop_timeout_writes_nothing_after_stop(settings, registry, domain,
                                                                             tmp_path, monkeypatch):
    """The thread is in the middle of a flush (a slow disk) for longer than stop()'s join: stop() used to
    give up on the join and return, and the shutdown sealed the spool; the flush then wrote its counts
    into a fresh segment nobody seals. Now stop() returns only once that round is over."""
    monkeypatch.setattr(sealer_module, "REFUSALS_FLUSH_S", 0.05)
    monkeypatch.setattr(sealer_module, "STOP_TIMEOUT_S", 0.1)
    directory = tmp_path / "spool"
    spool = HeldSpool(directory, max_bytes=1 << 20, max_age_s=3600)
    app = create_app(settings.with_overrides(spool_dir=directory), spool, start_sealer=False, registry=registry)
    register(settings, registry, domain)
    app.extensions["tally_refusals"].add(domain, "invalid_event", 2)
    spool.hold.set()
    sealer = sealer_module.Sealer(app, spool, 3600).start()
    assert spool.entered.wait(30), "the sealer never flushed"

    def shutdown() -> None:  # as collector/rsgi.py stops a worker: the sealer, then the spool
        sealer.stop()
        spool.stopped.set()
        spool.close()

    stopper = threading.Thread(target=shutdown)
    stopper.start()
    stopper.join(1.0)  # ten times the join timeout: the old stop() had returned and the spool was sealed
    spool.release.set()
    stopper.join(30)
    assert not stopper.is_alive() and spool.done.wait(30)
    assert spool.written_after_stop == [False], "the sealer wrote after stop() returned"
    assert not list(directory.glob("*.open")), "the sealer opened a segment after shutdown sealed the spool"
    assert [r["count"] for r in spooled(directory)] == [2]


def test_the_steps_run_in_the_documented_order_each_refusing_with_its_reason():
    assert [step.__name__ for step in SCREEN] == [
        "parse_batch", "drop_empty_batch", "drop_oversized_batch", "put_sites", "drop_foreign_origin",
        "put_context", "put_events", "drop_over_limit"]
    unread = Intake(b"[1,", None, user_agent=None, client_ip=None)
    refusal = admission_module.parse_batch(None, unread)
    assert isinstance(refusal, Refusal) and (refusal.status, refusal.code) == (400, "malformed_json")
    empty = Intake(b"[]", None, user_agent=None, client_ip=None)
    assert admission_module.parse_batch(None, empty) is None and empty.items == []
    assert admission_module.drop_empty_batch(None, empty) == Refusal(400, "empty_batch", "the batch holds no events")
