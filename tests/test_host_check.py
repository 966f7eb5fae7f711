"""The Host allowlist of both HTTP apps (DNS rebinding): unit rules, then each real app."""

from __future__ import annotations

import pytest

from collector.app import create_app as create_collector
from collector.registry import SiteRegistry
from core.http import host_allowed
from spool.segments import SpoolWriter

pytestmark = pytest.mark.servers("postgres")

ALLOWED = ("localhost", "127.0.0.1", "::1", "tally.example.com", ".corp.example")


@pytest.mark.parametrize("host, ok", [
    ("localhost", True), ("localhost:8701", True), ("LOCALHOST:8701", True), ("127.0.0.1:8700", True),
    ("[::1]:8701", True), ("[::1]", True), ("tally.example.com", True), ("tally.example.com.", True),
    ("a.corp.example:443", True), ("corp.example", True),
    ("attacker.example", False), ("attacker.example:8701", False), ("127.0.0.2", False), ("", False),
    ("tally.example.com.attacker.example", False), ("evilcorp.example", False), ("[::2]:80", False),
    ("localhost@attacker.example", False), ("[::1", False),
])
def test_host_rules(host, ok):
    assert host_allowed(host, ALLOWED) is ok


def test_collector_refuses_an_unknown_host_and_writes_nothing(make_settings, tmp_path):
    settings = make_settings(TALLY_ALLOWED_HOSTS="localhost,collector.example.com")
    spool = SpoolWriter(settings.spool_dir, max_bytes=1 << 20, max_age_s=3600)
    # loaded once, no refresh thread: one left running refreshed every 2 s until the worker ended, and logged to
    # pytest's closed streams once the session's PostgreSQL stopped
    registry = SiteRegistry.from_settings(settings).start(background=False)
    client = create_collector(settings, spool, start_sealer=False, registry=registry).test_client()
    event = {"domain": "example.com", "url": "https://example.com/", "type": "pageview"}
    resp = client.post("/collect", json=event, headers={"Host": "attacker.example"})
    assert resp.status_code == 400 and resp.json["error"]["code"] == "host_not_allowed"
    assert client.get("/healthz", headers={"Host": "attacker.example:8700"}).status_code == 400
    assert client.get("/healthz", headers={"Host": "collector.example.com:8700"}).status_code == 200
    spool.close()
    assert not list(settings.spool_dir.glob("*.seg"))
