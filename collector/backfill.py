"""Backfill: historical events from a JSON Lines or CSV file, through the collector's own path.

Each line is validated by the collector's function (`core.event.event_from_hit`, the same repeated-key
check as `/collect`), with the received time = now and the past-age window opened to what the stores
keep (ClickHouse's TTL), hashed the same way, and appended to the spool through `SpoolWriter` (durable
when it returns); the shipper and both workers carry it from there, exactly as a live hit (ADR 23).

- Ids: a line without its own `id` gets `bf-<16 hex of the file's SHA-256>-<line number>`, so importing
  the same file again produces the same hashes (the stores count each once). Lines need a `ts`.
- Bad lines: every bad line of a chunk is reported (line number, field, problem) and skipped; nothing
  of a bad line is written. The good lines of the chunk are written in one spool append.
- Resumable: a progress file (`<progress_dir>/<sha256>.json`) records the first line not yet durably
  handled, rewritten (fsync, rename) only after the chunk's spool append returned. A crash resumes
  after the last durable chunk; a chunk written but not yet recorded is written again, which the
  stores' dedup makes harmless. A file recorded as complete is refused unless `force`: PostgreSQL
  forgets hashes older than its dedup window, so a second import would count those twice there.

Formats: JSON Lines (one event object per line, the collector's event shape) and CSV with a header
row of the same field names (empty cells are absent fields; a `ts` of digits is epoch milliseconds).
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from collector.body import BodyError, repeated_key
from core.event import Event, EventError, HitContext, Limits, event_from_hit
from spool.segments import fsync_dir

FIELDS = ("id", "domain", "url", "ts", "type", "value", "referrer", "site")  # what /collect takes per event
REQUIRED_COLUMNS = ("domain", "url", "ts")
FORMATS = ("jsonl", "csv")
_SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".csv": "csv"}


class BackfillError(ValueError):
    """The file cannot be imported at all (unreadable, unknown format, bad CSV header, already imported)."""


class AlreadyImported(BackfillError):
    """The progress file says this exact file (same SHA-256) was imported completely."""


@dataclass(frozen=True, slots=True)
class BadLine:
    line: int
    field: str
    problem: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.field}: {self.problem}"


@dataclass(slots=True)
class Progress:
    """What `<progress_dir>/<sha256>.json` holds: where to resume and what happened so far."""

    sha256: str
    path: str
    lines: int  # newline count of the file (for the progress bar)
    next_line: int = 1  # first line not yet durably handled
    imported: int = 0
    bad: int = 0
    bad_lines: list[int] = field(default_factory=list)  # the first 1000 bad line numbers
    done: bool = False
    started_at: str = ""
    finished_at: str | None = None

    @classmethod
    def load(cls, path: Path) -> Progress | None:
        try:
            return cls(**orjson.loads(path.read_bytes()))
        except FileNotFoundError:
            return None
        except (orjson.JSONDecodeError, TypeError) as exc:
            raise BackfillError(f"progress file {path} is unreadable ({exc}); remove it to start over") from None

    def save(self, path: Path) -> None:
        """Replace the progress file atomically and durably (write, fsync, rename, fsync the directory)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(orjson.dumps(asdict(self)))
            fh.flush()
            os.fsync(fh.fileno())
        tmp.replace(path)
        fsync_dir(path.parent)


@dataclass(slots=True)
class Summary:
    progress: Progress
    imported_now: int = 0
    bad_now: int = 0
    resumed_from: int = 1  # the first line read by this run
    oldest: datetime | None = None
    newest: datetime | None = None


def detect_format(path: Path, given: str | None = None) -> str:
    if given:
        if given not in FORMATS:
            raise BackfillError(f"--format {given!r} is not one of {', '.join(FORMATS)}")
        return given
    fmt = _SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise BackfillError(f"{path.name}: cannot tell the format from the name; use --format jsonl or csv")
    return fmt


