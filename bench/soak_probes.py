"""What the soak measures beside the load (bench/soak.py), each a thread of the bench process: marker events
and their freshness in each store as users see it (customer API for PostgreSQL, analyst SQL for ClickHouse),
the customer API's latency, the lag per consumer group and the records shipped (the API's and the collectors'
`/metrics`: a CLI call per sample would cost more CPU than the probes together), the
RSS of every process of the stack, and disk use. Everything lands in one `Record`, times in seconds since
the run started.
"""

from __future__ import annotations

import http.client
import json
import multiprocessing as mp
import queue
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from bench.soak_report import assign_seen
from bench.soak_stack import Stack, ch_sizes, pg_sizes, rss_sample, spool_bytes
from infra.processes import die_with_parent

MARK = "mark.soak.test"


@dataclass
class Record:
    t0: float = field(default_factory=time.time)
    load: list[tuple[float, Any]] = field(default_factory=list)  # (t, soak_load.Tally)
    acked_at: list[float] = field(default_factory=list)  # marker k (1-based) acknowledged at acked_at[k - 1]
    seen: dict[str, dict[int, float]] = field(default_factory=lambda: {"pg": {}, "ch": {}})
    polls: dict[str, list[tuple[float, float]]] = field(default_factory=lambda: {"pg": [], "ch": []})  # (t, ms)
    api: list[tuple[float, float, int, str]] = field(default_factory=list)  # (t, ms, HTTP status or 0, endpoint)
    status: list[tuple[float, dict[str, int], int | None]] = field(default_factory=list)  # lag/group, shipped
    rss: list[tuple[float, dict[str, int]]] = field(default_factory=list)
    private: list[tuple[float, dict[str, int]]] = field(default_factory=list)  # RssAnon, the same processes
    cpu: list[tuple[float, dict[str, float]]] = field(default_factory=list)  # CPU seconds so far, the same
    disk: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def now(self) -> float:
        return time.time() - self.t0

    def error(self, where: str, exc: BaseException) -> None:
        with self.lock:
            if len(self.errors) < 200:
                self.errors.append(f"{self.now():.0f}s {where}: {type(exc).__name__}: {exc}"[:300])


class Http:
    """One kept-alive connection to the API, reopened after a failure."""

    def __init__(self, base: str, token: str) -> None:
        host, port = base.split("//", 1)[1].rsplit(":", 1)
        self.host, self.port, self.token = host, int(port), token
        self.conn: http.client.HTTPConnection | None = None

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"}
        if self.conn is None:
            self.conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
        try:
            self.conn.request(method, path, json.dumps(body).encode() if body is not None else None, headers)
            resp = self.conn.getresponse()
            data = resp.read()
        except (OSError, http.client.HTTPException):
            self.conn.close()
            self.conn = None
            raise
        return resp.status, json.loads(data) if data[:1] in (b"{", b"[") else data


def since_iso(hours: float) -> str:
    return (datetime.now(UTC) + timedelta(hours=hours)).isoformat(timespec="seconds").replace("+00:00", "Z")


def pg_count(api: Http, domain: str, since: str, kinds: tuple[str, ...] = ("impressions", "pageviews")) -> int:
    """Events of `domain` in PostgreSQL as a customer sees them: impressions + page views since `since`."""
    total = 0
    for kind in kinds:
        status, body = api.call("GET", f"/api/v1/domains/{domain}/{kind}?granularity=15m&from={since}"
                                       f"&to={since_iso(1)}")
        if status != 200:
            raise RuntimeError(f"{kind} of {domain}: {status} {str(body)[:200]}")
        total += int(body["total"])
    return total


def ch_counts(api: Http, domains: list[str]) -> dict[str, int]:
    """Events per domain in ClickHouse as an analyst sees them (analyst SQL; duplicates never visible)."""
    names = ", ".join(f"'{d}'" for d in domains)
    status, body = api.call("POST", "/api/v1/sql", {"sql": f"SELECT domain, count() FROM tally.events "
                                                          f"WHERE domain IN ({names}) GROUP BY domain"})
    if status != 200:
        raise RuntimeError(f"analyst SQL: {status} {str(body)[:200]}")
    found = {str(d): int(n) for d, n in body["rows"]}
    return {d: found.get(d, 0) for d in domains}


