"""The async (granian RSGI) collector prototype: collector/async_spool.py, collector/rsgi.py,
collector/wsgi_bridge.py (docs/adr/0025-collector-speed.md, "async /collect").

- AsyncSpool keeps SpoolWriter.append's contract for coroutines: durable (written + fdatasync'd)
  when `append` returns, nothing of a failed flush left in the segment, every member of a failed
  group told so; concurrent appends share flushes.
- CollectorRSGI answers every request as the Flask-only collector does (status, headers, body,
  refusal counts, spooled events), the hot `POST /collect` natively, everything else through the
  WSGI bridge; in-process with a stand-in for granian's scope/protocol, and once under real granian
  against `tally collector` (WSGI) on the wire.
"""

from __future__ import annotations

import asyncio
import errno
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import orjson
import pytest
from werkzeug.test import Client, EnvironBuilder

from collector import spool as spool_module
from collector.app import create_app
from collector.async_spool import AsyncSpool
from collector.rsgi import CollectorRSGI, _client_ip
from collector.spool import SpoolFull, SpoolWriter, read_record, segment_records
from tests.conftest import SECRET, register
from tests.test_collector_fast_path import hit, spooled


def lines_in(directory: Path) -> list[bytes]:
    out: list[bytes] = []
    for path in sorted(directory.glob("*")):
        if path.is_file():
            out += [read_record(line) for line in segment_records(path.read_bytes())]
    return out


# --- AsyncSpool ------------------------------------------------------------------------------------

@pytest.fixture()
def writer(tmp_path):
    w = SpoolWriter(tmp_path / "spool", max_bytes=1 << 20, max_age_s=3600)
    yield w
    w.close()


def test_appends_return_only_once_durable_and_share_flushes(writer, tmp_path, monkeypatch):
    synced: list[int] = []  # segment size at each fdatasync
    real_fdatasync = os.fdatasync

    def fdatasync(fd):
        real_fdatasync(fd)
        synced.append(os.fstat(fd).st_size)

    monkeypatch.setattr(spool_module.os, "fdatasync", fdatasync)
    aspool = AsyncSpool(writer)
    returned_after: dict[int, int] = {}

    async def one(i: int) -> None:
        await aspool.append([b'{"n":%d}' % i])
        on_disk = (tmp_path / "spool").glob("*.open")
        returned_after[i] = synced[-1]  # the last fdatasync before we got control back
        assert any(b'{"n":%d}' % i in p.read_bytes()[: synced[-1]] for p in on_disk)

    async def main() -> None:
        await asyncio.gather(*(one(i) for i in range(60)))

    asyncio.run(main())
    aspool.close()
    assert sorted(orjson.loads(line)["n"] for line in lines_in(tmp_path / "spool")) == list(range(60))
    assert len(returned_after) == 60
    assert 1 <= writer.flushes < 60  # grouped: the first alone, the rest joined while it flushed
    assert len(synced) == writer.flushes


def test_nothing_to_append_flushes_nothing(writer):
    aspool = AsyncSpool(writer)
    asyncio.run(aspool.append([]))
    aspool.close()
    assert writer.flushes == 0


def test_a_failed_flush_fails_every_member_and_leaves_nothing(writer, tmp_path, monkeypatch):
    aspool = AsyncSpool(writer)

    def broken_sync(fd):
        raise OSError(errno.EIO, "I/O error")

    async def main() -> list[Any]:
        await aspool.append([b'{"before":1}'])  # durable before the disk breaks
        monkeypatch.setattr(spool_module.os, "fdatasync", broken_sync)
        got = await asyncio.gather(*(aspool.append([b'{"n":%d}' % i]) for i in range(10)), return_exceptions=True)
        monkeypatch.undo()
        await aspool.append([b'{"after":1}'])
        return got

    got = asyncio.run(main())
    aspool.close()
    assert all(isinstance(r, OSError) and r.errno == errno.EIO for r in got), got
    assert lines_in(tmp_path / "spool") == [b'{"before":1}', b'{"after":1}']


def test_a_full_disk_is_spool_full_and_marks_readiness(writer, tmp_path, monkeypatch):
    aspool = AsyncSpool(writer)

    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(spool_module.os, "write", full)
    with pytest.raises(SpoolFull):
        asyncio.run(aspool.append([b'{"n":1}']))
    monkeypatch.undo()
    aspool.close()
    assert "refused an append for lack of space" in (writer.readiness() or "")
    assert lines_in(tmp_path / "spool") == []


