"""One frozen, validated settings object, built once per process from TALLY_* variables.

Nothing else in the code base reads the environment: each process builds a
`Settings` in its composition root (the CLI) and passes it down.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

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


class ConfigError(ValueError):
    """A configuration value is missing or invalid; the message names the variable."""

    def __init__(self, variable: str, problem: str) -> None:
        super().__init__(f"{variable}: {problem}")
        self.variable = variable
        self.problem = problem


@dataclass(frozen=True, slots=True)
class Settings:
    """Every setting the platform reads. Build with `Settings.from_env`."""

    home: Path
    # Kafka. `None` means "start the embedded broker" (only `tally up` does that).
    kafka_bootstrap: tuple[str, ...] | None
    topic: str
    partitions: int
    replication_factor: int
    # PostgreSQL. `None` means "start embedded PostgreSQL under home".
    pg_dsn: str | None = field(repr=False)  # may carry a password: never printed
    # ClickHouse: chdb:///abs/path or http(s)://host:port[/database]
    clickhouse_dsn: str = field(repr=False)
    clickhouse_database: str
    spool_dir: Path
    secret: str | None = field(repr=False)
    bind_host: str
    collector_port: int
    api_port: int
    collector_workers: int
    max_body_bytes: int
    max_batch_events: int
    max_future_skew_s: int
    max_past_age_s: int
    spool_segment_bytes: int
    spool_segment_age_s: float
    sql_max_execution_s: int
    sql_max_memory_bytes: int
    sql_max_result_rows: int
    sql_max_result_bytes: int
    sql_max_concurrent: int
    sql_max_threads: int
    consumer_session_timeout_ms: int
    rollup_consumers: int  # consumer loops (group members, each with its own PostgreSQL writer) per rollup worker
    # Host header allowlist for both HTTP apps (DNS rebinding); names compared without the port.
    # A leading dot allows every subdomain (".example.com").
    allowed_hosts: tuple[str, ...]
    # Per-token API limit, in the `limits` library's notation ("1200/minute;50/second").
    api_rate_limit: str
    # The analyst-SQL process (owns ClickHouse/chDB access; the API forwards to it).
    analyst_port: int
    analyst_url: str
    # Collector: per-site default rate (events/s) and burst, unless the site sets its own.
    site_rate_per_s: float
    site_burst: int
    # How often the collector refreshes its in-memory copy of the sites registry.
    registry_refresh_s: float
    # The API token CLI commands send (`tally sql`, ...); default: $TALLY_HOME/admin-token.
    cli_token: str | None = field(repr=False)
    # Shipped spool segments are kept (spool/shipped/) until every consumer group stored them; the
    # groups the shipper cannot check (the ClickHouse loader) are covered for this long after the last
    # ship, and retained bytes are capped (0 = no cap). ADR 16.
    spool_retain_s: float
    spool_retain_bytes: int
    # Free space the collector leaves on the spool's filesystem for the shipper's bookkeeping (at most an
    # eighth of the filesystem): appends that would eat into it get 503 spool_full. ADR 28.
    spool_reserve_bytes: int = 64 << 20
    # Retention per rollup tier in days, enforced by dropping whole partitions (0 = kept forever),
    # the ClickHouse raw-event TTL (0 = no TTL) and the seen_events dedup window. ADR 18.
    retention_15m_days: int = 90
    retention_1h_days: int = 730
    retention_1d_days: int = 0
    raw_retention_days: int = 400
    dedup_window_days: int = 9
    # Process logs (core/logs.py): json | text, the directory (None = stderr, TALLY_LOG_DIR=-), rotation.
    log_format: str = "json"
    log_dir: Path | None = None
    log_max_bytes: int = 50 * 1024 * 1024
    log_backups: int = 5
    # Client networks that may read /metrics on the collector and the API without a token (ADR 21).
    metrics_allowed_nets: tuple[object, ...] = ()  # ipaddress.IPv4Network | IPv6Network
    # How often the analyst server reconciles the last settled hours of both stores (0 = never). ADR 20.
    reconcile_interval_s: float = 900.0
    # How granian serves the collector: rsgi (POST /collect natively async) or wsgi. ADR 25.
    collector_interface: str = "rsgi"
    # The API's HTTP server (tally/wsgi_server.py, ADR 35): open connections in all and per
    # client address (0 = no per-address bound, e.g. behind a reverse proxy), idle and request-read timeouts
    # (the request-read one is also the send timeout: an answer the client reads none of for that long is cut).
    api_max_connections: int = 2000
    api_max_connections_per_client: int = 64
    api_idle_timeout_s: int = 15
    api_request_timeout_s: int = 15
    # Collector: the share of a site's limit one client address (an IPv6 /56) may use, Origin or not (ADR 29).
    site_address_share: float = 0.1
    # Signed pixel URLs: how far in the future `exp` may be (ADR 31).
    pixel_max_ttl_s: int = 7 * 86_400
    # How long a query the analyst watchdog cancelled may go on computing after its deadline before the
    # analyst server exits (code 75) to be restarted by its supervisor (ADR 32).
    sql_overrun_grace_s: float = SQL_OVERRUN_GRACE_MIN_S
    raw: Mapping[str, str] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        """Build and validate settings; raises ConfigError naming the first bad variable."""
        r = _Reader(env)
        home = r.path("TALLY_HOME", Path(".tally"))
        ch_default = f"chdb://{(home / 'chdb').resolve()}"
        bind_host = r.text("TALLY_BIND_HOST", "127.0.0.1", min_len=1) or "127.0.0.1"
        analyst_port = r.integer("TALLY_ANALYST_PORT", 8702, 0, 65535)
        sql_max_execution_s = r.integer("TALLY_SQL_MAX_EXECUTION_S", 30, 1, 3600)
        settings = cls(
            home=home,
            kafka_bootstrap=r.bootstrap("TALLY_KAFKA_BOOTSTRAP"),
            topic=r.match("TALLY_KAFKA_TOPIC", "tally.events", r"[A-Za-z0-9._-]{1,249}",
                          "must be 1-249 characters of letters, digits, '.', '_' or '-'"),
            partitions=r.integer("TALLY_KAFKA_PARTITIONS", 4, 1, 1024),
            replication_factor=r.integer("TALLY_KAFKA_REPLICATION_FACTOR", 1, 1, 7),
            pg_dsn=r.dsn("TALLY_PG_DSN", None, ("postgresql", "postgres")),
            clickhouse_dsn=r.dsn("TALLY_CLICKHOUSE_DSN", ch_default, ("chdb", "http", "https"))
            or ch_default,
            clickhouse_database=r.match("TALLY_CLICKHOUSE_DATABASE", "tally", r"[A-Za-z_][A-Za-z0-9_]{0,63}",
                                        "must be an identifier (letters, digits, '_')"),
            spool_dir=r.path("TALLY_SPOOL_DIR", home / "spool"),
            secret=r.text("TALLY_SECRET", None, min_len=16),
            bind_host=bind_host,
            collector_port=r.integer("TALLY_COLLECTOR_PORT", 8700, 0, 65535),
            api_port=r.integer("TALLY_API_PORT", 8701, 0, 65535),
            collector_workers=r.integer("TALLY_COLLECTOR_WORKERS", 2, 1, 64),
            max_body_bytes=r.integer("TALLY_MAX_BODY_BYTES", 256 * 1024, 1024, 64 * 1024 * 1024),
            max_batch_events=r.integer("TALLY_MAX_BATCH_EVENTS", 500, 1, 100_000),
            max_future_skew_s=r.integer("TALLY_MAX_FUTURE_SKEW_S", 300, 0, 86_400),
            max_past_age_s=r.integer("TALLY_MAX_PAST_AGE_S", 7 * 86_400, 60, 400 * 86_400),
            spool_segment_bytes=r.integer("TALLY_SPOOL_SEGMENT_BYTES", 4 * 1024 * 1024, 4096, 1 << 30),
            spool_segment_age_s=r.number("TALLY_SPOOL_SEGMENT_AGE_S", 1.0, 0.05, 3600.0),
            sql_max_execution_s=sql_max_execution_s,
            sql_max_memory_bytes=r.integer("TALLY_SQL_MAX_MEMORY_BYTES", 512 << 20, 1 << 20, 1 << 40),
            sql_max_result_rows=r.integer("TALLY_SQL_MAX_RESULT_ROWS", 10_000, 1, 10_000_000),
            sql_max_result_bytes=r.integer("TALLY_SQL_MAX_RESULT_BYTES", 64 << 20, 1024, 1 << 34),
            sql_max_concurrent=r.integer("TALLY_SQL_MAX_CONCURRENT", 2, 1, 64),
            sql_max_threads=r.integer("TALLY_SQL_MAX_THREADS", 1, 1, 256),
            consumer_session_timeout_ms=r.integer("TALLY_CONSUMER_SESSION_TIMEOUT_MS", 6000, 1000, 300_000),
            rollup_consumers=r.integer("TALLY_ROLLUP_CONSUMERS", 2, 1, 16),
            allowed_hosts=r.hosts("TALLY_ALLOWED_HOSTS", bind_host),
            api_rate_limit=r.match("TALLY_API_RATE_LIMIT", "1200/minute;100/second", _RATE_RE,
                                   "must look like '1200/minute' or '100/second;5000/hour'"),
            analyst_port=analyst_port,
            analyst_url=r.dsn("TALLY_ANALYST_URL", None, ("http", "https")) or f"http://127.0.0.1:{analyst_port}",
            site_rate_per_s=r.number("TALLY_SITE_RATE_PER_S", 1000.0, 0.01, 1e7),
            site_burst=r.integer("TALLY_SITE_BURST", 20_000, 1, 100_000_000),
            registry_refresh_s=r.number("TALLY_REGISTRY_REFRESH_S", 2.0, 0.1, 3600.0),
            cli_token=r.text("TALLY_TOKEN", None, min_len=16),
            spool_retain_s=r.number("TALLY_SPOOL_RETAIN_S", 3600.0, 0.0, 30 * 86_400.0),
            spool_retain_bytes=r.integer("TALLY_SPOOL_RETAIN_BYTES", 1 << 30, 0, 1 << 44),
            spool_reserve_bytes=r.integer("TALLY_SPOOL_RESERVE_BYTES", 64 << 20, 0, 1 << 40),
            retention_15m_days=r.integer("TALLY_RETENTION_15M_DAYS", 90, 0, 100_000),
            retention_1h_days=r.integer("TALLY_RETENTION_1H_DAYS", 730, 0, 100_000),
            retention_1d_days=r.integer("TALLY_RETENTION_1D_DAYS", 0, 0, 100_000),
            raw_retention_days=r.integer("TALLY_RAW_RETENTION_DAYS", 400, 0, 100_000),
            dedup_window_days=r.integer("TALLY_DEDUP_WINDOW_DAYS", _default_dedup_days(env), 1, 10_000),
            log_format=r.match("TALLY_LOG_FORMAT", "json", r"json|text", "must be json or text"),
            log_dir=None if (env.get("TALLY_LOG_DIR") or "").strip() == "-" else r.path("TALLY_LOG_DIR", home / "logs"),
            log_max_bytes=r.integer("TALLY_LOG_MAX_BYTES", 50 * 1024 * 1024, 4096, 1 << 40),
            log_backups=r.integer("TALLY_LOG_BACKUPS", 5, 1, 1000),
            metrics_allowed_nets=r.networks("TALLY_METRICS_ALLOWED_NETS", "127.0.0.0/8,::1/128"),
            reconcile_interval_s=r.number("TALLY_RECONCILE_INTERVAL_S", 900.0, 0.0, 7 * 86_400.0),
            collector_interface=r.match("TALLY_COLLECTOR_INTERFACE", "rsgi", r"rsgi|wsgi", "must be rsgi or wsgi"),
            api_max_connections=r.integer("TALLY_API_MAX_CONNECTIONS", 2000, 16, 1_000_000),
            api_max_connections_per_client=r.integer("TALLY_API_MAX_CONNECTIONS_PER_CLIENT", 64, 0, 1_000_000),
            api_idle_timeout_s=r.integer("TALLY_API_IDLE_TIMEOUT_S", 15, 1, 3600),
            api_request_timeout_s=r.integer("TALLY_API_REQUEST_TIMEOUT_S", 15, 1, 3600),
            site_address_share=r.number("TALLY_SITE_ADDRESS_SHARE", 0.1, 0.01, 1.0),
            pixel_max_ttl_s=r.integer("TALLY_PIXEL_MAX_TTL_S", 7 * 86_400, 60, 366 * 86_400),
            sql_overrun_grace_s=r.number("TALLY_SQL_OVERRUN_GRACE_S",
                                         max(SQL_OVERRUN_GRACE_MIN_S, float(sql_max_execution_s)), 0.1, 86_400.0),
            raw={k: v for k, v in env.items() if k.startswith("TALLY_")},
        )
        unknown = sorted(set(settings.raw) - _KNOWN)
        if unknown:
            raise ConfigError(unknown[0], "unknown setting (typo?); known settings are listed in README.md")
        _check_retention(settings)
        return settings

    def with_overrides(self, **changes: object) -> Settings:
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


_KNOWN = {
    "TALLY_HOME", "TALLY_KAFKA_BOOTSTRAP", "TALLY_KAFKA_TOPIC", "TALLY_KAFKA_PARTITIONS",
    "TALLY_KAFKA_REPLICATION_FACTOR", "TALLY_PG_DSN",
    "TALLY_CLICKHOUSE_DSN", "TALLY_CLICKHOUSE_DATABASE", "TALLY_SPOOL_DIR", "TALLY_SECRET", "TALLY_BIND_HOST",
    "TALLY_COLLECTOR_PORT", "TALLY_API_PORT", "TALLY_COLLECTOR_WORKERS", "TALLY_MAX_BODY_BYTES",
    "TALLY_MAX_BATCH_EVENTS", "TALLY_MAX_FUTURE_SKEW_S", "TALLY_MAX_PAST_AGE_S", "TALLY_SPOOL_SEGMENT_BYTES",
    "TALLY_SPOOL_SEGMENT_AGE_S", "TALLY_SQL_MAX_EXECUTION_S",
    "TALLY_SQL_MAX_MEMORY_BYTES", "TALLY_SQL_MAX_RESULT_ROWS", "TALLY_SQL_MAX_RESULT_BYTES",
    "TALLY_SQL_MAX_CONCURRENT", "TALLY_SQL_MAX_THREADS", "TALLY_SQL_OVERRUN_GRACE_S", "TALLY_CONSUMER_SESSION_TIMEOUT_MS", "TALLY_ROLLUP_CONSUMERS", "TALLY_ALLOWED_HOSTS",
    "TALLY_API_RATE_LIMIT", "TALLY_ANALYST_PORT", "TALLY_ANALYST_URL", "TALLY_SITE_RATE_PER_S",
    "TALLY_SITE_BURST", "TALLY_REGISTRY_REFRESH_S", "TALLY_TOKEN", "TALLY_SPOOL_RETAIN_S",
    "TALLY_SPOOL_RETAIN_BYTES", "TALLY_SPOOL_RESERVE_BYTES", "TALLY_METRICS_ALLOWED_NETS",
    "TALLY_RETENTION_15M_DAYS", "TALLY_RETENTION_1H_DAYS", "TALLY_RETENTION_1D_DAYS",
    "TALLY_RAW_RETENTION_DAYS", "TALLY_DEDUP_WINDOW_DAYS",
    "TALLY_LOG_FORMAT", "TALLY_LOG_DIR", "TALLY_LOG_MAX_BYTES", "TALLY_LOG_BACKUPS",
    "TALLY_RECONCILE_INTERVAL_S", "TALLY_COLLECTOR_INTERFACE",
    "TALLY_API_MAX_CONNECTIONS", "TALLY_API_MAX_CONNECTIONS_PER_CLIENT", "TALLY_API_IDLE_TIMEOUT_S",
    "TALLY_API_REQUEST_TIMEOUT_S",
    "TALLY_SITE_ADDRESS_SHARE", "TALLY_PIXEL_MAX_TTL_S",
}

def _default_dedup_days(env: Mapping[str, str]) -> int:
    """Default dedup window: the collector's max past age in whole days, rounded up, plus 2 (more if
    the spool keeps shipped segments, which a recreated topic gets again, longer than a day)."""
    try:
        past_age_s = int((env.get("TALLY_MAX_PAST_AGE_S") or "").strip() or 7 * 86_400)
        retain_s = float((env.get("TALLY_SPOOL_RETAIN_S") or "").strip() or 3600.0)
    except ValueError:  # reported by the variables' own readers
        past_age_s, retain_s = 7 * 86_400, 3600.0
    past_age_s, retain_s = max(past_age_s, 0), min(max(retain_s, 0.0), 30 * 86_400.0)
    return max(-(-past_age_s // 86_400) + 2, -int(-(past_age_s + retain_s + 86_400) // 86_400))


def _check_retention(s: Settings) -> None:
    """Cross-setting rules (ADR 18); raises ConfigError naming the variable to change.

    The dedup window must cover the max accepted past age plus a day (a late duplicate must still
    find its twin in seen_events), plus how long the spool keeps shipped segments (ADR 16), and a finer tier may not be kept longer than a coarser one
    unless the coarser one is kept forever (0).
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
                raise ConfigError(fine_name, f"{f'{fine} days' if fine else 'forever'} exceeds {coarse_name} ({coarse} days); "
                                  "a finer tier cannot be kept longer than a coarser one")


