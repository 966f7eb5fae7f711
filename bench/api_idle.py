"""Does the API answer while idle sockets and a slowloris hold connections? (no-loss/hardening issue, item 4)

Run: `python -m bench.api_idle [--servers tally,waitress-defaults,granian] [--idle 1000] [--loris 200]
[--seconds 30]` (about 40 s per server).

It starts an embedded PostgreSQL, then for each server kind the real API app (`build_api`) in a child
process on a free port:

- tally:             `tally api` itself (tally/wsgi_server.py: waitress bounded, TALLY_API_* settings);
- waitress-defaults: waitress as the API ran before (connection_limit 100, channel_timeout 120 s);
- granian:           granian WSGI, one worker, 16 blocking threads, header_read_timeout 15 s.

Then, from this process: `--idle` sockets that never send a byte, spread over source addresses
127.0.0.2-127.0.0.21 (each under the per-address bound, so the total bound is what is measured), plus
`--loris` sockets that send a request line and then one header byte every 3 s, from 127.0.0.22; and
GET /healthz from 127.0.0.1 on a new connection every 100 ms for `--seconds`, 5 s timeout each (and
for 5 s before any socket is opened: the machine's own figure, for comparison).
Reported: the first /healthz right after the connect burst, then (from 1 s later) /healthz answers
and p50/p99/max latency, and how many idle / slowloris sockets the server
closed and when. Target: /healthz p99 under 50 ms with 1,000 idle sockets open. Results also go to
bench/results/api_idle.json.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import resource
import selectors
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from infra.processes import free_port, tcp_open, wait_until

RESULTS = Path(__file__).resolve().parent / "results" / "api_idle.json"
SECRET = "bench-secret-0123456789abcdef"
IDLE_SOURCES = [f"127.0.0.{i}" for i in range(2, 22)]
LORIS_SOURCE = "127.0.0.22"
KINDS = ("tally", "waitress-defaults", "granian")


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def api_from_env():  # -> flask.Flask; granian's factory target (in its worker process)
    from core.config import Settings
    from tally.roots import build_api

    return build_api(Settings.from_env(os.environ))


def serve(kind: str) -> None:
    """The child process: serve the API as `kind` on TALLY_API_PORT."""
    from core.config import Settings

    settings = Settings.from_env(os.environ)
    if kind == "waitress-defaults":
        import waitress

        from tally.roots import build_api

        waitress.serve(build_api(settings), host="127.0.0.1", port=settings.api_port, threads=16)
    elif kind == "granian":
        from granian import Granian
        from granian.constants import Interfaces
        from granian.http import HTTP1Settings

        Granian("bench.api_idle:api_from_env", factory=True, interface=Interfaces.WSGI, address="127.0.0.1",
                port=settings.api_port, workers=1, blocking_threads=16, backlog=2048, log_access=False,
                http1_settings=HTTP1Settings(header_read_timeout=15_000)).serve()
    else:
        raise SystemExit(f"unknown kind {kind}")


def start_server(kind: str, env: dict[str, str], port: int, log: Path) -> subprocess.Popen:
    cmd = ([sys.executable, "-m", "tally.cli", "api"] if kind == "tally"
           else [sys.executable, "-m", "bench.api_idle", "--serve", kind])
    out = log.open("wb")
    proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    wait_until(lambda: tcp_open("127.0.0.1", port), what=f"API ({kind})", timeout=60, proc=proc, log_path=log)
    return proc


def request(port: int, method: str, path: str, source: str, timeout: float, token: str | None = None,
            body: bytes | None = None) -> tuple[int | str, float]:
    started = time.perf_counter()
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout, source_address=(source, 0))
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        resp.read()
        conn.close()
        return resp.status, time.perf_counter() - started
    except Exception as exc:
        return type(exc).__name__, time.perf_counter() - started


def healthz(port: int) -> tuple[int | str, float]:
    return request(port, "GET", "/healthz", "127.0.0.1", 5)


class Watched:
    """Client sockets and the second (since t0) the server closed each."""

    def __init__(self) -> None:
        self.selector = selectors.DefaultSelector()
        self.closed_at: dict[str, list[float]] = {"idle": [], "loris": []}
        self.open = {"idle": 0, "loris": 0}
        self.loris: list[socket.socket] = []
        self.failed_connects = 0

    def connect(self, port: int, source: str, kind: str) -> socket.socket | None:
        try:
            sock = socket.create_connection(("127.0.0.1", port), timeout=2, source_address=(source, 0))
        except OSError:
            self.failed_connects += 1
            return None
        sock.setblocking(False)
        self.selector.register(sock, selectors.EVENT_READ, kind)
        self.open[kind] += 1
        return sock

    def reap(self, t0: float) -> None:
        """Note the sockets the server closed (readable with EOF or reset)."""
        for key, _ in self.selector.select(timeout=0):
            sock, kind = key.fileobj, key.data
            try:
                data = sock.recv(4096)  # type: ignore[union-attr]
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if data:
                continue  # an answer (e.g. 408); the close follows
            self.selector.unregister(sock)
            sock.close()  # type: ignore[union-attr]
            self.open[kind] -= 1
            self.closed_at[kind].append(round(time.monotonic() - t0, 1))
            if kind == "loris":
                self.loris = [s for s in self.loris if s is not sock]

    def close_all(self) -> None:
        for key in list(self.selector.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]
        self.selector.close()


def probe_quiet(port: int, seconds: float) -> dict[str, float | None]:
    """/healthz every 100 ms with no other socket open: what this machine gives right now."""
    times, t0 = [], time.monotonic()
    while time.monotonic() - t0 < seconds:
        status, elapsed = healthz(port)
        if status == 200:
            times.append(elapsed)
        time.sleep(0.1)
    return {"n": len(times), **_percentiles(times)}


def attack(port: int, idle: int, loris: int, seconds: float) -> dict[str, object]:
    quiet = probe_quiet(port, 5.0)
    w = Watched()
    t0 = time.monotonic()
    for i in range(idle):
        w.connect(port, IDLE_SOURCES[i % len(IDLE_SOURCES)], "idle")
    for _ in range(loris):
        sock = w.connect(port, LORIS_SOURCE, "loris")
        if sock is not None:
            try:
                sock.send(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-a: ")
                w.loris.append(sock)
            except OSError:
                pass
    opened = dict(w.open)
    say(f"  opened {w.open['idle']} idle and {w.open['loris']} slowloris sockets in {time.monotonic() - t0:.1f} s"
        f" ({w.failed_connects} connects failed)")
    stop = threading.Event()

    def drip() -> None:
        while not stop.wait(3.0):
            for sock in list(w.loris):
                try:
                    sock.send(b"a")
                except OSError:
                    pass

    threading.Thread(target=drip, daemon=True).start()
    burst_status, burst_s = healthz(port)  # right after the connect burst, while the server takes it in
    time.sleep(1.0)
    ok: list[float] = []
    bad: list[tuple[object, float]] = []
    slow: list[tuple[int, float]] = []  # (ms, at second) of answers over 50 ms
    ok_open: list[float] = []  # answers while at least 90% of the idle sockets were still open
    t1 = time.monotonic()
    while time.monotonic() - t1 < seconds:
        status, elapsed = healthz(port)
        if status == 200:
            ok.append(elapsed)
        else:
            bad.append((status, round(time.monotonic() - t0, 1)))
        if status == 200 and w.open["idle"] >= 0.9 * opened["idle"]:
            ok_open.append(elapsed)
        if status == 200 and elapsed > 0.05:
            slow.append((round(elapsed * 1000), round(time.monotonic() - t0, 1)))
        w.reap(t0)
        time.sleep(0.1)
    stop.set()
    w.reap(t0)
    result: dict[str, object] = {
              "quiet": quiet, "first_after_burst": f"{burst_status} in {burst_s * 1000:.0f} ms",
              "idle_opened": opened["idle"], "loris_opened": opened["loris"], "connects_failed": w.failed_connects,
              "healthz_ok": len(ok),
              "healthz_failed": len(bad), "failures": bad[:5], **_percentiles(ok), "over_50ms": slow[:10],
              "while_idle_open": {"n": len(ok_open), **_percentiles(ok_open)},
              "idle_closed": len(w.closed_at["idle"]), "idle_closed_at_s": _spread(w.closed_at["idle"]),
              "loris_closed": len(w.closed_at["loris"]), "loris_closed_at_s": _spread(w.closed_at["loris"])}
    w.close_all()
    return result


def _percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50_ms": None, "p99_ms": None, "max_ms": None}
    ordered = sorted(values)
    at = lambda q: round(ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))] * 1000, 1)  # noqa: E731
    return {"p50_ms": at(0.5), "p99_ms": at(0.99), "max_ms": at(1.0)}


def _spread(times: list[float]) -> str:
    return f"{min(times)}-{max(times)}" if times else "-"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.api_idle", description=__doc__.split("\n")[0])
    parser.add_argument("--servers", default=",".join(KINDS))
    parser.add_argument("--idle", type=int, default=1000)
    parser.add_argument("--loris", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--env", action="append", default=[], metavar="TALLY_X=V",
                        help="a setting for the servers, e.g. TALLY_API_MAX_CONNECTIONS_PER_CLIENT=0 (repeatable)")
    parser.add_argument("--serve", choices=KINDS[1:], help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args(argv)
    if args.serve:
        serve(args.serve)
        return 0
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, args.idle + args.loris + 512)), hard))
    from infra.postgres import EmbeddedPostgres

    results: dict[str, object] = {}
    with tempfile.TemporaryDirectory(prefix="tally-bench-idle-") as tmp:
        work = Path(tmp)
        postgres = EmbeddedPostgres(work / "pg", durable=False).start()
        try:
            for kind in args.servers.split(","):
                port = free_port()
                env = {**os.environ, "TALLY_HOME": str(work / kind), "TALLY_PG_DSN": postgres.dsn,
                       "TALLY_SECRET": SECRET, "TALLY_API_PORT": str(port), "TALLY_LOG_DIR": "-",
                       **dict(item.split("=", 1) for item in args.env)}
                say(f"[bench] {kind}: {args.idle} idle + {args.loris} slowloris sockets, "
                    f"/healthz for {args.seconds:.0f} s")
                proc = start_server(kind, env, port, work / f"{kind}.log")
                try:
                    results[kind] = attack(port, args.idle, args.loris, args.seconds)
                finally:
                    os.killpg(proc.pid, 15)
                    proc.wait(timeout=30)
                say(f"  {json.dumps(results[kind])}")
        finally:
            postgres.stop()
    print(table(results, args))
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"args": vars(args), "results": results}, indent=2) + "\n")
    return 0


def table(results: dict[str, object], args: argparse.Namespace) -> str:
    rows = [f"{args.idle} idle sockets (20 addresses) + {args.loris} slowloris (1 address, a byte every 3 s), "
            f"/healthz every 100 ms for {args.seconds:.0f} s",
            "| server | no sockets open: p50 / p99 / max ms | first, during the burst | /healthz ok / failed | "
            "p50 / p99 / max ms | same, while >= 90% idle open (n) | idle closed (at s) | slowloris closed (at s) |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for kind, r in results.items():
        assert isinstance(r, dict)
        o, q = r["while_idle_open"], r["quiet"]
        rows.append(f"| {kind} | {q['p50_ms']} / {q['p99_ms']} / {q['max_ms']} | {r['first_after_burst']} | "
                    f"{r['healthz_ok']} / {r['healthz_failed']} | "
                    f"{r['p50_ms']} / {r['p99_ms']} / {r['max_ms']} | {o['p50_ms']} / {o['p99_ms']} / {o['max_ms']} "
                    f"({o['n']}) | {r['idle_closed']} ({r['idle_closed_at_s']}) | "
                    f"{r['loris_closed']} ({r['loris_closed_at_s']}) |")
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
