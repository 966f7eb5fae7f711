"""A test whose report holds a lone surrogate reports as itself under pytest-xdist (tests/xdist_reports.py)."""

from __future__ import annotations

import collections
import enum
import subprocess
import sys
from pathlib import Path

from tests.xdist_reports import utf8_safe

ROOT = Path(__file__).resolve().parent.parent
MODULE = '''
import logging
import warnings

def test_fails_with_a_lone_surrogate():
    raise RuntimeError("cut mid-pair: \\udcff")

def test_passes_with_one_in_its_captured_log():
    logging.getLogger("x").warning("a path decoded with surrogateescape: \\udcfe")

def test_passes_with_a_warning_holding_one():
    warnings.warn("a warning cut mid-pair: \\udcfd")
'''


def run_worker(tmp_path: Path, *plugin: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    (tmp_path / "test_surrogates.py").write_text(MODULE)
    return subprocess.run([sys.executable, "-m", "pytest", "-c", str(tmp_path / "pytest.ini"), "--rootdir",
                           str(tmp_path), "-p", "no:cacheprovider", *plugin, "-n", "1", "-rA",
                           str(tmp_path / "test_surrogates.py")],
                          cwd=ROOT, capture_output=True, text=True, errors="replace", timeout=120)


def test_a_lone_surrogate_no_longer_ends_the_run(tmp_path):
    """Without the plugin this run ends in INTERNALERROR, "strings must be utf-8 encodable", at the first of the
    three (one CI run ended so)."""
    got = run_worker(tmp_path, "-p", "tests.xdist_reports")
    assert got.returncode == 1, got.stdout + got.stderr
    assert "INTERNALERROR" not in got.stdout + got.stderr
    assert "1 failed, 2 passed, 1 warning" in got.stdout
    assert "cut mid-pair: \\udcff" in got.stdout and "surrogateescape: \\udcfe" in got.stdout
    assert "a warning cut mid-pair: \\udcfd" in got.stdout


def test_utf8_safe_escapes_only_what_cannot_be_encoded():
    data = {"ok": "kathmandu \u0915", "bad": ["x\ud800y", ("\udcff",)], 3: None, "\udc80": 1.5, "b": b"\xff",
            "t": True, "odd": {1, 2}}
    assert utf8_safe(data) == {"ok": "kathmandu \u0915", "bad": ["x\\ud800y", ("\\udcff",)], 3: None, "\\udc80": 1.5,
                               "b": b"\xff", "t": True, "odd": "{1, 2}"}


def test_utf8_safe_sends_subclasses_and_namedtuples_as_plain_values():
    class Tag(str):
        pass

    class Level(enum.IntEnum):
        HIGH = 3

    point = collections.namedtuple("point", "x y")(1, "\udcff")
    got = utf8_safe({"tag": Tag("a"), "level": Level.HIGH, "point": point, "list": [Tag("b\ud800")]})
    assert got == {"tag": "a", "level": "<Level.HIGH: 3>", "point": "point(x=1, y='\\udcff')", "list": ["b\\ud800"]}
    assert {type(v) for v in got.values()} == {str, list} and type(got["list"][0]) is str
