"""The analyst server: the one process that runs analyst SQL against ClickHouse.

The API never talks to ClickHouse itself: it forwards `POST /api/v1/sql` here
(over loopback HTTP, with a bearer token both derive from TALLY_SECRET), so a
slow analyst query can hold at most one of this process's query slots and
none of the API's customer or health paths. With an embedded `chdb://` DSN
this process also runs the loader (chDB allows one engine per directory per
process); chDB runs queries from separate clients concurrently, so each query
slot has its own client and the loader keeps its own.

Contract of `POST /v1/query` (JSON `{"sql", "format", "token_id", "params"}`):
- `params` (optional): the values of the query's `{name:Type}` parameters as text (olap/params.py),
  bound by ClickHouse; a malformed one is 400 `invalid_params`, one the query does not use or lacks
  is refused as the query is (ADR 53);
- at most `slots` queries run at once; the next waits up to `wait_s`, then gets
  429 `analyst_busy` with Retry-After;
- every query is answered by `deadline_s` after it got its slot, whatever ClickHouse is doing:
  each runs on a thread of its own under olap/watchdog.py, which cancels it at the deadline and
  hands its slot back (ADR 32); a cancelled query still computing `overrun_grace` after its deadline
  ends this process (exit code 75, logged at CRITICAL) for its supervisor to restart;
- a query refused or failing before its first output byte gets a 400 JSON error
  (`query_refused`, `query_failed`, `query_timeout`, `result_too_large`), its message filtered
  by `public_message` (no hints naming tables or functions analysts cannot use);
- `json` answers one document; `csv`/`tsv`/`jsonl` stream. A streamed result
  that fails later (time or byte cap reached) is cut by closing the connection
  without the final chunk, so a client never mistakes it for a complete file;
- every query, refused ones included, is handed to `audit` once it ends.
"""

from __future__ import annotations

import hmac
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

from flask import Blueprint, Flask, Response, current_app, request

from core import metrics
from core.config import LOADER_GROUP, SQL_OVERRUN_GRACE_MIN_S
from core.http import error, install_host_check, install_json_errors, json_response
from olap.aggregates import ClickHouseAggregates, TooManyRows, encode_answer, parse_request
from olap.analyst import AnalystQueryError, QueryStats, SqlLimits, prepare, public_message, stream
from olap.ch_errors import code_for
from olap.ch_formats import is_ch_format
from olap.ch_query import Extras, answer_headers, ch_stream, request_extras
from olap.ch_settings import QUERY_ID
from olap.formats import FORMATS
from olap.params import ParamsError, parse_params
from olap.watchdog import DeadlineReached, Run, Watchdog

log = logging.getLogger(__name__)
bp = Blueprint("analyst_server", __name__)

_ERROR_CODES = {"refused": "query_refused", "failed": "query_failed", "timeout": "query_timeout",
                "too_large": "result_too_large"}


@dataclass(frozen=True, slots=True)
class AuditEntry:
    token_id: str | None
    started_at: datetime
    sql: str
    format: str
    status: str  # ok | refused | failed | timeout | too_large | busy | cancelled
    rows: int
    bytes: int
    duration_ms: float
    error: str | None
    client: str | None = None  # who asked (the User-Agent the API was sent)
    query_id: str | None = None  # the caller's id for it (ClickHouse's query_id)


class Busy(Exception):
    """Every query slot stayed taken for the whole wait."""


class QuerySlots:
    """At most `size` analyst queries at once, each with its own ClickHouse client (made on first use)."""

    def __init__(self, make_client: Callable[[], Any], size: int) -> None:
        self._make_client = make_client
        self._free: queue.LifoQueue[Any] = queue.LifoQueue()
        for _ in range(size):
            self._free.put(None)
        self.size = size

    def take(self, wait_s: float) -> tuple[Any, Callable[..., None]]:
        """A free slot's client, and release() to hand it back (idempotent). Raises Busy after `wait_s`."""
        try:
            client = self._free.get(timeout=wait_s)
        except queue.Empty:
            raise Busy from None
        if client is None:
            try:
                client = self._make_client()
            except BaseException:
                self._free.put(None)
                raise
        released = threading.Event()

        def release(fresh: bool = False) -> None:
            """fresh=True: the slot gets a new client (this one is still busy; its owner closes it)."""
            if not released.is_set():
                released.set()
                self._free.put(None if fresh else client)

        return client, release

    def make_client(self) -> Any:
        """A client of the slots' kind that belongs to no slot (the watchdog's, for KILL QUERY)."""
        return self._make_client()


