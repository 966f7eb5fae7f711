"""Does the API answer while clients ask for big answers and never read them? (ADR 35, slow readers)

Run: `python -m bench.api_slowread [--rounds 10] [--per-round 2] [--every 4.5] [--hold 30] [--sources 1]`
(about 70 s).

It starts an embedded PostgreSQL, the real `tally analyst-server` (chDB, no loader; default settings:
2 query slots) and the real `tally api` (16 threads), each a child process on free ports, as `tally up`
would, and an analyst token. Then, as a review found: every `--every` seconds for `--rounds` rounds,
`--per-round` new sockets (with a 4 KiB receive buffer) each send `POST /api/v1/sql?format=csv` for a
~28 MB answer and never read it, from 127.0.0.2 (or round-robin over `--sources` addresses from
127.0.0.2 on); the sockets stay open `--hold` seconds after the last round, then close. Meanwhile, from
other addresses: GET /healthz every 0.5 s (8 s timeout) and the analyst query `SELECT 1` through the
API every 2 s (15 s timeout), each on a new connection. Reported: answers and failures of both,
latency, the longest stretch without any /healthz answer, and how many of the attacker's sockets the
server closed, and when (seconds from the first round): cut by the send timeout, or, for a few, closed
after a short `429 analyst_busy` when both query slots stayed taken for 2 s. Results also go to
bench/results/api_slowread.json, under `--label`.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.api_idle import _percentiles, request, say
from infra.processes import free_port, tcp_open, wait_until

RESULTS = Path(__file__).resolve().parent / "results" / "api_slowread.json"
SECRET = "bench-secret-0123456789abcdef"
ROOT = Path(__file__).resolve().parents[1]
BIG_SQL = "SELECT number, repeat('x', 2800) AS pad FROM numbers(10000)"  # ~28 MB of CSV


def start(command: str, env: dict[str, str], port: int, log: Path, *extra: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "tally.cli", command, *extra], cwd=ROOT, env=env,
                            stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
    wait_until(lambda: tcp_open("127.0.0.1", port), what=command, timeout=120, proc=proc, log_path=log)
    return proc


class Probe(threading.Thread):
    """Sends one request every `every` s until stopped; keeps (second since t0, status, latency)."""

    def __init__(self, send, every: float, t0: float) -> None:
        super().__init__(daemon=True)
        self.send, self.every, self.t0 = send, every, t0
        self.stop = threading.Event()
        self.results: list[tuple[float, int | str, float]] = []

    def run(self) -> None:
        while not self.stop.is_set():
            at = time.monotonic() - self.t0
            status, elapsed = self.send()
            self.results.append((round(at, 1), status, elapsed))
            self.stop.wait(max(0.0, self.every - elapsed))

    def summary(self) -> dict[str, object]:
        ok = [e for _, s, e in self.results if s == 200]
        failed = [(at, s) for at, s, _ in self.results if s != 200]
        return {"ok": len(ok), "failed": len(failed), "first_failures": failed[:5], **_percentiles(ok),
                "longest_without_answer_s": _longest_gap(self.results)}


def _longest_gap(results: list[tuple[float, int | str, float]]) -> float:
    """The longest time between two answers (from a request's start to the next answered one's end)."""
    answered = [at + elapsed for at, status, elapsed in results if status == 200]
    if not results:
        return 0.0
    ends = [results[0][0], *answered, results[-1][0] + results[-1][2]]
    return round(max(b - a for a, b in zip(ends, ends[1:], strict=False)), 1)


def reader_that_never_reads(port: int, source: str, token: str) -> socket.socket | None:
    body = json.dumps({"sql": BIG_SQL}).encode()
    head = (f"POST /api/v1/sql?format=csv HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.bind((source, 0))
        sock.settimeout(5)
        sock.connect(("127.0.0.1", port))
        sock.sendall(head + body)
        return sock
    except OSError:
        sock.close()
        return None


def was_cut(sock: socket.socket) -> bool:
    poller = select.poll()
    poller.register(sock, select.POLLRDHUP)
    return any(ev & (select.POLLRDHUP | select.POLLHUP | select.POLLERR) for _, ev in poller.poll(0))


def attack(port: int, token: str, args: argparse.Namespace, t0: float) -> dict[str, object]:
    sources = [f"127.0.0.{2 + i}" for i in range(args.sources)]
    socks: list[socket.socket] = []
    cut_at: dict[int, float] = {}
    n = 0
    end_of_rounds = t0 + args.rounds * args.every
    while time.monotonic() < end_of_rounds + args.hold:
        if n < args.rounds * args.per_round and time.monotonic() >= t0 + (n // args.per_round) * args.every:
            sock = reader_that_never_reads(port, sources[n % len(sources)], token)
            n += 1
            if sock is not None:
                socks.append(sock)
            continue
        for i, sock in enumerate(socks):
            if i not in cut_at and was_cut(sock):
                cut_at[i] = round(time.monotonic() - t0, 1)
        time.sleep(0.1)
    for sock in socks:
        sock.close()
    times = sorted(cut_at.values())
    return {"sent": n, "connected": len(socks), "cut": len(cut_at),
            "cut_at_s": f"{times[0]}-{times[-1]}" if times else "-"}


def run(work: Path, args: argparse.Namespace) -> dict[str, object]:
    from infra.postgres import EmbeddedPostgres

    postgres = EmbeddedPostgres(work / "pg", durable=False).start()
    procs: list[subprocess.Popen] = []
    try:
        api_port, analyst_port = free_port(), free_port()
        env = {**os.environ, "TALLY_HOME": str(work / "home"), "TALLY_PG_DSN": postgres.dsn, "TALLY_SECRET": SECRET,
               "TALLY_CLICKHOUSE_DSN": f"chdb://{work / 'chdb'}", "TALLY_API_PORT": str(api_port),
               "TALLY_ANALYST_URL": f"http://127.0.0.1:{analyst_port}", "TALLY_LOG_DIR": str(work / "logs"),
               "TALLY_RECONCILE_INTERVAL_S": "0"}
        procs.append(start("analyst-server", env, analyst_port, work / "analyst.out"))
        procs.append(start("api", env, api_port, work / "api.out"))
        import psycopg

        from oltp import tokens

        with psycopg.connect(postgres.dsn, autocommit=True) as conn:
            token = tokens.create(conn, "analyst", [], name="bench slow readers")[1]
        t0 = time.monotonic()
        probes = {
            "healthz": Probe(lambda: request(api_port, "GET", "/healthz", "127.0.0.1", 8.0), 0.5, t0),
            "select_1": Probe(lambda: request(api_port, "POST", "/api/v1/sql", "127.0.0.40", 15.0, token,
                                              b'{"sql": "SELECT 1"}'), 2.0, t0)}
        for probe in probes.values():
            probe.start()
        attacker = attack(api_port, token, args, t0)
        time.sleep(5.0)  # and after the attacker closed
        for probe in probes.values():
            probe.stop.set()
            probe.join(timeout=20)
        return {"attacker": attacker, **{name: p.summary() for name, p in probes.items()}}
    finally:
        for proc in procs:
            os.killpg(proc.pid, 15)
            proc.wait(timeout=30)
        postgres.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.api_slowread", description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--per-round", type=int, default=2)
    parser.add_argument("--every", type=float, default=4.5)
    parser.add_argument("--hold", type=float, default=30.0)
    parser.add_argument("--sources", type=int, default=1, help="attacker addresses (127.0.0.2 on), round-robin")
    parser.add_argument("--label", default="tally", help="the name of this run in the results file")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="tally-bench-slowread-") as tmp:
        say(f"[bench] {args.rounds} rounds of {args.per_round} never-read ~28 MB answers every {args.every} s "
            f"from {args.sources} address(es), held {args.hold} s")
        result = run(Path(tmp), args)
    print(json.dumps(result, indent=2))
    RESULTS.parent.mkdir(exist_ok=True)
    previous = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    previous[args.label] = {"args": {k: v for k, v in vars(args).items() if k != "label"}, "result": result}
    RESULTS.write_text(json.dumps(previous, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
