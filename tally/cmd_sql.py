"""`tally sql [QUERY | -f FILE] [--param NAME=VALUE ...] [--format pretty|csv|tsv|json|jsonl] [--json]`:
analyst SQL through the API (read-only, limited).

The query comes from the argument, from `-f FILE` (`-f -`: standard input), or, with neither, from standard
input when that is not a terminal. `--param d=example.com` gives the value of the query's `{d:String}`: the
API hands it to ClickHouse, which binds it (ADR 53); it is never pasted into the text.

Output: `pretty` (an aligned table) is the default on a terminal; elsewhere the default is a header line and
one tab-separated line per row (from the API's JSON), as it always was, with NULL as `\\N` and values escaped as
tsv escapes them; both show decimals as ClickHouse prints them (`846.17`). `csv`, `tsv` and `jsonl` copy the
API's encoding (olap/formats.py) to stdout as it streams (csv with LF line ends, as clickhouse-client writes
it); `json` is the API's document and a newline. Requests carry `User-Agent: tally-cli/<version>` (the audit
log's client).
Exit codes: 0 done, 1 the API refused the query (its status, code and message; ADR 53 addendum) or could not
be reached, 2 usage or configuration.
"""

from __future__ import annotations

import argparse
import decimal
import json
import sys
import urllib.error
import urllib.request
from typing import IO, TYPE_CHECKING, Any

from core.config import Settings
from olap.params import ParamsError, parse_params
from tally.cli_support import FINDING, OK, USAGE

if TYPE_CHECKING:
    from tally.cli_support import SubParsers

FORMATS = ("csv", "tsv", "json", "jsonl")  # the API's result formats (`?format=`)
CHOICES = ("pretty", *FORMATS)


class UsageError(ValueError):
    """A value that parses but is wrong: `tally sql: <message>`, exit 2 (ADR 40)."""


def register(sub: SubParsers) -> None:
    sql = sub.add_parser("sql", help="run analyst SQL through the API (read-only, limited)",
                         description="Run one read-only query on ClickHouse through the API, with TALLY_TOKEN "
                         "or the admin token of `tally up`. The query is the argument, the file of -f, or "
                         "standard input (-f -, or no argument with stdin not a terminal).")
    sql.add_argument("query", nargs="?", default=None, help="the SQL (or use -f FILE, or standard input)")
    sql.add_argument("-f", "--file", default=None, metavar="FILE", help="read the query from FILE (- for stdin)")
    sql.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                     help="the value of the query's {NAME:Type} parameter, bound by ClickHouse (repeatable); "
                     "in ClickHouse's text form, as clickhouse-client's --param_NAME")
    sql.add_argument("--format", choices=CHOICES, default=None,
                     help="pretty: an aligned table (the default on a terminal; elsewhere the default is a "
                     "header line, then tab-separated rows); csv, tsv, jsonl: the API's encoding, streamed; "
                     "json: the API's document")
    sql.add_argument("--json", dest="format", action="store_const", const="json", help="same as --format json")
    sql.add_argument("--api-url", default=None, help="default: http://TALLY_BIND_HOST:TALLY_API_PORT")
    sql.set_defaults(func=cmd_sql)


def _fail(message: str, code: int = FINDING) -> int:
    print(f"tally sql: {message}", file=sys.stderr)
    return code


def query_text(query: str | None, file: str | None) -> str:
    """The SQL from the argument, `-f FILE` (`-` is stdin) or, with neither, stdin when it is not a terminal."""
    if query is not None and file is not None:
        raise UsageError("give the query as an argument or with -f FILE, not both")
    if query is not None:
        text, source = query, "the argument"
    elif file is not None and file != "-":
        try:
            with open(file, encoding="utf-8") as handle:
                text = handle.read()
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise UsageError(f"cannot read the query from {file}: {reason}") from None
        source = file
    elif file == "-" or (sys.stdin is not None and not sys.stdin.isatty()):
        text, source = (sys.stdin.read() if sys.stdin is not None else ""), "standard input"
    else:
        raise UsageError("no query: give it as an argument, with -f FILE, or on standard input")
    if not text.strip():
        raise UsageError(f"the query from {source} is empty")
    return text


def query_params(pairs: list[str]) -> dict[str, str]:
    """`--param NAME=VALUE` arguments as the API's `params` (olap/params.py checks names and sizes)."""
    params: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep:
            raise UsageError(f"--param takes NAME=VALUE (got {pair!r})")
        if name in params:
            raise UsageError(f"--param {name} is given twice")
        params[name] = value
    try:
        return parse_params(params)
    except ParamsError as exc:
        raise UsageError(str(exc)) from None


