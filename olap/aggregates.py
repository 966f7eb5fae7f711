"""The ClickHouse side of reconcile and rebuild: fixed, parameterised queries over `tally.events FINAL`.

Three questions, nothing else (no caller ever sends SQL):
- `aggregates(lo, hi, domain)`: per (domain, type, UTC quarter hour) the event count, the events that
  carried a value, and the value sum / min / max, for events with lo <= ts < hi;
- `events(lo, hi, domain, keys)`: the deduplicated events of that range (hash, domain, type, ts, value,
  received_at), optionally only those of some (domain, type, bucket) keys;
- `loader_offsets(group, topic)`: the loader group's stored offsets per partition (topic id, next offset);
- `visitors(lo, hi, domain)`: the distinct (domain, quarter hour, visitor, dimension values) of the non-bot
  events with a visitor key, from which `tally rebuild` recomputes the visitor sketches (ADR 47).
- `dimensions(lo, hi, domain)`: the non-bot events (hash, domain, type, ts, value, six dimension values), from
  which `tally rebuild` recomputes the rollups by dimension and `tally reconcile` checks them (ADR 46).

Two ways to ask them, with one interface (duck-typed; `oltp` takes any object with these methods):
`ClickHouseAggregates` with a clickhouse-connect client (a ClickHouse server, or chDB inside the process
that owns the directory), and `RemoteAggregates`, which asks the analyst server's internal route
(`POST /v1/internal/aggregates`, bearer = the internal token) because with embedded chDB only that
process may open the directory (ADR 3, ADR 10, ADR 20).

Rows (plain tuples, so that `oltp` needs nothing from here):
- aggregate row: (domain, type, bucket_start: datetime UTC, events, valued, value_sum, value_min, value_max),
  the last three `Decimal` or None when no event carried a value;
- event row: (hash: 32 hex digits, domain, type, ts: datetime UTC, value: Decimal | None, received_at).
"""

from __future__ import annotations

import http.client
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any
from urllib.parse import urlsplit

import orjson

MAX_EVENT_ROWS = 2_000_000  # one `events` answer; a larger range is refused (ask for a smaller one)
OPS = ("aggregates", "events", "offsets", "visitors", "dimensions")

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

AggregateRow = tuple[str, str, datetime, int, int, "Decimal | None", "Decimal | None", "Decimal | None"]
EventRow = tuple[str, str, str, datetime, "Decimal | None", datetime]
# (domain, UTC quarter hour, visitor, page, source, country, device, browser, os): '' for a missing value
VisitorRow = tuple[str, datetime, str, str, str, str, str, str, str]
# (hash, domain, type, ts, value, page, source, country, device, browser, os): '' for a missing value
DimensionRow = tuple[str, str, str, datetime, "Decimal | None", str, str, str, str, str, str]
Key = tuple[str, str, datetime]


class AggregatesError(Exception):
    """ClickHouse could not answer (unreachable, refused, too many rows); the message says which."""


class TooManyRows(AggregatesError):
    pass


def _ms(t: datetime) -> int:
    if t.tzinfo is None:
        raise ValueError("aggregates: times must be timezone-aware")
    return round(t.timestamp() * 1000)  # exact for millisecond times (a double holds 2**53 ms)


def _from_ms(ms: int) -> datetime:
    return _EPOCH + timedelta(milliseconds=int(ms))


def _dec(text: str | None) -> Decimal | None:
    return None if text is None else Decimal(text)


def key_text(key: Key) -> str:
    """One (domain, type, bucket) key as the events query matches it: 'domain|type|epoch seconds'."""
    domain, event_type, bucket = key
    return f"{domain}|{event_type}|{_ms(bucket) // 1000}"


_WHERE = ("ts >= fromUnixTimestamp64Milli({lo:Int64}, 'UTC') AND ts < fromUnixTimestamp64Milli({hi:Int64}, 'UTC')"
          " AND ({domain:String} = '' OR domain = {domain:String})")


