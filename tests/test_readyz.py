"""/readyz on every HTTP process: 200 when it can do its job, 503 with the reason when it cannot.

/healthz only says the process answers; it said 200 while the spool disk was full and every
request got 503. /readyz says that."""

from __future__ import annotations

import errno
import os

from collector.app import create_app
from collector.registry import SiteRegistry
from infra.processes import free_port
from spool import segments as spool_module
from tests.conftest import register


def test_collector_ready_then_not_ready_while_its_spool_disk_is_full(client, settings, registry, domain,
                                                                     monkeypatch):
    assert client.get("/readyz").status_code == 200
    key = register(settings, registry, domain)
    real_write = os.write

    def full_disk(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(spool_module.os, "write", full_disk)
    event = {"domain": domain, "url": f"https://{domain}/", "type": "pageview"}
    assert client.post("/collect", json=event, query_string={"site": key}).status_code == 503
    assert client.get("/healthz").status_code == 200  # alive ...
    ready = client.get("/readyz")  # ... but not ready
    assert ready.status_code == 503 and ready.json["error"]["code"] == "not_ready"
    assert "space" in ready.json["error"]["message"] and ready.headers["Retry-After"] == "30"
    monkeypatch.setattr(spool_module.os, "write", real_write)
    assert client.post("/collect", json=event, query_string={"site": key}).status_code == 202


def test_collector_not_ready_with_a_tiny_disk_or_no_registry(settings, spool, monkeypatch):
    class Tiny:
        f_bavail, f_frsize = 10, 4096

    monkeypatch.setattr(spool_module.os, "statvfs", lambda _path: Tiny())
    reg = SiteRegistry(lambda: (_ for _ in ()).throw(OSError("down")), None).start(background=False)
    resp = create_app(settings, spool, start_sealer=False, registry=reg).test_client().get("/readyz")
    assert resp.status_code == 503
    problems = resp.json["error"]["problems"]
    assert any("nearly full" in p for p in problems) and any("registry" in p for p in problems)


def test_api_ready_then_not_ready_without_postgresql(make_settings):
    import dataclasses

    from psycopg_pool import ConnectionPool

    from api.app import create_app as create_api
    from oltp.queries import RollupReader
    from tally.roots import build_api

    app = build_api(make_settings())
    try:
        assert app.test_client().get("/readyz").json == {"status": "ready"}
        dead = ConnectionPool(f"postgresql://postgres@127.0.0.1:{free_port()}/postgres", min_size=0, max_size=1,
                              open=True,
                              kwargs={"connect_timeout": 1})
        backends = dataclasses.replace(app.extensions["tally_backends"], rollups=RollupReader(dead))
        down = create_api(app.config["TALLY"], backends).test_client().get("/readyz")
        assert down.status_code == 503 and down.json["error"]["code"] == "not_ready"
        assert "PostgreSQL" in down.json["error"]["message"]
        dead.close()
    finally:
        app.extensions["tally_backends"].rollups.pool.close()


def test_analyst_server_ready(analyst_url):
    import json
    import urllib.request

    with urllib.request.urlopen(f"{analyst_url}/readyz", timeout=10) as resp:
        assert resp.status == 200 and json.loads(resp.read())["status"] == "ready"
