"""What went through the spool, seen from outside the platform (issue 15 §2, ADR 24).

The verdict must say at which stage an acknowledged event went missing: never in the spool (the collector
acknowledged what it did not keep), or in the spool but not in a store (shipper, broker, workers). The
spool forgets on purpose (segments are deleted once both stores hold them), so `SpoolTap` keeps its own
copy: every few milliseconds it hard-links each segment file it has not seen yet (`.open`, `.seg`, and
`shipped/*.seg`; one link per inode) into a tap directory beside the spool. A hard link is the file
itself: what the writer appends after the link is in it too, and renames and deletions of the spool's
names do not touch it. A segment lives at least its age (TALLY_SPOOL_SEGMENT_AGE_S) plus its shipping
and retention, so a scan every few milliseconds sees each one; the tap records its longest gap between
two scans, and the verdict says so when that gap could have missed a segment.

Reading is independent of the project's code: lines split on the last tab, the JSON's `hash` field.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

SEGMENT_SUFFIXES = (".open", ".seg")


class SpoolTap(threading.Thread):
    def __init__(self, spool_dir: Path, tap_dir: Path, *, every_s: float = 0.005) -> None:
        super().__init__(name="chaos-spool-tap", daemon=True)
        self.spool_dir, self.tap_dir, self.every_s = spool_dir, tap_dir, every_s
        self.stop = threading.Event()
        self.seen: set[tuple[int, int]] = set()
        self.max_gap_s = 0.0
        self.scans = 0
        self.errors: list[str] = []
        tap_dir.mkdir(parents=True, exist_ok=True)

    def run(self) -> None:
        last = time.monotonic()
        while not self.stop.is_set():
            try:
                self.scan()
            except Exception as exc:
                if len(self.errors) < 20:
                    self.errors.append(f"{type(exc).__name__}: {exc}")
            now = time.monotonic()
            self.max_gap_s = max(self.max_gap_s, now - last)
            last = now
            self.stop.wait(self.every_s)
        self.scan()

    def scan(self) -> None:
        for directory in (self.spool_dir, self.spool_dir / "shipped"):
            try:
                entries = list(os.scandir(directory))
            except FileNotFoundError:
                continue
            for entry in entries:
                if entry.name.endswith(SEGMENT_SUFFIXES):
                    self._link(entry)
        self.scans += 1

    def _link(self, entry: os.DirEntry[str]) -> None:
        try:
            st = entry.stat(follow_symlinks=False)
        except FileNotFoundError:  # renamed or deleted since the listing: the next scan finds its new name
            return
        key = (st.st_dev, st.st_ino)
        if key in self.seen:
            return
        try:
            os.link(entry.path, self.tap_dir / f"{st.st_ino}-{entry.name}")
        except FileNotFoundError:
            return
        except FileExistsError:
            pass
        self.seen.add(key)

    def hashes(self) -> set[str]:
        """Every event hash in a whole line of any segment the tap saw (refusal-count records have none)."""
        out: set[str] = set()
        for path in self.tap_dir.iterdir():
            for line in path.read_bytes().split(b"\n")[:-1]:  # the part after the last newline is torn
                payload = line.rpartition(b"\t")[0] or line
                try:
                    value = json.loads(payload).get("hash")
                except (ValueError, AttributeError):
                    continue
                if isinstance(value, str):
                    out.add(value)
        return out