@dataclass(frozen=True, slots=True)
class AnalystConfig:
    database: str
    limits: SqlLimits
    token: str  # what the API must present
    wait_s: float = 2.0
    # When the watchdog cancels a query, counted from when it got its slot; None: the time limit + 1 s.
    deadline_s: float | None = None
    # How long a cancelled query may go on computing after its deadline before the process exits (ADR 32);
    # None: the time limit, at least SQL_OVERRUN_GRACE_MIN_S.
    overrun_grace_s: float | None = None

    @property
    def deadline(self) -> float:
        return self.deadline_s if self.deadline_s is not None else float(self.limits.max_execution_s) + 1.0

    @property
    def overrun_grace(self) -> float:
        if self.overrun_grace_s is not None:
            return self.overrun_grace_s
        return max(SQL_OVERRUN_GRACE_MIN_S, float(self.limits.max_execution_s))


def _cfg() -> AnalystConfig:
    cfg: AnalystConfig = current_app.config["TALLY_ANALYST"]
    return cfg


def _slots() -> QuerySlots:
    slots: QuerySlots = current_app.extensions["tally_query_slots"]
    return slots


def _audit(sink: Callable[[AuditEntry], int | None], entry: AuditEntry) -> int | None:
    """Hand `entry` to the audit sink; the audit row's id, if the sink gives one."""
    metrics.count_analyst_query(entry.status, entry.duration_ms / 1000.0)  # every query ends here, once
    try:
        row_id = sink(entry)
    except Exception:
        log.exception("analyst: could not write the audit record")
        return None
    return row_id if isinstance(row_id, int) else None


def _authorised() -> bool:
    supplied = request.headers.get("Authorization", "")
    expected = f"Bearer {_cfg().token}"
    return hmac.compare_digest(supplied.encode(), expected.encode())


@bp.post("/v1/query")
def query() -> Response:
    parsed = _query_request()
    if isinstance(parsed, Response):
        if parsed.status_code == 400:
            _audit_invalid(parsed)
        return parsed
    sql, fmt, token_id, params = parsed
    extras = request_extras(request.get_json(silent=True) or {}, fmt)
    if isinstance(extras, str):
        return _audit_invalid(error(400, "invalid_body", extras))
    cfg, started, t0 = _cfg(), datetime.now(UTC), time.monotonic()
    stats, sink = QueryStats(), current_app.extensions["tally_audit"]  # the stream outlives the app context

    audited = threading.Event()

    def audit(status: str, message: str | None) -> int | None:  # once per query, whichever path ends it first
        if audited.is_set():
            return None
        audited.set()
        return _audit(sink, AuditEntry(token_id, started, sql[:100_000], extras.format, status, stats.rows,
                                       stats.bytes, (time.monotonic() - t0) * 1000.0, message, extras.client,
                                       extras.query_id))

    slots = _slots()
    try:
        client, release = slots.take(cfg.wait_s)
    except Busy:
        audit("busy", "every analyst query slot was taken")
        resp = _failure(extras, 429, "analyst_busy", f"{slots.size} analyst queries are already running; "
                        "retry shortly", code_for("busy", "", None))
        resp.headers["Retry-After"] = "1"
        return resp

    def work(tag: str) -> Iterator[bytes]:
        if extras.clickhouse:
            return ch_stream(client, sql, cfg.database, cfg.limits, stats, tag, extras, params)
        return stream(client, prepare(client, sql, cfg.database, params), cfg.limits, fmt, stats, tag, params)

    run = _watchdog().start(work, cfg.deadline, release, lambda: _close_quietly(client))
    return _answer(run, extras, stats, audit, cfg, t0)


