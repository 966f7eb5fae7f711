"""What the collector accepts from browsers (docs/adr/0015-browser-edge.md): text/plain bodies, CORS by
the sites registry, the tag script, and the strictness that keeps 2xx == stored by both consumers.

Real PostgreSQL for the registry, a real spool on disk, Flask's test client.
"""

from __future__ import annotations

import gzip
import hashlib
import uuid
from pathlib import Path

import pytest

from collector.app import create_app
from collector.registry import SiteRegistry
from core.event import decode_stored
from oltp import sites
from tests.conftest import register
from tests.test_collector import spooled

pytestmark = pytest.mark.servers("postgres")

ORIGIN = "https://shop.example.com"
TAG_MIN = Path(__file__).resolve().parent.parent / "collector" / "static" / "tag.min.js"


@pytest.fixture()
def key(settings, registry, domain) -> str:
    """`domain` registered with the page origins ORIGIN and http://localhost:8080."""
    return register(settings, registry, domain, origins=[ORIGIN, "http://localhost:8080"])


def hit(host: str, **extra) -> dict:
    return {"domain": host, "url": f"https://{host}/", "type": "pageview", **extra}


def no_cors(resp) -> bool:
    return not any(h.lower().startswith("access-control-") for h in resp.headers.keys())


def refusals(app) -> dict:
    return app.extensions["tally_refusals"].snapshot()


# --- text/plain bodies ------------------------------------------------------------------------------

@pytest.mark.parametrize("content_type", ["text/plain", "text/plain;charset=UTF-8", "text/plain; charset=utf-8",
                                          "application/json", "application/json; charset=UTF-8"])
def test_text_plain_and_json_bodies_are_the_same_json(client, settings, domain, key, content_type):
    body = f'[{{"domain": "{domain}", "url": "https://{domain}/ü", "type": "pageview"}}]'.encode()
    resp = client.post(f"/collect?site={key}", data=body, headers={"Content-Type": content_type})
    assert resp.status_code == 202, resp.json
    (event,) = spooled(settings)
    assert event.url == f"https://{domain}/ü"


def test_415_names_the_accepted_types_and_non_utf8_is_400(app, client, settings, domain, key):
    resp = client.post(f"/collect?site={key}", data=b"{}", headers={"Content-Type": "multipart/form-data"})
    assert resp.status_code == 415
    assert "application/json" in resp.json["error"]["message"] and "text/plain" in resp.json["error"]["message"]
    assert resp.json["error"]["accepted"] == ["application/json", "text/plain"]
    latin1 = f'{{"domain": "{domain}", "url": "https://{domain}/caf\xe9"}}'.encode("latin-1")
    bad = client.post(f"/collect?site={key}", data=latin1, headers={"Content-Type": "text/plain"})
    assert bad.status_code == 400 and bad.json["error"]["code"] == "invalid_encoding"
    assert bad.json["error"]["field"] == "body"
    assert spooled(settings) == []
    assert refusals(app) == {(None, "unsupported_media_type"): 1, (None, "invalid_encoding"): 1}


# --- CORS -------------------------------------------------------------------------------------------

def preflight(client, key, origin=ORIGIN, method="POST", headers="content-type"):
    h = {"Origin": origin, "Access-Control-Request-Method": method}
    if headers is not None:
        h["Access-Control-Request-Headers"] = headers
    return client.options("/collect", query_string={"site": key} if key else None, headers=h)


def test_preflight_for_a_registered_origin(client, key):
    resp = preflight(client, key)
    assert resp.status_code == 204
    assert resp.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert resp.headers["Access-Control-Allow-Methods"] == "POST"
    assert resp.headers["Access-Control-Allow-Headers"] == "Content-Type"
    assert int(resp.headers["Access-Control-Max-Age"]) == 86400
    assert "Origin" in resp.headers["Vary"]
    assert "Access-Control-Allow-Credentials" not in resp.headers
    # default ports and case are normalised as the registry stores origins
    assert preflight(client, key, "HTTPS://Shop.Example.com:443").headers["Access-Control-Allow-Origin"] == ORIGIN
    assert preflight(client, key, "http://localhost:8080", headers=None).status_code == 204