def test_a_bug_in_the_flush_is_an_oserror_for_the_members_not_a_success(writer, tmp_path, monkeypatch):
    aspool = AsyncSpool(writer)
    monkeypatch.setattr(writer, "write_durably", lambda data: (_ for _ in ()).throw(RuntimeError("a bug")))

    async def main() -> list[Any]:
        return await asyncio.gather(*(aspool.append([b'{"n":%d}' % i]) for i in range(5)), return_exceptions=True)

    got = asyncio.run(main())
    assert all(isinstance(r, OSError) and "a bug" in str(r) for r in got), got
    monkeypatch.undo()
    asyncio.run(aspool.append([b'{"later":1}']))  # the next group is flushed again
    aspool.close()
    assert lines_in(tmp_path / "spool") == [b'{"later":1}']


def test_a_cancelled_flush_fails_its_group_and_the_next_then_flushing_resumes(writer, tmp_path, monkeypatch):
    import threading

    aspool = AsyncSpool(writer)
    release = threading.Event()
    real_write = writer.write_durably

    def slow_write(data):
        release.wait(10)
        real_write(data)

    monkeypatch.setattr(writer, "write_durably", slow_write)

    async def main() -> list[Any]:
        members = [asyncio.ensure_future(aspool.append([b'{"n":%d}' % i])) for i in range(3)]
        await asyncio.sleep(0.05)  # the first group's flush is waiting in the flusher thread
        later = asyncio.ensure_future(aspool.append([b'{"n":9}']))  # joins the next group
        await asyncio.sleep(0)
        (flush,) = aspool._tasks
        flush.cancel()
        got = await asyncio.gather(*members, later, return_exceptions=True)
        release.set()
        monkeypatch.undo()
        await aspool.append([b'{"after":1}'])  # a new flush task takes over
        return got

    got = asyncio.run(main())
    aspool.close()
    assert all(isinstance(r, OSError) and "CancelledError" in str(r) for r in got), got
    assert b'{"after":1}' in lines_in(tmp_path / "spool")


def test_a_cancelled_member_does_not_cancel_its_groups_flush(writer, tmp_path):
    aspool = AsyncSpool(writer)

    async def main() -> None:
        first = asyncio.ensure_future(aspool.append([b'{"n":0}']))
        await asyncio.sleep(0)  # the first group is being flushed; the next two share a group
        doomed = asyncio.ensure_future(aspool.append([b'{"n":1}']))
        kept = asyncio.ensure_future(aspool.append([b'{"n":2}']))
        await asyncio.sleep(0)
        doomed.cancel()
        await asyncio.gather(first, kept)
        assert doomed.cancelled()

    asyncio.run(main())
    aspool.close()
    # the cancelled request got no answer; its line was in the group and is written (never acknowledged)
    assert sorted(orjson.loads(line)["n"] for line in lines_in(tmp_path / "spool")) == [0, 1, 2]


# --- CollectorRSGI in-process, against the Flask-only app ----------------------------------------

class FakeHeaders(dict):
    """Like granian's RSGIHeaders: lower-case names, `get`, `in`, `items`."""


class FakeScope:
    """An RSGI HTTP scope built from a werkzeug test environ (as granian would build it)."""

    proto = "http"
    http_version = "1.1"
    scheme = "http"

    def __init__(self, environ: dict[str, Any]) -> None:
        self.method = environ["REQUEST_METHOD"]
        self.path = environ["PATH_INFO"].encode("latin-1").decode("utf-8")
        self.query_string = environ.get("QUERY_STRING", "")
        self.client = f"{environ['REMOTE_ADDR']}:40000"
        self.server = f"{environ['SERVER_NAME']}:{environ['SERVER_PORT']}"
        headers = FakeHeaders()
        for key, value in environ.items():
            if key.startswith("HTTP_"):
                headers[key[5:].lower().replace("_", "-")] = value
            elif key in ("CONTENT_TYPE", "CONTENT_LENGTH") and value != "":
                headers[key.lower().replace("_", "-")] = value
        self.headers = headers
        self.authority = None


