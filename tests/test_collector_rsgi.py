"""The async (granian RSGI) collector, `tally collector`'s default interface: spool/async_writer.py,
collector/rsgi.py, collector/wsgi_bridge.py (docs/adr/0025-collector-speed.md, "async /collect").

- AsyncSpool keeps SpoolWriter.append's contract for coroutines: durable (written + fdatasync'd)
  when `append` returns, nothing of a failed flush left in the segment, every member of a failed
  group told so; concurrent appends share flushes.
- CollectorRSGI answers every request as the Flask-only collector does (status, headers, body,
  refusal counts, spooled events), the hot `POST /collect` natively, everything else through the
  WSGI bridge; in-process with a stand-in for granian's scope/protocol, and under real granian:
  `tally collector` with TALLY_COLLECTOR_INTERFACE=wsgi and =rsgi answer the same requests alike on
  the wire; oversized bodies are refused without being kept; SIGTERM, and the master's death
  (die_with_parent), stop RSGI workers with their spool segments sealed.
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

from collector.app import create_app
from collector.rsgi import CollectorRSGI, _client_ip
from spool import segments as spool_module
from spool.async_writer import AsyncSpool
from spool.recovery import recover_orphans
from spool.segments import SpoolFull, SpoolWriter, read_record, segment_records
from tests.conftest import SECRET, register
from tests.test_collector_fast_path import hit, spooled

pytestmark = pytest.mark.servers("postgres")


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
    def strip(e):
        return {k: v for k, v in e.items() if k not in ("hash", "received_at", "ts")}

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
    # the oversized body, the foreign Host, the wrong Content-Type and the Origin: Flask (an unreadable
    # body is refused by the native path, parsed once: ADR 37)
    assert len(bridged) == 4


class ChunkedProto(FakeProto):
    """A body arriving in `size`-byte chunks; counts the bytes the bridge took from the connection."""

    def __init__(self, body: bytes, size: int = 1000) -> None:
        super().__init__(body)
        self.size, self.taken = size, 0

    async def __call__(self) -> bytes:
        raise AssertionError("the bridge must read a body chunk by chunk, bounded")

    def __aiter__(self):
        async def chunks():
            for i in range(0, len(self.body), self.size):
                self.taken += len(self.body[i:i + self.size])
                yield self.body[i:i + self.size]
        return chunks()


@pytest.mark.parametrize("declared, sent, kept, taken", [
    (None, 8000, 4001, 5000),    # chunked, too large: kept up to max + 1, no chunk taken after (app refuses)
    (None, 3000, 3000, 3000),    # chunked within the limit: all of it
    (6000, 6000, 0, 6000),       # declared too large, at most 2 * max: dropped as it arrives, never kept
    (9000, 9000, 0, 0),          # declared beyond 2 * max: not one byte read
    (4000, 4000, 4000, 4000),    # declared within the limit: all of it
])
def test_the_bridge_bounds_what_it_reads_of_a_body(declared, sent, kept, taken):
    from collector.wsgi_bridge import WSGIBridge

    seen: list[tuple[bytes, str | None]] = []

    def app(environ, start_response):
        seen.append((environ["wsgi.input"].read(), environ.get("CONTENT_LENGTH")))
        start_response("413 REQUEST ENTITY TOO LARGE", [("Content-Type", "text/plain")])
        return [b"too large"]

    environ = EnvironBuilder(path="/collect", method="POST", headers={"Content-Type": "application/json"},
                             environ_base={"REMOTE_ADDR": "203.0.113.9"}).get_environ()
    environ.pop("CONTENT_LENGTH", None)
    if declared is None:
        environ["HTTP_TRANSFER_ENCODING"] = "chunked"
    else:
        environ["CONTENT_LENGTH"] = str(declared)
    proto = ChunkedProto(b"x" * sent)
    bridge = WSGIBridge(app, threads=1, max_body=4000)
    try:
        asyncio.run(bridge(FakeScope(environ), proto))
    finally:
        bridge.close()
    assert proto.answer == (413, [("Content-Type", "text/plain")], b"too large")
    assert len(seen[0][0]) == kept and proto.taken == taken
    assert seen[0][1] == (str(declared) if declared is not None else None)  # the app sees the declared length


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


# --- under real granian: `tally collector` in both interfaces, on the wire -----------------------

MAX_BODY = 16384  # TALLY_MAX_BODY_BYTES for the servers below: oversized bodies stay small


def _call(base: str, path: str, method: str = "GET", data: Any = None, **headers: str):
    req = urllib.request.Request(base + path, method=method, data=data, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=15) as resp:
            return resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, exc.read()


def _wait_healthy(base: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            if _call(base, "/healthz")[0] == 200:
                return
        except (urllib.error.URLError, ConnectionError):
            pass
        assert time.monotonic() < deadline and proc.poll() is None, log.read_text()[-2000:]
        time.sleep(0.2)


def _collector(servers, tmp_path: Path, name: str, interface: str | None, workers: int = 1
               ) -> tuple[subprocess.Popen, str, Path]:
    """`tally collector` with TALLY_COLLECTOR_INTERFACE=`interface` (None: unset, the default), healthy."""
    from infra.processes import free_port

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TALLY_") and k != "PROMETHEUS_MULTIPROC_DIR"}
    env.update(TALLY_HOME=str(tmp_path / f"{name}-home"), TALLY_PG_DSN=servers.pg_dsn, TALLY_SECRET=SECRET,
               TALLY_SPOOL_DIR=str(tmp_path / f"{name}-spool"), TALLY_COLLECTOR_PORT=str(port),
               TALLY_COLLECTOR_WORKERS=str(workers), TALLY_MAX_BODY_BYTES=str(MAX_BODY),
               TALLY_SPOOL_SEGMENT_AGE_S="3600",  # nothing sealed by age: only shutdown seals
               TALLY_ALLOWED_HOSTS="127.0.0.1,localhost", PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    if interface is not None:
        env["TALLY_COLLECTOR_INTERFACE"] = interface
    log = tmp_path / f"{name}.log"
    proc = subprocess.Popen([sys.executable, "-m", "tally.cli", "collector"], env=env, stdout=log.open("wb"),
                            stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(base, proc, log)
    except BaseException:
        proc.kill()
        proc.wait(timeout=30)
        raise
    return proc, base, tmp_path / f"{name}-spool"


def _stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


def _raw_answer(base: str, head: bytes, timeout: float = 15.0) -> bytes:
    """Send `head` (request line and headers, no body) on a fresh socket; what the server answers."""
    import socket

    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(head)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        return data


def test_both_interfaces_answer_alike_on_the_wire(servers, tmp_path, domain):
    """`tally collector` under TALLY_COLLECTOR_INTERFACE=wsgi and =rsgi (real granian, one worker each):
    the same requests (accepted, refused, bridged, CORS, pixel, tag, oversized, rate-limited, foreign
    Host) get the same status, headers and body; both spool the same events; both stop on SIGTERM."""
    import http.client

    from core.pixel import signed_query
    from oltp import sites

    origin = "https://shop.example.org"
    site = sites.add(servers.pg_dsn, domain, origins=[origin])
    tight = sites.add(servers.pg_dsn, f"tight-{domain}", rate_per_s=0.01, burst=3)
    procs, bases, spools = [], {}, {}
    try:
        for name in ("wsgi", "rsgi"):
            proc, bases[name], spools[name] = _collector(servers, tmp_path, name, name)
            procs.append(proc)
        one = orjson.dumps(hit(domain))
        fifty = orjson.dumps([hit(domain, url=f"https://{domain}/{i}") for i in range(50)])
        too_big = orjson.dumps([hit(domain, url=f"https://{domain}/{'x' * 200}/{i}") for i in range(100)])
        assert len(fifty) < MAX_BODY < len(too_big) <= 2 * MAX_BODY  # read and dropped, then refused: a clean 413
        key = f"/collect?site={site.site_key}"
        etag = _call(bases["wsgi"], "/tag.js", **{"Accept-Encoding": "gzip"})[1]["ETag"]
        pixel = signed_query(site.secret, {"site": site.site_key, "domain": domain, "url": f"https://{domain}/n",
                                           "exp": str(int(time.time()) + 300)})

        def chunked(body: bytes):  # urllib sends an iterable without Content-Length chunked
            return iter([body[i:i + 1000] for i in range(0, len(body), 1000)])

        json_ct = {"Content-Type": "application/json"}
        requests = [  # (what, path, method, body, headers, expected status)
            ("accepted", key, "POST", one, json_ct, 202),
            ("accepted 50", key, "POST", fifty, {"Content-Type": "text/plain;charset=UTF-8"}, 202),
            ("accepted chunked", key, "POST", lambda: chunked(one), json_ct, 202),
            ("unknown key", "/collect?site=nope", "POST", one, json_ct, 401),
            ("no key", "/collect", "POST", one, json_ct, 401),
            ("bad json", key, "POST", b"{bad", json_ct, 400),
            ("media type", key, "POST", one, {"Content-Type": "text/html"}, 415),
            ("other query", f"{key}&x=1", "POST", one, json_ct, 202),
            ("rate limited", f"/collect?site={tight.site_key}", "POST",
             orjson.dumps([hit(f"tight-{domain}")] * 5), json_ct, 429),
            ("cors accepted", key, "POST", one, {"Content-Type": "text/plain", "Origin": origin}, 202),
            ("cors refused", key, "POST", one, {"Content-Type": "text/plain", "Origin": "https://evil.example"}, 403),
            ("preflight", key, "OPTIONS", None, {"Origin": origin, "Access-Control-Request-Method": "POST",
                                                 "Access-Control-Request-Headers": "content-type"}, 204),
            ("preflight refused", key, "OPTIONS", None, {"Origin": "https://evil.example",
                                                         "Access-Control-Request-Method": "POST"}, 403),
            ("oversized", key, "POST", too_big, json_ct, 413),
            ("oversized chunked", key, "POST", lambda: chunked(too_big), json_ct, 413),
            ("foreign host", key, "POST", one, {**json_ct, "Host": "evil.example"}, 400),
            ("foreign host, tag", "/tag.js", "GET", None, {"Host": "evil.example"}, 400),
            ("wrong method", "/collect", "GET", None, {}, 405),
            ("tag", "/tag.js", "GET", None, {"Accept-Encoding": "gzip"}, 200),
            ("tag, plain", "/tag.js", "GET", None, {}, 200),
            ("tag, unchanged", "/tag.js", "GET", None, {"Accept-Encoding": "gzip", "If-None-Match": etag}, 304),
            ("pixel", f"/i.gif?{pixel}", "GET", None, {}, 200),
            ("pixel, tampered", f"/i.gif?{pixel.replace('%2Fn', '%2Fm')}", "GET", None, {}, 403),
            ("readyz", "/readyz", "GET", None, {}, 200),
            ("healthz", "/healthz", "GET", None, {}, 200),
            ("not found", "/nothing-here", "GET", None, {}, 404),
        ]
        for what, path, method, body, headers, expected in requests:
            answers = []
            for name in ("wsgi", "rsgi"):
                data = body() if callable(body) else body
                status, got_headers, got = _call(bases[name], path, method, data, **headers)
                hdrs = {k.lower(): v for k, v in got_headers.items() if k.lower() != "date"}
                answers.append(normalised(status, list(hdrs.items()), got) + (hdrs.get("content-length"),))
            assert answers[0] == answers[1], what
            assert answers[0][0] == expected, (what, answers[0])
            if expected == 413:
                assert answers[0][2]["error"]["code"] == "request_entity_too_large", (what, answers[0])
        for name in ("wsgi", "rsgi"):  # /metrics: the same families either way (counts differ by timing)
            status, got_headers, got = _call(bases[name], "/metrics")
            assert status == 200 and got_headers["Content-Type"].startswith("text/plain"), (name, status)
            assert b'tally_collector_requests_total{endpoint="collector.collect",status="202"}' in got, name
        events = {name: [e for e in spooled(spools[name]) if "kind" not in e] for name in ("wsgi", "rsgi")}
        assert len(events["wsgi"]) == len(events["rsgi"]) == 1 + 50 + 1 + 1 + 1 + 1  # pixel too
        assert sorted(e["url"] for e in events["wsgi"]) == sorted(e["url"] for e in events["rsgi"])

        # A declared Content-Length beyond the limit: RSGI answers 413 without reading a byte of it.
        head = (f"POST {key} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                f"Content-Length: {50 * 1024 * 1024}\r\n\r\n").encode()
        answer = _raw_answer(bases["rsgi"], head)
        assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
        conn = http.client.HTTPConnection(bases["rsgi"].removeprefix("http://"), timeout=15)
        conn.request("POST", key, body=one, headers=json_ct)  # the server still serves
        assert conn.getresponse().status == 202
        conn.close()

        for proc in procs:  # both stop cleanly on SIGTERM (granian's graceful shutdown)
            proc.terminate()
        assert [proc.wait(timeout=30) for proc in procs] == [0, 0]
        # RSGI seals its worker's segment as it stops: nothing left open, every event in a sealed one.
        assert list(spools["rsgi"].glob("*.open")) == [], sorted(spools["rsgi"].iterdir())
        sealed = [e for e in spooled(spools["rsgi"]) if "kind" not in e]
        assert len(sealed) == len(events["rsgi"]) + 1
    finally:
        _stop(procs)


def test_rsgi_is_the_default_and_an_unknown_interface_is_refused(servers, tmp_path):
    from core.config import ConfigError, Settings

    assert Settings.from_env({}).collector_interface == "rsgi"
    assert Settings.from_env({"TALLY_COLLECTOR_INTERFACE": "wsgi"}).collector_interface == "wsgi"
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({"TALLY_COLLECTOR_INTERFACE": "asgi"})
    assert "TALLY_COLLECTOR_INTERFACE" in str(caught.value) and "rsgi or wsgi" in str(caught.value)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TALLY_")}
    env.update(TALLY_HOME=str(tmp_path / "home"), TALLY_PG_DSN=servers.pg_dsn, TALLY_SECRET=SECRET,
               TALLY_COLLECTOR_INTERFACE="asgi")
    out = subprocess.run([sys.executable, "-m", "tally.cli", "collector"], env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode != 0 and "TALLY_COLLECTOR_INTERFACE" in out.stderr, (out.returncode, out.stderr[-500:])


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_default_collector_workers_die_with_the_master_and_keep_every_acknowledged_event(servers, tmp_path,
                                                                                        domain):
    """`tally collector` (default: RSGI, two workers) killed with SIGKILL: its workers stop (SIGKILL from
    PR_SET_PDEATHSIG or collector.wsgi's parent watch); the port is free again, no segment stays locked,
    and after orphan recovery (what the shipper runs) every acknowledged event is in a sealed segment."""
    import signal

    from infra.processes import tcp_open
    from oltp import sites

    site = sites.add(servers.pg_dsn, domain)
    proc, base, spool_dir = _collector(servers, tmp_path, "default", None, workers=2)
    try:
        for i in range(8):
            status, _, body = _call(base, f"/collect?site={site.site_key}", "POST",
                                    orjson.dumps(hit(domain, url=f"https://{domain}/{i}")),
                                    **{"Content-Type": "application/json"})
            assert status == 202, body
        assert list(spool_dir.glob("*.open")), "nothing spooled into an open segment"
        workers = _children(proc.pid)
        assert len(workers) == 2, workers
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        deadline = time.monotonic() + 30
        while any(_alive(w) for w in workers):
            assert time.monotonic() < deadline, "a worker outlived its master"
            time.sleep(0.1)
        # Orphan recovery, as the shipper runs it periodically, seals what a worker could not. A dead
        # worker's thread-group leader shows as a zombie before its last thread has released the
        # segment's lock, so the first pass may still find a segment locked: try again, like the shipper.
        while True:
            recover_orphans(spool_dir)
            if not list(spool_dir.glob("*.open")):
                break
            assert time.monotonic() < deadline, sorted(spool_dir.iterdir())
            time.sleep(0.1)
        assert len([e for e in spooled(spool_dir) if "kind" not in e]) == 8
        port = int(base.rsplit(":", 1)[1])
        assert not tcp_open("127.0.0.1", port)
    finally:
        _stop([proc])


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
