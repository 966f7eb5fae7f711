"""The pixel signing rule, as a customer's server would follow it without our code."""

from __future__ import annotations

import hashlib
import hmac
import time
import urllib.parse

import pytest

from core.pixel import PixelError, canonical, check_shape, signed_query, verify

SECRET = "sk_test-secret-for-pixels-0123456789"


def readme_example(secret: str, params: dict[str, str]) -> str:
    # The five lines in README.md, verbatim in spirit: sort, RFC 3986-encode, HMAC-SHA256, hex.
    canon = urllib.parse.urlencode(sorted(params.items()), quote_via=urllib.parse.quote, safe="")
    sig = hmac.new(secret.encode(), canon.encode(), hashlib.sha256).hexdigest()
    return f"{canon}&sig={sig}"


def parse(query: str) -> dict[str, str]:
    return check_shape(urllib.parse.parse_qsl(query, keep_blank_values=True, strict_parsing=True))


PARAMS = {"site": "pk_abc", "domain": "example.com", "url": "https://example.com/news letter?a=1&b=ü",
          "type": "pageview", "exp": str(int(time.time()) + 3600)}


def test_our_signer_and_the_readme_rule_agree_and_verify():
    query = signed_query(SECRET, PARAMS)
    assert query == readme_example(SECRET, PARAMS)
    params = parse(query)
    assert params["url"] == PARAMS["url"]
    verify(SECRET, params, time.time())
    assert canonical(params) == query.rsplit("&sig=", 1)[0]


@pytest.mark.parametrize("tamper, field", [
    (lambda q: q.replace("news%20letter", "news%20letteX"), "sig"),
    (lambda q: q.replace("type=pageview", "type=impression"), "sig"),
    (lambda q: q.replace("&sig=", "&sig=0"), "sig"),
    (lambda q: q + "&value=10", "sig"),
])
def test_any_tampering_breaks_the_signature(tamper, field):
    params = parse(tamper(signed_query(SECRET, PARAMS)))
    with pytest.raises(PixelError) as err:
        verify(SECRET, params, time.time())
    assert err.value.field == field


def test_wrong_secret_and_expiry():
    params = parse(signed_query(SECRET, PARAMS))
    with pytest.raises(PixelError, match="sig"):
        verify("sk_another-secret", params, time.time())
    expired = parse(signed_query(SECRET, {**PARAMS, "exp": str(int(time.time()) - 1)}))
    with pytest.raises(PixelError, match="expired"):
        verify(SECRET, expired, time.time())


@pytest.mark.parametrize("query, field", [
    ("site=a&domain=b&url=c&exp=1&sig=x&sig=y", "sig"),
    ("site=a&domain=b&url=c&exp=1&sig=x&admin=1", "admin"),
    ("site=a&domain=b&url=c&sig=x", "exp"),
    ("site=a&domain=b&url=c&exp=&sig=x", "exp"),
    ("site=a&domain=b&url=c&exp=١٢٣&sig=x", "exp"),
    ("site=a&domain=b&url=c&exp=1e9&sig=x", "exp"),
    ("domain=b&url=c&exp=1&sig=x", "site"),
    ("site=a&domain=b&url=c&exp=1", "sig"),
])
def test_malformed_pixels_name_the_parameter(query, field):
    with pytest.raises(PixelError) as err:
        parse(query)
    assert err.value.field == field
