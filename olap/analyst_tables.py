"""Dimension tables and column comments for analysts: ClickHouse migration 3 (docs/adr/0052-analyst-dimensions.md).

- `<db>.sites`: one row per registered (or since removed) domain, copied from PostgreSQL by
  olap/sites_sync.py. ReplacingMergeTree keyed by domain with `synced_at` as the version: a change is
  one insert of the changed rows, so a reader never sees the table half written, and the newest row
  per domain wins (the analyst endpoint reads with `final = 1`; elsewhere use FINAL).
- `<db>.countries`: every ISO 3166-1 country (olap/countries.py), filled here; re-applying inserts
  only codes not there yet.
- A COMMENT on every column of every analyst table (`<db>.events` too): its meaning, when it is
  NULL and an example, in the form "Meaning. NULL when ... (or Never NULL). Example: value".
  docs/analysts.md is generated from them (olap/docs.py), and DESCRIBE shows them.
"""

from __future__ import annotations

from olap.countries import countries

TABLE_COMMENTS = {
    "events": "One row per event the collector accepted (pageviews and impressions of every site). Duplicates of "
              "one event share `hash` and are hidden when read with FINAL (the analyst endpoint always does).",
    "sites": "The registered sites (domains) and the customer account each belongs to, copied from the sites "
             "registry within seconds of a change. Removed sites stay, with removed_at set.",
    "countries": "ISO 3166-1 countries with their continent (pycountry and GeoNames), for joins on "
                 "events.country.",
}

EVENTS_COMMENTS = {
    "hash": "The event's identity (32 hex digits): resends of one event share it, and duplicates are hidden when "
            "read with FINAL. Never NULL. Example: 3f2a9c0d4b5e6f708192a3b4c5d6e7f8",
    "domain": "The site the event was sent for (a registered domain, lower case); joins sites.domain. Never NULL. "
              "Example: shop.example.com",
    "url": "The page URL as stored under the site's URL rule: query cut to the utm_* tags and the site's kept "
           "parameters, no fragment (kept whole for raw_urls sites). Never NULL. "
           "Example: https://shop.example.com/cart?utm_source=news",
    "ts": "When the event happened by the sender's clock, in UTC to the millisecond (the collector refuses times "
          "too far in the past or future). Never NULL. Example: 2026-12-06T09:09:17.292Z",
    "received_at": "When the collector received the event (its clock, UTC). Never NULL. "
                   "Example: 2026-12-06T09:09:17.480Z",
    "type": "What happened: pageview or impression. Never NULL. Example: impression",
    "value": "The number sent with the event (revenue, a price; up to 6 decimal places). NULL when none was sent. "
             "Example: 10.5",
    "referrer": "The referring URL (a referrer from another site is cut to its origin unless the site keeps raw "
                "URLs). NULL when none was sent. Example: https://www.google.com",
    "user_agent": "The sender's User-Agent header (at most 512 characters). NULL when the request had none. "
                  "Example: Mozilla/5.0 (X11; Linux x86_64) Firefox/133.0",
    "browser": "The browser family parsed from user_agent. NULL without a user agent. Example: Chrome",
    "os": "The operating system family parsed from user_agent. NULL without a user agent. Example: Windows",
    "device": "bot, tablet, mobile or desktop, from user_agent. NULL without a user agent. Example: mobile",
    "country": "The ISO 3166-1 alpha-2 country of the sender's address; joins countries.code. NULL for private or "
               "unknown addresses and for events stored before countries were filled. Example: DE",
    "visitor": "An anonymous visitor key (32 hex digits) from the address and user agent under a secret key; it "
               "changes every UTC day and per domain, so count distinct values within one day and domain. NULL "
               "when the address was unknown. Example: 9b1c2d3e4f5a69788796a5b4c3d2e1f0",
    "page": "The URL's path plus the site's own kept query parameters; starts with /. NULL for events stored "
            "before pages were derived. Example: /cart",
    "source": "Where the visit came from: utm_source, else the referrer's known family or registrable domain. "
              "NULL for direct visits, self-referrals and events stored before sources were derived. "
              "Example: Google",
    "utm_medium": "The URL's utm_medium tag (decoded, trimmed). NULL when the URL has none. Example: email",
    "utm_campaign": "The URL's utm_campaign tag (decoded, trimmed). NULL when the URL has none. "
                    "Example: spring_sale",
}

# (name, type, comment)
SITES_COLUMNS = (
    ("domain", "String", "The site's domain, as events.domain holds it. Never NULL. Example: shop.example.com"),
    ("account", "Nullable(String)", "The customer the site belongs to (`tally sites add|update --account`). "
                                    "NULL when none was given. Example: Acme Inc."),
    ("tz", "LowCardinality(String)", "The site's IANA time zone (its daily rollups and dashboard days). "
                                     "Never NULL. Example: Europe/Berlin"),
    ("keep_query", "Array(String)", "Query parameters the site's URLs keep besides the utm_* tags (empty: "
                                    "none). Never NULL. Example: ['q','page']"),
    ("raw_urls", "Bool", "Whether the site stores URLs and referrers as sent. Never NULL. Example: false"),
    ("registered_at", "DateTime64(3, 'UTC')", "When the site was registered (UTC). Never NULL. "
                                              "Example: 2026-11-02T10:00:00.000Z"),
    ("updated_at", "DateTime64(3, 'UTC')", "When the site's registration last changed (UTC). Never NULL. "
                                           "Example: 2026-12-01T08:30:00.000Z"),
    ("removed_at", "Nullable(DateTime64(3, 'UTC'))", "When the site was seen removed from the registry (UTC); its "
                                                    "events stay. NULL while it is registered. "
                                                    "Example: 2026-12-05T16:00:02.114Z"),
    ("synced_at", "DateTime64(3, 'UTC')", "When this row was copied from the registry (UTC); the newest row per "
                                          "domain wins. Never NULL. Example: 2026-12-06T09:09:19.020Z"),
)