def fingerprint(path: Path) -> tuple[str, int]:
    """(SHA-256 hex of the file's bytes, number of newlines)."""
    digest, lines = hashlib.sha256(), 0
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
            lines += block.count(b"\n")
    return digest.hexdigest(), lines


def read_jsonl(fh: io.BufferedReader) -> Iterator[tuple[int, Any]]:
    """(line number, event object or BadLine) per non-blank line."""
    for number, raw in enumerate(fh, start=1):
        raw = raw.rstrip(b"\r\n")
        if number == 1 and raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte order mark (some exporters write one)
            raw = raw[3:]
        if not raw.strip():
            continue
        try:
            obj = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            yield number, BadLine(number, "$", f"not valid JSON ({exc})")
            continue
        if not isinstance(obj, dict):
            yield number, BadLine(number, "$", "each line must be one JSON object (one event)")
            continue
        try:
            index, name = repeated_key(raw, [obj])
        except BodyError as exc:
            yield number, BadLine(number, "$", exc.args[0] if exc.args else "malformed")
            continue
        if name is not None:
            yield number, BadLine(number, name, "appears more than once in the event object")
            continue
        yield number, obj


def check_header(columns: list[str] | None) -> list[str]:
    """The CSV header's field names; raises BackfillError naming an unknown, repeated or missing column."""
    if not columns:
        raise BackfillError("CSV header: the file is empty (the first row must name the fields)")
    names = [c.strip() for c in columns]
    for name in names:
        if name not in FIELDS:
            raise BackfillError(f"CSV header: unknown column {name[:80]!r} (allowed: {', '.join(FIELDS)})")
    seen = set()
    for name in names:
        if name in seen:
            raise BackfillError(f"CSV header: column {name!r} appears more than once")
        seen.add(name)
    missing = [c for c in REQUIRED_COLUMNS if c not in seen]
    if missing:
        raise BackfillError(f"CSV header: required column {missing[0]!r} is missing")
    return names


def read_csv(fh: io.BufferedReader) -> Iterator[tuple[int, Any]]:
    """(line number where the row starts, event object or BadLine) per non-empty row after the header."""
    text = io.TextIOWrapper(fh, encoding="utf-8-sig", newline="")  # -sig: a leading byte order mark is dropped
    reader = csv.reader(text, strict=True)
    try:
        names = check_header(next(reader, None))
        start = reader.line_num + 1
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                yield start, BadLine(start, "$", f"not valid CSV ({exc})")
                start = reader.line_num + 1
                continue
            number, start = start, reader.line_num + 1
            if not any(cell.strip() for cell in row):
                continue
            if len(row) != len(names):
                yield number, BadLine(number, "$", f"has {len(row)} cells, the header names {len(names)}")
                continue
            obj: dict[str, Any] = {n: v for n, v in zip(names, row, strict=True) if v != ""}
            ts = obj.get("ts")
            if isinstance(ts, str) and ts.isascii() and ts.isdigit():
                obj["ts"] = int(ts)  # epoch milliseconds, as a JSON number would be
            yield number, obj
    except UnicodeDecodeError as exc:
        raise BackfillError(f"the file is not UTF-8 ({exc})") from None


def validate(obj: Any, number: int, *, file_id: str, ctx: HitContext, limits: Limits,
             registered: Callable[[str], bool]) -> Event | BadLine:
    """One line as the collector would take it, with a deterministic id if it has none."""
    if isinstance(obj, BadLine):
        return obj
    if obj.get("ts") is None:
        return BadLine(number, "ts", "is required for backfill (a historical event carries its own time)")
    if obj.get("id") is None:
        obj = {**obj, "id": f"bf-{file_id[:16]}-{number}"}
    try:
        event = event_from_hit(obj, ctx, limits, b"backfill")
    except EventError as exc:
        return BadLine(number, exc.field, exc.problem)
    if not registered(event.domain):
        return BadLine(number, "domain", f"{event.domain} is not a registered site (`tally sites add {event.domain}`)")
    return event


