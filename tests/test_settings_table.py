"""Each setting is written once (ADR 41): the field in core/config.py is the only place; `from_env`, the
allowlist of variables and the README's settings table are derived from it, and the README cannot drift."""

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from core.config import KNOWN_VARIABLES, SETTINGS, ConfigError, Settings
from core.settings_doc import BEGIN, END, render, settings_table
from core.settings_parse import Derived

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
SCRIPT = ROOT / "scripts" / "gen-settings-table"


def run_script(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run([str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=60)


def test_the_readme_table_is_the_generated_one():
    readme = README.read_text(encoding="utf-8")
    assert settings_table() in readme, "README.md's settings table drifted: run scripts/gen-settings-table"
    assert render(readme) == readme


def test_every_setting_has_one_row_with_its_default_and_meaning():
    table = settings_table()
    rows = [line for line in table.splitlines() if line.startswith("| `TALLY_")]
    assert [row.split(" | ")[0].strip("|` ") for row in rows] == [s.variable for s in SETTINGS.values()]
    row = next(r for r in rows if r.startswith("| `TALLY_MAX_BODY_BYTES` |"))
    assert row.split(" | ")[1:3] == ["`262144` (256 KiB)", "bytes, 1 KiB to 64 MiB"]
    row = next(r for r in rows if r.startswith("| `TALLY_DEDUP_WINDOW_DAYS` |"))
    assert "(`9`)" in row  # the derived default's value when nothing is set, computed, not typed in
    row = next(r for r in rows if r.startswith("| `TALLY_SQL_MAX_EXECUTION_S` |"))
    assert "gives up 2 + (limit + 1) + 2 s" in row  # from SQL_SLOT_WAIT_S, SQL_WATCHDOG_GRACE_S, SQL_RELAY_MARGIN_S


def test_check_fails_on_a_drifted_copy_and_the_script_regenerates_it_in_place(tmp_path):
    copy = tmp_path / "README.md"
    original = README.read_text(encoding="utf-8")
    drifted = original.replace("| `TALLY_COLLECTOR_PORT` | `8700` |", "| `TALLY_COLLECTOR_PORT` | `8800` |")
    assert drifted != original
    copy.write_text(drifted, encoding="utf-8")
    check = run_script("--check", "--readme", str(copy))
    assert check.returncode == 1
    assert "differs from core/config.py; run scripts/gen-settings-table" in check.stderr
    assert copy.read_text(encoding="utf-8") == drifted  # --check changes nothing
    fix = run_script("--readme", str(copy))
    assert fix.returncode == 0, fix.stderr
    assert copy.read_text(encoding="utf-8") == original
    assert run_script("--check", "--readme", str(copy)).returncode == 0


def test_text_around_the_markers_is_kept_and_missing_markers_are_refused(tmp_path):
    text = f"intro\n{BEGIN}\n| stale |\n{END}\noutro\n"
    assert render(text) == "intro\n" + settings_table() + "outro\n"
    copy = tmp_path / "README.md"
    copy.write_text("no markers here\n", encoding="utf-8")
    proc = run_script("--readme", str(copy))
    assert proc.returncode == 2 and "needs one line" in proc.stderr
    assert copy.read_text(encoding="utf-8") == "no markers here\n"
    with pytest.raises(ValueError):
        render(f"{END}\n{BEGIN}\n")


def test_one_table_gives_the_fields_the_allowlist_and_from_env():
    import dataclasses

    fields = [f.name for f in dataclasses.fields(Settings) if f.name != "raw"]
    assert list(SETTINGS) == fields
    variables = [s.variable for s in SETTINGS.values()]
    assert len(set(variables)) == len(variables) and KNOWN_VARIABLES == set(variables)
    assert all(v.startswith("TALLY_") for v in variables)
    assert Settings.from_env({v: " " for v in variables}) == Settings.from_env({})  # blank = the default
    with pytest.raises(ConfigError, match="unknown setting"):
        Settings.from_env({"TALLY_NOT_IN_THE_TABLE": "1"})


def test_plain_defaults_are_values_their_variable_accepts():
    """What the README shows as a default, set explicitly, gives the same value (so it is in range)."""
    checked = 0
    for name, spec in SETTINGS.items():
        if isinstance(spec.default, Derived) or spec.default is None:
            continue
        value = spec.default
        text = ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
        assert getattr(Settings.from_env({spec.variable: text}), name) == value, spec.variable
        checked += 1
    assert checked > 40


@pytest.mark.parametrize("path", ["core/config.py", "core/settings_parse.py", "core/settings_doc.py"])
def test_no_function_over_60_lines(path):
    tree = ast.parse((ROOT / path).read_text(encoding="utf-8"))
    long = [(node.name, node.end_lineno - node.lineno + 1) for node in ast.walk(tree)
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno - node.lineno >= 60]
    assert long == []


def test_the_script_is_executable():
    assert os.access(SCRIPT, os.X_OK) and shutil.which("bash")