def _answer(run: Run, extras: Extras, stats: QueryStats, audit: Callable[[str, str | None], int | None],
            cfg: AnalystConfig, t0: float) -> Response:
    """The response to a started query: whole (json; wait_end_of_query), or streamed after its first chunk."""
    try:
        if not extras.streamed():
            payload = b"".join(iter(run.next_chunk, None))
        else:
            first = run.next_chunk() or b""
    except AnalystQueryError as exc:
        run.close()
        audit(exc.code, exc.message)
        return _failure(extras, 400, _ERROR_CODES.get(exc.code, "query_failed"),
                        public_message(exc.message, cfg.database), code_for(exc.code, exc.message, exc.ch_code))
    except DeadlineReached:
        run.audit_id = audit("timeout", _cancelled(run, cfg))  # named in the log if it overruns its grace
        return _failure(extras, 400, "query_timeout", _timeout_message(cfg), code_for("timeout", "", None))
    except BaseException:
        run.close()
        audit("failed", "internal error")
        raise
    if not extras.streamed():
        run.close()
        audit("ok", None)
        resp = Response(payload, status=200, content_type=extras.content_type())
        if extras.clickhouse:
            resp.headers.update(answer_headers(extras, stats, time.monotonic() - t0))
        return resp
    resp = Response(_rest(run, first, stats, audit, cfg), status=200, content_type=extras.content_type())
    resp.headers["X-Tally-Format"] = extras.format
    if extras.clickhouse:
        resp.headers.update(answer_headers(extras, stats, None))

    def closed() -> None:  # also when the server never started the body (the caller left before it)
        run.close()
        audit("cancelled", "the client went away")

    resp.call_on_close(closed)
    return resp


def _audit_invalid(resp: Response) -> Response:
    """A request refused for its shape (invalid_body, invalid_format, invalid_params) in the audit log too, with
    what of it can be read: the query, who asked, the query id."""
    body = request.get_json(silent=True)
    body = body if isinstance(body, dict) else {}

    def text(name: str, limit: int) -> str | None:
        value = body.get(name)
        return value[:limit] if isinstance(value, str) else None

    query_id = text("query_id", 200)
    message = str(((resp.get_json(silent=True) or {}).get("error") or {}).get("message") or "invalid request")
    _audit(current_app.extensions["tally_audit"], AuditEntry(
        text("token_id", 200), datetime.now(UTC), text("sql", 100_000) or "", text("format", 40) or "-", "refused",
        0, 0, 0.0, message, text("client", 200), query_id if query_id and QUERY_ID.fullmatch(query_id) else None))
    return resp


def _query_request() -> tuple[str, str, str | None, dict[str, str]] | Response:
    """(sql, format, token_id, params) of an authorised, well-formed query request, or the error to answer."""
    if not _authorised():
        resp = error(401, "unauthorized", "the analyst server answers the API only")
        resp.headers["WWW-Authenticate"] = "Bearer"
        return resp
    body = request.get_json(silent=True)
    if not isinstance(body, dict) or not isinstance(body.get("sql"), str):
        return error(400, "invalid_body", 'send a JSON object {"sql": "SELECT ...", "format": "json"}')
    fmt = body.get("format", "json")
    if fmt not in FORMATS and not is_ch_format(fmt):
        return error(400, "invalid_format", f"format must be one of {', '.join(FORMATS)} or an allowlisted "
                     "ClickHouse format (olap/ch_formats.py)")
    token_id = body.get("token_id") if isinstance(body.get("token_id"), str) else None
    try:
        params = parse_params(body.get("params"))
    except ParamsError as exc:
        return error(400, "invalid_params", str(exc))
    return body["sql"], fmt, token_id, params


