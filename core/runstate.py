"""What a running `tally up` says about itself, for the processes and commands around it.

`tally up` (tally/platform.py) writes `$TALLY_HOME/run/stack.json` (0600, in a 0700 directory: it holds
the embedded PostgreSQL's DSN) at start and whenever a supervised child dies or comes back. Besides
where the embedded servers are, `components` maps each supervised name to what the supervisor knows:
`{"state": "up" | "down", "pid", "restarts", "crashes_in_a_row", "last_exit_code", "detail"}`.
The file is removed when `tally up` stops; one left by a killed `tally up` names a dead pid and is ignored.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from core.pids import pid_running

RUN_STATE = "run/stack.json"  # under TALLY_HOME


def down_components(home: Path) -> dict[str, str]:
    """name -> detail for each part a running `tally up` with this TALLY_HOME reports down; {} when none
    runs (production: there the service manager supervises)."""
    try:
        state: Any = json.loads((home / RUN_STATE).read_bytes())
    except (OSError, ValueError):
        return {}
    if not isinstance(state, dict) or not pid_running(state.get("pid")):
        return {}
    components = state.get("components")
    if not isinstance(components, dict):
        return {}
    return {str(name): str(info.get("detail") or "down") for name, info in components.items()
            if isinstance(info, dict) and info.get("state") == "down"}