@pytest.mark.parametrize("origin, site, code", [
    ("https://evil.example.net", "ok", "origin_not_allowed"),
    ("http://shop.example.com", "ok", "origin_not_allowed"),  # another scheme is another origin
    ("https://shop.example.com:8443", "ok", "origin_not_allowed"),
    ("null", "ok", "origin_not_allowed"),
    ("garbage", "ok", "origin_not_allowed"),
    (ORIGIN, "pk_unknown0000000000000000", "origin_not_allowed"),
    (ORIGIN, None, "origin_not_allowed"),
])
def test_preflight_refused_without_cors_headers(client, settings, key, origin, site, code):
    resp = preflight(client, key if site == "ok" else site, origin)
    assert resp.status_code == 403 and resp.json["error"]["code"] == code
    assert resp.json["error"]["origin"] == origin and origin in resp.json["error"]["message"]
    assert no_cors(resp)
    assert spooled(settings) == []


def test_preflight_only_for_post_and_content_type(client, key):
    put = preflight(client, key, method="PUT")
    assert put.status_code == 403 and put.json["error"]["field"] == "Access-Control-Request-Method"
    assert no_cors(put)
    extra = preflight(client, key, headers="content-type, x-secret")
    assert extra.status_code == 403 and extra.json["error"]["header"] == "x-secret" and no_cors(extra)


def test_options_without_origin_is_plain(client, key):
    resp = client.options(f"/collect?site={key}")
    assert resp.status_code == 204 and "POST" in resp.headers["Allow"] and no_cors(resp)


def test_post_from_a_registered_origin_is_readable_on_success_and_on_errors(client, settings, domain, key):
    ok = client.post(f"/collect?site={key}", json=[hit(domain)], headers={"Origin": ORIGIN})
    assert ok.status_code == 202
    assert ok.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert ok.headers["Access-Control-Expose-Headers"] == "Retry-After"
    assert "Origin" in ok.headers["Vary"] and "Access-Control-Allow-Credentials" not in ok.headers
    # the tag reads a 400's index, a 415, a malformed body: all readable by the registered origin
    bad = client.post(f"/collect?site={key}", json=[hit(domain), hit(domain, url="nope")], headers={"Origin": ORIGIN})
    assert bad.status_code == 400 and bad.json["error"]["index"] == 1
    assert bad.headers["Access-Control-Allow-Origin"] == ORIGIN
    for resp in (client.post(f"/collect?site={key}", data=b"{nope", content_type="text/plain",
                             headers={"Origin": ORIGIN}),
                 client.post(f"/collect?site={key}", data=b"{}", content_type="text/html", headers={"Origin": ORIGIN})):
        assert resp.status_code in (400, 415) and resp.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert len(spooled(settings)) == 1


def test_a_429_is_readable_with_its_retry_after(client, settings, registry, domain):
    key = register(settings, registry, domain, origins=[ORIGIN], rate_per_s=1, burst=4)
    for address in ("127.0.0.1", "127.0.0.2", "127.0.0.3", "127.0.0.4"):  # an address may use a tenth of the
        # site's limit, at least one event (ADR 29)
        assert client.post(f"/collect?site={key}", json=[hit(domain)], headers={"Origin": ORIGIN},
                           environ_base={"REMOTE_ADDR": address}).status_code == 202
    resp = client.post(f"/collect?site={key}", json=[hit(domain)], headers={"Origin": ORIGIN},
                       environ_base={"REMOTE_ADDR": "127.0.0.5"})
    assert resp.status_code == 429 and int(resp.headers["Retry-After"]) >= 1
    assert resp.json["error"]["code"] == "rate_limited"
    assert resp.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert resp.headers["Access-Control-Expose-Headers"] == "Retry-After"


@pytest.mark.parametrize("origin", ["https://evil.example.net", "null", "http://shop.example.com", "x"])
def test_post_from_an_unregistered_origin_is_403_and_writes_nothing(app, client, settings, domain, key, origin):
    for body in ([hit(domain)], [hit(domain), hit(domain, url="nope")]):  # even an invalid batch: 403 first
        resp = client.post(f"/collect?site={key}", json=body, headers={"Origin": origin})
        assert resp.status_code == 403, resp.json
        err = resp.json["error"]
        assert err["code"] == "origin_not_allowed" and err["origin"] == origin and err["domain"] == domain
        assert origin in err["message"] and err["index"] == 0
        assert no_cors(resp)
    assert spooled(settings) == []
    assert refusals(app) == {(domain, "origin_not_allowed"): 3}


def test_a_site_without_origins_refuses_every_browser(client, settings, registry, domain):
    key = register(settings, registry, domain)
    resp = client.post(f"/collect?site={key}", json=hit(domain), headers={"Origin": ORIGIN})
    assert resp.status_code == 403 and resp.json["error"]["code"] == "origin_not_allowed" and no_cors(resp)
    assert preflight(client, key).status_code == 403
    assert spooled(settings) == []


