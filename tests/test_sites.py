"""The sites registry (oltp/sites.py) against the session's real PostgreSQL, and `tally sites` as a user runs it
(in this process, tests/cli_inproc.py; as a subprocess where the process itself matters)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid

import psycopg
import pytest

from oltp import sites
from oltp.schema import ensure_schema
from oltp.sites import SiteError
from tests.cli_inproc import run_tally


@pytest.fixture()
def dsn(servers) -> str:
    return servers.pg_dsn


def test_add_get_list_rotate_remove(dsn, domain):
    site = sites.add(dsn, domain.upper() + ".", tz="Europe/Berlin",
                     origins=["https://Example.com:443/", "http://localhost:3000", "https://example.com"],
                     rate_per_s=50, burst=500)
    assert site.domain == domain  # normalised
    assert site.tz == "Europe/Berlin"
    assert site.origins == ("https://example.com", "http://localhost:3000")  # normalised, deduplicated
    assert re.fullmatch(r"pk_[A-Za-z0-9_-]{22}", site.site_key)
    assert re.fullmatch(r"sk_[A-Za-z0-9_-]{43}", site.secret)
    assert (site.rate_per_s, site.burst, site.respect_dnt) == (50.0, 500, False)
    assert site.secret not in repr(site)

    assert sites.get(dsn, domain) == site
    listed = {s.domain: s for s in sites.list(dsn)}
    assert listed[domain].site_key == site.site_key
    assert "secret" not in listed[domain].public_dict()

    new = sites.rotate_secret(dsn, domain)
    assert new != site.secret and re.fullmatch(r"sk_[A-Za-z0-9_-]{43}", new)
    again = sites.get(dsn, domain)
    assert again.secret == new and again.site_key == site.site_key and again.updated_at > site.updated_at

    sites.remove(dsn, domain)
    assert sites.get(dsn, domain) is None
    assert domain not in {s.domain for s in sites.load_all(dsn)}


def test_defaults_and_unique_keys(dsn):
    a, b = (sites.add(dsn, f"s{uuid.uuid4().hex[:8]}.example.org") for _ in range(2))
    assert a.tz == "UTC" and a.origins == () and a.rate_per_s is None and a.burst is None
    assert a.site_key != b.site_key and a.secret != b.secret


@pytest.mark.parametrize("kwargs, code", [
    ({"tz": "Mars/Olympus"}, "invalid_tz"),
    ({"tz": "../../etc/passwd"}, "invalid_tz"),
    ({"tz": ""}, "invalid_tz"),
    ({"origins": ["ftp://example.com"]}, "invalid_origin"),
    ({"origins": ["https://example.com/path"]}, "invalid_origin"),
    ({"origins": ["example.com"]}, "invalid_origin"),
    ({"origins": ["https://user:pw@example.com"]}, "invalid_origin"),
    ({"origins": ["https://example.com:99999"]}, "invalid_origin"),
    ({"origins": ["https://exa mple.com"]}, "invalid_origin"),
    ({"rate_per_s": 0}, "invalid_rate"),
    ({"rate_per_s": float("nan")}, "invalid_rate"),
    ({"burst": 0}, "invalid_burst"),
])
def test_bad_input_is_refused_and_writes_nothing(dsn, domain, kwargs, code):
    with pytest.raises(SiteError) as info:
        sites.add(dsn, domain, **kwargs)
    assert info.value.code == code and info.value.message
    assert sites.get(dsn, domain) is None


def test_bad_domain_duplicate_and_unknown(dsn, domain):
    with pytest.raises(SiteError) as info:
        sites.add(dsn, "not a domain")
    assert info.value.code == "invalid_domain"
    sites.add(dsn, domain)
    with pytest.raises(SiteError) as info:
        sites.add(dsn, domain.upper())
    assert info.value.code == "duplicate_domain"
    other = f"x{uuid.uuid4().hex[:8]}.example.com"
    for call in (sites.rotate_secret, sites.remove):
        with pytest.raises(SiteError) as info:
            call(dsn, other)
        assert info.value.code == "unknown_domain"


def test_schema_is_idempotent(dsn):
    ensure_schema(dsn)
    ensure_schema(dsn)
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT to_regclass('sites')").fetchone()[0] == "sites"


# --- the CLI, as a user runs it ------------------------------------------------------------------

def tally(dsn: str, home, *args: str) -> subprocess.CompletedProcess[str]:
    """`tally sites *args` in this process (tests/cli_inproc.py); the tests below that need a real process
    (no configuration at all, the DSN from a running `tally up`) use subprocess.run."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TALLY_")}
    env.update(TALLY_PG_DSN=dsn, TALLY_HOME=str(home))
    return run_tally(["sites", *args], env)