def _rest(run: Run, first: bytes, stats: QueryStats, audit: Callable[[str, str | None], int | None],
          cfg: AnalystConfig) -> Iterator[bytes]:
    """A streamed answer after its first chunk. A failure or the deadline cuts it: the server drops the
    connection without the final chunk, so the client sees an incomplete body, never a short file."""
    status: str = "cancelled"
    message: str | None = "the client went away"
    try:
        if first:
            yield first
        while (chunk := run.next_chunk()) is not None:
            yield chunk
        status, message = "ok", None
    except AnalystQueryError as exc:
        status, message = exc.code, exc.message
        log.warning("analyst: streamed query cut after %d bytes: %s", stats.bytes, exc.message)
        raise
    except DeadlineReached:
        status, message = "timeout", _cancelled(run, cfg)
        log.warning("analyst: streamed query cut after %d bytes at its deadline", stats.bytes)
        raise
    finally:
        run.close()
        audit_id = audit(status, message)
        if status == "timeout":
            run.audit_id = audit_id


def _failure(extras: Extras, status: int, code: str, message: str, clickhouse_code: int) -> Response:
    """An error answer; for the ClickHouse endpoint with the ClickHouse error code its answer carries."""
    if extras.clickhouse:
        return error(status, code, message, clickhouse_code=clickhouse_code)
    return error(status, code, message)


def _timeout_message(cfg: AnalystConfig) -> str:
    return (f"the query ran longer than {cfg.limits.max_execution_s} s (max execution time) and was cancelled; "
            f"aggregate more, add a LIMIT or narrow the time range")


def _cancelled(run: Run, cfg: AnalystConfig) -> str:
    """The audit row's account of a query the watchdog cut at its deadline."""
    slot = ("its slot was handed back at once" if run.slot_freed else
            "its slot comes back when that block ends (too many cancelled queries still computing)")
    return (f"cancelled by the watchdog at the {cfg.deadline:g} s deadline (time limit "
            f"{cfg.limits.max_execution_s} s): ClickHouse was still inside one block; it was told to stop "
            f"(KILL QUERY) and {slot}; if it still computes {cfg.overrun_grace:g} s after the deadline, the "
            f"analyst server restarts (query tag {run.tag})")


def _close_quietly(client: Any) -> None:
    try:
        client.close()
    except Exception:
        log.exception("analyst: closing a cancelled query's client failed")


def _watchdog() -> Watchdog:
    watchdog: Watchdog = current_app.extensions["tally_watchdog"]
    return watchdog


def clickhouse_killer(make_client: Callable[[], Any]) -> Callable[[str], None]:
    """kill(tag): `KILL QUERY ... ASYNC` for the query started with log_comment = tag, on a client of its own."""
    lock = threading.Lock()
    holder: list[Any] = []

    def kill(tag: str) -> None:
        if not tag.replace("-", "").isalnum():
            raise ValueError(f"unexpected query tag {tag!r}")
        with lock:
            if not holder:
                holder.append(make_client())
            holder[0].command(f"KILL QUERY WHERE Settings['log_comment'] = '{tag}' ASYNC")

    return kill


@bp.get("/healthz")
def healthz() -> Response:
    return json_response({"status": "ok"})


@bp.get("/readyz")
def readyz() -> Response:
    """Whether a query slot's ClickHouse client answers `SELECT 1` (waits for a free slot up to wait_s)."""
    slots = _slots()
    try:
        client, release = slots.take(_cfg().wait_s)
    except Busy:
        return json_response({"status": "ready", "note": "every query slot is busy"}, 200)
    try:
        client.query("SELECT 1")
    except Exception as exc:
        return error(503, "not_ready", f"ClickHouse does not answer ({type(exc).__name__})")
    finally:
        release()
    return json_response({"status": "ready"}, 200)


def utc_iso(value: datetime | None) -> str | None:
    """An ISO time with its zone from a `DateTime64(.., 'UTC')` value, which the driver may hand back naive
    (the API's OpenAPI says date-time); None for None or the epoch, ClickHouse's max() over no rows."""
    if not value or value.year <= 1970:
        return None
    return (value if value.tzinfo else value.replace(tzinfo=UTC)).isoformat()