def test_unknown_key_from_a_browser_is_401_unreadable(client, settings, key, domain):
    resp = client.post("/collect?site=pk_nope", json=hit(domain), headers={"Origin": ORIGIN})
    assert resp.status_code == 401 and no_cors(resp)
    assert spooled(settings) == []


def test_a_mixed_batch_needs_every_site_to_allow_the_origin(client, settings, registry, domain, key):
    other = f"d{uuid.uuid4().hex[:10]}.example.com"
    other_key = register(settings, registry, other, origins=["https://other.example.org"])
    batch = [hit(domain), hit(other, site=other_key), hit(domain)]
    resp = client.post(f"/collect?site={key}", json=batch, headers={"Origin": ORIGIN})
    assert resp.status_code == 403 and resp.json["error"]["index"] == 1 and resp.json["error"]["domain"] == other
    assert no_cors(resp)
    assert spooled(settings) == []
    third = f"d{uuid.uuid4().hex[:10]}.example.com"
    third_key = register(settings, registry, third, origins=[ORIGIN])
    ok = client.post(f"/collect?site={key}", json=[hit(domain), hit(third, site=third_key)], headers={"Origin": ORIGIN})
    assert ok.status_code == 202 and ok.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert sorted(e.domain for e in spooled(settings)) == sorted([domain, third])
    # no ?site=, every event names its own site, all registered the origin: errors are readable too
    bad = client.post("/collect", json=[hit(domain, site=key), hit(third, site=third_key, url="nope")],
                      headers={"Origin": ORIGIN})
    assert bad.status_code == 400 and bad.json["error"]["index"] == 1
    assert bad.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert len(spooled(settings)) == 2


def test_requests_without_origin_are_unaffected(client, settings, registry, domain):
    key = register(settings, registry, domain)  # no origins at all: servers and curl still send
    resp = client.post(f"/collect?site={key}", json=hit(domain))
    assert resp.status_code == 202 and no_cors(resp)
    assert len(spooled(settings)) == 1


def test_without_a_registry_copy_browsers_get_503_unreadable(settings, spool, domain):
    blind = SiteRegistry(None, None)  # never loaded: PostgreSQL and the disk copy both missing
    client = create_app(settings, spool, start_sealer=False, registry=blind).test_client()
    post = client.post("/collect?site=pk_x", json=hit(domain), headers={"Origin": ORIGIN})
    assert post.status_code == 503 and post.json["error"]["code"] == "registry_unavailable" and no_cors(post)
    pre = preflight(client, "pk_x")
    assert pre.status_code == 503 and no_cors(pre) and int(pre.headers["Retry-After"]) >= 1
    gif = client.get("/i.gif?site=a&domain=b&url=c&exp=1&sig=x")
    assert gif.status_code == 503 and gif.headers["Cache-Control"] == "no-store"
    assert spooled(settings) == []


# --- the tag ----------------------------------------------------------------------------------------

def test_tag_js_gzip_identity_etags_and_304(client):
    raw = TAG_MIN.read_bytes()
    plain = client.get("/tag.js")
    assert plain.status_code == 200 and plain.data == raw
    assert plain.headers["Content-Type"] == "text/javascript; charset=utf-8"
    assert "Content-Encoding" not in plain.headers
    assert plain.headers["Cache-Control"] == "public, max-age=3600"
    assert plain.headers["Vary"] == "Accept-Encoding"
    assert plain.headers["ETag"] == f'"{hashlib.sha256(raw).hexdigest()[:32]}"'

    zipped = client.get("/tag.js", headers={"Accept-Encoding": "gzip, deflate, br"})
    assert zipped.status_code == 200 and zipped.headers["Content-Encoding"] == "gzip"
    assert gzip.decompress(zipped.data) == raw
    assert 200 <= len(zipped.data) <= 3072
    assert int(zipped.headers["Content-Length"]) == len(zipped.data)
    assert zipped.headers["ETag"] != plain.headers["ETag"]  # two representations, two strong ETags
    assert client.get("/tag.js", headers={"Accept-Encoding": "gzip;q=0"}).headers["ETag"] == plain.headers["ETag"]

    for enc, etag in (("gzip", zipped.headers["ETag"]), ("identity", plain.headers["ETag"])):
        again = client.get("/tag.js", headers={"Accept-Encoding": enc, "If-None-Match": f'"x", {etag}'})
        assert again.status_code == 304 and again.data == b"" and again.headers["ETag"] == etag
        assert again.headers["Cache-Control"] == "public, max-age=3600"
    # the other encoding's ETag does not validate this one
    cross = client.get("/tag.js", headers={"Accept-Encoding": "identity", "If-None-Match": zipped.headers["ETag"]})
    assert cross.status_code == 200 and cross.data == raw
    assert client.get("/tag.js", headers={"If-None-Match": "*"}).status_code == 304
    head = client.head("/tag.js", headers={"Accept-Encoding": "gzip"})
    assert head.status_code == 200 and head.headers["ETag"] == zipped.headers["ETag"]