def test_cli_add_json_list_rotate_remove(dsn, domain, tmp_path):
    out = tally(dsn, tmp_path, "add", domain, "--tz", "Asia/Kathmandu", "--origin", "https://example.com",
                "--origin", "http://localhost:8080", "--rate", "5", "--burst", "50", "--json")
    assert out.returncode == 0, out.stderr
    body = json.loads(out.stdout)
    key_fields = [k for k in body if re.search(r"(site.?)?key$", k)]
    assert key_fields == ["site_key"]  # a black-box check finds the key by this pattern
    assert body["domain"] == domain and body["tz"] == "Asia/Kathmandu"
    assert body["origins"] == ["https://example.com", "http://localhost:8080"]
    assert (body["rate_per_s"], body["burst"]) == (5.0, 50)
    assert re.fullmatch(r"pk_[A-Za-z0-9_-]{22}", body["site_key"])
    assert re.fullmatch(r"sk_[A-Za-z0-9_-]{43}", body["secret"])
    assert f'data-site="{body["site_key"]}"' in body["tag"] and "/tag.js" in body["tag"]
    assert sites.get(dsn, domain).secret == body["secret"]

    listed = tally(dsn, tmp_path, "list", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = {r["domain"]: r for r in json.loads(listed.stdout)}
    assert rows[domain]["site_key"] == body["site_key"]
    assert body["secret"] not in listed.stdout and "secret" not in rows[domain]
    text = tally(dsn, tmp_path, "list")
    assert domain in text.stdout and body["secret"] not in text.stdout

    rotated = tally(dsn, tmp_path, "rotate-secret", domain)
    assert rotated.returncode == 0, rotated.stderr
    (new,) = re.findall(r"sk_[A-Za-z0-9_-]{43}", rotated.stdout)
    assert new != body["secret"] and sites.get(dsn, domain).secret == new

    removed = tally(dsn, tmp_path, "remove", domain)
    assert removed.returncode == 0, removed.stderr
    assert sites.get(dsn, domain) is None


def test_cli_add_prints_key_secret_and_tag(dsn, domain, tmp_path):
    out = tally(dsn, tmp_path, "add", domain)
    assert out.returncode == 0, out.stderr
    site = sites.get(dsn, domain)
    assert site.site_key in out.stdout and site.secret in out.stdout
    assert f'<script defer src="http://127.0.0.1:8700/tag.js" data-site="{site.site_key}"></script>' in out.stdout
    assert f"/collect?site={site.site_key}" in out.stdout


def test_cli_show_tag_prints_the_tag_with_data_domain_and_the_url_rule(dsn, domain, tmp_path):
    assert tally(dsn, tmp_path, "add", domain, "--keep-query", "ref").returncode == 0
    out = tally(dsn, tmp_path, "show", domain, "--tag")
    assert out.returncode == 0, out.stderr
    key = sites.get(dsn, domain).site_key
    assert out.stdout == (f'<script defer src="http://127.0.0.1:8700/tag.js" data-site="{key}" data-keep-query="ref"'
                          f' data-domain="{domain}"></script>\n')
    missing = tally(dsn, tmp_path, "show", "nowhere-" + domain, "--tag")
    assert missing.returncode == 1 and "not registered" in missing.stderr and not missing.stdout


@pytest.mark.parametrize("args, message", [
    (("add", "{d}", "--tz", "Nowhere/Land"), "time zone"),
    (("add", "{d}", "--origin", "ftp://x.example.com"), "origin"),
    (("add", "{d}", "--rate", "0"), "rate"),
    (("add", "not_a domain"), "not a valid domain"),
    (("rotate-secret", "{d}"), "not registered"),
    (("remove", "{d}"), "not registered"),
])
def test_cli_refusals_exit_non_zero_with_a_message(dsn, domain, tmp_path, args, message):
    out = tally(dsn, tmp_path, *(a.format(d=domain) for a in args))
    assert out.returncode == 1
    assert message in out.stderr and "Traceback" not in out.stderr
    assert sites.get(dsn, domain) is None


def test_cli_url_rule_add_update_list(dsn, domain, tmp_path):
    """`--keep-query` / `--raw-urls` on add, `tally sites update` to change them (issue 15 item 11); the
    printed tag carries the rule, so the tag keeps what the collector keeps."""
    out = tally(dsn, tmp_path, "add", domain, "--keep-query", "ref, lang", "--json")
    assert out.returncode == 0, out.stderr
    body = json.loads(out.stdout)
    assert (body["keep_query"], body["raw_urls"]) == (["ref", "lang"], False)
    assert 'data-keep-query="ref,lang"></script>' in body["tag"]
    assert sites.get(dsn, domain).url_rule.page(f"https://{domain}/?lang=de&x=1") == f"https://{domain}/?lang=de"
    raw = tally(dsn, tmp_path, "update", domain, "--raw-urls")
    assert raw.returncode == 0, raw.stderr
    assert "stored as sent" in raw.stdout and 'data-raw-urls="true"' in raw.stdout
    site = sites.get(dsn, domain)
    assert (site.keep_query, site.raw_urls) == (("ref", "lang"), True)
    listed = tally(dsn, tmp_path, "list")
    assert [line for line in listed.stdout.splitlines() if line.startswith(domain)][0].endswith("\traw")
    clean = tally(dsn, tmp_path, "update", domain, "--clean-urls", "--keep-query", "", "--json")
    assert clean.returncode == 0, clean.stderr
    assert json.loads(clean.stdout)["keep_query"] == [] and json.loads(clean.stdout)["raw_urls"] is False
    for args, words in ((("update", domain), "nothing to change"), (("update", domain, "--keep-query", "a b"),
                        "--keep-query"), (("update", "nobody-" + domain, "--raw-urls"), "not registered"),
                        (("update", domain, "--raw-urls", "--clean-urls"), "not allowed with")):
        out = tally(dsn, tmp_path, *args)
        assert out.returncode != 0 and words in out.stderr and "Traceback" not in out.stderr, (args, out.stderr)
    assert sites.get(dsn, domain).url_rule.keep == frozenset(("utm_source", "utm_medium", "utm_campaign",
                                                              "utm_term", "utm_content"))


def test_cli_update_changes_a_sites_rate_limit(dsn, domain, tmp_path):
    """A site fed from its own servers raises its own limit without a new key (one address may use a tenth
    of it, ADR 29); before, only `add` took --rate / --burst."""
    key = sites.add(dsn, domain).site_key
    out = tally(dsn, tmp_path, "update", domain, "--rate", "5000", "--burst", "100000", "--json")
    assert out.returncode == 0, out.stderr
    assert (json.loads(out.stdout)["rate_per_s"], json.loads(out.stdout)["burst"]) == (5000.0, 100000)
    text = tally(dsn, tmp_path, "update", domain, "--burst", "50000")
    assert text.returncode == 0 and "5000 events/s, burst 50000" in text.stdout, text.stderr
    site = sites.get(dsn, domain)
    assert (site.rate_per_s, site.burst, site.site_key) == (5000.0, 50000, key)
    for args, words in ((("--rate", "0"), "rate"), (("--burst", "0"), "burst")):
        bad = tally(dsn, tmp_path, "update", domain, *args)
        # a bad value: exit 2 (ADR 40; issue 17 item 5 made `update` follow it), an unknown domain: 1
        assert bad.returncode == 2 and words in bad.stderr and "Traceback" not in bad.stderr, bad.stderr
    assert tally(dsn, tmp_path, "update", "nobody-" + domain, "--rate", "5").returncode == 1


def test_cli_duplicate_domain(dsn, domain, tmp_path):
    assert tally(dsn, tmp_path, "add", domain).returncode == 0
    out = tally(dsn, tmp_path, "add", domain)
    assert out.returncode == 1 and "already registered" in out.stderr


def test_cli_without_postgres_says_so(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("TALLY_")}
    env.update(TALLY_HOME=str(tmp_path))  # no TALLY_PG_DSN and no running `tally up`
    out = subprocess.run([sys.executable, "-m", "tally.cli", "sites", "list"], env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2 and "TALLY_PG_DSN" in out.stderr
    dead = tally("postgresql://postgres@127.0.0.1:1/postgres", tmp_path, "list")
    assert dead.returncode == 1 and "cannot reach PostgreSQL" in dead.stderr


def test_cli_uses_a_running_tally_up(dsn, domain, tmp_path):
    """From a second terminal: no TALLY_PG_DSN, the DSN comes from $TALLY_HOME/run/stack.json."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "stack.json").write_text(json.dumps({"pg_dsn": dsn, "collector_url": "http://127.0.0.1:9999"}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("TALLY_")}
    env.update(TALLY_HOME=str(tmp_path))
    out = subprocess.run([sys.executable, "-m", "tally.cli", "sites", "add", domain, "--json"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["tag"].startswith('<script defer src="http://127.0.0.1:9999/tag.js"')


# --- `tally sites update`: origins, time zone, rate, account; the key and secret stay (issue 17 item 5) -----

def test_cli_update_origins_tz_rate_account_keeps_key_and_secret(dsn, domain, tmp_path):
    before = sites.add(dsn, domain, tz="UTC", origins=["https://a.example"])
    out = tally(dsn, tmp_path, "update", domain, "--add-origin", "http://localhost:8000", "--add-origin",
                "https://B.example:443/", "--remove-origin", "https://a.example", "--tz", "Europe/Berlin",
                "--rate", "7", "--account", " Acme Inc. ", "--json")
    assert out.returncode == 0, out.stderr
    body = json.loads(out.stdout)
    assert body["origins"] == ["http://localhost:8000", "https://b.example"]
    assert (body["tz"], body["rate_per_s"], body["account"]) == ("Europe/Berlin", 7.0, "Acme Inc.")
    assert body["site_key"] == before.site_key and "secret" not in body and before.secret not in out.stdout
    assert body["rebuild"]["tiers"] == ["1d"] and body["rebuild"]["unaffected"] == ["15m", "1h"]
    command = body["rebuild"]["command"]
    assert command.startswith("tally rebuild --from ") and command.endswith(f"--domain {domain}")
    after = sites.get(dsn, domain)
    assert (after.site_key, after.secret) == (before.site_key, before.secret)
    assert after.origins == ("http://localhost:8000", "https://b.example") and after.account == "Acme Inc."

    text = tally(dsn, tmp_path, "update", domain, "--tz", "Asia/Kathmandu")
    assert text.returncode == 0, text.stderr
    assert "Europe/Berlin -> Asia/Kathmandu" in text.stdout and "daily tier (1d)" in text.stdout
    assert "tally rebuild --from" in text.stdout and "15m and 1h" in text.stdout
    same = tally(dsn, tmp_path, "update", domain, "--tz", "Asia/Kathmandu", "--json")
    assert json.loads(same.stdout)["rebuild"] is None  # the zone did not change: nothing to rebuild
    cleared = tally(dsn, tmp_path, "update", domain, "--account", "", "--json")
    assert cleared.returncode == 0 and json.loads(cleared.stdout)["account"] is None
    final = sites.get(dsn, domain)
    assert (final.site_key, final.secret, final.tz) == (before.site_key, before.secret, "Asia/Kathmandu")


@pytest.mark.parametrize("args, code, words", [
    (("--remove-origin", "https://never.example"), 1, "no origin https://never.example to remove"),
    (("--add-origin", "ftp://x.example"), 2, "is not an origin"),
    (("--remove-origin", "https://a.example/path"), 2, "is not an origin"),
    (("--tz", "Mars/Olympus"), 2, "time zone"),
    (("--rate", "0"), 2, "rate"),
    (("--burst", "0"), 2, "burst"),
    (("--account", "a\tb"), 2, "account"),
    (("--account", "x" * 101), 2, "account"),
    ((), 2, "nothing to change"),
])
def test_cli_update_refusals_change_nothing(dsn, domain, tmp_path, args, code, words):
    """Bad values exit 2, what is not there exits 1 (ADR 40); nothing is written, not even the valid parts."""
    before = sites.add(dsn, domain, origins=["https://a.example"], account="Acme")
    out = tally(dsn, tmp_path, "update", domain, *(("--add-origin", "https://ok.example", *args) if args else ()))
    assert out.returncode == code and words in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert sites.get(dsn, domain) == before


def test_cli_update_unknown_domain_exits_1(dsn, domain, tmp_path):
    out = tally(dsn, tmp_path, "update", "nobody-" + domain, "--add-origin", "https://a.example")
    assert out.returncode == 1 and "not registered" in out.stderr and "Traceback" not in out.stderr
    bad = tally(dsn, tmp_path, "update", "not_a domain", "--tz", "UTC")
    assert bad.returncode == 2 and "not a valid domain" in bad.stderr


def test_cli_add_and_list_show_the_account(dsn, domain, tmp_path):
    out = tally(dsn, tmp_path, "add", domain, "--account", "Acme Inc.", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["account"] == "Acme Inc." and sites.get(dsn, domain).account == "Acme Inc."
    rows = {r["domain"]: r for r in json.loads(tally(dsn, tmp_path, "list", "--json").stdout)}
    assert rows[domain]["account"] == "Acme Inc."
    line = [x for x in tally(dsn, tmp_path, "list").stdout.splitlines() if x.startswith(domain)][0]
    assert line.split("\t")[1] == "Acme Inc."
    bad = tally(dsn, tmp_path, "add", "x" + domain, "--account", "a\nb")
    assert bad.returncode == 1 and "account" in bad.stderr and sites.get(dsn, "x" + domain) is None


def test_site_account_survives_the_collectors_disk_copy(dsn, domain):
    site = sites.add(dsn, domain, account="Acme")
    assert sites.Site.from_dict(site.to_dict()) == site
    old_copy = {k: v for k, v in site.to_dict().items() if k != "account"}  # written before the column existed
    assert sites.Site.from_dict(old_copy).account is None
