"""`tally ...` run inside the test process: `tally.cli.main` with its own environment and stdin, its output
captured, its answer shaped as `subprocess.run`'s.

A `tally` subprocess costs about 0.3 s of CPU on a quiet machine (interpreter, imports) and several seconds on
a loaded one; the suite ran hundreds of them on two cores (ADR 42, addendum of issue 18). Tests of what only a
real process shows (the console script, signals, a closed pipe, the exit status the shell sees) keep
`subprocess.run`; each module that switches keeps at least one such test.
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from unittest import mock


def run_tally(args: Sequence[str], env: Mapping[str, str], stdin: str = "") -> subprocess.CompletedProcess[str]:
    """`tally *args` with exactly `env` as its environment; (returncode, stdout, stderr) as a subprocess's."""
    from tally.cli import main

    out, err = io.StringIO(), io.StringIO()
    with mock.patch.dict(os.environ, dict(env), clear=True), mock.patch.object(sys, "stdin", io.StringIO(stdin)), \
            contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as exc:  # argparse's usage errors, --help
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return subprocess.CompletedProcess(["tally", *args], code, out.getvalue(), err.getvalue())
