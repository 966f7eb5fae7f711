"""`tally up [--demo]`: the whole platform on the embedded stack, until Ctrl-C (tally/platform.py).

The banner it prints once everything answers shows the URLs of the registered sites (or, with none,
the `tally sites add` command that registers the first one), never a domain that is not registered. If
the sites cannot be listed, the banner says so and the platform runs on: the list is only for show.
`--hosts N` (N > 1) starts the simulated multi-host deployment of tally/topology.py (ADR 59) and prints
every URL it serves: each collector host's `/collect`, the API front and the API processes behind it.
Exit codes: 0 stopped by Ctrl-C or SIGTERM, 1 start-up failed, 2 configuration.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from core.config import Settings

if TYPE_CHECKING:
    from tally.cli_support import SubParsers
    from tally.platform import Platform

log = logging.getLogger(__name__)

SHOWN_SITES = 5  # the banner lists this many registered domains, then "and N more"


def register(sub: SubParsers) -> None:
    up = sub.add_parser("up", help="run the whole platform on the embedded stack (PostgreSQL, tansu, chDB)",
                        description="Start PostgreSQL, the broker, chDB and every tally process under one "
                        "supervisor; print the URLs; stop everything on Ctrl-C.",
                        epilog="exit codes: 0 stopped by Ctrl-C or SIGTERM; 1 start-up failed; "
                        "2 a usage or configuration error")
    up.add_argument("--demo", action="store_true", help="also send synthetic traffic so numbers move")
    up.add_argument("--json", action="store_true", help="print the banner as one JSON object (one line)")
    up.add_argument("--hosts", type=int, default=1, metavar="N",
                    help="simulate N collector hosts (collector + shipper each, own TALLY_HOME, spool and loopback "
                    "address), with 2 rollup workers and 2 API processes behind a round-robin front "
                    "(default 1: one process per component)")
    up.set_defaults(func=cmd_up)


@dataclass(frozen=True)
class Banner:
    """What `tally up` prints once it is up."""

    collector_url: str
    api_url: str
    log_dir: str
    token_file: Path
    admin_token: str | None  # shown only by the start that minted it
    domains: tuple[str, ...] | None  # the registered sites, sorted; None: they could not be listed
    clickhouse_http_url: str | None = None  # the ClickHouse-compatible endpoint (ADR 50)
    topology: HostsLines | None = None  # --hosts N > 1

    def as_json(self) -> dict[str, object]:
        out: dict[str, object] = {
            "collector_url": self.collector_url, "api_url": self.api_url, "logs": self.log_dir,
            "admin_token_file": str(self.token_file), "admin_token": self.admin_token,
            "sites": None if self.domains is None else list(self.domains),
            "clickhouse_http_url": self.clickhouse_http_url}
        if self.topology is not None:
            out.update(hosts=len(self.topology.collector_urls), collector_urls=list(self.topology.collector_urls),
                       api_backends=list(self.topology.api_backends),
                       rollup_workers=list(self.topology.rollup_workers))
        return out

    def _collector_lines(self) -> str:
        if self.topology is None:
            return _line("collector", f"{self.collector_url}/collect")
        return "".join(_line("collector", f"{url}/collect  (host c{i})")
                       for i, url in enumerate(self.topology.collector_urls, 1))

    def _topology_lines(self) -> str:
        if self.topology is None:
            return ""
        t = self.topology
        return (_line("api processes", f"{', '.join(t.api_backends)}  (behind the front at {self.api_url})")
                + _line("rollup workers", f"{len(t.rollup_workers)}: {', '.join(t.rollup_workers)}")
                + _line("hosts", f"{len(t.collector_urls)} collector hosts, each its own TALLY_HOME, spool and "
                        "loopback address (no network namespaces); docs/adr/0059-multi-host-topology.md"))

    def _clickhouse_line(self) -> str:
        if not self.clickhouse_http_url:
            return ""
        return _line("clickhouse http", f"{self.clickhouse_http_url}/  (ClickHouse tools: an analyst token as "
                     "the password; docs/clickhouse-http.md)")

    def _where(self) -> tuple[str, str]:
        """(the api and dashboard lines, the sites line)."""
        api = self.api_url
        if self.domains:
            domain = self.domains[0]
            more = f" and {len(self.domains) - SHOWN_SITES} more" if len(self.domains) > SHOWN_SITES else ""
            sites = _line("sites", f"{', '.join(self.domains[:SHOWN_SITES])}{more}  (tally sites list)")
            return (_line("api", f"{api}/api/v1/domains/{domain}/impressions?granularity=15m")
                    + _line("dashboard", f"{api}/?domain={domain}")), sites
        where = _line("api", f"{api}/api/v1/domains") + _line("dashboard", f"{api}/")
        if self.domains is None:
            return where, _line("sites", "could not be listed (see the log; tally sites list)")
        return where, (_line("sites", "none registered yet; register one with")
                       + _line("", "tally sites add example.com --tz Europe/Berlin --origin https://example.com"))

    def text(self) -> str:
        if self.admin_token:
            admin = (_line("admin token", self.admin_token)
                     + _line("", f"(saved in {self.token_file}, mode 0600)")).rstrip("\n")
        else:
            admin = _line("admin token", f"in {self.token_file}").rstrip("\n")
        where, sites = self._where()
        return ("\ntally is up.\n" + self._collector_lines() + where
                + _line("analyst SQL", f'{self.api_url}/api/v1/sql      (or: tally sql "SELECT count() FROM '
                        'tally.events")')
                + self._clickhouse_line() + self._topology_lines() + sites + _line("logs", self.log_dir)
                + f"{admin}\nPress Ctrl-C to stop.")


@dataclass(frozen=True)
class HostsLines:
    """What the banner adds for `--hosts N` > 1."""

    collector_urls: tuple[str, ...]
    api_backends: tuple[str, ...]
    rollup_workers: tuple[str, ...]


LABEL_WIDTH = len("clickhouse http") + 2  # the banner's labels, one column: the widest and two spaces


def _line(label: str, value: str) -> str:
    """One banner line: its label padded to the labels' column (none: a continuation of the line above)."""
    return f"  {label:<{LABEL_WIDTH}}{value}\n"