class FakeProto:
    def __init__(self, body: bytes) -> None:
        self.body = body
        self.answer: tuple[int, list[tuple[str, str]], bytes] | None = None

    async def __call__(self) -> bytes:
        return self.body

    def __aiter__(self):
        async def chunks():
            if self.body:
                yield self.body
        return chunks()

    def response_bytes(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        assert self.answer is None, "answered twice"
        self.answer = (status, headers, body)


def normalised(status: int, headers: list[tuple[str, str]], body: bytes) -> tuple[int, dict, Any]:
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        parsed = body
    if isinstance(parsed, dict) and "hashes" in parsed:  # random per event: compare how many
        parsed = {**parsed, "hashes": len(parsed["hashes"])}
    return status, {k.lower(): v for k, v in headers if k.lower() != "content-length"}, parsed


@pytest.fixture()
def rsgi_pair(settings, registry, tmp_path):
    """(RSGI app, its spool dir, Flask-only app, its spool dir, paths the RSGI app bridged to Flask)."""
    apps, dirs = [], []
    for name in ("rsgi", "flask"):
        directory = tmp_path / f"spool-{name}"
        spool = SpoolWriter(directory, max_bytes=1 << 20, max_age_s=3600)
        apps.append(create_app(settings.with_overrides(spool_dir=directory), spool, start_sealer=False,
                               registry=registry))
        dirs.append(directory)
    flask_only = apps[1]
    flask_only.wsgi_app = flask_only.wsgi_app.flask_wsgi  # the lean WSGI path taken off too
    rsgi = CollectorRSGI(apps[0], bridge_threads=2)
    bridged: list[str] = []
    bridge = rsgi.bridge

    async def counted(scope, proto, **kwargs):
        bridged.append(scope.path)
        await bridge(scope, proto, **kwargs)

    rsgi.bridge = counted
    yield rsgi, dirs[0], flask_only, dirs[1], bridged
    rsgi.bridge = bridge
    rsgi.__rsgi_del__(None)
    for app in apps:
        app.extensions["tally_spool"].close()


def alike(rsgi_pair, method: str = "POST", path: str = "/collect", **kwargs) -> tuple[int, dict, Any]:
    rsgi, _, flask_only, _, _ = rsgi_pair
    environ = EnvironBuilder(path=path, method=method, environ_base={"REMOTE_ADDR": "203.0.113.9"},
                             **kwargs).get_environ()
    body = environ["wsgi.input"].read()
    proto = FakeProto(body)
    asyncio.run(rsgi.__rsgi__(FakeScope(environ), proto))
    assert proto.answer is not None, "no answer"
    got = normalised(*proto.answer)
    resp = Client(flask_only).open(path, method=method, environ_base={"REMOTE_ADDR": "203.0.113.9"}, **kwargs)
    expected = normalised(resp.status_code, list(resp.headers.items()), resp.get_data())
    assert got == expected
    return got


def test_accepted_requests_answer_as_flask_does_without_flask(rsgi_pair, settings, registry, domain):
    key = register(settings, registry, domain)
    _, rsgi_dir, _, flask_dir, bridged = rsgi_pair
    status, headers, body = alike(rsgi_pair, json=hit(domain), query_string={"site": key},
                                  headers={"User-Agent": "Mozilla/5.0 (iPhone; CPU iPhone OS 17_0) Mobile"})
    assert (status, body) == (202, {"accepted": 1, "hashes": 1})
    assert headers == {"content-type": "application/json", "vary": "Origin"}
    batch = [hit(domain, url=f"https://{domain}/{i}") for i in range(50)]
    assert alike(rsgi_pair, data=orjson.dumps(batch), content_type="text/plain;charset=UTF-8",
                 query_string={"site": key})[0] == 202
    assert alike(rsgi_pair, json=[hit(domain, site=key)])[0] == 202
    assert bridged == []
    strip = lambda e: {k: v for k, v in e.items() if k not in ("hash", "received_at", "ts")}
    assert [strip(e) for e in spooled(rsgi_dir)] == [strip(e) for e in spooled(flask_dir)]
    assert len(spooled(rsgi_dir)) == 52 and spooled(rsgi_dir)[0]["device"] == "mobile"


def test_refusals_answer_alike_count_alike_and_spool_nothing(rsgi_pair, settings, registry, domain):
    key = register(settings, registry, domain)
    other = register(settings, registry, f"other-{domain}")
    rsgi, rsgi_dir, flask_only, flask_dir, bridged = rsgi_pair
    cases = [  # (kwargs, status, code)
        ({"data": b"{not json", "content_type": "application/json"}, 400, "malformed_json"),
        ({"data": b'{"domain": "\xe9x.com"}', "content_type": "text/plain"}, 400, "invalid_encoding"),
        ({"data": b"[]", "content_type": "application/json"}, 400, "empty_batch"),
        ({"json": [hit(domain)] * (settings.max_batch_events + 1), "query_string": {"site": key}}, 413,
         "batch_too_large"),
        ({"json": hit(domain), "content_type": "application/xml"}, 415, "unsupported_media_type"),
        ({"json": hit(domain)}, 401, "missing_site_key"),
        ({"json": hit(domain), "query_string": {"site": "no-such-key"}}, 401, "unknown_site_key"),
        ({"json": hit(domain), "query_string": {"site": other}}, 403, "site_mismatch"),
        ({"json": [hit(domain), hit(domain, url="nope")], "query_string": {"site": key}}, 400, "invalid_event"),
        ({"data": b"x" * (settings.max_body_bytes + 1), "content_type": "application/json"}, 413,
         "request_entity_too_large"),
        ({"json": hit(domain), "query_string": {"site": key}, "headers": {"Host": "evil.example"}}, 400,
         "host_not_allowed"),
        ({"json": hit(domain), "query_string": {"site": key}, "headers": {"Origin": "https://nope.example"}}, 403,
         "origin_not_allowed"),
    ]
    for kwargs, status, code in cases:
        got = alike(rsgi_pair, **kwargs)
        assert (got[0], got[2]["error"]["code"]) == (status, code), kwargs
        assert got[2]["error"]["message"]
    assert spooled(rsgi_dir) == spooled(flask_dir) == []
    assert rsgi.app.extensions["tally_refusals"].snapshot() == flask_only.extensions["tally_refusals"].snapshot()
    # unreadable bodies, the oversized body, the foreign Host, the wrong Content-Type and the Origin: Flask
    assert len(bridged) == 6


def test_other_routes_go_through_the_bridge_unchanged(rsgi_pair, settings, registry, domain):
    *_, bridged = rsgi_pair
    assert alike(rsgi_pair, "GET", "/healthz")[0] == 200
    assert alike(rsgi_pair, "GET", "/readyz")[0] == 200
    status, headers, _ = alike(rsgi_pair, "GET", "/tag.js", headers={"Accept-Encoding": "gzip"})
    assert status == 200 and headers["content-encoding"] == "gzip"
    assert alike(rsgi_pair, "GET", "/no/such/%C3%A9")[0] == 404
    assert alike(rsgi_pair, "OPTIONS", "/collect")[0] == 204
    assert alike(rsgi_pair, "GET", "/collect")[0] == 405
    assert bridged == ["/healthz", "/readyz", "/tag.js", "/no/such/é", "/collect", "/collect"]


def test_a_full_spool_is_a_counted_503_and_a_bug_a_500(rsgi_pair, settings, registry, domain, monkeypatch):
    key = register(settings, registry, domain)
    rsgi, rsgi_dir, flask_only, _, _ = rsgi_pair

    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(spool_module.os, "write", full)
    status, headers, body = alike(rsgi_pair, json=hit(domain), query_string={"site": key})
    monkeypatch.undo()
    assert (status, headers["retry-after"], body["error"]["code"]) == (503, "30", "spool_full")
    assert rsgi.app.extensions["tally_refusals"].snapshot() == {(domain, "spool_full"): 1}
    for app in (rsgi.app, flask_only):
        monkeypatch.setattr(app.extensions["tally_spool"], "write_durably",
                            lambda data: (_ for _ in ()).throw(RuntimeError("a bug")))
    status, _, body = alike(rsgi_pair, json=hit(domain), query_string={"site": key})
    assert status == 500 and body["error"]["code"] == "internal_error"
    assert spooled(rsgi_dir) == []


@pytest.mark.parametrize("client, address", [("127.0.0.1:5000", "127.0.0.1"), ("[::1]:5000", "::1"),
                                             ("203.0.113.9", "203.0.113.9")])
def test_the_client_address_is_the_host_part(client, address):
    assert _client_ip(client) == address


# --- under real granian: RSGI against `tally collector` (WSGI), on the wire ----------------------

def _call(base: str, path: str, method: str = "GET", data: bytes | None = None, **headers: str):
    req = urllib.request.Request(base + path, method=method, data=data, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, exc.read()


def _wait_healthy(base: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            if _call(base, "/healthz")[0] == 200:
                return
        except urllib.error.URLError:
            pass
        assert time.monotonic() < deadline and proc.poll() is None, log.read_text()[-2000:]
        time.sleep(0.2)


def test_under_granian_rsgi_answers_as_the_wsgi_collector(servers, tmp_path, domain):
    from infra.processes import free_port
    from oltp import sites

    site = sites.add(servers.pg_dsn, domain)
    bases, procs = {}, []
    try:
        for name in ("wsgi", "rsgi"):
            port = free_port()
            env = {k: v for k, v in os.environ.items() if not k.startswith("TALLY_")}
            env.update(TALLY_HOME=str(tmp_path / f"{name}-home"), TALLY_PG_DSN=servers.pg_dsn, TALLY_SECRET=SECRET,
                       TALLY_SPOOL_DIR=str(tmp_path / f"{name}-spool"), TALLY_COLLECTOR_PORT=str(port),
                       TALLY_COLLECTOR_WORKERS="1", PYTHONPATH=str(Path(__file__).resolve().parent.parent))
            argv = ([sys.executable, "-m", "tally.cli", "collector"] if name == "wsgi" else
                    [sys.executable, "-m", "bench.collector", "--serve-rsgi"])
            log = tmp_path / f"{name}.log"
            proc = subprocess.Popen(argv, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)
            procs.append(proc)
            bases[name] = f"http://127.0.0.1:{port}"
            _wait_healthy(bases[name], proc, log)
        one = orjson.dumps(hit(domain))
        fifty = orjson.dumps([hit(domain, url=f"https://{domain}/{i}") for i in range(50)])
        requests = [  # (path, method, body, headers)
            (f"/collect?site={site.site_key}", "POST", one, {"Content-Type": "application/json"}),
            (f"/collect?site={site.site_key}", "POST", fifty, {"Content-Type": "text/plain;charset=UTF-8"}),
            ("/collect?site=nope", "POST", one, {"Content-Type": "application/json"}),
            (f"/collect?site={site.site_key}", "POST", b"{bad", {"Content-Type": "application/json"}),
            (f"/collect?site={site.site_key}", "POST", one, {"Content-Type": "text/html"}),
            (f"/collect?site={site.site_key}", "POST", one, {"Content-Type": "application/json",
                                                             "Origin": "https://x.example"}),
            ("/collect", "OPTIONS", None, {}),
            ("/tag.js", "GET", None, {"Accept-Encoding": "gzip"}),
            ("/readyz", "GET", None, {}),
            ("/nothing-here", "GET", None, {}),
        ]
        for path, method, body, headers in requests:
            answers = []
            for name in ("wsgi", "rsgi"):
                status, got_headers, data = _call(bases[name], path, method, body, **headers)
                hdrs = {k.lower(): v for k, v in got_headers.items() if k.lower() != "date"}
                answers.append(normalised(status, list(hdrs.items()), data) + (hdrs.get("content-length"),))
            assert answers[0] == answers[1], (path, method, headers)
        assert answers[0][0] == 404
        events = {name: [e for e in spooled(tmp_path / f"{name}-spool") if "kind" not in e]  # not refusal counts
                  for name in ("wsgi", "rsgi")}
        assert len(events["wsgi"]) == len(events["rsgi"]) == 51
        for proc in procs:  # both stop cleanly on SIGTERM (granian's graceful shutdown)
            proc.terminate()
        assert [proc.wait(timeout=30) for proc in procs] == [0, 0]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)


def test_a_key_the_copy_lacks_is_looked_up_off_the_event_loop(rsgi_pair, settings, registry, domain, monkeypatch):
    import threading

    from oltp import sites

    rsgi, rsgi_dir, *_ = rsgi_pair
    site = sites.add(settings.pg_dsn, domain)  # added after the copy was loaded: unknown to it
    assert site.site_key not in registry.snapshot().by_key
    refreshed_in: list[str] = []
    real_refresh = registry.refresh

    def refresh():
        refreshed_in.append(threading.current_thread().name)
        return real_refresh()

    monkeypatch.setattr(registry, "refresh", refresh)
    environ = EnvironBuilder(path="/collect", method="POST", json=hit(domain), query_string={"site": site.site_key},
                             environ_base={"REMOTE_ADDR": "203.0.113.9"}).get_environ()
    proto = FakeProto(environ["wsgi.input"].read())
    asyncio.run(rsgi.__rsgi__(FakeScope(environ), proto))
    assert proto.answer is not None and proto.answer[0] == 202, proto.answer
    assert len(refreshed_in) == 1 and refreshed_in[0].startswith("wsgi-bridge")
    assert len(spooled(rsgi_dir)) == 1