class ClickHouseAggregates:
    """The three questions on a clickhouse-connect client (`db` is a validated identifier from Settings)."""

    def __init__(self, client: Any, db: str) -> None:
        self.client = client
        self.db = db

    def aggregates(self, lo: datetime, hi: datetime, domain: str | None = None) -> list[AggregateRow]:
        rows = self.client.query(
            "SELECT domain, type, toUnixTimestamp(toStartOfFifteenMinutes(ts)) AS bucket, count(), count(value),"
            " toString(sum(value)), toString(min(value)), toString(max(value))"
            f" FROM {self.db}.events FINAL WHERE {_WHERE} GROUP BY domain, type, bucket",
            parameters={"lo": _ms(lo), "hi": _ms(hi), "domain": domain or ""}).result_rows
        return [(d, t, _from_ms(b * 1000), int(n), int(v), *((_dec(x) for x in (s, mn, mx)) if v else (None,) * 3))
                for d, t, b, n, v, s, mn, mx in rows]

    def events(self, lo: datetime, hi: datetime, domain: str | None = None,
               keys: Iterable[Key] | None = None) -> list[EventRow]:
        """Raises TooManyRows past MAX_EVENT_ROWS (nothing is returned then)."""
        where, params = _WHERE, {"lo": _ms(lo), "hi": _ms(hi), "domain": domain or ""}
        if keys is not None:
            where += (" AND has({keys:Array(String)}, concat(domain, '|', type, '|',"
                      " toString(toUnixTimestamp(toStartOfFifteenMinutes(ts)))))")
            params["keys"] = sorted({key_text(k) for k in keys})
        rows = self.client.query(
            "SELECT toString(hash), domain, type, toUnixTimestamp64Milli(ts), toString(value),"
            f" toUnixTimestamp64Milli(received_at) FROM {self.db}.events FINAL WHERE {where}"
            f" LIMIT {MAX_EVENT_ROWS + 1}", parameters=params).result_rows
        if len(rows) > MAX_EVENT_ROWS:
            raise TooManyRows(f"more than {MAX_EVENT_ROWS} events in the range; ask for a shorter one or one domain")
        return [(h, d, t, _from_ms(ts), _dec(v), _from_ms(r)) for h, d, t, ts, v, r in rows]

    def visitors(self, lo: datetime, hi: datetime, domain: str | None = None) -> list[VisitorRow]:
        """The distinct (domain, quarter hour, visitor, six dimension values) of the non-bot events with a visitor
        key (oltp/visitors.py rebuilds its sketches from them; ADR 47). Raises TooManyRows past MAX_EVENT_ROWS."""
        rows = self.client.query(
            "SELECT DISTINCT domain, toUnixTimestamp(toStartOfFifteenMinutes(ts)) AS q, visitor, ifNull(page, ''),"
            " ifNull(source, ''), ifNull(country, ''), ifNull(device, ''), ifNull(browser, ''), ifNull(os, '')"
            f" FROM {self.db}.events FINAL WHERE {_WHERE} AND visitor IS NOT NULL AND ifNull(device, '') != 'bot'"
            f" LIMIT {MAX_EVENT_ROWS + 1}",
            parameters={"lo": _ms(lo), "hi": _ms(hi), "domain": domain or ""}).result_rows
        if len(rows) > MAX_EVENT_ROWS:
            raise TooManyRows(f"more than {MAX_EVENT_ROWS} visitor rows in the range; ask for a shorter one or one"
                              " domain")
        return [(d, _from_ms(q * 1000), v, *dims) for d, q, v, *dims in rows]

    def dimensions(self, lo: datetime, hi: datetime, domain: str | None = None) -> list[DimensionRow]:
        """The non-bot events of the range with their six dimension values: what `tally rebuild` recomputes the
        rollups by dimension from, and `tally reconcile` compares them with (ADR 46). Raises TooManyRows past
        MAX_EVENT_ROWS."""
        rows = self.client.query(
            "SELECT toString(hash), domain, type, toUnixTimestamp64Milli(ts), toString(value), ifNull(page, ''),"
            " ifNull(source, ''), ifNull(country, ''), ifNull(device, ''), ifNull(browser, ''), ifNull(os, '')"
            f" FROM {self.db}.events FINAL WHERE {_WHERE} AND ifNull(device, '') != 'bot' LIMIT {MAX_EVENT_ROWS + 1}",
            parameters={"lo": _ms(lo), "hi": _ms(hi), "domain": domain or ""}).result_rows
        if len(rows) > MAX_EVENT_ROWS:
            raise TooManyRows(f"more than {MAX_EVENT_ROWS} events in the range; ask for a shorter one or one domain")
        return [(r[0], r[1], r[2], _from_ms(r[3]), _dec(r[4]), *r[5:]) for r in rows]

    def loader_offsets(self, group: str, topic: str) -> dict[int, tuple[str, int]]:
        rows = self.client.query(
            "SELECT partition, argMax(topic_id, written_at), argMax(next_offset, written_at)"
            f" FROM {self.db}.consumer_offsets WHERE consumer_group = {{g:String}} AND topic = {{t:String}}"
            " GROUP BY partition", parameters={"g": group, "t": topic}).result_rows
        return {int(p): (str(tid), int(o)) for p, tid, o in rows}


