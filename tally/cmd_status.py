"""`tally status [--json]`: every process up or down, spool backlog, broker, lag per group and partition,
freshness of each store. Works from a second terminal next to a running `tally up` (same TALLY_HOME: it
reads `$TALLY_HOME/run/stack.json`) and in production from settings alone (URLs, DSNs, bootstrap servers).

Contract:
- every probe runs in its own daemon thread and the report is assembled at `--timeout` (default 5 s)
  at the latest: a probe still running then is reported `down` with detail "no answer within ...",
  so a hung broker or database never hangs `tally status`;
- exit 0 when every process it can see is up (and ready), the broker and PostgreSQL answer; exit 1
  when the report says something is down or not ready; exit 2 on a configuration error;
- the report never holds a DSN, a password or a token (PostgreSQL is shown as host:port/db).

The `--json` shape (version 1, keys stable; `null` where a value is unknown):
  {"version": 1, "as_of", "ok", "source": "tally up" | "settings", "timeout_s",
   "processes": {name: {"state": "up|down|unready|unknown", "pid", "url", "detail"}},
   "spool": {"state": "ok|missing|down", "dir", "segments", "bytes", "oldest_age_s", "open_segments",
             "open_bytes", "retained_segments", "retained_bytes", "quarantined_bytes", "detail"},
   "broker": {"state": "up|down", "bootstrap", "topic", "topic_id", "end_offsets": {partition: offset}, "detail"},
   "lag": {group: {"store", "state": "ok|unknown", "total", "partitions": {partition: {"end_offset",
           "stored_offset", "lag"}}, "detail"}},
   "stores": {"postgresql" | "clickhouse": {"state": "up|down|unknown", "where", "last_write_at",
              "last_write_age_s", "newest_event_at", "newest_event_age_s", "detail"}}}
Next to `tally up --hosts N` (N > 1, ADR 59) `processes` names every supervised process as the topology does
(`c1-collector`, `c1-shipper`, ..., `rollup-worker-1`, `api-1`, `api-front`, ...), `spool` sums every collector
host's spool (`dir` null) and one more key says how each host is:
   "hosts": {"c1": {"state": "up|down|unready", "collector_url", "collector", "shipper", "spool": {as above}}}
"""

from __future__ import annotations

import argparse
import functools
import http.client
import json
import logging
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from core.config import LOADER_GROUP, ROLLUP_GROUP, Settings
from tally import status_hosts
from tally.status_hosts import DOWN, UNKNOWN, UNREADY, UP, Hosts

if TYPE_CHECKING:
    from tally.cli_support import SubParsers

SCHEMA_VERSION = 1
HTTP_COMPONENTS = ("collector", "api", "analyst")  # answer /healthz and /readyz
# What `tally up` runs (tally/platform.py; stack.json "pids" uses these names), in pipeline order.
UP_PROCESSES = ("up", "postgres", "broker", "collector", "shipper", "rollup-worker", "analyst", "api",
                "clickhouse-http")
PING_COMPONENTS = ("clickhouse-http",)  # answer /ping (ClickHouse's health check), no /healthz


def register(sub: SubParsers) -> None:
    status = sub.add_parser("status", help="processes up/down, spool backlog, consumer lag, store freshness")
    status.add_argument("--json", action="store_true", help="one JSON object (shape documented in README.md)")
    status.add_argument("--timeout", default="5", metavar="DURATION",
                        help="answer after at most this long (0.5 to 120 seconds: 5, 5s, 1m; default 5); probes "
                        "still running then count as down")
    status.set_defaults(func=cmd_status)


def cmd_status(settings: Settings, args: argparse.Namespace) -> int:
    from tally.timespec import TimeSyntaxError, parse_seconds

    try:
        timeout_s = parse_seconds(args.timeout, "--timeout", low=0.5, high=120)
    except TimeSyntaxError as exc:
        print(f"tally status: {exc}", file=sys.stderr)
        return 2
    # The report says what failed; the clients' own error lines would only repeat it on stderr.
    logging.getLogger("kafka").setLevel(logging.CRITICAL)
    report = collect(settings, timeout_s=timeout_s)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        render(report)
    return 0 if report["ok"] else 1