_RATE_RE = r"\d+\s*(/|per)\s*\d*\s*(second|minute|hour|day)s?(\s*[;,]\s*\d+\s*(/|per)\s*\d*\s*(second|minute|hour|day)s?)*"
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
_HOST_RE = re.compile(r"\.?(?=.{1,253}$)[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?)*")


def _is_ip(text: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


class _Reader:
    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env

    def _get(self, name: str) -> str | None:
        value = self.env.get(name)
        if value is None or value.strip() == "":
            return None
        return value.strip()

    def text(self, name: str, default: str | None, *, min_len: int) -> str | None:
        value = self._get(name)
        if value is None:
            return default
        if len(value) < min_len:
            raise ConfigError(name, f"must be at least {min_len} characters long")
        return value

    def match(self, name: str, default: str, pattern: str, explain: str) -> str:
        value = self._get(name)
        if value is None:
            return default
        if not re.fullmatch(pattern, value):
            raise ConfigError(name, f"{value!r} {explain}")
        return value

    def integer(self, name: str, default: int, lo: int, hi: int) -> int:
        value = self._get(name)
        if value is None:
            return default
        try:
            number = int(value)
        except ValueError:
            raise ConfigError(name, f"{value!r} is not an integer") from None
        if not lo <= number <= hi:
            raise ConfigError(name, f"{number} is out of range [{lo}, {hi}]")
        return number

    def number(self, name: str, default: float, lo: float, hi: float) -> float:
        value = self._get(name)
        if value is None:
            return default
        try:
            number = float(value)
        except ValueError:
            raise ConfigError(name, f"{value!r} is not a number") from None
        if not lo <= number <= hi:
            raise ConfigError(name, f"{number} is out of range [{lo}, {hi}]")
        return number

    def path(self, name: str, default: Path) -> Path:
        value = self._get(name)
        path = Path(value) if value is not None else default
        return path.expanduser().resolve()

    def hosts(self, name: str, bind_host: str) -> tuple[str, ...]:
        """Host names allowed in the Host header; default: the loopback names and the bound host."""
        value = self._get(name)
        if value is None:
            names = [*LOOPBACK_HOSTS, bind_host.lower()]
            return tuple(dict.fromkeys(h for h in names if h not in ("0.0.0.0", "::")))
        hosts = []
        for part in value.split(","):
            host = part.strip().lower().strip("[]")
            if not host:
                continue
            if host == "*":
                raise ConfigError(name, "'*' would allow DNS rebinding; list the host names this server answers to")
            if not (_HOST_RE.fullmatch(host) or _is_ip(host)):
                raise ConfigError(name, f"{part.strip()!r} is not a host name or IP address (no port, no scheme)")
            hosts.append(host)
        if not hosts:
            raise ConfigError(name, "lists no host")
        return tuple(dict.fromkeys(hosts))

    def networks(self, name: str, default: str) -> tuple[object, ...]:
        """Comma-separated IP networks in CIDR notation (a bare address is its /32 or /128)."""
        import ipaddress

        value = self._get(name) or default
        nets = []
        for part in value.split(","):
            if not part.strip():
                continue
            try:
                nets.append(ipaddress.ip_network(part.strip(), strict=False))
            except ValueError:
                raise ConfigError(name, f"{part.strip()[:60]!r} is not an IP network (e.g. 10.0.0.0/8, ::1/128)") from None
        if not nets:
            raise ConfigError(name, "lists no network")
        return tuple(nets)

    def bootstrap(self, name: str) -> tuple[str, ...] | None:
        value = self._get(name)
        if value is None:
            return None
        servers = tuple(part.strip() for part in value.split(",") if part.strip())
        for server in servers:
            host, sep, port = server.rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ConfigError(name, f"{server!r} is not host:port (comma-separate several brokers)")
        if not servers:
            raise ConfigError(name, "lists no broker")
        return servers

    def dsn(self, name: str, default: str | None, schemes: tuple[str, ...]) -> str | None:
        value = self._get(name)
        if value is None:
            return default
        parts = urlsplit(value)
        if parts.scheme not in schemes:
            raise ConfigError(name, f"scheme {parts.scheme or '(none)'!r} is not one of {', '.join(schemes)}")
        if parts.scheme == "chdb":
            if not parts.path.startswith("/") or parts.netloc:
                raise ConfigError(name, "a chDB DSN is chdb:///absolute/path/to/dir")
        elif parts.scheme in ("http", "https", "postgresql", "postgres") and not parts.hostname \
                and "host=" not in parts.query:
            raise ConfigError(name, "names no host")
        try:
            _ = parts.port
        except ValueError:
            raise ConfigError(name, "has an invalid port") from None
        return value
