"""Process logs: one JSON object per line, in a size-rotated file that several processes may share.

Every long-running process (`tally up`, the collector and each of its granian workers, the
shipper, both workers, the API, the analyst server) calls `setup_logging` once at start:

- a line is `{"ts", "level", "logger", "msg", "process", "pid", ...}` plus every field passed
  with `extra=` (e.g. the consumer's `group`, `offsets`, `events`, `rejected`, `duration_ms`),
  and `exc` when an exception is logged; newlines inside values are escaped, so one record is
  always one line (`TALLY_LOG_FORMAT=text` writes the classic human format instead);
- lines go to `<TALLY_LOG_DIR>/<process>.log` (dir 0700, files 0600), rotated at
  `TALLY_LOG_MAX_BYTES` into `.1` ... `.<TALLY_LOG_BACKUPS>` (`SharedRotatingFileHandler`:
  safe when the granian workers and their master write one file); `TALLY_LOG_DIR=-` writes
  them to stderr instead (containers);
- whatever looks like a secret is masked before it is written: URL passwords
  (`postgresql://user:***@host`), API tokens (`tly_<id>_***`), bearer credentials and
  `password=` / `secret=` / `token=` pairs (`redact`). Code must still never log secrets on
  purpose: this is the second line of defence, not the first.

Kernel module: imports nothing of ours except the settings next to it.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import sys
import threading
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, TextIO

from core.config import Settings

# Attributes every LogRecord has: anything else on a record came from `extra=` and is written as a field.
_RECORD_ATTRS = frozenset(vars(logging.LogRecord("x", logging.INFO, "x", 0, "x", (), None))) | {
    "message", "asctime", "taskName"}
_OURS = "_tally_handler"  # marks the handlers setup_logging installed, so a second call replaces them

_SECRET_PATTERNS = (
    # userinfo password in any URL / DSN: scheme://user:PASSWORD@host
    (re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://[^/\s:@]*:)[^@\s/]+@"), r"\1***@"),
    # API tokens tly_<id>_<secret>
    (re.compile(r"\b(tly_[A-Za-z0-9]+_)[A-Za-z0-9_-]+"), r"\1***"),
    # Authorization: Bearer <credential>
    (re.compile(r"(?i)\b(bearer\s+)[A-Za-z0-9._~+/=-]+"), r"\1***"),
    # key=value pairs (libpq conninfo, query strings) naming a secret
    (re.compile(r"(?i)\b(password|passwd|secret|token|sig)(\s*[=:]\s*)[^\s&,;'\"]+"), r"\1\2***"),
)


def redact(text: str) -> str:
    """`text` with URL passwords, API tokens, bearer credentials and `password=...` values masked."""
    for pattern, replacement in _SECRET_PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def _clean(value: Any) -> Any:
    """A JSON-ready copy of an `extra=` value, strings redacted (dict keys become strings)."""
    if isinstance(value, str):
        return redact(value)
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_clean(v) for v in value]
    if isinstance(value, datetime):
        return value.isoformat()
    return redact(str(value))


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line; see the module docstring for the fields."""

    def __init__(self, process: str) -> None:
        super().__init__()
        self.process_name = process

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": redact(record.getMessage()),
            "process": self.process_name,
            "pid": record.process,
        }
        for key, value in record.__dict__.items():
            if key not in _RECORD_ATTRS and not key.startswith("_") and key not in out:
                out[key] = _clean(value)
        if record.exc_info:
            out["exc"] = redact(self.formatException(record.exc_info))
        if record.stack_info:
            out["stack"] = redact(self.formatStack(record.stack_info))
        return json.dumps(out, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """`time LEVEL process logger: message`, redacted (TALLY_LOG_FORMAT=text, and terminals)."""

    def __init__(self, process: str) -> None:
        super().__init__(f"%(asctime)s %(levelname)s {process} %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


class SharedRotatingFileHandler(logging.Handler):
    """Appends records to `path` (created 0600) and rotates it at `max_bytes` into `path.1` ... `path.<backups>`.

    Several processes may write the same file (granian's workers and their master): every record
    is one `write(2)` on an O_APPEND descriptor, so lines never interleave; before each write the
    handler follows the path to the file now there (another process may have rotated it); a
    rotation holds an exclusive `flock` on the file being rotated and re-checks, under it, that
    nobody rotated it meanwhile, so one size crossing rotates once. A record written in the race
    between a check and a rotation lands in `path.1`: it is kept, never lost (until it ages out
    of the backups).
    """

    def __init__(self, path: Path, *, max_bytes: int, backups: int) -> None:
        super().__init__()
        if max_bytes < 1 or backups < 1:
            raise ValueError("max_bytes and backups must be at least 1")
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.backups = backups
        self._fd: int | None = None
        self._inode: tuple[int, int] | None = None

    def _reopen(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        st = os.fstat(fd)
        if st.st_uid == os.getuid() and st.st_mode & 0o077:
            os.fchmod(fd, 0o600)  # a file made by someone else's umask earlier
        self._fd, self._inode = fd, (st.st_dev, st.st_ino)

    def _on_disk(self) -> tuple[tuple[int, int], int] | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return (st.st_dev, st.st_ino), st.st_size

    def emit(self, record: logging.LogRecord) -> None:
        try:
            data = (self.format(record) + "\n").encode("utf-8", "replace")
            self._write(data)
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)

    def _write(self, data: bytes) -> None:
        now = self._on_disk()
        if self._fd is None or now is None or now[0] != self._inode:
            self._reopen()
            now = self._on_disk()
        size = now[1] if now else 0
        if size and size + len(data) > self.max_bytes:
            self._rotate(len(data))
        assert self._fd is not None
        os.write(self._fd, data)

    def _rotate(self, incoming: int) -> None:
        assert self._fd is not None
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            now = self._on_disk()
            # Rotated by another process while we waited for the lock: just follow it.
            if now is not None and now[0] == self._inode and now[1] + incoming > self.max_bytes:
                for n in range(self.backups - 1, 0, -1):
                    older = self.path.with_name(f"{self.path.name}.{n}")
                    if older.exists():
                        older.replace(self.path.with_name(f"{self.path.name}.{n + 1}"))
                self.path.replace(self.path.with_name(f"{self.path.name}.1"))
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        self._reopen()

    def close(self) -> None:
        self.acquire()
        try:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
        finally:
            self.release()
        super().close()


def log_file(settings: Settings, process: str) -> Path | None:
    """Where `process` writes its log (None: TALLY_LOG_DIR=-, stderr)."""
    return None if settings.log_dir is None else settings.log_dir / f"{process}.log"


def setup_logging(settings: Settings, process: str, *, level: int = logging.INFO,
                  terminal_level: int | None = logging.INFO, stream: TextIO | None = None) -> Path | None:
    """Send every record of this process to its log (file or stderr, see the module docstring).

    Replaces the root logger's handlers. `terminal_level`: also write text at this level to
    `stream` (default stderr) when it is a terminal (None: never); `tally up` passes WARNING and
    forces it (`stream` given), so its terminal stays short. Returns the log file, if any.
    Raises OSError if the log directory cannot be made.
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        if getattr(handler, _OURS, False):
            handler.close()
    formatter: logging.Formatter = (JsonFormatter(process) if settings.log_format == "json"
                                    else TextFormatter(process))
    path = log_file(settings, process)
    main: logging.Handler
    if path is None:
        main = logging.StreamHandler(sys.stderr)
    else:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = path.parent.stat()
        if st.st_uid == os.getuid() and st.st_mode & 0o077:
            path.parent.chmod(0o700)
        main = SharedRotatingFileHandler(path, max_bytes=settings.log_max_bytes, backups=settings.log_backups)
    main.setFormatter(formatter)
    handlers = [main]
    out = stream if stream is not None else sys.stderr
    if terminal_level is not None and path is not None and (stream is not None or out.isatty()):
        terminal = logging.StreamHandler(out)
        terminal.setLevel(terminal_level)
        terminal.setFormatter(TextFormatter(process))
        handlers.append(terminal)
    for handler in handlers:
        setattr(handler, _OURS, True)
        root.addHandler(handler)
    root.setLevel(level)
    _log_uncaught()
    return path


def _log_uncaught() -> None:
    """An exception that ends the process (or a thread) is logged too, then reported as before (stderr)."""
    if getattr(sys.excepthook, _OURS, False):
        return
    previous, previous_thread = sys.excepthook, threading.excepthook

    def hook(kind: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
        if not issubclass(kind, KeyboardInterrupt):
            logging.getLogger("tally").critical("uncaught %s", kind.__name__, exc_info=(kind, value, tb))
        previous(kind, value, tb)

    def thread_hook(args: threading.ExceptHookArgs) -> None:
        if args.exc_type is not SystemExit:
            exc = args.exc_value  # None only when raised without an instance
            logging.getLogger("tally").critical("uncaught %s in thread %s", args.exc_type.__name__,
                                                args.thread.name if args.thread else "?",
                                                exc_info=None if exc is None else
                                                (args.exc_type, exc, args.exc_traceback))
        previous_thread(args)

    setattr(hook, _OURS, True)
    sys.excepthook, threading.excepthook = hook, thread_hook