def registered_domains(dsn: str) -> tuple[str, ...] | None:
    """The registered sites, sorted; None (logged) when they cannot be read: the banner is no reason to
    stop a platform that has just started."""
    from oltp import sites

    try:
        return tuple(sorted(site.domain for site in sites.list_sites(dsn)))
    except Exception:  # any failure at all: the list is only for show
        log.warning("up: cannot list the registered sites for the banner", exc_info=True)
        return None


def _hosts_lines(platform: Platform) -> HostsLines | None:
    t = platform.topology
    if t.hosts == 1:
        return None
    workers = tuple(name for name, spec in t.children.items() if spec.role == "rollup-worker")
    return HostsLines(tuple(platform.collector_urls), tuple(f"http://{b}" for b in t.api_backends), workers)


def check_host_ports(platform: Platform) -> None:
    """With --hosts N > 1: every collector host's and API process's address and port must be free (StartupError
    naming the one that is not)."""
    import socket

    from infra.processes import StartupError

    t = platform.topology
    if t.hosts == 1:
        return
    wanted = [(h.address, h.port, f"collector host {h.name}") for h in t.collectors]
    for i, backend in enumerate(t.api_backends, 1):
        address, _, number = backend.rpartition(":")
        wanted.append((address, int(number), f"API process {i}"))
    for host, port, what in wanted:
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, port))
            except OSError as exc:
                raise StartupError(f"{what}: cannot listen on {host}:{port} ({exc.strerror}); set "
                                   "TALLY_COLLECTOR_PORT / TALLY_API_PORT to free ports") from None


def cmd_up(settings: Settings, args: argparse.Namespace) -> int:
    from infra.processes import StartupError
    from infra.stack import check_ports
    from tally.demo import demo_settings
    from tally.platform import Platform
    from tally.roots import stop_on_signals
    from tally.topology import MAX_HOSTS

    if not 1 <= args.hosts <= MAX_HOSTS:
        print(f"tally up: --hosts must be between 1 and {MAX_HOSTS}", file=sys.stderr)
        return 2
    if args.hosts != 1 and args.demo:
        print("tally up: --demo runs with one host only (drop --hosts or --demo)", file=sys.stderr)
        return 2
    stop = stop_on_signals()
    try:
        check_ports(settings)
        # demo: countries (tally/demo.py)
        platform = Platform(demo_settings(settings) if args.demo else settings, hosts=args.hosts)
        check_host_ports(platform)
        print(f"tally: starting the embedded stack in {settings.home} ...", flush=True)
        platform.start()
    except StartupError as exc:
        print(f"tally: start-up failed: {exc}", file=sys.stderr)
        return 1
    try:
        _run(platform, settings, args, stop)
    finally:
        with contextlib.suppress(OSError):  # a closed stdout (`tally up | head`) must not skip the stop
            print("tally: stopping ...", flush=True)
        platform.stop()
    return 0


def _run(platform: Platform, settings: Settings, args: argparse.Namespace, stop: threading.Event) -> None:
    """Print the banner (with --demo, register the demo sites and send their traffic), then supervise."""
    from tally.demo import DEMO_DOMAINS, register_demo_sites, run_demo
    from tally.roots import ADMIN_TOKEN_FILE

    started = platform.settings
    assert started is not None and started.pg_dsn, "Platform.start() sets the embedded PostgreSQL's DSN"
    keys = register_demo_sites(started.pg_dsn) if args.demo else {}  # the collector needs their site keys
    domains = registered_domains(started.pg_dsn)
    if args.demo and domains is not None:  # the demo's main domain first: its dashboard moves
        domains = (DEMO_DOMAINS[0], *(d for d in domains if d != DEMO_DOMAINS[0]))
    banner = Banner(platform.collector_url, platform.api_url, str(settings.log_dir or "stderr (TALLY_LOG_DIR=-)"),
                    settings.home / ADMIN_TOKEN_FILE,
                    platform.admin_token if platform.admin_token_created else None, domains,
                    platform.clickhouse_http_url, _hosts_lines(platform))
    print(json.dumps(banner.as_json()) if args.json else banner.text(), flush=True)
    if args.demo:
        threading.Thread(target=run_demo, args=(platform.collector_url, stop), kwargs={"keys": keys},
                         daemon=True).start()
    platform.supervise(stop)