def test_tag_is_package_data():
    text = (Path(__file__).resolve().parent.parent / "pyproject.toml").read_text()
    assert 'collector = ["static/*"]' in text


# --- strictness: what the collector acknowledges, both consumers store ---------------------------------

@pytest.mark.parametrize("extra, field", [
    ({"value": "١٢٣"}, "value"), ({"value": "１"}, "value"), ({"value": "1_000"}, "value"),
    ({"value": " 1"}, "value"), ({"value": "1 "}, "value"), ({"value": "1e3"}, "value"), ({"value": "NaN"}, "value"),
    ({"value": "Infinity"}, "value"), ({"value": "-0"}, "value"), ({"value": "+1"}, "value"),
    ({"value": ".5"}, "value"), ({"value": True}, "value"), ({"value": "0x10"}, "value"),
    ({"ts": "２０２６-01-01T00:00:00+00:00"}, "ts"), ({"ts": "1732000000000"}, "ts"), ({"ts": False}, "ts"),
    ({"domain": "127.0.0.1"}, "domain"), ({"domain": "[::1]"}, "domain"), ({"domain": "10.0.0.1."}, "domain"),
    ({"url": "https://x.example.com/\u0000a"}, "url"), ({"url": "https://x.example.com/\na"}, "url"),
    ({"referrer": "https://x.example.com/\u0085"}, "referrer"),
    ({"referrer": "https://x.example.com/\x7f"}, "referrer"),
])
def test_what_a_store_would_refuse_is_refused_at_the_door(app, client, settings, domain, key, extra, field):
    resp = client.post(f"/collect?site={key}", json=[hit(domain), hit(domain, **extra)])
    assert resp.status_code == 400, resp.json
    assert resp.json["error"]["code"] == "invalid_event"
    assert resp.json["error"]["index"] == 1 and resp.json["error"]["field"] == field
    assert spooled(settings) == []


def test_black_box_arabic_indic_value_is_400(client, settings, domain, key):
    resp = client.post(f"/collect?site={key}", data='{"value":"١٢٣"}'.encode(), content_type="text/plain")
    assert resp.status_code == 400 and spooled(settings) == []


@pytest.mark.parametrize("value, stored", [("123", "123"), ("1.5", "1.5"), ("0.000001", "0.000001"), (2, "2"),
                                           (1.25, "1.25"), ("007", "7")])
def test_plain_numbers_are_still_accepted(client, settings, domain, key, value, stored):
    assert client.post(f"/collect?site={key}", json=hit(domain, value=value)).status_code == 202
    (event,) = spooled(settings)
    assert str(event.value) == stored


@pytest.mark.parametrize("body, field", [
    ('{{"domain": "{d}", "url": "https://{d}/", "url": "https://{d}/b"}}', "url"),
    ('[{{"domain": "{d}", "url": "https://{d}/"}}, {{"domain": "{d}", "url": "https://{d}/", "type": "pageview",'
     ' "type": "impression"}}]', "type"),
    ('{{"domain": "{d}", "url": "https://{d}/", "\\u0075rl": "https://{d}/b"}}', "url"),  # a \\u-escaped repeat
    ('{{"domain": "{d}", "domain": "{d}", "url": "https://{d}/"}}', "domain"),
])
def test_repeated_keys_are_refused(client, settings, domain, key, body, field):
    raw = body.format(d=domain).encode()
    resp = client.post(f"/collect?site={key}", data=raw, content_type="application/json")
    assert resp.status_code == 400, resp.json
    assert resp.json["error"]["code"] == "invalid_event" and resp.json["error"]["field"] == field
    assert "more than once" in resp.json["error"]["message"]
    assert spooled(settings) == []


def test_a_value_that_spells_a_field_name_is_not_a_repeat(client, settings, domain, key):
    # "url" and "type" as a referrer's text or a value: the slow exact check clears them
    body = f'{{"domain": "{domain}", "url": "https://{domain}/", "referrer": "https://{domain}/\\"url\\""}}'
    assert client.post(f"/collect?site={key}", data=body.encode(), content_type="text/plain").status_code == 202
    body = f'{{"domain": "{domain}", "url": "https://{domain}/\\u00e9", "type": "pageview"}}'
    assert client.post(f"/collect?site={key}", data=body.encode(), content_type="text/plain").status_code == 202
    assert len(spooled(settings)) == 2


