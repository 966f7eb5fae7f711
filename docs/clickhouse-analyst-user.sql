-- The ClickHouse user tally's analyst server connects as in production (TALLY_CLICKHOUSE_DSN of
-- the analyst server: https://tally_analyst:<password>@ch.internal:8443). Run as an admin, once.
-- One statement per `;`-terminated paragraph; tests/test_analyst.py parses each with ClickHouse's
-- parser (formatQuery). Access control cannot be exercised on chDB, so the grants themselves are
-- untested here: check them on your server with `SHOW GRANTS FOR tally_analyst`.
-- On a cluster (TALLY_CLICKHOUSE_CLUSTER) use the ON CLUSTER version in docs/clickhouse-cluster.md instead.
--
-- readonly = 2, not 1: under readonly = 1 ClickHouse refuses every per-query setting, so the
-- analyst server could not set its limits (TALLY_SQL_*). readonly = 2 still refuses every write;
-- the MAX constraints make this profile's limits a ceiling nobody can raise per query. If you
-- raise a TALLY_SQL_* limit above its MAX here, those queries fail with a message naming it.
--
-- Also set, in the server's config.xml (not SQL), so that system.* and information_schema need a
-- grant like any other table (ClickHouse otherwise lets every user read some system tables):
--   <access_control_improvements>
--     <select_from_system_db_requires_grant>true</select_from_system_db_requires_grant>
--     <select_from_information_schema_requires_grant>true</select_from_information_schema_requires_grant>
--   </access_control_improvements>
--
-- Table functions need CREATE TEMPORARY TABLE plus a grant on their source (FILE, URL, REMOTE, S3,
-- MYSQL, POSTGRES, ...); this user has none of them. Untested: whether your server lets numbers(),
-- generateSeries() and values() run without CREATE TEMPORARY TABLE (they run under readonly = 1 on
-- chDB). If analysts get ACCESS_DENIED for numbers(), add `GRANT CREATE TEMPORARY TABLE ON *.*`:
-- the sources stay ungranted.

CREATE SETTINGS PROFILE IF NOT EXISTS tally_analyst SETTINGS
    readonly = 2,
    max_execution_time = 30 MAX 30,
    timeout_overflow_mode = 'throw',
    max_memory_usage = 2147483648 MAX 2147483648,
    max_result_rows = 10000 MAX 10000,
    max_result_bytes = 67108864 MAX 67108864,
    result_overflow_mode = 'throw',
    max_threads = 1 MAX 4,
    max_concurrent_queries_for_user = 4 MAX 4,
    allow_introspection_functions = 0 MAX 0,
    final = 1;

CREATE USER IF NOT EXISTS tally_analyst
    IDENTIFIED WITH sha256_password BY 'replace-with-a-long-random-password'
    DEFAULT DATABASE tally
    SETTINGS PROFILE 'tally_analyst';

REVOKE ALL ON *.* FROM tally_analyst;

-- The analyst tables (olap.allowlist.ANALYST_TABLES; their columns are in docs/analysts.md). tally.sites is
-- written by the loader worker, whose ClickHouse user (not this one) needs INSERT and SELECT on it (ADR 52).
GRANT SELECT ON tally.events TO tally_analyst;

GRANT SELECT ON tally.sites TO tally_analyst;

GRANT SELECT ON tally.countries TO tally_analyst;

-- The curated views tools browse instead of `system` (ClickHouse migration 4, ADR 51); they run as their
-- definer, so this user needs nothing in `system`.
GRANT SELECT ON tally_catalog.* TO tally_analyst;
