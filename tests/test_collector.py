"""The collector over Flask's test client, writing a real spool on disk (sites registered in the real PostgreSQL)."""

import errno
import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from collector.app import create_app
from core.event import Event
from oltp import sites
from spool import segments as spool_module
from spool.recovery import recover_orphans
from spool.segments import SpoolWriter, read_record, sealed_segments, segment_records
from tests.eventlib import event_from_json

pytestmark = pytest.mark.servers("postgres")


@pytest.fixture()
def key(settings, registry, domain) -> str:
    """`domain` registered as a site; its site key (the collector's copy already knows it)."""
    site = sites.add(settings.pg_dsn, domain)
    assert registry.refresh()
    return site.site_key


def spooled(settings) -> list[Event]:
    lines = []
    for path in sorted(Path(settings.spool_dir).glob("*")):
        if path.is_file():
            lines += [event_from_json(read_record(line)) for line in segment_records(path.read_bytes())]
    return lines


def test_single_event_is_spooled_before_202(client, settings, domain, key):
    resp = client.post("/collect", json={"domain": domain, "url": f"https://{domain}/", "type": "impression"},
                       query_string={"site": key},
                       headers={"User-Agent": "Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X) Mobile"})
    assert resp.status_code == 202, resp.json
    assert resp.json["accepted"] == 1
    events = spooled(settings)
    assert [e.hash for e in events] == resp.json["hashes"]
    assert events[0].domain == domain and events[0].device == "mobile" and events[0].os == "iOS"


def test_batch_is_spooled_whole(client, settings, domain, key):
    batch = [{"domain": domain, "url": f"https://{domain}/{i}"} for i in range(25)]
    resp = client.post("/collect", json=batch, query_string={"site": key})
    assert resp.status_code == 202
    assert resp.json["accepted"] == 25
    assert len(spooled(settings)) == 25


@pytest.mark.parametrize("body, content_type, status, code", [
    (b"{not json", "application/json", 400, "malformed_json"),
    (b"[]", "application/json", 400, "empty_batch"),
    (b'"just a string"', "application/json", 400, "invalid_event"),
    (b'{"domain": "example.com"}', "application/xml", 415, "unsupported_media_type"),
    (b'{"domain": "example.com"}', "text/plain; charset=ISO-8859-1", 415, "unsupported_media_type"),
    (b'{"domain": "example.com"}', "application/x-www-form-urlencoded", 415, "unsupported_media_type"),
    (b'{"domain": "example.com"}', "application/ld+json", 415, "unsupported_media_type"),
    (b'{"domain": "example.com"}', "", 415, "unsupported_media_type"),
    (b'{"domain": "\xe9xample.com"}', "text/plain", 400, "invalid_encoding"),
    (b'{"domain": "example.com", "url": "https://example.com/", "type": 7}', "application/json", 400,
     "invalid_event"),
])
def test_bad_bodies_get_named_errors_and_spool_nothing(client, settings, body, content_type, status, code):
    resp = client.post("/collect", data=body, content_type=content_type)
    assert resp.status_code == status
    assert resp.json["error"]["code"] == code
    assert resp.json["error"]["message"]
    assert spooled(settings) == []


def test_one_bad_event_rejects_the_whole_batch(client, settings, domain, key):
    batch = [{"domain": domain, "url": f"https://{domain}/"}] * 3 + [{"domain": domain, "url": "nope"}]
    resp = client.post("/collect", json=batch, query_string={"site": key})
    assert resp.status_code == 400
    assert resp.json["error"]["index"] == 3 and resp.json["error"]["field"] == "url"
    assert spooled(settings) == []
    # and the collector keeps serving
    assert client.post("/collect", json=batch[0], query_string={"site": key}).status_code == 202


def test_oversized_body_and_batch(make_settings, spool, registry):
    settings = make_settings(TALLY_MAX_BODY_BYTES="2048", TALLY_MAX_BATCH_EVENTS="5")
    client = create_app(settings, spool, start_sealer=False, registry=registry).test_client()
    big = client.post("/collect", data=b"[" + b" " * 4000 + b"]", content_type="application/json")
    assert big.status_code == 413 and big.json["error"]["code"] == "request_entity_too_large"
    many = client.post("/collect", json=[{"domain": "example.com", "url": "https://example.com/"}] * 6)
    assert many.status_code == 413 and many.json["error"]["code"] == "batch_too_large"
    assert spooled(settings) == []


def test_disk_full_answers_503_and_leaves_no_partial_line(client, settings, domain, key, monkeypatch):
    event = {"domain": domain, "url": f"https://{domain}/", "site": key}
    assert client.post("/collect", json=event).status_code == 202
    real_write = os.write

    def full_disk(fd, data):
        real_write(fd, data[: len(data) // 2])  # a torn write, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(spool_module.os, "write", full_disk)
    resp = client.post("/collect", json=[event] * 10)
    assert resp.status_code == 503
    assert resp.headers["Retry-After"] == "30"
    assert resp.json["error"]["code"] == "spool_full"
    monkeypatch.undo()
    assert len(spooled(settings)) == 1  # the torn half-batch was truncated away
    assert client.post("/collect", json=event).status_code == 202  # recovers by itself
    assert len(spooled(settings)) == 2


def test_unknown_route_is_json_404(client):
    resp = client.get("/nope")
    assert resp.status_code == 404 and resp.json["error"]["code"] == "not_found"


WRITER = """
import os, sys, time
from pathlib import Path
from spool.segments import SpoolWriter
w = SpoolWriter(Path(sys.argv[1]), max_bytes=1 << 20, max_age_s=3600)
w.append([b'{"a": 1}', b'{"a": 2}'])
os.write(w._fd, b'{"a": 3, "torn')  # a write that was cut off: never acknowledged
print("ready", flush=True)
time.sleep(600)
"""


def test_segment_of_a_killed_writer_is_sealed_without_its_torn_tail(tmp_path):
    spool_dir = tmp_path / "spool"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(spool_dir)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        assert recover_orphans(spool_dir) == 0  # alive: its lock is held, leave it alone
        assert sealed_segments(spool_dir) == []
    finally:
        proc.kill()  # SIGKILL: no chance to seal
        proc.wait()
    assert recover_orphans(spool_dir) == 1
    (segment,) = sealed_segments(spool_dir)
    assert [orjson.loads(read_record(x))["a"] for x in segment_records(segment.read_bytes())] == [1, 2]
    assert list(spool_dir.glob("*.open")) == []


def test_live_writers_segment_is_left_alone_even_in_the_same_process(settings):
    writer = SpoolWriter(settings.spool_dir, max_bytes=1 << 20, max_age_s=3600)
    writer.append([b'{"x": 1}'])
    assert recover_orphans(settings.spool_dir) == 0
    assert sealed_segments(settings.spool_dir) == []
    writer.close()
    assert len(sealed_segments(settings.spool_dir)) == 1


def test_disk_full_when_opening_a_segment_is_a_503(client, settings, domain, key, monkeypatch):
    real_open = os.open

    def full_disk(path, *args, **kwargs):
        if str(path).endswith(".new"):  # a new segment is created as .new (ADR 28)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(spool_module.os, "open", full_disk)
    resp = client.post("/collect", json={"domain": domain, "url": f"https://{domain}/"}, query_string={"site": key})
    assert resp.status_code == 503 and resp.json["error"]["code"] == "spool_full"
    monkeypatch.undo()
    assert client.post("/collect", json={"domain": domain, "url": f"https://{domain}/"},
                       query_string={"site": key}).status_code == 202