# -- where to look -------------------------------------------------------------------------------


@dataclass
class Targets:
    source: str  # "tally up" | "settings"
    up_pid: int | None
    pids: dict[str, int]
    urls: dict[str, str]  # collector, api, analyst, clickhouse-http base URLs (no credentials)
    bootstrap: tuple[str, ...]
    pg_dsn: str | None = field(repr=False)
    internal_token: str | None = field(repr=False)
    spool_dir: Path
    topic: str
    components: dict[str, dict[str, Any]] = field(default_factory=dict)  # the supervisor's view (stack.json)
    hosts: Hosts | None = None  # `tally up --hosts N`, N > 1: the collector hosts and API processes


def _loopback(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


def _strip_credentials(url: str) -> str:
    parts = urlsplit(url)
    netloc = parts.hostname or ""
    if ":" in netloc:
        netloc = f"[{netloc}]"
    if parts.port:
        netloc += f":{parts.port}"
    return parts._replace(netloc=netloc).geturl().rstrip("/")


def targets(settings: Settings) -> Targets:
    """A running `tally up` (its stack.json, pid alive) wins over settings for what it wrote."""
    from core.keys import internal_token
    from infra.processes import pid_alive
    from tally.roots import read_run_state

    state = read_run_state(settings.home)
    up_pid = state.get("pid")
    running = isinstance(up_pid, int) and pid_alive(up_pid)
    if not running:
        state = {}
    host = _loopback(settings.bind_host)
    urls = {"collector": str(state.get("collector_url") or f"http://{host}:{settings.collector_port}"),
            "api": str(state.get("api_url") or f"http://{host}:{settings.api_port}"),
            "analyst": str(state.get("analyst_url") or settings.analyst_url),
            "clickhouse-http": str(state.get("clickhouse_http_url")
                                   or f"http://{host}:{settings.clickhouse_http_port}")}
    bootstrap = settings.kafka_bootstrap or tuple(
        b for b in str(state.get("kafka_bootstrap") or "").split(",") if b)
    secret = settings.secret
    if secret is None:
        try:
            secret = (settings.home / "secret").read_text().strip() or None  # `tally up` wrote it (0600)
        except OSError:
            secret = None
    hosts = status_hosts.read(state)
    if hosts is not None:
        urls.update(status_hosts.process_urls(hosts, urls["api"]))
    raw_pids = state.get("pids")
    pids = ({str(k): v for k, v in raw_pids.items() if isinstance(v, int)} if isinstance(raw_pids, dict) else {})
    raw_components = state.get("components")
    components = ({str(k): v for k, v in raw_components.items() if isinstance(v, dict)}
                  if isinstance(raw_components, dict) else {})
    return Targets(
        source="tally up" if running else "settings",
        up_pid=up_pid if running and isinstance(up_pid, int) else None,
        pids=pids,
        urls={k: _strip_credentials(v) for k, v in urls.items()},
        bootstrap=bootstrap,
        pg_dsn=settings.pg_dsn or (str(state["pg_dsn"]) if state.get("pg_dsn") else None),
        internal_token=internal_token(secret) if secret else None,
        spool_dir=Path(str(state.get("spool_dir") or settings.spool_dir)),
        topic=settings.topic,
        components=components,
        hosts=hosts,
    )


# -- probes (each returns a JSON-ready dict; each is time-bound on its own too) --------------------------


def _get(url: str, timeout_s: float, token: str | None = None) -> tuple[int, bytes]:
    parts = urlsplit(url)
    cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    conn = cls(parts.hostname or "127.0.0.1", parts.port, timeout=timeout_s)
    try:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        conn.request("GET", parts.path or "/", headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read(64 * 1024)
    finally:
        conn.close()


def _reason(body: bytes) -> str:
    try:
        message = json.loads(body).get("error", {}).get("message")
    except (ValueError, AttributeError):
        message = None
    return str(message or body[:200].decode("utf-8", "replace"))


def _failure(exc: BaseException) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, TimeoutError):
        return "no answer in time"
    return f"{type(exc).__name__}: {exc}"


def probe_http(base: str, timeout_s: float) -> dict[str, Any]:
    """/healthz then /readyz: up (both 200), unready (alive, /readyz not 200), down (no answer)."""
    try:
        status, body = _get(base + "/healthz", timeout_s)
    except (OSError, http.client.HTTPException) as exc:
        return {"state": DOWN, "detail": f"/healthz: {_failure(exc)}"}
    if status != 200:
        return {"state": DOWN, "detail": f"/healthz answered {status}"}
    try:
        status, body = _get(base + "/readyz", timeout_s)
    except (OSError, http.client.HTTPException) as exc:
        return {"state": UNREADY, "detail": f"/readyz: {_failure(exc)}"}
    if status != 200:
        return {"state": UNREADY, "detail": f"/readyz answered {status}: {_reason(body)}"}
    return {"state": UP, "detail": None}


def probe_ping(base: str, timeout_s: float) -> dict[str, Any]:
    """/ping (the ClickHouse-compatible endpoint's health check): up (200 `Ok.`) or down."""
    try:
        status, body = _get(base + "/ping", timeout_s)
    except (OSError, http.client.HTTPException) as exc:
        return {"state": DOWN, "detail": f"/ping: {_failure(exc)}"}
    if status != 200:
        return {"state": DOWN, "detail": f"/ping answered {status}: {body[:100].decode('utf-8', 'replace')}"}
    return {"state": UP, "detail": None}


def _empty_spool(spool_dir: Path) -> dict[str, Any]:
    return {"state": "ok", "dir": str(spool_dir), "segments": 0, "bytes": 0, "oldest_age_s": None,
            "open_segments": 0, "open_bytes": 0, "retained_segments": 0, "retained_bytes": 0,
            "quarantined_bytes": 0, "detail": None}


def probe_spool(spool_dir: Path) -> dict[str, Any]:
    """Sealed segments waiting for the shipper, open ones being written, shipped ones retained (ADR 16)."""
    from spool.segments import OPEN, SEALED
    from workers.retention import SHIPPED_DIR

    out = _empty_spool(spool_dir)
    if not spool_dir.is_dir():
        out.update(state="missing", detail="no spool directory here (the collector runs on another host?)")
        return out
    now, oldest = time.time(), None

    def files(directory: Path, pattern: str) -> list[tuple[int, float]]:
        found = []
        for path in directory.glob(pattern):
            try:
                st = path.stat()
            except FileNotFoundError:  # shipped or sealed meanwhile
                continue
            found.append((st.st_size, st.st_mtime))
        return found

    sealed = files(spool_dir, f"*{SEALED}")
    opened = files(spool_dir, f"*{OPEN}")
    retained = files(spool_dir / SHIPPED_DIR, f"*{SEALED}") if (spool_dir / SHIPPED_DIR).is_dir() else []
    bad = files(spool_dir / "quarantine", "*") if (spool_dir / "quarantine").is_dir() else []
    # The backlog is what is not yet acknowledged by Kafka: sealed and open segments.
    for _size, mtime in sealed + opened:
        oldest = mtime if oldest is None else min(oldest, mtime)
    out.update(segments=len(sealed), bytes=sum(s for s, _ in sealed), open_segments=len(opened),
               open_bytes=sum(s for s, _ in opened), retained_segments=len(retained),
               retained_bytes=sum(s for s, _ in retained), quarantined_bytes=sum(s for s, _ in bad),
               oldest_age_s=round(max(0.0, now - oldest), 1) if sealed and oldest is not None else None)
    return out


def probe_broker(bootstrap: tuple[str, ...], topic: str, timeout_s: float) -> dict[str, Any]:
    """The topic's id and end offset per partition, from the brokers (kafka-python, time-bound)."""
    from kafka import KafkaConsumer, TopicPartition
    from kafka.errors import KafkaError

    out: dict[str, Any] = {"state": DOWN, "bootstrap": ",".join(bootstrap) or None, "topic": topic,
                           "topic_id": None, "end_offsets": {}, "detail": None}
    if not bootstrap:
        out["detail"] = "no broker known (set TALLY_KAFKA_BOOTSTRAP, or start `tally up`)"
        return out
    ms = max(600, int(timeout_s * 1000))
    consumer = None
    try:
        consumer = KafkaConsumer(bootstrap_servers=list(bootstrap), group_id=None, enable_auto_commit=False,
                                 request_timeout_ms=ms, bootstrap_timeout_ms=ms,
                                 reconnect_backoff_max_ms=500, metadata_max_age_ms=ms)
        partitions = consumer.partitions_for_topic(topic)
        if not partitions:
            out.update(state=UP, detail=f"topic {topic} does not exist (yet)")
            return out
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        ends = consumer.end_offsets(tps, timeout_ms=ms)
        topic_id = consumer._client.cluster.topic_id(topic)
        out.update(state=UP, topic_id=str(topic_id) if topic_id else None,
                   end_offsets={str(tp.partition): int(ends[tp]) for tp in tps})
    except (KafkaError, OSError, ValueError, AssertionError) as exc:
        out["detail"] = f"{type(exc).__name__}: {exc}"
    finally:
        if consumer is not None:
            try:
                consumer.close(timeout_ms=0) if _close_takes_timeout() else consumer.close()
            except Exception:
                pass
    return out


def _close_takes_timeout() -> bool:
    import inspect

    from kafka import KafkaConsumer

    return "timeout_ms" in inspect.signature(KafkaConsumer.close).parameters


def _pg_where(dsn: str) -> str:
    parts = urlsplit(dsn)
    host = parts.hostname or "?"
    return f"{host}:{parts.port or 5432}{parts.path or ''}"


def probe_postgres(dsn: str | None, topic: str, timeout_s: float) -> dict[str, Any]:
    """PostgreSQL: the rollup group's stored offsets, when it last wrote, the newest event it counted."""
    out: dict[str, Any] = {"state": UNKNOWN, "where": None, "offsets": {}, "last_write_at": None,
                           "newest_event_at": None, "detail": None}
    if not dsn:
        out["detail"] = "no PostgreSQL known (set TALLY_PG_DSN, or start `tally up`)"
        return out
    import psycopg

    out["where"] = _pg_where(dsn)
    ms = max(500, int(timeout_s * 1000))
    try:
        with psycopg.connect(dsn, connect_timeout=max(1, int(timeout_s)), autocommit=True,
                             options=f"-c statement_timeout={ms}") as conn:
            rows = conn.execute("SELECT partition, next_offset, topic_id, updated_at FROM consumer_offsets"
                                " WHERE consumer_group = %s AND topic = %s", (ROLLUP_GROUP, topic)).fetchall()
            out["offsets"] = {int(p): {"next_offset": int(o), "topic_id": tid, "written_at": w}
                              for p, o, tid, w in rows}
            out["last_write_at"] = max((w for *_, w in rows), default=None)
            try:
                newest = conn.execute("SELECT max(last_received_at) FROM ingestion_15m").fetchone()
                out["newest_event_at"] = newest[0] if newest else None
            except psycopg.Error as exc:  # an older schema: freshness by last write only
                out["detail"] = f"newest event unknown ({type(exc).__name__})"
        out["state"] = UP
    except psycopg.Error as exc:
        out.update(state=DOWN, detail=f"{type(exc).__name__}: {_first_line(exc)}")
    return out


def _first_line(exc: BaseException) -> str:
    from core.logs import redact

    return redact(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)


def probe_clickhouse(analyst_url: str, token: str | None, timeout_s: float, topic: str) -> dict[str, Any]:
    """ClickHouse through the analyst server (with chDB only it can read it): loader offsets, freshness."""
    out: dict[str, Any] = {"state": UNKNOWN, "where": None, "offsets": {}, "last_write_at": None,
                           "newest_event_at": None, "detail": None}
    if not token:
        out["detail"] = "TALLY_SECRET unknown: cannot ask the analyst server"
        return out
    try:
        status, body = _get(analyst_url + "/v1/freshness", timeout_s, token)
    except (OSError, http.client.HTTPException) as exc:
        out["detail"] = f"analyst server: {_failure(exc)}"
        return out
    if status != 200:
        out.update(state=DOWN if status >= 500 else UNKNOWN,
                   detail=f"analyst server answered {status}: {_reason(body)}")
        return out
    data = json.loads(body)
    out.update(state=UP, last_write_at=_parse_time(data.get("loader_written_at")),
               newest_event_at=_parse_time(data.get("newest_received_at")))
    if "loader_offsets" not in data:
        out["detail"] = "the analyst server does not report offsets (older version)"
    for row in data.get("loader_offsets") or []:
        if row.get("topic") == topic:
            out["offsets"][int(row["partition"])] = {"next_offset": int(row["next_offset"]),
                                                     "topic_id": row.get("topic_id") or ""}
    return out


def _parse_time(value: object) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    parsed = datetime.fromisoformat(value)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


# -- assembling -----------------------------------------------------------------------------------


def _run_all(probes: dict[str, Callable[[], dict[str, Any]]], timeout_s: float) -> dict[str, dict[str, Any] | None]:
    """Run every probe in its own daemon thread; None for those not done by the deadline."""
    results: dict[str, dict[str, Any] | None] = {name: None for name in probes}

    def run(name: str, probe: Callable[[], dict[str, Any]]) -> None:
        try:
            results[name] = probe()
        except Exception as exc:
            results[name] = {"state": DOWN, "detail": f"{type(exc).__name__}: {_first_line(exc)}"}

    threads = [threading.Thread(target=run, args=item, name=f"status-{item[0]}", daemon=True)
               for item in probes.items()]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout_s
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    return dict(results)  # a late probe may still write into `results`: hand out a copy


def _iso(value: datetime | None) -> str | None:
    return value.astimezone(UTC).isoformat() if value else None


def _age(value: datetime | None, now: datetime) -> float | None:
    return round(max(0.0, (now - value).total_seconds()), 1) if value else None


def lag_of(store: str, probe: dict[str, Any] | None, broker: dict[str, Any], topic: str) -> dict[str, Any]:
    out: dict[str, Any] = {"store": store, "state": UNKNOWN, "total": None, "partitions": {}, "detail": None}
    if broker.get("state") != UP or not broker.get("end_offsets"):
        out["detail"] = "broker end offsets unknown"
        return out
    if probe is None or probe.get("state") != UP:
        out["detail"] = f"{store} offsets unknown"
        return out
    current_id = broker.get("topic_id") or ""
    total = 0
    for key, end in sorted(broker["end_offsets"].items(), key=lambda kv: int(kv[0])):
        stored_row = probe["offsets"].get(int(key))
        stored = 0  # nothing stored for this incarnation: everything on the topic is still to be read
        if stored_row and (not current_id or not stored_row["topic_id"] or stored_row["topic_id"] == current_id):
            stored = stored_row["next_offset"]
        # tansu reports the last batch's base offset + 1 as the end: a stored offset may be past it.
        lag = max(0, int(end) - stored)
        total += lag
        out["partitions"][key] = {"end_offset": int(end), "stored_offset": stored, "lag": lag}
    out.update(state="ok", total=total)
    return out


def _http_names(t: Targets) -> list[str]:
    """The processes asked over HTTP: with several hosts, each collector and API process and the front
    (the single-host `collector` and `api` URLs are c1's and the front's then)."""
    if t.hosts is None:
        return [*HTTP_COMPONENTS, *PING_COMPONENTS]
    return [name for name in t.urls if name not in ("collector", "api")]


def spools_of(t: Targets) -> dict[str, Path]:
    """Probe name -> spool directory: `spool`, or one `spool:cI` per collector host."""
    if t.hosts is None:
        return {"spool": t.spool_dir}
    return {f"spool:{h.name}": h.spool_dir for h in t.hosts.collectors}


def _probes(t: Targets, each: float) -> dict[str, Callable[[], dict[str, Any]]]:
    """Every probe of the report, each bound to `each` seconds on its own."""
    probes: dict[str, Callable[[], dict[str, Any]]] = {
        f"http:{name}": functools.partial(probe_ping if name in PING_COMPONENTS else probe_http, t.urls[name], each)
        for name in _http_names(t)}
    for name, spool_dir in spools_of(t).items():
        probes[name] = functools.partial(probe_spool, spool_dir)
    probes["broker"] = lambda: probe_broker(t.bootstrap, t.topic, each)
    probes["postgresql"] = lambda: probe_postgres(t.pg_dsn, t.topic, each)
    probes["clickhouse"] = lambda: probe_clickhouse(t.urls["analyst"], t.internal_token, each, t.topic)
    return probes


@dataclass
class _Results:
    """The probes' answers, with those that did not answer by the deadline reported down."""

    got: dict[str, dict[str, Any] | None]
    timeout_s: float

    def __call__(self, name: str, **fallback: Any) -> dict[str, Any]:
        got = self.got[name]
        return got if got is not None else {"state": DOWN, "detail": f"no answer within {self.timeout_s:g}s",
                                            **fallback}


def _process(name: str, t: Targets, result: _Results, broker: dict[str, Any], pg: dict[str, Any]) -> dict[str, Any]:
    """One process's row: the supervisor's word first, then its pid, then what its probe says."""
    from infra.processes import pid_alive

    pid = t.up_pid if name == "up" else t.pids.get(name)
    entry: dict[str, Any] = {"state": UNKNOWN, "pid": pid, "url": t.urls.get(name), "detail": None}
    supervised = t.components.get(name, {})
    if supervised.get("state") == DOWN:  # crashed, waiting for its restart backoff (ADR 33)
        entry.update(state=DOWN, detail=str(supervised.get("detail") or "down"))
    elif t.source == "tally up" and pid is not None and not pid_alive(pid):
        entry.update(state=DOWN, detail=f"pid {pid} is not running (being restarted?)")
    elif f"http:{name}" in result.got:
        entry.update({k: v for k, v in result(f"http:{name}").items() if k in ("state", "detail")})
    elif name == "broker":
        entry.update(state=broker["state"], detail=broker.get("detail"), url=broker.get("bootstrap"))
    elif name == "postgres":
        entry.update(state=DOWN if pg["state"] == DOWN else (UP if pg["state"] == UP else UNKNOWN),
                     detail=pg.get("detail") if pg["state"] != UP else None, url=pg.get("where"))
    elif t.source == "tally up" and pid is not None:
        entry["state"] = UP  # alive; no endpoint to ask: its lag below says whether it keeps up
    else:
        entry["detail"] = "no probe for this process from here; see its group's lag"
    if name == "analyst" and t.source == "tally up" and not entry["detail"]:
        entry["detail"] = "runs the loader worker too"
    return entry


def _store(probe: dict[str, Any], now: datetime) -> dict[str, Any]:
    return {"state": probe.get("state", UNKNOWN), "where": probe.get("where"),
            "last_write_at": _iso(probe.get("last_write_at")),
            "last_write_age_s": _age(probe.get("last_write_at"), now),
            "newest_event_at": _iso(probe.get("newest_event_at")),
            "newest_event_age_s": _age(probe.get("newest_event_at"), now), "detail": probe.get("detail")}


def _names(t: Targets) -> list[str] | tuple[str, ...]:
    """The processes of the report, in pipeline order."""
    if t.hosts is not None:
        return status_hosts.process_names(t.hosts, [*t.pids, *t.components])
    if t.source == "tally up":
        return UP_PROCESSES
    return ("postgres", "broker", "collector", "shipper", "rollup-worker", "loader-worker", "analyst", "api",
            "clickhouse-http")


def collect(settings: Settings, *, timeout_s: float = 5.0) -> dict[str, Any]:
    """Probe everything concurrently and return the report (the JSON shape in the module docstring)."""
    t = targets(settings)
    each = max(0.5, timeout_s * 0.8)  # each probe's own bound, inside the overall deadline
    result = _Results(_run_all(_probes(t, each), timeout_s), timeout_s)
    now = datetime.now(UTC)
    broker = result("broker", bootstrap=",".join(t.bootstrap) or None, topic=t.topic, topic_id=None, end_offsets={})
    pg, ch = result("postgresql"), result("clickhouse", offsets={})
    if result.got["clickhouse"] is None:
        ch["state"] = UNKNOWN
    spools = {name.removeprefix("spool:"): result.got[name] or {**_empty_spool(spool_dir), "state": DOWN,
                                                                "detail": f"no answer within {timeout_s:g}s"}
              for name, spool_dir in spools_of(t).items()}  # "spool", or per host: "c1", "c2", ...
    processes = {name: _process(name, t, result, broker, pg) for name in _names(t)}
    spool = spools["spool"] if t.hosts is None else status_hosts.total_spool(spools)
    report: dict[str, Any] = {
        "version": SCHEMA_VERSION,
        "as_of": now.isoformat(),
        "ok": False,
        "source": t.source,
        "timeout_s": timeout_s,
        "processes": processes,
        "spool": spool,
        "broker": {k: broker.get(k) for k in ("state", "bootstrap", "topic", "topic_id", "end_offsets", "detail")},
        "lag": {ROLLUP_GROUP: lag_of("postgresql", pg, broker, t.topic),
                LOADER_GROUP: lag_of("clickhouse", ch, broker, t.topic)},
        "stores": {"postgresql": _store(pg, now), "clickhouse": _store(ch, now)},
    }
    if t.hosts is not None:  # a down host's collector or shipper is down in `processes` too: not ok below
        report["hosts"] = status_hosts.host_rows(t.hosts, processes, spools)
    report["broker"]["end_offsets"] = report["broker"]["end_offsets"] or {}
    report["ok"] = (all(p["state"] in (UP, UNKNOWN) for p in processes.values())
                    and broker["state"] == UP and pg["state"] == UP and spool.get("state") != DOWN)
    return report


# -- the table ------------------------------------------------------------------------------------


def _bytes(n: int | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return f"{n} B"


def _ago(age: float | None) -> str:
    if age is None:
        return "never"
    if age < 120:
        return f"{age:.0f}s ago"
    if age < 7200:
        return f"{age / 60:.0f}m ago"
    return f"{age / 3600:.1f}h ago"


_STYLE = {UP: "green", "ok": "green", DOWN: "bold red", UNREADY: "yellow", UNKNOWN: "dim", "missing": "dim"}


def _state(text: str) -> str:
    return f"[{_STYLE.get(text, 'white')}]{text}[/]"


def _unbroken(table: Any, name: str, values: list[str]) -> None:
    """A column whose cells are never folded (URLs, names, pids): as wide as its widest cell, so that a
    narrow terminal or a pipe (80 columns) folds the free-text column instead."""
    table.add_column(name, no_wrap=True, min_width=max([len(name), *map(len, values)]))


def _process_table(report: dict[str, Any]) -> Any:
    from rich.table import Table

    rows = [(name, p["state"], str(p["pid"] or ""), p.get("url") or "", p.get("detail") or "")
            for name, p in report["processes"].items()]
    procs = Table(title=f"tally status ({report['source']}, {report['as_of'][:19]}Z)", title_justify="left")
    for i, col in enumerate(("process", "state", "pid", "where")):
        _unbroken(procs, col, [row[i] for row in rows])
    procs.add_column("detail", overflow="fold", min_width=24)
    for name, state, pid, url, detail in rows:
        procs.add_row(name, _state(state), pid, url, detail)
    return procs


def _spool_numbers(spool: dict[str, Any]) -> str:
    oldest = f", oldest {spool['oldest_age_s']:.0f}s" if spool.get("oldest_age_s") is not None else ""
    return (f"{spool['segments']} sealed segments ({_bytes(spool['bytes'])}){oldest}; "
            f"{spool['open_segments']} open ({_bytes(spool['open_bytes'])}); "
            f"{spool['retained_segments']} shipped, retained ({_bytes(spool['retained_bytes'])}); "
            f"quarantined {_bytes(spool['quarantined_bytes'])}")


def _pipeline_table(report: dict[str, Any]) -> Any:
    from rich.table import Table

    broker = report["broker"]
    ends = ", ".join(f"p{p}={o}" for p, o in broker["end_offsets"].items())
    spools = ([(f"spool backlog {name}", host["spool"]) for name, host in report["hosts"].items()]
              if report.get("hosts") else [("spool backlog", report["spool"])])  # one row per collector host
    rows = [(stage, spool.get("state", UNKNOWN),
             _spool_numbers(spool) if spool.get("state") == "ok" else spool.get("detail") or "")
            for stage, spool in spools]
    rows.append((f"broker {broker['topic']}", broker["state"],
                 (f"end offsets {ends}" if ends else "") + (f" {broker['detail']}" if broker.get("detail") else "")))
    for group, lag in report["lag"].items():
        parts = ", ".join(f"p{p}={v['lag']}" for p, v in lag["partitions"].items())
        numbers = f"lag {lag['total']} ({parts})" if lag["total"] is not None else (lag.get("detail") or "")
        rows.append((f"lag {group} -> {lag['store']}", lag["state"], numbers))
    pipe = Table(title="pipeline", title_justify="left")
    _unbroken(pipe, "stage", [row[0] for row in rows])
    _unbroken(pipe, "state", [row[1] for row in rows])
    pipe.add_column("numbers", overflow="fold", min_width=24)
    for stage, state, numbers in rows:
        pipe.add_row(stage, _state(state), numbers)
    return pipe


def _stores_table(report: dict[str, Any]) -> Any:
    from rich.table import Table

    rows = [(name, s["state"], _ago(s["last_write_age_s"]), _ago(s["newest_event_age_s"]), s.get("detail") or "")
            for name, s in report["stores"].items()]
    stores = Table(title="stores", title_justify="left")
    for i, col in enumerate(("store", "state", "last write", "newest event")):
        _unbroken(stores, col, [row[i] for row in rows])
    stores.add_column("detail", overflow="fold", min_width=24)
    for name, state, *rest in rows:
        stores.add_row(name, _state(state), *rest)
    return stores


def render(report: dict[str, Any], console: Any = None) -> None:
    """The report as rich tables on the terminal (plain text when not a terminal). URLs, names and
    numbers are never folded, whatever the width; only the free-text columns are."""
    from rich.console import Console

    console = console or Console()
    if report["source"] == "settings":
        console.print("[dim]No `tally up` is running with this TALLY_HOME: probing what the settings name.[/]")
    for table in (_process_table(report), _pipeline_table(report), _stores_table(report)):
        # Never narrower than its unbroken columns: a line wider than the terminal wraps there, whole.
        width, needed = console.width, sum(c.min_width or 0 for c in table.columns) + 3 * len(table.columns) + 1
        console.width = max(width, needed)
        try:
            console.print(table, crop=False)
        finally:
            console.width = width
    if report.get("hosts"):
        console.print("collector hosts: " + ", ".join(f"{name} {_state(host['state'])}"
                                                      for name, host in report["hosts"].items()))
    down = [n for n, p in report["processes"].items() if p["state"] in (DOWN, UNREADY)]
    if report["ok"]:
        console.print("[green]all up[/]")
    else:
        console.print(f"[bold red]not healthy:[/] {', '.join(down) or 'see above'}")
