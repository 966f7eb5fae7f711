'use strict';
// Drives the official ClickHouse Node client (@clickhouse/client, pinned in package.json) against tally's
// ClickHouse-compatible endpoint. Run by tests/test_clickhouse_http_clients.py with NODE_PATH pointing at
// the npm cache dir; it only observes: every call's outcome goes to stdout as one JSON object
// {call: {ok: true, value} | {ok: false, error: {cls, code, type, message}}}, and the test asserts on it.
// Environment: TALLY_CH_URL (http://127.0.0.1:port), TALLY_CH_ANALYST and TALLY_CH_CUSTOMER (tokens).

const { createClient, ClickHouseError, ClickHouseLogLevel } = require('@clickhouse/client');
const { version } = require('@clickhouse/client/package.json');

const url = process.env.TALLY_CH_URL;
const analyst = process.env.TALLY_CH_ANALYST;
const customer = process.env.TALLY_CH_CUSTOMER;
const clients = [];

function client(options = {}) {
  const made = createClient({ url, username: 'analyst', password: analyst, request_timeout: 60000,
    log: { level: ClickHouseLogLevel.OFF }, ...options });
  clients.push(made);
  return made;
}

const HEADERS = ['x-clickhouse-query-id', 'x-clickhouse-format', 'x-clickhouse-summary', 'x-clickhouse-timezone',
  'content-encoding', 'content-type'];

function headersOf(resultSet) {
  const seen = {};
  for (const name of HEADERS) {
    if (resultSet.response_headers[name] !== undefined) seen[name] = resultSet.response_headers[name];
  }
  return seen;
}

function describe(err) {
  return {
    cls: err instanceof ClickHouseError ? 'ClickHouseError' : (err && err.constructor ? err.constructor.name : 'unknown'),
    code: err && err.code !== undefined ? String(err.code) : null,
    type: err && err.type !== undefined ? err.type : null,
    message: String(err && err.message).slice(0, 600),
  };
}

async function rowsOf(options, query, format = 'JSONEachRow', extra = {}) {
  const resultSet = await client(options).query({ query, format, ...extra });
  return { rows: await resultSet.json(), headers: headersOf(resultSet), query_id: resultSet.query_id };
}

const SMALL = 'SELECT toUInt32(number) AS n, toString(number) AS s FROM numbers(3) ORDER BY n';

const calls = {
  async ping() {
    const result = await client().ping();
    return { success: result.success, error: result.success ? null : describe(result.error) };
  },
  async ping_select() {
    const result = await client().ping({ select: true });
    return { success: result.success, error: result.success ? null : describe(result.error) };
  },
  async json_each_row() {
    return rowsOf({}, SMALL, 'JSONEachRow', { query_id: 'tally-node-json-each-row' });
  },
  async json_document() {
    const resultSet = await client().query({ query: SMALL, format: 'JSON' });
    const doc = await resultSet.json();
    return { meta: doc.meta, data: doc.data, rows: doc.rows };
  },
  async csv_text() {
    const resultSet = await client().query({ query: "SELECT toUInt32(number) AS n, concat('a,\"b', toString(number)) AS s"
      + ' FROM numbers(3) ORDER BY n', format: 'CSV' });
    return { text: await resultSet.text(), headers: headersOf(resultSet) };
  },
  async tsv_with_names_text() {
    const resultSet = await client().query({ query: SMALL, format: 'TabSeparatedWithNames' });
    return { text: await resultSet.text() };
  },
  async stream() {
    const resultSet = await client().query({ query: 'SELECT toUInt32(number) AS n FROM numbers(5000)', format: 'JSONEachRow' });
    let rows = 0;
    let sum = 0;
    let chunks = 0;
    for await (const batch of resultSet.stream()) {
      chunks += 1;
      for (const row of batch) {
        rows += 1;
        sum += row.json().n;
      }
    }
    return { rows, sum, chunks };
  },
  async query_params() {
    return rowsOf({}, 'SELECT {a:UInt32} + 1 AS x, {s:String} AS s, length({s:String}) AS len', 'JSONEachRow',
      { query_params: { a: 41, s: "it's a 'quoted' \\ value; DROP TABLE tally.events" } });
  },
  async harmless_settings() {
    return rowsOf({}, "SELECT toUInt64(7) AS big, toDateTime('2026-01-02 03:04:05', 'UTC') AS t", 'JSONEachRow',
      { clickhouse_settings: { output_format_json_quote_64bit_integers: 1, date_time_output_format: 'iso' } });
  },
  async refused_setting_readonly() {
    return rowsOf({}, 'SELECT 1 AS one', 'JSONEachRow', { clickhouse_settings: { readonly: '0' } });
  },
  async refused_setting_limit() {
    return rowsOf({}, 'SELECT 1 AS one', 'JSONEachRow', { clickhouse_settings: { max_result_rows: '0' } });
  },
  async response_compression() {
    return rowsOf({ compression: { response: true } }, SMALL);
  },
  async request_compression() {
    return rowsOf({ compression: { request: true } }, SMALL);
  },
  async session_option() {
    return rowsOf({ session_id: 'tally-node-session' }, SMALL);
  },
  async database_option() {
    return rowsOf({ database: 'tally' }, 'SELECT count() >= 0 AS ok FROM tally.events');
  },
  async events_table() {
    return rowsOf({}, 'SELECT count() >= 0 AS ok, max(ts) <= now() + 86400 AS sane FROM tally.events');
  },
  async exec_with_own_format() {
    const result = await client().exec({ query: 'SELECT 1 AS one FORMAT TabSeparatedWithNames' });
    const parts = [];
    for await (const chunk of result.stream) parts.push(chunk);
    return { text: Buffer.concat(parts).toString('utf8') };
  },
  async customer_token() {
    return rowsOf({ password: customer }, 'SELECT 1 AS one');
  },
  async wrong_token() {
    return rowsOf({ password: 'tly_tok_0000000000_not-a-real-secret' }, 'SELECT 1 AS one');
  },
  async no_password() {
    return rowsOf({ password: '' }, 'SELECT 1 AS one');
  },
  async refused_system_users() {
    return rowsOf({}, 'SELECT * FROM system.users');
  },
  async refused_file() {
    return rowsOf({}, "SELECT * FROM file('/etc/passwd', 'LineAsString')");
  },
  async refused_insert() {
    await client().insert({ table: 'tally.events', values: [{ hash: 'x' }], format: 'JSONEachRow' });
    return { inserted: true };
  },
  async refused_command() {
    await client().command({ query: 'DROP TABLE tally.events' });
    return { dropped: true };
  },
};

async function main() {
  const only = process.argv.slice(2);
  const out = { _client_version: { ok: true, value: version }, _node_version: { ok: true, value: process.version } };
  for (const [name, call] of Object.entries(calls)) {
    if (only.length && !only.includes(name)) continue;
    try {
      out[name] = { ok: true, value: await call() };
    } catch (err) {
      out[name] = { ok: false, error: describe(err) };
    }
  }
  await Promise.allSettled(clients.map((c) => c.close()));
  process.stdout.write(JSON.stringify(out) + '\n');
}

main().catch((err) => {
  process.stderr.write(`driver failed: ${err && err.stack}\n`);
  process.exit(2);
});