@bp.get("/v1/freshness")
def freshness() -> Response:
    """When the loader last wrote to ClickHouse (its offsets' newest `written_at`), for the ingestion status."""
    if not _authorised():
        return error(401, "unauthorized", "the analyst server answers the API only")
    slots = _slots()
    try:
        client, release = slots.take(_cfg().wait_s)
    except Busy:
        return error(429, "analyst_busy", "every analyst query slot is taken; retry shortly")
    db = _cfg().database
    try:
        rows = client.query(f"SELECT max(written_at) FROM {db}.consumer_offsets"
                            " WHERE consumer_group = {g:String}", parameters={"g": LOADER_GROUP}).result_rows
        # For `tally status`: the loader's stored offsets (lag = end offset - next_offset) and the newest
        # event it loaded (among events of the last 8 days: what arrives now has a `ts` within
        # TALLY_MAX_PAST_AGE_S, 7 days by default; the day key prunes the scan to those parts).
        offsets = client.query(
            f"SELECT topic, partition, argMax(topic_id, written_at), argMax(next_offset, written_at),"
            f" max(written_at) FROM {db}.consumer_offsets WHERE consumer_group = {{g:String}}"
            " GROUP BY topic, partition ORDER BY topic, partition", parameters={"g": LOADER_GROUP}).result_rows
        newest = client.query(f"SELECT max(received_at) FROM {db}.events"
                              " WHERE toDate(ts) >= today() - 8").result_rows
    finally:
        release()

    return json_response({
        "loader_written_at": utc_iso(rows[0][0] if rows else None),
        "newest_received_at": utc_iso(newest[0][0] if newest else None),
        "loader_offsets": [{"topic": t, "partition": int(p), "topic_id": tid, "next_offset": int(o),
                            "written_at": utc_iso(w)} for t, p, tid, o, w in offsets]})


@bp.post("/v1/internal/aggregates")
def internal_aggregates() -> Response:
    """Reconcile and rebuild (ADR 20): fixed, parameterised questions about `tally.events FINAL` and the loader's
    offsets (olap/aggregates.py validates the body by allowlist); never SQL from the caller. The API's token only."""
    if not _authorised():
        return error(401, "unauthorized", "the analyst server answers the API only")
    try:
        op, kwargs = parse_request(request.get_json(silent=True))
    except ValueError as exc:
        return error(400, "invalid_body", str(exc))
    # The loader's offsets (a few rows, asked every few seconds by the shipper to free spool space, ADR 28)
    # have a client of their own: analysts holding every query slot must not fill the collector's disk.
    slots = current_app.extensions["tally_offsets_slot"] if op == "offsets" else _slots()
    try:
        client, release = slots.take(30.0)
    except Busy:
        return error(429, "analyst_busy", "every analyst query slot is taken; retry shortly")
    try:
        source = ClickHouseAggregates(client, _cfg().database)
        result = cast(dict[str, Callable[..., Any]], {"aggregates": source.aggregates, "events": source.events,
                  "offsets": source.loader_offsets, "visitors": source.visitors,
                  "dimensions": source.dimensions})[op](**kwargs)
    except TooManyRows as exc:
        return error(413, "too_many_rows", str(exc))
    except Exception as exc:  # the caller gets the kind of failure, the log the details
        log.exception("analyst: internal %s query failed", op)
        return error(503, "clickhouse_failed", f"ClickHouse could not answer ({type(exc).__name__})")
    finally:
        release()
    return Response(encode_answer(op, result), status=200, mimetype="application/json")


def create_analyst_app(config: AnalystConfig, slots: QuerySlots, audit: Callable[[AuditEntry], int | None],
                       allowed_hosts: tuple[str, ...]) -> Flask:
    app = Flask(__name__)
    app.config["TALLY_ANALYST"] = config
    app.config["MAX_CONTENT_LENGTH"] = 1024 * 1024
    app.extensions["tally_query_slots"] = slots
    app.extensions["tally_offsets_slot"] = QuerySlots(slots.make_client, 1)
    app.extensions["tally_audit"] = audit
    # At most as many cancelled queries still computing as there are slots: ClickHouse runs at most twice
    # TALLY_SQL_MAX_CONCURRENT analyst queries at once, and none of them past its deadline + the grace.
    app.extensions["tally_watchdog"] = Watchdog(clickhouse_killer(slots.make_client), max_abandoned=slots.size,
                                                overrun_grace_s=config.overrun_grace)
    install_host_check(app, allowed_hosts)
    app.register_blueprint(bp)
    install_json_errors(app)
    return app