# ------------------------------------------------------------------ the wire format of the internal route

def _str(x: object) -> str | None:
    return None if x is None else str(x)


def encode_answer(op: str, result: Any) -> bytes:
    """The JSON body the analyst server answers for `op` (times as epoch ms, decimals as strings)."""
    if op == "aggregates":
        rows = [[d, t, _ms(b), n, v, _str(s), _str(mn), _str(mx)] for d, t, b, n, v, s, mn, mx in result]
    elif op == "events":
        rows = [[h, d, t, _ms(ts), _str(v), _ms(r)] for h, d, t, ts, v, r in result]
    elif op == "visitors":
        rows = [[d, _ms(q), *rest] for d, q, *rest in result]
    elif op == "dimensions":
        rows = [[r[0], r[1], r[2], _ms(r[3]), _str(r[4]), *r[5:]] for r in result]
    else:
        rows = [[p, tid, o] for p, (tid, o) in sorted(result.items())]
    return orjson.dumps({"op": op, "rows": rows})


def _aggregate_rows(rows: list[list[Any]]) -> list[AggregateRow]:
    return [(d, t, _from_ms(b), int(n), int(v), _dec(s), _dec(mn), _dec(mx))
            for d, t, b, n, v, s, mn, mx in rows]


def _event_rows(rows: list[list[Any]]) -> list[EventRow]:
    return [(h, d, t, _from_ms(ts), _dec(v), _from_ms(r)) for h, d, t, ts, v, r in rows]


def _visitor_rows(rows: list[list[Any]]) -> list[VisitorRow]:
    return [(d, _from_ms(q), v, p, s, c, dv, b, o) for d, q, v, p, s, c, dv, b, o in rows]


def _dimension_rows(rows: list[list[Any]]) -> list[DimensionRow]:
    return [(h, d, t, _from_ms(ts), _dec(v), p, s, c, dv, b, o) for h, d, t, ts, v, p, s, c, dv, b, o in rows]


def _offsets(rows: list[list[Any]]) -> dict[int, tuple[str, int]]:
    return {int(p): (str(tid), int(o)) for p, tid, o in rows}


