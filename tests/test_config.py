import subprocess
import sys

import pytest

from core.config import ConfigError, Settings


def test_defaults_are_valid_and_frozen(tmp_path):
    s = Settings.from_env({"TALLY_HOME": str(tmp_path)})
    assert s.home == tmp_path.resolve()
    assert s.spool_dir == tmp_path.resolve() / "spool"
    assert s.clickhouse_dsn == f"chdb://{tmp_path.resolve() / 'chdb'}"
    assert s.kafka_bootstrap is None and s.pg_dsn is None
    with pytest.raises(AttributeError):
        s.topic = "other"  # type: ignore[misc]


def test_valid_production_values():
    s = Settings.from_env({
        "TALLY_KAFKA_BOOTSTRAP": "k1:9092, k2:9093",
        "TALLY_PG_DSN": "postgresql://tally@db.internal:5432/tally",
        "TALLY_CLICKHOUSE_DSN": "https://ch.internal:8443/tally",
        "TALLY_KAFKA_PARTITIONS": "12",
    })
    assert s.kafka_bootstrap == ("k1:9092", "k2:9093")
    assert s.partitions == 12
    assert Settings.from_env({"TALLY_SPOOL_RESERVE_BYTES": "1048576"}).spool_reserve_bytes == 1 << 20
    assert Settings.from_env({}).spool_reserve_bytes == 64 << 20


@pytest.mark.parametrize("variable, value, words", [
    ("TALLY_KAFKA_PARTITIONS", "many", "not an integer"),
    ("TALLY_KAFKA_PARTITIONS", "0", "out of range"),
    ("TALLY_KAFKA_REPLICATION_FACTOR", "0", "out of range"),
    ("TALLY_COLLECTOR_PORT", "70000", "out of range"),
    ("TALLY_KAFKA_BOOTSTRAP", "localhost", "not host:port"),
    ("TALLY_KAFKA_BOOTSTRAP", "host:port", "not host:port"),
    ("TALLY_PG_DSN", "mysql://x@y/z", "scheme 'mysql'"),
    ("TALLY_PG_DSN", "postgresql:///nohost", "names no host"),
    ("TALLY_CLICKHOUSE_DSN", "chdb://relative/dir", "chdb:///absolute"),
    ("TALLY_CLICKHOUSE_DSN", "ftp://x", "scheme 'ftp'"),
    ("TALLY_CLICKHOUSE_DSN", "http://ch:notaport", "invalid port"),
    ("TALLY_KAFKA_TOPIC", "bad topic!", "letters, digits"),
    ("TALLY_SECRET", "short", "at least 16"),
    ("TALLY_SPOOL_SEGMENT_AGE_S", "fast", "not a number"),
    ("TALLY_CLICKHOUSE_DATABASE", "1; DROP", "identifier"),
    ("TALLY_KAFKA_PARTITONS", "4", "unknown setting"),
    ("TALLY_ROLLUP_CONSUMERS", "0", "out of range"),
    ("TALLY_ROLLUP_CONSUMERS", "two", "not an integer"),
    ("TALLY_SPOOL_RESERVE_BYTES", "-1", "out of range"),
    ("TALLY_SPOOL_RESERVE_BYTES", "lots", "not an integer"),
    ("TALLY_SUPERVISOR_BACKOFF_S", "0", "out of range"),
    ("TALLY_SUPERVISOR_BACKOFF_S", "soon", "not a number"),
    ("TALLY_BROKER_RECYCLE_RECORDS", "-1", "out of range"),
    ("TALLY_BROKER_RECYCLE_RECORDS", "15001", "out of range"),
])
def test_bad_values_name_the_variable(variable, value, words):
    with pytest.raises(ConfigError) as info:
        Settings.from_env({variable: value})
    assert info.value.variable == variable
    assert words in str(info.value)
    assert str(info.value).startswith(variable)


