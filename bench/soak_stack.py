"""The soak's stack under test and what it reads of it, through public interfaces only (bench/soak.py):
`tally up` in its own process group on free ports and its own TALLY_HOME, the `tally` CLI against it, /proc
for every process of the stack, the spool directory, PostgreSQL (the DSN `tally up` writes to its run state)
and ClickHouse through the ClickHouse-compatible endpoint (`system.tables` / `system.columns`, which analysts
may read) plus the size of chDB's directory on disk.
"""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from infra.processes import free_port

LIMITS = {"TALLY_SITE_RATE_PER_S": "10000000", "TALLY_SITE_BURST": "100000000", "TALLY_SITE_ADDRESS_SHARE": "1",
          "TALLY_API_RATE_LIMIT": "10000000/minute;1000000/second"}


class Stack:
    """`tally up` in a child process group (from `tree`, a source checkout, default this one), and the CLI."""

    def __init__(self, work: Path, tree: Path, up_args: list[str], settings: dict[str, str] | None = None) -> None:
        self.home, self.tree = work / "home", tree
        ports = {name: free_port() for name in ("COLLECTOR", "API", "ANALYST", "CLICKHOUSE_HTTP")}
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("TALLY_")}
        self.env.update({f"TALLY_{k}_PORT": str(v) for k, v in ports.items()}, TALLY_HOME=str(self.home), **LIMITS)
        self.env["PYTHONPATH"] = str(tree)
        self.env.update(settings or {})  # `bench.soak --set`: the stack's own TALLY_* settings, last
        self.log_path = work / "up.log"
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "tally.cli", "up", *up_args], env=self.env, cwd=tree,
                                     stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self.collector = f"http://127.0.0.1:{ports['COLLECTOR']}"
        self.api = f"http://127.0.0.1:{ports['API']}"
        self.clickhouse_http = f"http://127.0.0.1:{ports['CLICKHOUSE_HTTP']}"
        self.token = ""
        self.collectors = [self.collector]

    def wait_up(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"tally up exited with {self.proc.returncode}; see {self.log_path}")
            text = self.log_path.read_text(errors="replace")
            if "tally is up" in text:
                self.token = (self.home / "admin-token").read_text().strip()
                self.read_banner(text)
                return
            time.sleep(0.3)
        raise RuntimeError(f"tally up was not up after {timeout:.0f}s; see {self.log_path}")

    def read_banner(self, text: str) -> None:
        """The URLs `tally up` printed: every collector (`--hosts N` serves several) and the API."""
        found = sorted(set(re.findall(r"(http://[^ /]+)/collect\b", text)))
        self.collectors = found or [self.collector]
        api = re.findall(r"(http://[^ /]+)/api/v1/", text)
        self.api = api[0] if api else self.api

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "tally.cli", *args], env=self.env, cwd=self.tree,
                              capture_output=True, text=True, timeout=timeout)

    def cli_json(self, *args: str, timeout: float = 60) -> dict[str, Any]:
        out = self.cli(*args, "--json", timeout=timeout)
        if out.returncode not in (0, 1) or not out.stdout.strip():
            raise RuntimeError(f"tally {' '.join(args)}: exit {out.returncode}: {out.stderr.strip()[-300:]}")
        answer: dict[str, Any] = json.loads(out.stdout)
        return answer

    def pg_dsn(self) -> str | None:
        try:
            dsn = json.loads((self.home / "run" / "stack.json").read_text()).get("pg_dsn")
            return str(dsn) if dsn else None
        except (OSError, ValueError):
            return None

    def stop(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(60)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.log.close()


# --- processes -------------------------------------------------------------------------------------------


def children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            out += [int(x) for x in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
    except OSError:
        pass
    return out


def tree(root: int) -> list[int]:
    """`root` and every descendant (as /proc shows them now)."""
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children(pid)
    return out


def label(pid: int) -> str:
    """A readable name for a process of the stack: `tally <command>` or the program, and the pid."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return f"? {pid}"
    words = [a.decode(errors="replace") for a in argv if a]
    if "tally.cli" in words:
        rest = words[words.index("tally.cli") + 1:]
        return f"tally {' '.join(rest[:2])} {pid}".replace("  ", " ")
    if words and words[0].startswith("postgres:"):
        return f"{words[0][:40]} {pid}"
    name = Path(words[0]).name if words else "?"
    return f"{name} {' '.join(w for w in words[1:3] if not w.startswith('/'))[:40]} {pid}".replace("  ", " ")


def memory(pid: int) -> tuple[int, int] | None:
    """(VmRSS, RssAnon) in bytes: the resident set, and its private part (without shared memory and mapped
    files: what a leak grows; a PostgreSQL backend's RSS also grows as it touches shared buffers)."""
    found: dict[str, int] = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key = line.split(":", 1)[0]
            if key in ("VmRSS", "RssAnon"):
                found[key] = int(line.split()[1]) * 1024
    except OSError:
        return None
    return (found["VmRSS"], found.get("RssAnon", 0)) if "VmRSS" in found else None


def cpu_seconds(pid: int) -> float | None:
    """CPU (user + system) a process used itself so far."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_sample(root: int) -> tuple[dict[str, int], dict[str, int], dict[str, float]]:
    """label -> RSS bytes, -> private (anonymous) resident bytes, -> CPU seconds so far, for every live process
    of the stack."""
    rss, private, cpu = {}, {}, {}
    for pid in tree(root):
        mem, used = memory(pid), cpu_seconds(pid)
        if mem is not None and used is not None:
            name = label(pid)
            (rss[name], private[name]), cpu[name] = mem, used
    return rss, private, cpu


def tree_cpu_s(root: int) -> float:
    """CPU seconds the stack used: every live process's own and its reaped children's (/proc/<pid>/stat)."""
    total, tick = 0, os.sysconf("SC_CLK_TCK")
    for pid in tree(root):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
    return total / tick


def cpu_busy_s() -> float:
    """Seconds of CPU the whole machine spent busy since boot (/proc/stat): how loaded it was meanwhile."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


# --- disk ------------------------------------------------------------------------------------------------


def du(path: Path) -> int:
    """Bytes allocated under `path`; files that vanish meanwhile (merged parts, shipped segments) are skipped."""
    total = 0
    for dirpath, _, files in os.walk(path, onerror=lambda _exc: None):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_blocks * 512
            except OSError:
                pass
    return total


def spool_bytes(home: Path) -> int:
    """Bytes on disk of every spool directory under the stack's home (one per collector host, at most two levels
    down; not a walk of the whole home, whose chDB parts come and go)."""
    found = {home / "spool", *home.glob("*/spool"), *home.glob("*/*/spool")}
    return sum(du(p) for p in found if p.is_dir())


PG_SIZES = """
SELECT c.relname, (SELECT coalesce(sum(pg_total_relation_size(t.relid)), 0) FROM pg_partition_tree(c.oid) t)::bigint,
       (SELECT coalesce(sum(greatest(k.reltuples, 0)), 0) FROM pg_partition_tree(c.oid) t
          JOIN pg_class k ON k.oid = t.relid)::bigint
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p') AND NOT c.relispartition
"""


def pg_sizes(dsn: str) -> dict[str, tuple[int, int]]:
    """table -> (bytes with indexes and TOAST, summed over its partitions; estimated rows)."""
    import psycopg

    with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
        return {name: (int(size), int(rows)) for name, size, rows in conn.execute(PG_SIZES).fetchall()}


def ch_query(url: str, token: str, sql: str) -> list[dict[str, Any]]:
    """Rows of one query through the ClickHouse-compatible endpoint, as an analyst tool would send it."""
    auth = base64.b64encode(f"soak:{token}".encode()).decode()
    req = urllib.request.Request(f"{url}/?query={urllib.parse.quote(sql + ' FORMAT JSONEachRow')}",
                                 headers={"Authorization": f"Basic {auth}"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return [json.loads(line) for line in resp.read().decode().splitlines() if line.strip()]


def ch_sizes(url: str, token: str) -> dict[str, int]:
    """events: bytes on disk (system.tables total_bytes: its active parts), rows, and the columns' compressed
    and uncompressed bytes (system.columns)."""
    tables = ch_query(url, token, "SELECT name, total_bytes, total_rows FROM system.tables "
                                  "WHERE database = 'tally' AND name = 'events'")
    cols = ch_query(url, token, "SELECT sum(data_compressed_bytes) AS c, sum(data_uncompressed_bytes) AS u "
                                "FROM system.columns WHERE database = 'tally' AND table = 'events'")
    t = tables[0] if tables else {}
    c = cols[0] if cols else {}
    return {"bytes_on_disk": int(t.get("total_bytes") or 0), "rows": int(t.get("total_rows") or 0),
            "compressed": int(c.get("c") or 0), "uncompressed": int(c.get("u") or 0)}