def parse_request(body: Any) -> tuple[str, dict[str, Any]]:
    """Validate an internal request body by allowlist: (op, keyword arguments). Raises ValueError naming the field."""
    if not isinstance(body, dict):
        raise ValueError('send a JSON object {"op": "aggregates" | "events" | "offsets" | "visitors" | "dimensions",'
                         ' ...}')
    unknown = set(body) - {"op", "from_ms", "to_ms", "domain", "keys", "group", "topic"}
    if unknown:
        raise ValueError(f"unknown field {min(unknown)!r}")
    op = body.get("op")
    if op not in OPS:
        raise ValueError(f"op must be one of {', '.join(OPS)}")
    if op == "offsets":
        group, topic = body.get("group"), body.get("topic")
        if not isinstance(group, str) or not isinstance(topic, str) or not group or not topic:
            raise ValueError("offsets needs 'group' and 'topic' (strings)")
        return op, {"group": group, "topic": topic}
    lo, hi, domain = body.get("from_ms"), body.get("to_ms"), body.get("domain")
    if not isinstance(lo, int) or not isinstance(hi, int) or isinstance(lo, bool) or isinstance(hi, bool) \
            or not lo < hi:
        raise ValueError("'from_ms' and 'to_ms' must be integers (epoch milliseconds) with from_ms < to_ms")
    if domain is not None and (not isinstance(domain, str) or len(domain) > 253):
        raise ValueError("'domain' must be a host name or null")
    args: dict[str, Any] = {"lo": _from_ms(lo), "hi": _from_ms(hi), "domain": domain or None}
    if op == "events" and body.get("keys") is not None:
        keys = body["keys"]
        if not isinstance(keys, list) or not all(
                isinstance(k, list) and len(k) == 3 and isinstance(k[0], str) and isinstance(k[1], str)
                and isinstance(k[2], int) and not isinstance(k[2], bool) for k in keys):
            raise ValueError("'keys' must be a list of [domain, type, bucket epoch ms]")
        args["keys"] = [(d, t, _from_ms(b)) for d, t, b in keys]
    elif body.get("keys") is not None:
        raise ValueError("'keys' is only for op 'events'")
    return op, args


class RemoteAggregates:
    """The same three questions, asked of the analyst server that owns ClickHouse (internal token)."""

    PATH = "/v1/internal/aggregates"

    def __init__(self, base_url: str, token: str, *, timeout_s: float = 300.0) -> None:
        parts = urlsplit(base_url)
        self._https = parts.scheme == "https"
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port or (443 if self._https else 80)
        self._path = parts.path.rstrip("/") + self.PATH
        self._token = token
        self.timeout_s = timeout_s

    def _ask(self, op: str, body: dict[str, Any]) -> list[list[Any]]:
        """The answer's rows, as JSON gives them (the caller decodes them for `op`)."""
        cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
        conn = cls(self._host, self._port, timeout=self.timeout_s)
        try:
            conn.request("POST", self._path, body=orjson.dumps({"op": op, **body}),
                         headers={"Content-Type": "application/json", "Authorization": f"Bearer {self._token}"})
            resp = conn.getresponse()
            data = resp.read()
        except OSError as exc:
            raise AggregatesError(f"the analyst server at {self._host}:{self._port} is unreachable ({exc}); "
                                  "is `tally up` (or `tally analyst-server`) running?") from exc
        finally:
            conn.close()
        if resp.status != 200:
            try:
                message = orjson.loads(data)["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = f"HTTP {resp.status}"
            raise (TooManyRows if resp.status == 413 else AggregatesError)(f"the analyst server refused: {message}")
        rows: list[list[Any]] = orjson.loads(data)["rows"]
        return rows

    def aggregates(self, lo: datetime, hi: datetime, domain: str | None = None) -> list[AggregateRow]:
        return _aggregate_rows(self._ask("aggregates", {"from_ms": _ms(lo), "to_ms": _ms(hi), "domain": domain}))

    def events(self, lo: datetime, hi: datetime, domain: str | None = None,
               keys: Sequence[Key] | None = None) -> list[EventRow]:
        body: dict[str, Any] = {"from_ms": _ms(lo), "to_ms": _ms(hi), "domain": domain}
        if keys is not None:
            body["keys"] = [[d, t, _ms(b)] for d, t, b in keys]
        return _event_rows(self._ask("events", body))

    def visitors(self, lo: datetime, hi: datetime, domain: str | None = None) -> list[VisitorRow]:
        return _visitor_rows(self._ask("visitors", {"from_ms": _ms(lo), "to_ms": _ms(hi), "domain": domain}))

    def dimensions(self, lo: datetime, hi: datetime, domain: str | None = None) -> list[DimensionRow]:
        return _dimension_rows(self._ask("dimensions", {"from_ms": _ms(lo), "to_ms": _ms(hi), "domain": domain}))

    def loader_offsets(self, group: str, topic: str) -> dict[int, tuple[str, int]]:
        return _offsets(self._ask("offsets", {"group": group, "topic": topic}))