COUNTRIES_COLUMNS = (
    ("code", "String", "ISO 3166-1 alpha-2 code (plus XK, Kosovo); joins events.country. Never NULL. Example: DE"),
    ("alpha3", "String", "ISO 3166-1 alpha-3 code. Never NULL. Example: DEU"),
    ("name", "String", "The common English name. Never NULL. Example: Germany"),
    ("official_name", "Nullable(String)", "The official English name. NULL when ISO gives none besides name. "
                                          "Example: Federal Republic of Germany"),
    ("continent_code", "LowCardinality(String)", "GeoNames' continent code: AF, AN, AS, EU, NA, OC or SA. "
                                                 "Never NULL. Example: EU"),
    ("continent", "LowCardinality(String)", "The continent: Africa, Antarctica, Asia, Europe, North America, "
                                            "Oceania or South America. Never NULL. Example: Europe"),
)


def quote(text: str) -> str:
    """A ClickHouse string literal of `text`."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _create(db: str, table: str, columns: tuple[tuple[str, str, str], ...], engine: str) -> str:
    body = ",\n            ".join(f"{name} {kind} COMMENT {quote(comment)}" for name, kind, comment in columns)
    return (f"CREATE TABLE IF NOT EXISTS {db}.{table} (\n            {body}\n        ) ENGINE = {engine}"
            f" COMMENT {quote(TABLE_COMMENTS[table])}")


def _fill_countries(db: str) -> str:
    """Insert the countries not in the table yet (idempotent: a re-applied migration adds nothing)."""
    structure = ", ".join(f"{name} {kind}" for name, kind, _ in COUNTRIES_COLUMNS)
    rows = ", ".join(
        f"({quote(c.code)}, {quote(c.alpha3)}, {quote(c.name)}, "
        f"{'NULL' if c.official_name is None else quote(c.official_name)}, {quote(c.continent_code)}, "
        f"{quote(c.continent)})" for c in countries())
    names = ", ".join(name for name, _, _ in COUNTRIES_COLUMNS)  # by name: migration 6 adds columns after these
    return (f"INSERT INTO {db}.countries ({names}) SELECT * FROM values({quote(structure)}, {rows}) "
            f"WHERE code NOT IN (SELECT code FROM {db}.countries)")


REGION_COLUMNS = (
    ("region", "LowCardinality(Nullable(String))", "The UN M49 region: Africa, Americas, Asia, Europe or Oceania. "
                                                   "NULL where M49 gives none (Antarctica). Example: Europe"),
    ("subregion", "LowCardinality(Nullable(String))", "The UN M49 subregion. NULL where M49 gives none. "
                                                      "Example: Western Europe"),
)


def _literal(value: str | None) -> str:
    return "NULL" if value is None else quote(value)


def migration_6(db: str) -> list[str]:
    """tally.countries gains the UN M49 region and subregion (countryinfo; ADR 52): the columns, then every row
    again whole (a ReplacingMergeTree by code: the new rows replace the old, merged at once). Idempotent."""
    columns = COUNTRIES_COLUMNS + REGION_COLUMNS
    added = ", ".join(f"ADD COLUMN IF NOT EXISTS {name} {kind} COMMENT {quote(text)}"
                      for name, kind, text in REGION_COLUMNS)
    structure = ", ".join(f"{name} {kind}" for name, kind, _ in columns)
    rows = ", ".join("(" + ", ".join(_literal(v) for v in (c.code, c.alpha3, c.name, c.official_name,
                                                            c.continent_code, c.continent, c.region, c.subregion))
                     + ")" for c in countries())
    names = ", ".join(name for name, _, _ in columns)
    return [f"ALTER TABLE {db}.countries {added}",
            f"INSERT INTO {db}.countries ({names}) SELECT * FROM values({quote(structure)}, {rows})",
            f"OPTIMIZE TABLE {db}.countries FINAL"]


def migration_3(db: str) -> list[str]:
    """Sites and countries tables, countries filled, comments on every events column."""
    comments = ", ".join(f"COMMENT COLUMN IF EXISTS {name} {quote(text)}" for name, text in EVENTS_COMMENTS.items())
    return [
        _create(db, "sites", SITES_COLUMNS, "ReplacingMergeTree(synced_at) ORDER BY domain"),
        _create(db, "countries", COUNTRIES_COLUMNS, "ReplacingMergeTree ORDER BY code"),
        _fill_countries(db),
        f"ALTER TABLE {db}.events {comments}",
        f"ALTER TABLE {db}.events MODIFY COMMENT {quote(TABLE_COMMENTS['events'])}",
    ]
