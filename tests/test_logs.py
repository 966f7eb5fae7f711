"""Process logs (core/logs.py): JSON lines with structured fields, secrets masked, size rotation that
several processes can share, file modes, and the settings that configure it (bad values refused)."""

from __future__ import annotations

import json
import logging
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from core.config import ConfigError, Settings
from core.logs import JsonFormatter, SharedRotatingFileHandler, redact, setup_logging

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def restore_root_logging():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    hooks = (sys.excepthook, __import__("threading").excepthook)
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
        if handler not in handlers:
            handler.close()
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)
    sys.excepthook, __import__("threading").excepthook = hooks


def record(msg: str, *args, level=logging.INFO, exc_info=None, **extra) -> logging.LogRecord:
    rec = logging.LogRecord("tally.test", level, __file__, 1, msg, args, exc_info)
    rec.__dict__.update(extra)
    return rec


def test_a_record_is_one_json_line_with_the_fields_and_extras():
    line = JsonFormatter("rollup-worker").format(record(
        "committed batch\nsecond line %d", 7, group="tally-rollups", offsets={0: [5, 9]}, events=4, duration_ms=1.5))
    assert "\n" not in line
    doc = json.loads(line)
    assert doc["msg"] == "committed batch\nsecond line 7"
    assert doc["level"] == "INFO" and doc["logger"] == "tally.test" and doc["process"] == "rollup-worker"
    assert doc["pid"] == os.getpid() and doc["ts"].endswith("+00:00")
    assert doc["group"] == "tally-rollups" and doc["offsets"] == {"0": [5, 9]} and doc["events"] == 4
    assert doc["duration_ms"] == 1.5


def test_an_exception_is_in_the_same_line():
    try:
        raise ValueError("boom")
    except ValueError:
        line = JsonFormatter("api").format(record("failed", level=logging.ERROR, exc_info=sys.exc_info()))
    doc = json.loads(line)
    assert doc["level"] == "ERROR" and "ValueError: boom" in doc["exc"] and "Traceback" in doc["exc"]


@pytest.mark.parametrize("text, secret", [
    ("connecting to postgresql://tally:s3cr3t-pw@db.internal:5432/tally", "s3cr3t-pw"),
    ("TALLY_CLICKHOUSE_DSN=https://default:hunter2hunter2@ch:8443", "hunter2hunter2"),
    ("token tly_tok_0123456789_QWERTYsecretpartXYZ was refused", "QWERTYsecretpartXYZ"),
    ("Authorization: Bearer abcdefghijklmnop0123", "abcdefghijklmnop0123"),
    ("host=db user=tally password=pa55word dbname=tally", "pa55word"),
    ("GET /i.gif?site=pk_1&sig=deadbeefcafe0011", "deadbeefcafe0011"),
])
def test_secrets_are_masked_in_messages_extras_and_tracebacks(text, secret):
    assert secret not in redact(text) and "***" in redact(text)
    try:
        raise RuntimeError(text)
    except RuntimeError:
        line = JsonFormatter("x").format(record("%s", text, level=logging.ERROR, exc_info=sys.exc_info(),
                                                detail=text, nested={"k": [text]}))
    assert secret not in line
    assert json.loads(line)["msg"] == redact(text)


def test_what_is_not_a_secret_is_left_alone():
    for text in ("shipped segment a.seg to topic_id 01a2", "3 tokens listed", "TALLY_SECRET: is required",
                 "http://127.0.0.1:8700/collect", "postgresql://tally@127.0.0.1:5432/postgres"):
        assert redact(text) == text


def read_lines(paths: list[Path]) -> list[dict]:
    out = []
    for path in paths:
        out += [json.loads(line) for line in path.read_text().splitlines()]
    return out


def test_rotation_happens_at_the_size_limit_and_keeps_the_backups(tmp_path):
    path = tmp_path / "logs" / "shipper.log"
    path.parent.mkdir()
    handler = SharedRotatingFileHandler(path, max_bytes=4096, backups=3)
    handler.setFormatter(JsonFormatter("shipper"))
    try:
        for i in range(200):  # ~120 bytes each: ~24 KiB, so more rotations than backups
            handler.handle(record("shipped segment %d", i, n=i))
    finally:
        handler.close()
    files = sorted(path.parent.iterdir())
    assert [p.name for p in files] == ["shipper.log", "shipper.log.1", "shipper.log.2", "shipper.log.3"]
    for p in files:
        assert p.stat().st_size <= 4096, p
        assert stat.S_IMODE(p.stat().st_mode) == 0o600
    # oldest backup first: the kept records are the newest ones, contiguous, in order, none torn
    kept = [doc["n"] for doc in read_lines([path.with_name("shipper.log.3"), path.with_name("shipper.log.2"),
                                             path.with_name("shipper.log.1"), path])]
    assert kept == list(range(kept[0], 200)) and kept[0] > 0
    # each file was filled up to the limit before rotating: a next record would not have fitted
    for p in files[1:]:
        assert p.stat().st_size + 100 > 4096


