"""One frozen, validated settings object, built once per process from TALLY_* variables.

Nothing else in the code base reads the environment: each process builds a
`Settings` in its composition root (the CLI) and passes it down.

Each setting is written once (ADR 41): its `Settings` field is declared with `setting(variable, default,
parser, doc)` (the parsers and the record are in core/settings_parse.py), and everything else is derived
from those fields: `Settings.from_env`, the allowlist of
known variables (`KNOWN_VARIABLES`) and the README's settings table (`core/settings_doc.py`,
`scripts/gen-settings-table`). Fields are read in declaration order, so a `Derived` default may use the
fields above it; the first bad variable in that order is the one reported.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# ConfigError is defined with the parsers that raise it and re-exported here, where callers import it.
from core.settings_parse import (
    Bootstrap,
    Derived,
    Dsn,
    Hosts,
    Integer,
    LogDir,
    Match,
    MaxMindFile,
    Network,
    Networks,
    Number,
    PathValue,
    Setting,
    Text,
    earlier,
    fields_table,
    plain_number,
    resolve_path,
    setting,
)
from core.settings_parse import ConfigError as ConfigError

# The two consumer groups: every process that reads or writes their offsets names them from here.
ROLLUP_GROUP = "tally-rollups"
LOADER_GROUP = "tally-loader"

# Analyst SQL is answered by the clock (ADR 32). The analyst server's watchdog cancels a query this long
# after TALLY_SQL_MAX_EXECUTION_S (ClickHouse's own limit fires first when it can); a query waits up to
# SQL_SLOT_WAIT_S for a slot; the API's relay waits for both plus a margin. All from the one setting.
SQL_WATCHDOG_GRACE_S = 1.0
SQL_SLOT_WAIT_S = 2.0
SQL_RELAY_MARGIN_S = 2.0
# A query cancelled at its deadline that is still computing inside ClickHouse this long after the deadline
# makes the analyst server exit for its supervisor to restart (TALLY_SQL_OVERRUN_GRACE_S; default
# max(SQL_OVERRUN_GRACE_MIN_S, TALLY_SQL_MAX_EXECUTION_S)). ADR 32.
SQL_OVERRUN_GRACE_MIN_S = 30.0

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")


# --- Derived defaults: each from settings declared above it. ---

def _under_home(name: str) -> Derived[Path]:
    return Derived(lambda v: resolve_path(earlier(v, "home", Path) / name), f"`$TALLY_HOME/{name}`")


_HOME = Derived(lambda v: resolve_path(Path(".tally")), "`./.tally`")
_CHDB = Derived(lambda v: f"chdb://{(earlier(v, 'home', Path) / 'chdb').resolve()}", "`chdb://$TALLY_HOME/chdb`")
_ANALYST_URL = Derived(lambda v: f"http://127.0.0.1:{earlier(v, 'analyst_port', int)}",
                       "`http://127.0.0.1:$TALLY_ANALYST_PORT`")


def _default_hosts(values: Mapping[str, object]) -> tuple[str, ...]:
    """The loopback names and the bound host (unless it is a wildcard address)."""
    names = [*LOOPBACK_HOSTS, earlier(values, "bind_host", str).lower()]
    return tuple(dict.fromkeys(h for h in names if h not in ("0.0.0.0", "::")))


def _default_dedup_days(values: Mapping[str, object]) -> int:
    """The collector's max past age in whole days, rounded up, plus 2 (more if the spool keeps shipped
    segments, which a recreated topic gets again, longer than a day)."""
    past_age_s = earlier(values, "max_past_age_s", int)
    retain_s = earlier(values, "spool_retain_s", float)
    return max(-(-past_age_s // 86_400) + 2, -int(-(past_age_s + retain_s + 86_400) // 86_400))


def _default_overrun_grace(values: Mapping[str, object]) -> float:
    return max(SQL_OVERRUN_GRACE_MIN_S, float(earlier(values, "sql_max_execution_s", int)))


_ONE_RATE = r"\d+\s*(/|per)\s*\d*\s*(second|minute|hour|day)s?"
_RATE_RE = _ONE_RATE + r"(\s*[;,]\s*" + _ONE_RATE + r")*"


@dataclass(frozen=True, slots=True)
class Settings:
    """Every setting the platform reads, one field each. Build with `Settings.from_env`.

    The order of the fields is the order they are read in and the order of the README's table."""

    home: Path = setting(
        "TALLY_HOME", _HOME, PathValue(), "embedded state, logs, default spool and chDB directory")
    # Kafka. `None` means "start the embedded broker" (only `tally up` does that).
    kafka_bootstrap: tuple[str, ...] | None = setting(
        "TALLY_KAFKA_BOOTSTRAP", None, Bootstrap(), "the Kafka brokers", shown="embedded broker")
    topic: str = setting(
        "TALLY_KAFKA_TOPIC", "tally.events",
        Match(r"[A-Za-z0-9._-]{1,249}", "must be 1-249 characters of letters, digits, '.', '_' or '-'",
              "1-249 letters, digits, `.`, `_`, `-`"),
        "the raw-events topic")
    partitions: int = setting(
        "TALLY_KAFKA_PARTITIONS", 4, Integer(1, 1024), "partitions of the raw-events topic")
    replication_factor: int = setting(
        "TALLY_KAFKA_REPLICATION_FACTOR", 1, Integer(1, 7),
        "replicas of the raw-events topic (the default suits the one embedded broker); set `3` in production: "
        "with 2+ replicas the topic gets `min.insync.replicas=2`")
    record_events: int = setting(
        "TALLY_KAFKA_RECORD_EVENTS", 250, Integer(1, 10_000),
        "events per Kafka record at most: the shipper packs a partition's events into batched records "
        "(docs/record-format.md, ADR 55); `1` still writes the batched format, one event each")
    record_bytes: int = setting(
        "TALLY_KAFKA_RECORD_BYTES", 256 * 1024, Integer(1024, 768 * 1024, size=True),
        "bytes of events per Kafka record at most (below the producer's 1 MiB request limit and the "
        "broker's message size); an event bigger than this travels alone")
    broker_recycle_records: int = setting(
        "TALLY_BROKER_RECYCLE_RECORDS", 10_000, Integer(0, 15_000),
        "`tally up` only: restart the embedded broker (memory storage) once a partition holds this many "
        "records and both consumer groups are near the end; its fetches slow with every batch it holds, "
        "and the spool ships again what it held (ADR 64). `0` = never; at most 15,000, so that the recycle "
        "forced at 3 times it comes before tansu's fetches stop (~60,000 batches)")
    # PostgreSQL. `None` means "start embedded PostgreSQL under home". May carry a password: never printed.
    pg_dsn: str | None = setting(
        "TALLY_PG_DSN", None, Dsn(("postgresql", "postgres")), "PostgreSQL, `postgresql://user@host:port/db`",
        shown="embedded PostgreSQL", secret=True)
    clickhouse_dsn: str = setting(
        "TALLY_CLICKHOUSE_DSN", _CHDB, Dsn(("chdb", "http", "https")),
        "ClickHouse: `chdb:///abs/dir` (embedded chDB) or `http(s)://user:pw@host:port[/database]`", secret=True)
    clickhouse_database: str = setting(
        "TALLY_CLICKHOUSE_DATABASE", "tally",
        Match(r"[A-Za-z_][A-Za-z0-9_]{0,63}", "must be an identifier (letters, digits, '_')", "an identifier"),
        "the ClickHouse database holding `events`")
    clickhouse_cluster: str | None = setting(
        "TALLY_CLICKHOUSE_CLUSTER", None,
        Match(r"[A-Za-z_][A-Za-z0-9_]{0,63}", "must be the name of a cluster in the servers' remote_servers, an "
              "identifier (letters, digits, '_')", "an identifier: a cluster in `remote_servers`"),
        "ClickHouse migrations create the schema on this cluster: `events` a Distributed table over a "
        "ReplicatedReplacingMergeTree `events_local` sharded by event hash, the other tables replicated to every "
        "node (docs/clickhouse-cluster.md, ADR 57); needs a ClickHouse server DSN",
        shown="none (one node)")
    spool_dir: Path = setting(
        "TALLY_SPOOL_DIR", _under_home("spool"), PathValue(), "local spool of the collector and its shipper")
    secret: str | None = setting(
        "TALLY_SECRET", None, Text(16),
        "keys the anonymised visitor hash, dashboard sessions and the API's key for the analyst server "
        "(the same on every host)", shown="generated into `$TALLY_HOME/secret` by `up`", secret=True)
    bind_host: str = setting(
        "TALLY_BIND_HOST", "127.0.0.1", Text(1), "the address the collector and the API listen on")
    collector_port: int = setting("TALLY_COLLECTOR_PORT", 8700, Integer(0, 65535), "the collector's port")
    api_port: int = setting("TALLY_API_PORT", 8701, Integer(0, 65535), "the API's port")
    clickhouse_http_port: int = setting(
        "TALLY_CLICKHOUSE_HTTP_PORT", 8703, Integer(0, 65535),
        "the ClickHouse-compatible HTTP endpoint's port (analyst SQL for ClickHouse tools, on `TALLY_BIND_HOST`)")
    # The analyst-SQL process (owns ClickHouse/chDB access; the API forwards to it).
    analyst_port: int = setting(
        "TALLY_ANALYST_PORT", 8702, Integer(0, 65535), "the analyst server's port when `TALLY_ANALYST_URL` is unset")
    analyst_url: str = setting(
        "TALLY_ANALYST_URL", _ANALYST_URL, Dsn(("http", "https")),
        "the analyst server listens on this URL's host and port; the API calls it there")
    # Host header allowlist for both HTTP apps (DNS rebinding); names compared without the port.
    allowed_hosts: tuple[str, ...] = setting(
        "TALLY_ALLOWED_HOSTS", Derived(_default_hosts, "`localhost,127.0.0.1,::1` and the bound host"), Hosts(),
        "Host names both HTTP servers answer to (others get `400`, against DNS rebinding); `.example.com` "
        "allows every subdomain")
    collector_workers: int = setting(
        "TALLY_COLLECTOR_WORKERS", 2, Integer(1, 64),
        "granian worker processes of the collector (each enforces 1/N of every site's rate limit)")
    collector_hosts: int = setting(
        "TALLY_COLLECTOR_HOSTS", 1, Integer(1, 1024),
        "collector hosts behind the load balancer sharing every site's rate limit: each host enforces 1/H of it "
        "(each worker 1/(H x TALLY_COLLECTOR_WORKERS)), so a site's limit is its total; set the same H on every "
        "collector host (`tally sites show` prints the shares; ADR 60)")
    collector_interface: str = setting(
        "TALLY_COLLECTOR_INTERFACE", "rsgi", Match(r"rsgi|wsgi", "must be rsgi or wsgi", "`rsgi` or `wsgi`"),
        "how granian serves the collector: `rsgi` (`POST /collect` natively async, the other routes through a "
        "WSGI bridge) or `wsgi` (all Flask); same answers either way (ADR 25)")
    # Collector: per-site default rate and burst, unless the site sets its own; an address's share (ADR 29).
    site_rate_per_s: float = setting(
        "TALLY_SITE_RATE_PER_S", 1000.0, Number(0.01, 1e7),
        "events per second per site, in total across its `TALLY_COLLECTOR_HOSTS` collector hosts, unless the site "
        "sets `--rate`")
    site_burst: int = setting(
        "TALLY_SITE_BURST", 20_000, Integer(1, 100_000_000),
        "burst (events) per site, in total across its `TALLY_COLLECTOR_HOSTS` collector hosts, unless the site "
        "sets `--burst`")
    site_address_share: float = setting(
        "TALLY_SITE_ADDRESS_SHARE", 0.1, Number(0.01, 1.0),
        "the share of a site's limit one client address (an IPv6 /56) may use, with or without an `Origin`, and "
        "the most of its refusals that count on the site's status per window; `1`: no per-address share (ADR 29)")
    # Collector: who the client is behind a proxy, and its country (ADR 44).
    trusted_proxies: tuple[Network, ...] = setting(
        "TALLY_TRUSTED_PROXIES", (), Networks(),
        "proxies whose `X-Forwarded-For` the collector believes: from a peer in these networks the client is the "
        "rightmost forwarded address outside them; from any other peer the header is ignored (ADR 44)",
        shown="none (the socket peer is the client)")
    geoip_db: Path | None = setting(
        "TALLY_GEOIP_DB", None, MaxMindFile(),
        "a MaxMind DB file (GeoLite2 / GeoIP2 Country or City, DB-IP Lite Country) the collector takes countries "
        "from, instead of its embedded registry data; checked at startup (ADR 44)",
        shown="none (the embedded `iptocc` data)")
    pixel_max_ttl_s: int = setting(
        "TALLY_PIXEL_MAX_TTL_S", 7 * 86_400, Integer(60, 366 * 86_400),
        "how far ahead a signed pixel URL's `exp` may be; further is `400 invalid_pixel`, and "
        "`sign-pixel --ttl` refuses more (ADR 31)", shown="`604800` (7 days)")
    registry_refresh_s: float = setting(
        "TALLY_REGISTRY_REFRESH_S", 2.0, Number(0.1, 3600.0),
        "how often each collector worker reloads the sites registry from PostgreSQL, and the loader copies it to "
        "ClickHouse's `tally.sites` for analysts")
    max_body_bytes: int = setting(
        "TALLY_MAX_BODY_BYTES", 256 * 1024, Integer(1024, 64 * 1024 * 1024, size=True),
        "the largest request body the collector reads")
    max_batch_events: int = setting(
        "TALLY_MAX_BATCH_EVENTS", 500, Integer(1, 100_000), "the most events in one `POST /collect` batch")
    max_future_skew_s: int = setting(
        "TALLY_MAX_FUTURE_SKEW_S", 300, Integer(0, 86_400), "how far in the future an event's `ts` may be")
    max_past_age_s: int = setting(
        "TALLY_MAX_PAST_AGE_S", 7 * 86_400, Integer(60, 400 * 86_400),
        "how far in the past an event's `ts` may be", shown="`604800` (7 days)")
    spool_segment_bytes: int = setting(
        "TALLY_SPOOL_SEGMENT_BYTES", 4 * 1024 * 1024, Integer(4096, 1 << 30, size=True),
        "a spool segment is sealed for shipping at this size, or at `TALLY_SPOOL_SEGMENT_AGE_S`")
    spool_segment_age_s: float = setting(
        "TALLY_SPOOL_SEGMENT_AGE_S", 1.0, Number(0.05, 3600.0),
        "a spool segment is sealed for shipping at this age (seconds), or at `TALLY_SPOOL_SEGMENT_BYTES` (its "
        "acknowledged lines ship before that, as they arrive: ADR 56)")
    # Shipped spool segments are kept (spool/shipped/) until every consumer group stored them. ADR 16.
    spool_retain_s: float = setting(
        "TALLY_SPOOL_RETAIN_S", 3600.0, Number(0.0, 30 * 86_400.0),
        "shipped segments stay in `spool/shipped/` until both groups stored offsets past them (the rollup "
        "group's in PostgreSQL, the loader's in ClickHouse, asked of the analyst server with chDB); a group the "
        "shipper cannot ask is covered for this many seconds after the last ship instead; re-shipped if the "
        "topic is recreated (ADR 16, 28)")
    spool_retain_bytes: int = setting(
        "TALLY_SPOOL_RETAIN_BYTES", 1 << 30, Integer(0, 1 << 44, size=True),
        "cap on `spool/shipped/`; over it the oldest are dropped even if not yet confirmed, with an error in "
        "the shipper log (`0` = no cap)")
    spool_reserve_bytes: int = setting(
        "TALLY_SPOOL_RESERVE_BYTES", 64 << 20, Integer(0, 1 << 40, size=True),
        "free space the collector leaves on the spool's filesystem for the shipper (at most an eighth of the "
        "filesystem): an append that would eat into it gets `503 spool_full` with `Retry-After`, and the "
        "collector accepts again by itself once the shipper has shipped and the stores have caught up (ADR 28)")
    # Retention per rollup tier, the ClickHouse raw-event TTL and the seen_events dedup window. ADR 18.
    retention_15m_days: int = setting(
        "TALLY_RETENTION_15M_DAYS", 90, Integer(0, 100_000),
        "days the 15-minute rollup tier is kept, dropped by whole partitions (`0` = forever; a finer tier may "
        "not outlive a coarser one); see [Retention](#retention)")
    retention_1h_days: int = setting(
        "TALLY_RETENTION_1H_DAYS", 730, Integer(0, 100_000), "days the hourly rollup tier is kept (`0` = forever)")
    retention_1d_days: int = setting(
        "TALLY_RETENTION_1D_DAYS", 0, Integer(0, 100_000), "days the daily rollup tier is kept (`0` = forever)")
    dedup_window_days: int = setting(
        "TALLY_DEDUP_WINDOW_DAYS", Derived(_default_dedup_days,
                                           "max past age in days, rounded up, + 2; more if the spool retains "
                                           "longer than a day ({value})"),
        Integer(1, 10_000),
        "days event hashes are remembered against duplicates; must cover `TALLY_MAX_PAST_AGE_S` + "
        "`TALLY_SPOOL_RETAIN_S` + 1 day")
    raw_retention_days: int = setting(
        "TALLY_RAW_RETENTION_DAYS", 400, Integer(0, 100_000),
        "TTL of raw events in ClickHouse (`0` = none), applied at start-up and by `tally migrate`")
    # Per-token API limit, in the `limits` library's notation.
    api_rate_limit: str = setting(
        "TALLY_API_RATE_LIMIT", "1200/minute;100/second",
        Match(_RATE_RE, "must look like '1200/minute' or '100/second;5000/hour'", "`limits` notation"),
        "per API token (per client address without a valid token), per API process; `;` between limits")
    # The API's HTTP server (tally/wsgi_server.py, ADR 35).
    api_max_connections: int = setting(
        "TALLY_API_MAX_CONNECTIONS", 2000, Integer(16, 1_000_000),
        "open connections to one API process in all; above this or `TALLY_API_MAX_CONNECTIONS_PER_CLIENT`, the "
        "least recently active connection without a request running is closed to make room, so idle sockets "
        "never lock clients out (ADR 35)")
    api_max_connections_per_client: int = setting(
        "TALLY_API_MAX_CONNECTIONS_PER_CLIENT", 64, Integer(0, 1_000_000),
        "open connections to one API process from one client address (an IPv6 /56, as the collector counts "
        "clients; `0` = no per-address bound: set it behind a reverse proxy). At most a quarter of the API's "
        "16 threads (4) run requests of one address at once; its further requests wait on their connections, "
        "in order, and are not refused (`0` turns this off too)")
    api_idle_timeout_s: int = setting(
        "TALLY_API_IDLE_TIMEOUT_S", 15, Integer(1, 3600),
        "the API closes a connection silent this long between requests")
    api_request_timeout_s: int = setting(
        "TALLY_API_REQUEST_TIMEOUT_S", 15, Integer(1, 3600),
        "the API closes a connection whose request (headers and body) has not fully arrived this long after "
        "its first byte (slowloris); it also bounds a client that stops reading its answer: a connection "
        "whose socket has taken no byte of it for that long is reset, and the request's thread is freed")
    cli_token: str | None = setting(
        "TALLY_TOKEN", None, Text(16), "the API token CLI commands such as `tally sql` send",
        shown="`$TALLY_HOME/admin-token`", secret=True)
    # Analyst SQL (ADR 32).
    sql_max_execution_s: int = setting(
        "TALLY_SQL_MAX_EXECUTION_S", 30, Integer(1, 3600),
        "analyst time limit per query, enforced by the clock: answered at most "
        f"{plain_number(SQL_WATCHDOG_GRACE_S)} s past it, and the API's relay to the analyst server gives up "
        f"{plain_number(SQL_SLOT_WAIT_S)} + (limit + {plain_number(SQL_WATCHDOG_GRACE_S)}) + "
        f"{plain_number(SQL_RELAY_MARGIN_S)} s after sending (ADR 32)")
    sql_max_memory_bytes: int = setting(
        "TALLY_SQL_MAX_MEMORY_BYTES", 512 << 20, Integer(1 << 20, 1 << 40, size=True),
        "analyst memory limit per query (GROUP BY and ORDER BY spill to disk past half of it)")
    sql_max_result_rows: int = setting(
        "TALLY_SQL_MAX_RESULT_ROWS", 10_000, Integer(1, 10_000_000), "analyst result rows per query")
    sql_max_result_bytes: int = setting(
        "TALLY_SQL_MAX_RESULT_BYTES", 64 << 20, Integer(1024, 1 << 34, size=True),
        "analyst result size per query (encoded bytes)")
    sql_max_concurrent: int = setting(
        "TALLY_SQL_MAX_CONCURRENT", 2, Integer(1, 64),
        "analyst queries running at once (each with its own ClickHouse client); the next waits "
        f"{plain_number(SQL_SLOT_WAIT_S)} s, then `429`")
    sql_max_threads: int = setting(
        "TALLY_SQL_MAX_THREADS", 1, Integer(1, 256), "ClickHouse threads per analyst query")
    sql_overrun_grace_s: float = setting(
        "TALLY_SQL_OVERRUN_GRACE_S",
        Derived(_default_overrun_grace, f"max({plain_number(SQL_OVERRUN_GRACE_MIN_S)}, `TALLY_SQL_MAX_EXECUTION_S`)"),
        Number(0.1, 86_400.0),
        "how long a query cancelled at its deadline may still compute inside ClickHouse before the analyst "
        "server logs it at CRITICAL and exits with code 75 to be restarted (ADR 32)")
    consumer_session_timeout_ms: int = setting(
        "TALLY_CONSUMER_SESSION_TIMEOUT_MS", 6000, Integer(1000, 300_000), "consumer-group session timeout")
    consumer_write_interval_ms: int = setting(
        "TALLY_CONSUMER_WRITE_INTERVAL_MS", 0, Integer(0, 10_000),
        "the rollup worker and the loader start a store write at most this often per consumer loop (a full batch "
        "goes at once): what arrives meanwhile joins the next write, so a busy pipeline pays each write's fixed "
        "cost (a commit; a ClickHouse part and its merges) less often, and a record may wait this long more "
        "before it is visible. `0` = write as soon as the last write is done, for the freshest answers (ADR 65)")
    rollup_consumers: int = setting(
        "TALLY_ROLLUP_CONSUMERS", 2, Integer(1, 16),
        "consumer loops in one rollup worker (members of its group, each with its own PostgreSQL writer; "
        "partitions are shared among them, so more than the topic's partitions leaves some idle); see ADR 27")
    dimension_cap: int = setting(
        "TALLY_DIMENSION_CAP", 1000, Integer(1, 1_000_000),
        "distinct values kept per domain, dimension (page, source, country, device, browser, os) and local day; "
        "later new values are counted as `(other)`, and the site's ingestion status says so (ADR 46)")
    # Process logs (core/logs.py).
    log_format: str = setting(
        "TALLY_LOG_FORMAT", "json", Match(r"json|text", "must be json or text", "`json` or `text`"),
        "`json` (one object per line) or `text`, for each process's log; see [Logs](#logs)")
    log_dir: Path | None = setting(
        "TALLY_LOG_DIR", _under_home("logs"), LogDir(),
        "where each process writes `<command>.log` (dir 0700, files 0600); `-` = stderr, no file")
    log_max_bytes: int = setting(
        "TALLY_LOG_MAX_BYTES", 50 * 1024 * 1024, Integer(4096, 1 << 40, size=True),
        "a log is rotated at this size into `.1` ... `.N`")
    log_backups: int = setting(
        "TALLY_LOG_BACKUPS", 5, Integer(1, 1000), "how many rotated logs (`N`) are kept")
    metrics_allowed_nets: tuple[object, ...] = setting(  # ipaddress.IPv4Network | IPv6Network
        "TALLY_METRICS_ALLOWED_NETS", (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128")),
        Networks(),
        "client networks that may read `/metrics` on the collector and the API, without a token; others get "
        "`403 metrics_forbidden` (ADR 21; see [Metrics](#metrics))")
    reconcile_interval_s: float = setting(
        "TALLY_RECONCILE_INTERVAL_S", 900.0, Number(0.0, 7 * 86_400.0),
        "how often the analyst server reconciles the last 3 settled hours of both stores (`0` = never); "
        "see [Reconcile and rebuild](#reconcile-and-rebuild)")
    supervisor_backoff_s: float = setting(
        "TALLY_SUPERVISOR_BACKOFF_S", 0.5, Number(0.01, 60.0),
        "`tally up` restarts a process that died after this many seconds, doubled with each crash in a row up "
        "to 60 s, and back to this once it stayed up a minute (ADR 33)")
    raw: Mapping[str, str] = field(default_factory=dict, repr=False, compare=False)  # every TALLY_* given

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        """Build and validate settings; raises ConfigError naming the first bad variable."""
        values: dict[str, Any] = {}
        for name, spec in SETTINGS.items():
            values[name] = spec.read(env, values)
        raw = {k: v for k, v in env.items() if k.startswith("TALLY_")}
        settings = cls(**values, raw=raw)
        unknown = sorted(set(raw) - KNOWN_VARIABLES)
        if unknown:
            raise ConfigError(unknown[0], "unknown setting (typo?); known settings are listed in README.md")
        _check_retention(settings)
        return settings

    def with_overrides(self, **changes: Any) -> Settings:
        """A copy with some fields replaced (used by `tally up` once embedded servers are up)."""
        return dataclasses.replace(self, **changes)

    @property
    def sql_deadline_s(self) -> float:
        """When the analyst server's watchdog cancels a running analyst query (seconds after it got its slot)."""
        return self.sql_max_execution_s + SQL_WATCHDOG_GRACE_S

    @property
    def sql_relay_timeout_s(self) -> float:
        """How long the API waits for the analyst server's answer: the slot wait, the deadline and a margin."""
        return SQL_SLOT_WAIT_S + self.sql_deadline_s + SQL_RELAY_MARGIN_S


# The table, field name -> Setting, in reading order; and the allowlist of variables derived from it.
SETTINGS: Mapping[str, Setting[Any]] = fields_table(Settings)
KNOWN_VARIABLES = frozenset(spec.variable for spec in SETTINGS.values())


def _check_retention(s: Settings) -> None:
    """Cross-setting rules (ADR 18); raises ConfigError naming the variable to change.

    The dedup window must cover the max accepted past age plus a day (a late duplicate must still
    find its twin in seen_events), plus how long the spool keeps shipped segments (ADR 16), and a finer
    tier may not be kept longer than a coarser one unless the coarser one is kept forever (0).
    """
    if s.dedup_window_days * 86_400 < s.max_past_age_s + 86_400:
        raise ConfigError("TALLY_DEDUP_WINDOW_DAYS",
                          f"{s.dedup_window_days} days does not cover TALLY_MAX_PAST_AGE_S "
                          f"({s.max_past_age_s} s) plus one day; a late duplicate could be counted twice")
    if s.dedup_window_days * 86_400 < s.max_past_age_s + s.spool_retain_s + 86_400:
        raise ConfigError("TALLY_DEDUP_WINDOW_DAYS",
                          f"{s.dedup_window_days} days does not cover TALLY_MAX_PAST_AGE_S ({s.max_past_age_s} s)"
                          f" + TALLY_SPOOL_RETAIN_S ({s.spool_retain_s:g} s) plus one day; an event the spool"
                          " ships again to a recreated topic could be counted twice")
    tiers = [("TALLY_RETENTION_15M_DAYS", s.retention_15m_days),
             ("TALLY_RETENTION_1H_DAYS", s.retention_1h_days),
             ("TALLY_RETENTION_1D_DAYS", s.retention_1d_days)]
    for i, (fine_name, fine) in enumerate(tiers):
        for coarse_name, coarse in tiers[i + 1:]:
            if coarse and (fine == 0 or fine > coarse):
                kept = f"{fine} days" if fine else "forever"
                raise ConfigError(fine_name, f"{kept} exceeds {coarse_name} ({coarse} days); "
                                  "a finer tier cannot be kept longer than a coarser one")