def cmd_sql(settings: Settings, args: argparse.Namespace) -> int:
    try:
        body: dict[str, Any] = {"sql": query_text(args.query, args.file)}
        params = query_params(args.param)
    except UsageError as exc:
        return _fail(str(exc), USAGE)
    if params:
        body["params"] = params
    fmt = args.format or ("pretty" if sys.stdout.isatty() else None)
    streamed = fmt in FORMATS  # the API's encoding as is; pretty and the default read its JSON
    base = (args.api_url or f"http://{settings.bind_host}:{settings.api_port}").rstrip("/")
    url = base + "/api/v1/sql" + (f"?format={fmt}" if streamed else "")
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers=request_headers(settings),
                                 method="POST")
    try:
        with urllib.request.urlopen(req, timeout=settings.sql_max_execution_s + 10) as resp:
            if streamed:
                copy_stream(resp, sys.stdout.buffer, LfRecords() if fmt == "csv" else None, newline=fmt == "json")
                return OK
            document = read_document(resp, base)
    except urllib.error.HTTPError as exc:
        return _fail(http_failure(exc, base, settings))
    except urllib.error.URLError as exc:
        return _fail(f"cannot reach the API at {url} ({exc.reason}); is `tally up` running?")
    except NotTheApi as exc:
        return _fail(str(exc))
    if fmt == "pretty":
        print_table(document, terminal=sys.stdout.isatty())
    else:
        print_lines(document)
    return OK


def user_agent() -> str:
    """`tally-cli/<the installed package's version>`: what `tally sql-log` shows as the client."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"tally-cli/{version('tally')}"
    except PackageNotFoundError:
        return "tally-cli/unknown"


def request_headers(settings: Settings) -> dict[str, str]:
    from tally.roots import cli_token

    headers = {"Content-Type": "application/json", "User-Agent": user_agent()}
    token = cli_token(settings)
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return headers


# --- what went wrong -----------------------------------------------------------------------------------


class NotTheApi(ValueError):
    """A 200 answer that is not tally's JSON document: --api-url names something else."""


def read_document(resp: Any, base: str) -> dict[str, Any]:
    """The API's JSON document {"columns", "types", "rows", ...}; NotTheApi for anything else."""
    try:
        document = json.loads(resp.read())
    except ValueError:
        document = None
    if not isinstance(document, dict) or not isinstance(document.get("columns"), list) \
            or not isinstance(document.get("rows"), list):
        raise NotTheApi(f"{base} answered something that is not tally's API (no JSON result document); "
                        "tally sql talks to tally's API (TALLY_API_PORT), see --api-url")
    return document


def http_failure(exc: urllib.error.HTTPError, base: str, settings: Settings) -> str:
    """What an HTTP error answer means for the user of `tally sql`: the API's refusal with its status and code
    (and a hint where the CLI has a better way), or what else answered."""
    try:
        raw = exc.read(65536)
    except (OSError, ValueError):
        raw = b""
    try:
        error = json.loads(raw)["error"]
        code, message = str(error["code"]), str(error["message"])
    except (ValueError, KeyError, TypeError):
        pass
    else:
        return f"the API answered {exc.code} {code}: {with_hint(message, settings)}"
    if any(name.lower().startswith("x-clickhouse-") for name in exc.headers or {}) or b"DB::Exception" in raw \
            or raw.startswith(b"There is no handle"):
        return (f"{base} answers like a ClickHouse server (HTTP {exc.code}), not like tally's API: tally sql talks "
                f"to tally's API (TALLY_API_PORT, {settings.api_port} here; --api-url names another); for the "
                "ClickHouse-compatible endpoint use clickhouse-client, clickhouse-connect or curl")
    reason = exc.reason if isinstance(exc.reason, str) else ""
    status = f"{exc.code} {reason}".rstrip()
    return f"{base} answered HTTP {status}, not as tally's API does (TALLY_API_PORT; --api-url names another)"


def with_hint(message: str, settings: Settings) -> str:
    """The API's message, or, where it tells users of other paths what to do (a FORMAT clause: `?format=`),
    what a `tally sql` user does: `--format`, or FORMAT on the ClickHouse-compatible endpoint. (A `system`
    table the endpoint serves is refused with a pointer to it by the allowlist itself, for every path.)"""
    if message.startswith("FORMAT clauses are not allowed"):
        return (f"FORMAT clauses are not allowed in tally sql: use --format {'|'.join(CHOICES)} instead; the "
                f"ClickHouse-compatible endpoint (port {settings.clickhouse_http_port}, TALLY_CLICKHOUSE_HTTP_PORT) "
                "accepts FORMAT clauses (clickhouse-client, clickhouse-connect, curl)")
    return message


# --- streamed formats ---------------------------------------------------------------------------------


class LfRecords:
    """The API's CSV (RFC 4180: every record ends in CRLF) with records ending in LF instead, as clickhouse-client
    writes CSV and as line tools (`grep -x`, `wc -l`, `cut`) expect; a CRLF inside a quoted value stays."""

    def __init__(self) -> None:
        self.in_quotes = False
        self.held = b""  # a CR at the end of a chunk, outside quotes: its LF may come with the next chunk

    def feed(self, data: bytes) -> bytes:
        parts = (self.held + data).split(b'"')
        self.held = b""
        out: list[bytes] = []
        for index, part in enumerate(parts):
            if index:  # every quote toggles (a doubled quote inside a value toggles twice)
                out.append(b'"')
                self.in_quotes = not self.in_quotes
            if not self.in_quotes:
                part = part.replace(b"\r\n", b"\n")
                if index == len(parts) - 1 and part.endswith(b"\r"):
                    part, self.held = part[:-1], b"\r"
            out.append(part)
        return b"".join(out)

    def end(self) -> bytes:
        return self.held