def paced(rec: Record, stop: threading.Event, period: float, what: str, fn: Callable[[], None]) -> None:
    """Call fn every `period` seconds until stop; a failure is recorded, not raised."""
    while not stop.is_set():
        t = time.monotonic()
        try:
            fn()
        except Exception as exc:
            rec.error(what, exc)
        stop.wait(max(0.0, period - (time.monotonic() - t)))


def send_marker(rec: Record, stack: Stack, site_key: str, conn: list[http.client.HTTPConnection | None]) -> None:
    k = len(rec.acked_at) + 1
    event = {"domain": MARK, "url": f"https://{MARK}/m", "type": "impression", "id": f"M{k}",
             "ts": int(time.time() * 1000)}
    host, port = stack.collector.split("//", 1)[1].rsplit(":", 1)
    c = conn[0] = conn[0] or http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        c.request("POST", f"/collect?site={site_key}", json.dumps(event).encode(), {"Content-Type": "application/json"})
        resp = c.getresponse()
        resp.read()
    except (OSError, http.client.HTTPException):
        c.close()
        conn[0] = None
        raise
    if resp.status == 202:
        with rec.lock:
            rec.acked_at.append(rec.now())


def poll_store(rec: Record, store: str, count: Callable[[], int]) -> None:
    """Ask one store how many markers it shows; how long the answer took bounds the freshness resolution."""
    t = time.perf_counter()
    n = count()
    with rec.lock:
        assign_seen(rec.acked_at, rec.seen[store], n, rec.now())
        rec.polls[store].append((rec.now(), (time.perf_counter() - t) * 1000.0))


def _timed(conn: Http, path: str, endpoint: str) -> tuple[float, float, int, str]:
    """One GET: (wall time, ms, status or 0, endpoint)."""
    t = time.perf_counter()
    try:
        status, _ = conn.call("GET", path)
    except (OSError, http.client.HTTPException):
        status = 0
    return time.time(), (time.perf_counter() - t) * 1000.0, status, endpoint


def probe_once(api: Http, domain: str, turn: list[int]) -> tuple[float, float, int, str]:
    """One customer-API request, the next of three endpoints in turn."""
    paths = [f"/api/v1/domains/{domain}/impressions?granularity=1h",
             f"/api/v1/domains/{domain}/summary?last=24h",
             f"/api/v1/domains/{domain}/breakdown?dimension=page&last=24h"]
    turn[0] += 1
    path = paths[turn[0] % len(paths)]
    return _timed(api, path, path.split("?")[0].rsplit("/", 1)[-1])


FLOOR = "floor"  # the endpoint name of the bare floor's samples (an idle WSGI server: see start_api_probe)


def _floor_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", "15")])
    return [b'{"status":"ok"}']


def _floor_server(port: int) -> None:
    import waitress

    die_with_parent()
    waitress.serve(_floor_app, host="127.0.0.1", port=port, threads=4, _quiet=True)


def _api_probe_process(base: str, token: str, domain: str, period: float, floor_port: int, out: Any,
                       halt: Any) -> None:
    die_with_parent()
    # the floor on a kept-alive connection reopened after a failure, as the API's
    api, floor = Http(base, token), Http(f"http://127.0.0.1:{floor_port}", token)
    turn, batch, sent = [0], [], time.monotonic()
    while not halt.is_set():
        t = time.monotonic()
        batch.append(probe_once(api, domain, turn))
        batch.append(_timed(floor, "/healthz", FLOOR))
        if t - sent >= 0.5:
            out.put(batch)
            batch, sent = [], t
        halt.wait(max(0.0, period - (time.monotonic() - t)))
    out.put(batch)