def backfill(path: Path, *, spool: Any, progress_dir: Path, registered: Callable[[str], bool], limits: Limits,
             fmt: str | None = None, chunk_lines: int = 5000, force: bool = False,
             on_bad: Callable[[BadLine], None] = lambda bad: None,
             on_chunk: Callable[[int], None] = lambda lines: None,
             on_start: Callable[[Progress], None] = lambda progress: None) -> Summary:
    """Import `path` into the spool, resuming where an earlier run of the same file stopped.

    Durable when it returns (and after each chunk): every good line up to the recorded progress is in
    the spool. Raises BackfillError (bad header, unreadable file, AlreadyImported) before writing
    anything; OSError from the spool (SpoolFull, ...) leaves the progress at the last durable chunk.
    `on_bad` gets every bad line; `on_chunk` the number of lines each chunk advanced, `on_start` the
    progress it starts from (`lines`, `next_line`: a progress bar).
    """
    fmt = detect_format(path, fmt)
    try:
        sha, lines = fingerprint(path)
    except OSError as exc:
        raise BackfillError(f"cannot read {path} ({exc.strerror or exc})") from None
    progress_path = progress_dir / f"{sha}.json"
    progress = Progress.load(progress_path)
    if progress is not None and progress.done and not force:
        raise AlreadyImported(
            f"{path.name} (sha256 {sha[:16]}...) was imported completely at {progress.finished_at} "
            f"({progress.imported} events, {progress.bad} bad lines). Importing it again would count events "
            "older than PostgreSQL's dedup window twice there; use --force to do it anyway, then "
            "`tally rebuild` the PostgreSQL rollups of that range")
    if progress is None or progress.done:
        progress = Progress(sha256=sha, path=str(path.resolve()), lines=lines,
                            started_at=datetime.now(UTC).isoformat())
    summary = Summary(progress=progress, resumed_from=progress.next_line)
    on_start(progress)
    with open(path, "rb") as fh:
        records = read_jsonl(fh) if fmt == "jsonl" else read_csv(fh)
        chunk: list[tuple[int, Any]] = []
        last_line = progress.next_line - 1
        for number, obj in records:
            if number < progress.next_line:
                continue
            chunk.append((number, obj))
            last_line = number
            if len(chunk) >= chunk_lines:
                _write_chunk(chunk, last_line, sha, spool, progress, progress_path, registered, limits, summary, on_bad,
                             on_chunk)
                chunk = []
        _write_chunk(chunk, max(last_line, lines), sha, spool, progress, progress_path, registered, limits, summary,
                     on_bad, on_chunk)
    progress.done = True
    progress.finished_at = datetime.now(UTC).isoformat()
    progress.save(progress_path)
    return summary


def _write_chunk(chunk: list[tuple[int, Any]], last_line: int, sha: str, spool: Any, progress: Progress,
                 progress_path: Path, registered: Callable[[str], bool], limits: Limits, summary: Summary,
                 on_bad: Callable[[BadLine], None], on_chunk: Callable[[int], None]) -> None:
    ctx = HitContext(received_at=datetime.now(UTC))
    events: list[Event] = []
    for number, obj in chunk:
        result = validate(obj, number, file_id=sha, ctx=ctx, limits=limits, registered=registered)
        if isinstance(result, BadLine):
            progress.bad += 1
            summary.bad_now += 1
            if len(progress.bad_lines) < 1000:
                progress.bad_lines.append(result.line)
            on_bad(result)
        else:
            events.append(result)
    if events:
        spool.append(e.to_json() for e in events)  # durable when it returns
        summary.oldest = min([summary.oldest or events[0].ts, *(e.ts for e in events)])
        summary.newest = max([summary.newest or events[0].ts, *(e.ts for e in events)])
    advanced = last_line + 1 - progress.next_line
    progress.imported += len(events)
    summary.imported_now += len(events)
    progress.next_line = last_line + 1
    progress.save(progress_path)  # only after the spool append returned
    on_chunk(max(0, advanced))