def copy_stream(source: Any, sink: IO[bytes], records: LfRecords | None, newline: bool = False) -> None:
    """The API's answer to stdout as it arrives (each chunk as soon as it is read); `newline`: end it with one
    if it does not (the json document has none, a shell prompt would follow it on the same line)."""
    last = b"\n"
    while chunk := (source.read1(65536) if hasattr(source, "read1") else source.read(65536)):
        out = records.feed(chunk) if records else chunk
        sink.write(out)
        sink.flush()
        last = out[-1:] or last
    if records:
        sink.write(records.end())
    elif newline and last != b"\n":
        sink.write(b"\n")
        sink.flush()


# --- pretty and the default ----------------------------------------------------------------------------

_NUMERIC = ("Int", "UInt", "Float", "Decimal", "BFloat")
# Control characters in a cell are shown escaped: a value (a visitor's User-Agent) must not drive the terminal.
_CONTROLS = {c: f"\\x{c:02x}" for c in [*range(0x20), *range(0x7F, 0xA0)]} | {0x09: "\\t", 0x0A: "\\n", 0x0D: "\\r"}
# The default off a terminal escapes as tsv does (olap/formats.py), so NULL (`\N`) is not '' and a tab or a
# newline in a value cannot split its row.
_TSV_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r", "\0": "\\0"})


def _bare(type_name: str) -> str:
    """The type inside Nullable(...) and LowCardinality(...), in any order (`LowCardinality(Nullable(String))`)."""
    while type_name.startswith(("Nullable(", "LowCardinality(")):
        type_name = type_name.partition("(")[2]
    return type_name


def ch_decimal(text: str) -> str:
    """A Decimal as ClickHouse prints it: without trailing zeros (the API's JSON has the column's scale,
    `846.170000`; ClickHouse shows `846.17`, and `100` for `100.0000`)."""
    try:
        value = decimal.Decimal(text)
    except decimal.InvalidOperation:
        return text
    if not value.is_finite():
        return text
    plain = format(value, "f")
    if "." in plain:
        plain = plain.rstrip("0").rstrip(".")
    return "0" if plain == "-0" else plain


def shown_rows(document: dict[str, Any]) -> list[list[Any]]:
    """The document's rows with Decimal columns' values as ClickHouse prints them (only for showing)."""
    types = [_bare(str(t)) for t in document.get("types") or []]
    decimals = [i for i, t in enumerate(types) if t.startswith("Decimal")]
    rows: list[list[Any]] = [list(row) for row in document["rows"]]
    for row in rows:
        for i in decimals:
            if i < len(row) and isinstance(row[i], str):
                row[i] = ch_decimal(row[i])
    return rows


def line_cell(value: Any) -> str:
    """One value of the default output off a terminal: `\\N` for NULL, strings escaped as tsv escapes them."""
    if value is None:
        return "\\N"
    return value.translate(_TSV_ESCAPES) if isinstance(value, str) else str(value)


def print_lines(document: dict[str, Any]) -> None:
    """The default off a terminal: a header line, then one tab-separated line per row."""
    print("\t".join(str(name).translate(_TSV_ESCAPES) for name in document["columns"]))
    for row in shown_rows(document):
        print("\t".join(line_cell(v) for v in row))


def cell(value: Any) -> str:
    """One value of the API's JSON as the table shows it: NULL, text, or JSON for arrays and maps."""
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, (list, dict)):
        text = json.dumps(value, ensure_ascii=False)
    else:
        text = str(value)
    return text.translate(_CONTROLS)


def print_table(document: dict[str, Any], terminal: bool) -> None:
    """The API's JSON document as an aligned table and a row count. On a terminal the table fits its width
    (long cells fold); elsewhere (`--format pretty` into a file) it is as wide as its widest cells."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    types = document.get("types") or [""] * len(document["columns"])
    table = Table(show_lines=False, header_style="bold")
    for name, type_name in zip(document["columns"], types, strict=False):
        numeric = _bare(str(type_name)).startswith(_NUMERIC)
        table.add_column(Text(cell(name)), justify="right" if numeric else "left", overflow="fold")
    rows = shown_rows(document)
    for row in rows:
        table.add_row(*(Text(cell(v), style="dim" if v is None else "") for v in row))
    console = Console(highlight=False) if terminal else Console(width=1_000_000, no_color=True, highlight=False)
    console.print(table, crop=False)
    count = len(rows)
    console.print(Text(f"{count} row{'' if count == 1 else 's'}", style="dim"))