def test_cli_fails_at_startup_naming_the_variable(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "TALLY_HOME": str(tmp_path), "TALLY_KAFKA_PARTITIONS": "-3"}
    proc = subprocess.run([sys.executable, "-m", "tally.cli", "rollup-worker"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "TALLY_KAFKA_PARTITIONS" in proc.stderr and "out of range" in proc.stderr


def test_cli_names_missing_required_setting(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "TALLY_HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "tally.cli", "shipper"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "TALLY_KAFKA_BOOTSTRAP" in proc.stderr and "required" in proc.stderr


# --- The contract the one settings table (ADR 41) keeps: every default, derived default and message. ---

DEFAULTS = {
    "kafka_bootstrap": None, "topic": "tally.events", "partitions": 4, "replication_factor": 1, "pg_dsn": None,
    "clickhouse_database": "tally", "clickhouse_cluster": None, "record_events": 250, "record_bytes": 262144,
    "broker_recycle_records": 10_000,
    "secret": None, "bind_host": "127.0.0.1",
    "collector_port": 8700,
    "api_port": 8701, "clickhouse_http_port": 8703, "collector_workers": 2, "max_body_bytes": 262144,
    "collector_hosts": 1,
    "max_batch_events": 500,
    "max_future_skew_s": 300, "max_past_age_s": 604800, "spool_segment_bytes": 4194304,
    "spool_segment_age_s": 1.0, "sql_max_execution_s": 30, "sql_max_memory_bytes": 536870912,
    "sql_max_result_rows": 10000, "sql_max_result_bytes": 67108864, "sql_max_concurrent": 2,
    "sql_max_threads": 1, "consumer_session_timeout_ms": 6000, "consumer_write_interval_ms": 0, "rollup_consumers": 2,
    "allowed_hosts": ("localhost", "127.0.0.1", "::1"), "api_rate_limit": "1200/minute;100/second",
    "analyst_port": 8702, "analyst_url": "http://127.0.0.1:8702", "site_rate_per_s": 1000.0,
    "site_burst": 20000, "registry_refresh_s": 2.0, "cli_token": None, "spool_retain_s": 3600.0,
    "spool_retain_bytes": 1073741824, "spool_reserve_bytes": 67108864, "retention_15m_days": 90,
    "retention_1h_days": 730, "retention_1d_days": 0, "raw_retention_days": 400, "dedup_window_days": 9,
    "log_format": "json", "log_max_bytes": 52428800, "log_backups": 5, "reconcile_interval_s": 900.0,
    "collector_interface": "rsgi", "api_max_connections": 2000, "api_max_connections_per_client": 64,
    "api_idle_timeout_s": 15, "api_request_timeout_s": 15, "site_address_share": 0.1,
    "pixel_max_ttl_s": 604800, "sql_overrun_grace_s": 30.0, "supervisor_backoff_s": 0.5,
    "trusted_proxies": (), "geoip_db": None, "dimension_cap": 1000,
}


def test_every_default(tmp_path):
    import dataclasses
    import ipaddress

    home = tmp_path.resolve()
    s = Settings.from_env({"TALLY_HOME": str(tmp_path)})
    expected = {**DEFAULTS, "home": home, "clickhouse_dsn": f"chdb://{home / 'chdb'}", "spool_dir": home / "spool",
                "log_dir": home / "logs", "raw": {"TALLY_HOME": str(tmp_path)},
                "metrics_allowed_nets": (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))}
    assert {f.name: getattr(s, f.name) for f in dataclasses.fields(s)} == expected
    for name, value in DEFAULTS.items():
        assert type(getattr(s, name)) is type(value), name


def test_blank_means_default_and_values_are_stripped():
    assert Settings.from_env({"TALLY_KAFKA_PARTITIONS": "   "}).partitions == 4
    assert Settings.from_env({"TALLY_KAFKA_PARTITIONS": " 8 "}).partitions == 8
    assert Settings.from_env({"TALLY_LOG_DIR": " - "}).log_dir is None


@pytest.mark.parametrize("env, attribute, value", [
    ({"TALLY_BIND_HOST": "0.0.0.0"}, "allowed_hosts", ("localhost", "127.0.0.1", "::1")),
    ({"TALLY_BIND_HOST": " Example.Org "}, "allowed_hosts", ("localhost", "127.0.0.1", "::1", "example.org")),
    ({"TALLY_ALLOWED_HOSTS": "A.example, [::1], .b.example,"}, "allowed_hosts", ("a.example", "::1", ".b.example")),
    ({"TALLY_ANALYST_PORT": "9000"}, "analyst_url", "http://127.0.0.1:9000"),
    ({"TALLY_ANALYST_URL": "https://analyst.internal:8702"}, "analyst_url", "https://analyst.internal:8702"),
    ({"TALLY_SQL_MAX_EXECUTION_S": "60"}, "sql_overrun_grace_s", 60.0),
    ({"TALLY_SQL_OVERRUN_GRACE_S": "0.5"}, "sql_overrun_grace_s", 0.5),
    ({"TALLY_MAX_PAST_AGE_S": "864000"}, "dedup_window_days", 12),
    ({"TALLY_SPOOL_RETAIN_S": "172800"}, "dedup_window_days", 10),
    ({"TALLY_MAX_PAST_AGE_S": "864000", "TALLY_SPOOL_RETAIN_S": "172800"}, "dedup_window_days", 13),
    ({"TALLY_API_RATE_LIMIT": "10 per minute"}, "api_rate_limit", "10 per minute"),
    ({"TALLY_PG_DSN": "postgresql:///db?host=/tmp"}, "pg_dsn", "postgresql:///db?host=/tmp"),
    ({"TALLY_RETENTION_1H_DAYS": "0", "TALLY_RETENTION_1D_DAYS": "0"}, "retention_1h_days", 0),
])
def test_derived_and_given_values(env, attribute, value):
    assert getattr(Settings.from_env(env), attribute) == value


def test_metrics_nets_and_paths(tmp_path, monkeypatch):
    import ipaddress

    s = Settings.from_env({"TALLY_METRICS_ALLOWED_NETS": "10.1.2.3, ::/0"})
    assert s.metrics_allowed_nets == (ipaddress.ip_network("10.1.2.3/32"), ipaddress.ip_network("::/0"))
    monkeypatch.chdir(tmp_path)
    s = Settings.from_env({"TALLY_SPOOL_DIR": "rel/spool", "TALLY_LOG_DIR": "~/tally-logs"})
    assert s.home == tmp_path.resolve() / ".tally"
    assert s.spool_dir == tmp_path.resolve() / "rel" / "spool"
    assert s.log_dir == (__import__("pathlib").Path.home() / "tally-logs").resolve()


@pytest.mark.parametrize("variable, value, message", [
    ("TALLY_KAFKA_BOOTSTRAP", " , ", "lists no broker"),
    ("TALLY_KAFKA_BOOTSTRAP", "h:0", "'h:0' is not host:port (comma-separate several brokers)"),
    ("TALLY_KAFKA_TOPIC", "x" * 250, f"{'x' * 250!r} must be 1-249 characters of letters, digits, '.', '_' or '-'"),
    ("TALLY_PG_DSN", "postgresql://h:99999/db", "has an invalid port"),
    ("TALLY_CLICKHOUSE_DSN", "http:///x", "names no host"),
    ("TALLY_ANALYST_URL", "ftp://x", "scheme 'ftp' is not one of http, https"),
    ("TALLY_SECRET", "x" * 15, "must be at least 16 characters long"),
    ("TALLY_TOKEN", "short", "must be at least 16 characters long"),
    ("TALLY_MAX_BODY_BYTES", "1023", "1023 is out of range [1024, 67108864]"),
    ("TALLY_SPOOL_SEGMENT_AGE_S", "0.01", "0.01 is out of range [0.05, 3600.0]"),
    ("TALLY_SITE_RATE_PER_S", "nan", "nan is out of range [0.01, 10000000.0]"),
    ("TALLY_ALLOWED_HOSTS", "*", "'*' would allow DNS rebinding; list the host names this server answers to"),
    ("TALLY_ALLOWED_HOSTS", "http://x", "'http://x' is not a host name or IP address (no port, no scheme)"),
    ("TALLY_ALLOWED_HOSTS", " , ", "lists no host"),
    ("TALLY_METRICS_ALLOWED_NETS", "everyone", "'everyone' is not an IP network (e.g. 10.0.0.0/8, ::1/128)"),
    ("TALLY_METRICS_ALLOWED_NETS", ",", "lists no network"),
    ("TALLY_API_RATE_LIMIT", "lots", "'lots' must look like '1200/minute' or '100/second;5000/hour'"),
    ("TALLY_LOG_FORMAT", "xml", "'xml' must be json or text"),
    ("TALLY_COLLECTOR_INTERFACE", "asgi", "'asgi' must be rsgi or wsgi"),
    ("TALLY_DEDUP_WINDOW_DAYS", "3", "3 days does not cover TALLY_MAX_PAST_AGE_S (604800 s) plus one day; "
                                     "a late duplicate could be counted twice"),
    ("TALLY_DEDUP_WINDOW_DAYS", "0", "0 is out of range [1, 10000]"),
    ("TALLY_RETENTION_15M_DAYS", "800", "800 days exceeds TALLY_RETENTION_1H_DAYS (730 days); "
                                        "a finer tier cannot be kept longer than a coarser one"),
    ("TALLY_SQL_OVERRUN_GRACE_S", "0", "0.0 is out of range [0.1, 86400.0]"),
    ("TALLY_PIXEL_MAX_TTL_S", "59", "59 is out of range [60, 31622400]"),
    ("TALLY_API_MAX_CONNECTIONS", "15", "15 is out of range [16, 1000000]"),
    ("TALLY_SITE_ADDRESS_SHARE", "1.5", "1.5 is out of range [0.01, 1.0]"),
    ("TALLY_LOG_BACKUPS", "0", "0 is out of range [1, 1000]"),
    ("TALLY_RECONCILE_INTERVAL_S", "-1", "-1.0 is out of range [0.0, 604800.0]"),
    ("TALLY_COLLECTOR_PORT", "1.5", "'1.5' is not an integer"),
    ("TALLY_SPOOL_RETAIN_S", "1e9", "1000000000.0 is out of range [0.0, 2592000.0]"),
    ("TALLY_KAFKA_PARTITONS", "4", "unknown setting (typo?); known settings are listed in README.md"),
])
def test_exact_messages(variable, value, message):
    with pytest.raises(ConfigError) as info:
        Settings.from_env({variable: value})
    assert (info.value.variable, info.value.problem) == (variable, message)
    assert str(info.value) == f"{variable}: {message}"


def test_a_bad_value_is_reported_before_an_unknown_variable():
    with pytest.raises(ConfigError) as info:
        Settings.from_env({"TALLY_NOPE": "1", "TALLY_KAFKA_PARTITIONS": "0"})
    assert info.value.variable == "TALLY_KAFKA_PARTITIONS"
    with pytest.raises(ConfigError) as info:
        Settings.from_env({"TALLY_NOPE": "1", "TALLY_ZZZ": "1"})
    assert info.value.variable == "TALLY_NOPE"  # the first unknown one, alphabetically


def test_only_tally_variables_are_read_and_kept():
    s = Settings.from_env({"PATH": "/bin", "KAFKA_PARTITIONS": "x", "TALLY_KAFKA_PARTITIONS": "6"})
    assert s.raw == {"TALLY_KAFKA_PARTITIONS": "6"} and s.partitions == 6


def test_secrets_stay_out_of_repr():
    s = Settings.from_env({"TALLY_PG_DSN": "postgresql://u:pgpass-123@db:5432/t", "TALLY_SECRET": "s" * 16 + "SECRET",
                           "TALLY_TOKEN": "t" * 16 + "TOKEN", "TALLY_CLICKHOUSE_DSN": "https://u:chpass-456@ch:8443"})
    text = repr(s)
    for secret in ("pgpass-123", "SECRET", "TOKEN", "chpass-456"):
        assert secret not in text
    assert "partitions=4" in text


def test_with_overrides_replaces_fields_and_keeps_the_rest():
    s = Settings.from_env({"TALLY_KAFKA_PARTITIONS": "6"})
    t = s.with_overrides(pg_dsn="postgresql://h/db", collector_workers=3)
    assert (t.pg_dsn, t.collector_workers, t.partitions) == ("postgresql://h/db", 3, 6)
    assert s.pg_dsn is None and s != t