def test_several_processes_share_one_rotated_file_without_losing_or_tearing_a_line(tmp_path):
    """What the collector's granian workers do: each process appends to collector.log and rotates it."""
    path = tmp_path / "collector.log"
    code = textwrap.dedent(f"""
        import logging, sys
        from core.logs import JsonFormatter, SharedRotatingFileHandler
        h = SharedRotatingFileHandler(__import__("pathlib").Path({str(path)!r}), max_bytes=8192, backups=1000)
        h.setFormatter(JsonFormatter("collector"))
        log = logging.getLogger("w"); log.addHandler(h); log.setLevel(logging.INFO); log.propagate = False
        for i in range(400):
            log.info("request %d", i, extra={{"writer": int(sys.argv[1]), "i": i, "pad": "x" * (i % 50)}})
    """)
    procs = [subprocess.Popen([sys.executable, "-c", code, str(w)], cwd=ROOT) for w in range(3)]
    assert [p.wait(120) for p in procs] == [0, 0, 0]
    files = sorted(tmp_path.glob("collector.log*"))
    assert len(files) > 5  # it did rotate, many times, under contention
    docs = read_lines(files)  # every line parses: no interleaved or torn line
    seen = sorted((d["writer"], d["i"]) for d in docs)
    assert seen == sorted((w, i) for w in range(3) for i in range(400))  # each exactly once
    # per writer, lines keep their order across the rotated files (oldest backup has the highest number)
    ordered = sorted(files, key=lambda p: -int(p.suffix[1:]) if p.suffix[1:].isdigit() else 1)
    for w in range(3):
        mine = [d["i"] for d in read_lines(ordered) if d["writer"] == w]
        assert mine == list(range(400))


def settings_for(tmp_path: Path, **env: str) -> Settings:
    return Settings.from_env({"TALLY_HOME": str(tmp_path / "home"), **env})


def test_setup_logging_writes_json_to_a_private_file(tmp_path, restore_root_logging):
    os.umask(0o022)
    settings = settings_for(tmp_path)
    path = setup_logging(settings, "api", terminal_level=None)
    assert path == tmp_path / "home" / "logs" / "api.log"
    logging.getLogger("api.test").warning("ready on %s", "127.0.0.1:8701", extra={"port": 8701})
    doc = json.loads(path.read_text().splitlines()[-1])
    assert doc["msg"] == "ready on 127.0.0.1:8701" and doc["process"] == "api" and doc["port"] == 8701
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_text_format_and_stderr_only(tmp_path):
    """TALLY_LOG_FORMAT=text writes the human format; TALLY_LOG_DIR=- sends the lines to stderr, no file."""
    code = ("import logging, os\nfrom core.config import Settings\nfrom core.logs import setup_logging\n"
            "setup_logging(Settings.from_env(os.environ), 'shipper')\n"
            "logging.getLogger('t').info('hello %s', 'postgresql://u:pw123456@h/db')\n")
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("TALLY_")},
           "TALLY_HOME": str(tmp_path / "home"), "TALLY_LOG_DIR": "-"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stderr.strip().splitlines()[-1])
    assert doc["msg"] == "hello postgresql://u:***@h/db" and doc["process"] == "shipper"
    assert not (tmp_path / "home" / "logs").exists()
    env.update(TALLY_LOG_FORMAT="text", TALLY_LOG_DIR=str(tmp_path / "text-logs"))
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    line = (tmp_path / "text-logs" / "shipper.log").read_text().strip()
    assert line.endswith("INFO shipper t: hello postgresql://u:***@h/db") and "pw123456" not in line


@pytest.mark.parametrize("variable, value, problem", [
    ("TALLY_LOG_FORMAT", "xml", "must be json or text"),
    ("TALLY_LOG_MAX_BYTES", "lots", "is not an integer"),
    ("TALLY_LOG_MAX_BYTES", "100", "out of range"),
    ("TALLY_LOG_BACKUPS", "0", "out of range"),
    ("TALLY_LOG_BACKUPS", "-3", "out of range"),
])
def test_bad_log_settings_are_refused_naming_the_variable(tmp_path, variable, value, problem):
    with pytest.raises(ConfigError) as refused:
        settings_for(tmp_path, **{variable: value})
    assert refused.value.variable == variable and problem in str(refused.value)
    # the same through the CLI: exit 2, the variable named, no log directory made
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("TALLY_")},
           "TALLY_HOME": str(tmp_path / "home"), variable: value}
    out = subprocess.run([sys.executable, "-m", "tally.cli", "shipper"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2 and f"configuration error: {variable}:" in out.stderr, out.stderr
    assert not (tmp_path / "home" / "logs").exists()


def test_log_settings_defaults(tmp_path):
    settings = settings_for(tmp_path)
    assert (settings.log_format, settings.log_dir) == ("json", tmp_path / "home" / "logs")
    assert (settings.log_max_bytes, settings.log_backups) == (50 * 1024 * 1024, 5)
    assert settings_for(tmp_path, TALLY_LOG_DIR="-").log_dir is None


def test_a_log_directory_that_cannot_be_made_is_refused_naming_the_variable(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the log directory should be")
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("TALLY_")},
           "TALLY_HOME": str(tmp_path / "home"), "TALLY_LOG_DIR": str(blocker / "logs")}
    out = subprocess.run([sys.executable, "-m", "tally.cli", "shipper"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2 and "configuration error: TALLY_LOG_DIR: cannot write logs in" in out.stderr, \
        out.stderr
    assert blocker.read_text() == "a file where the log directory should be"