def test_long_user_agent_fields_are_cut_not_refused(app, client, settings, domain, key, monkeypatch):
    import collector.admission as admission_module

    monkeypatch.setattr(admission_module, "classify_user_agent", lambda ua: ("B" * 300, "O" * 300, "D" * 300))
    ua = "Mozilla/5.0 " + "x" * 2000
    resp = client.post(f"/collect?site={key}", json=hit(domain), headers={"User-Agent": ua})
    assert resp.status_code == 202
    (event,) = spooled(settings)
    assert (len(event.browser), len(event.os), len(event.device), len(event.user_agent)) == (64, 64, 32, 512)
    decode_stored(event.to_json())  # what both workers run: it stores this event


def test_a_real_long_browser_family_is_cut(client, settings, domain, key):
    # ua-parser's CFNetwork rule takes the product name as the family: here 120 characters
    ua = "Z" * 120 + "/1.0 CFNetwork/1.0 Darwin/20"
    from collector.ua import classify_user_agent

    assert len(classify_user_agent(ua)[0]) == 120  # what the stores (64) would refuse
    assert client.post(f"/collect?site={key}", json=hit(domain), headers={"User-Agent": ua}).status_code == 202
    (event,) = spooled(settings)
    assert event.browser == "Z" * 64 and event.os == "iOS"
    assert decode_stored(event.to_json()).browser == "Z" * 64


# --- the real thing: `tally collector` under granian ------------------------------------------------

def test_under_granian_tag_pixel_text_plain_and_cors(servers, settings, tmp_path, domain):
    import json
    import os
    import subprocess
    import sys
    import time
    import urllib.error
    import urllib.request

    from core.pixel import signed_query
    from infra.processes import free_port
    from tests.conftest import SECRET

    site = sites.add(servers.pg_dsn, domain, origins=[ORIGIN])
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TALLY_")}
    env.update(TALLY_HOME=str(tmp_path / "g-home"), TALLY_PG_DSN=servers.pg_dsn, TALLY_SECRET=SECRET,
               TALLY_SPOOL_DIR=str(tmp_path / "g-spool"), TALLY_COLLECTOR_PORT=str(port),
               TALLY_COLLECTOR_WORKERS="1")
    proc = subprocess.Popen([sys.executable, "-m", "tally.cli", "collector"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def call(path: str, method: str = "GET", data: bytes | None = None, **headers: str):
        req = urllib.request.Request(base + path, method=method, data=data, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=5) as resp:
                return resp.status, resp.headers, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.headers, exc.read()

    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if call("/healthz")[0] == 200:
                    break
            except urllib.error.URLError:
                pass
            assert time.monotonic() < deadline and proc.poll() is None, "collector did not start"
            time.sleep(0.2)
        status, headers, body = call("/tag.js", **{"Accept-Encoding": "gzip"})
        assert status == 200 and headers.get("Content-Encoding") == "gzip", (headers, len(body))
        assert 200 <= len(body) <= 3072
        assert gzip.decompress(body) == TAG_MIN.read_bytes()
        assert call("/tag.js", **{"Accept-Encoding": "gzip", "If-None-Match": headers["ETag"]})[0] == 304

        batch = json.dumps([hit(domain)]).encode()
        status, headers, body = call(f"/collect?site={site.site_key}", "POST", batch,
                                     **{"Content-Type": "text/plain;charset=UTF-8", "Origin": ORIGIN})
        assert status == 202, body
        assert headers["Access-Control-Allow-Origin"] == ORIGIN
        status, headers, body = call(f"/collect?site={site.site_key}", "POST", batch,
                                     **{"Content-Type": "text/plain", "Origin": "https://evil.example.net"})
        assert status == 403 and "Access-Control-Allow-Origin" not in headers
        status, headers, _ = call(f"/collect?site={site.site_key}", "OPTIONS", None, Origin=ORIGIN,
                                  **{"Access-Control-Request-Method": "POST",
                                     "Access-Control-Request-Headers": "content-type"})
        assert status == 204 and headers["Access-Control-Allow-Origin"] == ORIGIN

        query = signed_query(site.secret, {"site": site.site_key, "domain": domain, "url": f"https://{domain}/n",
                                           "exp": str(int(time.time()) + 60)})
        status, headers, body = call(f"/i.gif?{query}")
        assert status == 200 and headers["Content-Type"] == "image/gif" and body.startswith(b"GIF89a")
        assert call(f"/i.gif?{query.replace('%2Fn', '%2Fm')}")[0] == 403
    finally:
        proc.terminate()
        proc.wait(timeout=30)
