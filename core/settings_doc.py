"""The README's settings table, generated from the one table of settings in core/config.py (ADR 41).

    python -m core.settings_doc            rewrite the table in README.md, between its two marker lines
    python -m core.settings_doc --check    exit 1 if README.md's table is not the generated one

`scripts/gen-settings-table` runs it; tests/test_settings_table.py fails when the README drifts.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from core.config import SETTINGS, Settings
from core.settings_parse import Derived, Integer, Setting, plain_number, size_text

BEGIN = "<!-- settings table: generated from core/config.py by scripts/gen-settings-table; edit it there -->"
END = "<!-- end of the generated settings table -->"
README = Path(__file__).resolve().parent.parent / "README.md"


def default_text(spec: Setting[Any]) -> str:
    """The default column: what the README says a variable is when it is unset."""
    if isinstance(spec.default, Derived):
        if "{value}" not in spec.default.shown:
            return spec.default.shown
        name = next(name for name, s in SETTINGS.items() if s is spec)
        plain = Setting(spec.variable, getattr(Settings.from_env({}), name), spec.parse, spec.doc)
        return spec.default.shown.replace("{value}", default_text(plain))
    if spec.shown is not None:
        return spec.shown
    value = spec.default
    if value is None:
        raise ValueError(f"{spec.variable}: a default of None needs `shown=` to say what unset means")
    if isinstance(value, tuple):
        text = ",".join(str(item) for item in value)
    elif isinstance(value, float):
        text = plain_number(value)
    else:
        text = str(value)
    if isinstance(spec.parse, Integer) and spec.parse.size and isinstance(value, int) and size_text(value) != text:
        return f"`{text}` ({size_text(value)})"
    return f"`{text}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def settings_table() -> str:
    """The generated section, marker lines included, one row per setting in the table's order."""
    rows = [BEGIN, "| variable | default | accepts | meaning |", "| --- | --- | --- | --- |"]
    rows += [f"| `{spec.variable}` | {_cell(default_text(spec))} | {_cell(spec.parse.accepts)} | {_cell(spec.doc)} |"
             for spec in SETTINGS.values()]
    return "\n".join([*rows, END]) + "\n"


def render(readme: str) -> str:
    """`readme` with the text from the BEGIN line to the END line (both included) replaced by the table."""
    lines = readme.splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if line.strip() == BEGIN]
    ends = [i for i, line in enumerate(lines) if line.strip() == END]
    if len(starts) != 1 or len(ends) != 1 or ends[0] < starts[0]:
        raise ValueError(f"the README needs one line {BEGIN!r} and, after it, one line {END!r}")
    return "".join(lines[:starts[0]]) + settings_table() + "".join(lines[ends[0] + 1:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/gen-settings-table",
                                     description="Regenerate the README's settings table from core/config.py.")
    parser.add_argument("--check", action="store_true", help="exit 1 if the table differs; change nothing")
    parser.add_argument("--readme", type=Path, default=README, help="the file to update (default: %(default)s)")
    args = parser.parse_args(argv)
    current = args.readme.read_text(encoding="utf-8")
    try:
        wanted = render(current)
    except ValueError as exc:
        print(f"{args.readme}: {exc}", file=sys.stderr)
        return 2
    if wanted == current:
        print(f"{args.readme}: the settings table is up to date")
        return 0
    if args.check:
        print(f"{args.readme}: the settings table differs from core/config.py; run scripts/gen-settings-table",
              file=sys.stderr)
        return 1
    args.readme.write_text(wanted, encoding="utf-8")
    print(f"{args.readme}: settings table regenerated ({len(SETTINGS)} settings)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
