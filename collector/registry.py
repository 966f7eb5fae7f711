"""The collector's in-memory copy of the sites registry, kept fresh from PostgreSQL and on disk.

One `SiteRegistry` per collector worker process (each granian worker builds its own app).

- `start()` loads from PostgreSQL; if that fails it loads the last disk copy instead, so a
  collector restarted during a PostgreSQL outage keeps accepting the sites it knew.
- A daemon thread reloads every `refresh_s`; a failed reload keeps the copy it has.
- After every successful load the copy is written to `cache_path` atomically with mode 0600
  (it holds the site secrets), in a directory of mode 0700.
- `snapshot()` is None only when neither PostgreSQL nor a disk copy ever answered: the
  collector then answers 503 `registry_unavailable`, never 401 for a key it could not check.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import orjson

from core.config import Settings
from oltp.sites import Site, load_all

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One consistent copy of the registry: sites by key and by domain."""

    by_key: dict[str, Site]
    by_domain: dict[str, Site]
    source: str  # "postgres" or "disk"
    loaded_at: float  # time.monotonic()

    @classmethod
    def of(cls, sites: Sequence[Site], source: str) -> Snapshot:
        return cls({s.site_key: s for s in sites}, {s.domain: s for s in sites}, source, time.monotonic())


class SiteRegistry:
    """Thread-safe holder of the current `Snapshot`, refreshed by a background thread."""

    def __init__(self, loader: Callable[[], Sequence[Site]] | None, cache_path: Path | None,
                 refresh_s: float = 2.0) -> None:
        self._loader = loader
        self.cache_path = cache_path
        self.refresh_s = refresh_s
        self._snapshot: Snapshot | None = None
        self._written: bytes | None = None
        self._failing = False
        self._stop = threading.Event()
        self._miss_lock = threading.Lock()
        self._last_miss_refresh = float("-inf")
        self.miss_refresh_s = 1.0
        self._thread: threading.Thread | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> SiteRegistry:
        """PostgreSQL at `settings.pg_dsn`, disk copy at `$TALLY_HOME/collector/sites.json`."""
        dsn = settings.pg_dsn
        if not dsn:
            raise ValueError("TALLY_PG_DSN must be set for the collector (it reads the sites registry)")
        timeout = max(1.0, min(5.0, settings.registry_refresh_s))
        return cls(lambda: load_all(dsn, connect_timeout=timeout), settings.home / "collector" / "sites.json",
                   settings.registry_refresh_s)

    def snapshot(self) -> Snapshot | None:
        """The current copy (replaced whole on refresh; read it once per request)."""
        return self._snapshot

    def snapshot_knowing(self, keys: Iterable[object]) -> Snapshot | None:
        """The current copy, reloaded first if it lacks one of `keys` (a site added since the last refresh)
        and no such reload ran in the last `miss_refresh_s`: a new site's first hit is accepted at once,
        and random keys cost PostgreSQL at most one query per `miss_refresh_s` per process."""
        snap = self._snapshot
        wanted = [k for k in keys if isinstance(k, str) and k]
        if snap is None or all(k in snap.by_key for k in wanted):
            return snap
        with self._miss_lock:
            snap = self._snapshot
            if snap is None or all(k in snap.by_key for k in wanted):
                return snap
            if time.monotonic() - self._last_miss_refresh < self.miss_refresh_s:
                return snap
            self._last_miss_refresh = time.monotonic()
            self.refresh()
            return self._snapshot

    def start(self, *, background: bool = True) -> SiteRegistry:
        """Load once (PostgreSQL, else the disk copy), then keep refreshing in a daemon thread."""
        if not self.refresh():
            self.load_disk_copy()
        if background and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="sites-registry", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def refresh(self) -> bool:
        """One load from PostgreSQL; True if it worked (and the disk copy was written)."""
        if self._loader is None:
            return False
        try:
            sites = self._loader()
        except Exception as exc:  # PostgreSQL down, network, auth: keep the copy we have
            if not self._failing:  # once per outage, not every refresh
                have = f"the {self._snapshot.source} copy" if self._snapshot else "no copy yet"
                log.warning("sites registry: PostgreSQL reload failed (%s); %s until it answers",
                            type(exc).__name__, have)
            self._failing = True
            return False
        if self._failing or self._snapshot is None or self._snapshot.source != "postgres":
            log.info("sites registry: %d sites loaded from PostgreSQL", len(sites))
        self._failing = False
        self._snapshot = Snapshot.of(sites, "postgres")
        self._write_disk_copy(sites)
        return True

    def load_disk_copy(self) -> bool:
        """Adopt the last disk copy (only when nothing better is loaded); True if one was read."""
        if self.cache_path is None or self._snapshot is not None:
            return False
        try:
            data = orjson.loads(self.cache_path.read_bytes())
            sites = [Site.from_dict(obj) for obj in data["sites"]]
        except FileNotFoundError:
            log.error("sites registry: PostgreSQL unreachable and no disk copy at %s", self.cache_path)
            return False
        except (OSError, orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            log.error("sites registry: disk copy %s is unreadable (%s)", self.cache_path, exc)
            return False
        self._snapshot = Snapshot.of(sites, "disk")
        log.warning("sites registry: PostgreSQL unreachable; using the disk copy (%d sites)", len(sites))
        return True

    def _write_disk_copy(self, sites: Sequence[Site]) -> None:
        if self.cache_path is None:
            return
        data = orjson.dumps({"sites": [s.to_dict() for s in sites]})
        if data == self._written and self.cache_path.exists():
            return  # unchanged since this process last wrote it
        directory = self.cache_path.parent
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            if directory.stat().st_mode & 0o077:
                os.chmod(directory, 0o700)
            fd, tmp = tempfile.mkstemp(prefix=".sites.", suffix=".tmp", dir=directory)  # mode 0600
            try:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.chmod(tmp, 0o600)
                os.replace(tmp, self.cache_path)  # atomic: readers see the old or the new copy
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError as exc:
            log.error("sites registry: cannot write the disk copy %s (%s)", self.cache_path, exc)
            return
        self._written = data

    def _run(self) -> None:
        while not self._stop.wait(self.refresh_s):
            self.refresh()