def start_api_probe(rec: Record, stack: Stack, domain: str, stop: threading.Event,
                    period: float = 0.2) -> threading.Thread:
    """The customer-API probe, in a process of its own: timed inside this busy process, each answer also waited
    for its GIL. After each API request it times the same GET against the bare floor: an idle WSGI server
    (waitress, as the API) in another process of its own, answering a constant, so what the machine's load
    costs any HTTP answer is measured in the same run (samples named FLOOR). A thread here moves the samples
    into `rec.api` until `stop`."""
    from infra.processes import free_port

    ctx = mp.get_context("spawn")
    out, halt = ctx.Queue(), ctx.Event()
    floor_port = free_port()
    floor = ctx.Process(target=_floor_server, args=(floor_port,), name="soak-floor-server", daemon=True)
    floor.start()
    proc = ctx.Process(target=_api_probe_process,
                       args=(stack.api, stack.token, domain, period, floor_port, out, halt),
                       name="soak-api-probe", daemon=True)
    proc.start()

    def drain() -> None:
        while proc.is_alive() or not out.empty():
            if stop.is_set():
                halt.set()
            try:
                batch = out.get(timeout=0.5)
            except queue.Empty:
                continue
            with rec.lock:
                rec.api.extend((t - rec.t0, ms, status, endpoint) for t, ms, status, endpoint in batch)
        proc.join(5)
        floor.terminate()
        floor.join(5)

    thread = threading.Thread(target=drain, name="api probe", daemon=True)
    thread.start()
    return thread


def metric_sums(url: str, names: set[str]) -> dict[tuple[str, str], float]:
    """(metric, group label or '') -> the sum over its other labels, from a Prometheus `/metrics` page."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name in names:
                key = (s.name, s.labels.get("group", ""))
                out[key] = out.get(key, 0.0) + s.value
    return out


def status_sample(rec: Record, stack: Stack) -> None:
    """Lag per consumer group in records (`tally_consumer_lag_records` on the API's /metrics, each partition as
    its consumer last saw it) and the records the shippers produced so far (every collector's /metrics)."""
    lag = {g: int(v) for (_, g), v in metric_sums(stack.api, {"tally_consumer_lag_records"}).items()}
    shipped = [metric_sums(c, {"tally_shipper_shipped_records_total"}) for c in stack.collectors]
    records = sum(v for m in shipped for v in m.values())
    with rec.lock:
        rec.status.append((rec.now(), lag, int(records) if records else None))


def rss_probe(rec: Record, stack: Stack) -> None:
    rss, private, cpu = rss_sample(stack.proc.pid)
    with rec.lock:
        rec.rss.append((rec.now(), rss))
        rec.private.append((rec.now(), private))
        rec.cpu.append((rec.now(), cpu))


def disk_sample(rec: Record, stack: Stack) -> None:
    """Spool, PostgreSQL per table (bytes, rows) and ClickHouse (`events`, and chDB's directory) now."""
    from bench.soak_stack import du

    dsn = stack.pg_dsn()
    sample: dict[str, Any] = {"spool": spool_bytes(stack.home), "chdb_dir": du(stack.home / "chdb"),
                              "pg": pg_sizes(dsn) if dsn else {},
                              "ch": ch_sizes(stack.clickhouse_http, stack.token)}
    with rec.lock:
        rec.disk.append((rec.now(), sample))


def start_probes(rec: Record, stack: Stack, site_key: str, load_domain: str, quick: bool,
                 stop: threading.Event, poll_s: float = 0.1) -> list[threading.Thread]:
    """Every probe thread, started; each store is asked for the markers every `poll_s` seconds."""
    since = since_iso(-1)
    pg, ch = (Http(stack.api, stack.token) for _ in range(2))
    marker_conn: list[http.client.HTTPConnection | None] = [None]
    jobs: list[tuple[float, str, Callable[[], None]]] = [
        (0.5, "marker", lambda: send_marker(rec, stack, site_key, marker_conn)),
        (poll_s, "poll pg", lambda: poll_store(rec, "pg", lambda: pg_count(pg, MARK, since, ("impressions",)))),
        (poll_s, "poll ch", lambda: poll_store(rec, "ch", lambda: ch_counts(ch, [MARK])[MARK])),
        (2.0, "lag", lambda: status_sample(rec, stack)),
        (2.0 if quick else 5.0, "rss", lambda: rss_probe(rec, stack)),
        (15.0 if quick else 60.0, "disk", lambda: disk_sample(rec, stack)),
    ]
    threads = [threading.Thread(target=paced, args=(rec, stop, period, what, fn), daemon=True, name=what)
               for period, what, fn in jobs]
    for t in threads:
        t.start()
    return [*threads, start_api_probe(rec, stack, load_domain, stop)]
