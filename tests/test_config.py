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
