"""Files that hold users' data or secrets: created, and kept, readable by their owner only."""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path


def owner_only_sqlite(path: Path) -> None:
    """Create the database file readable by its owner only, or tighten one we own: SQLite makes
    its -wal and -shm files with the database's mode."""
    os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
    for part in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        with contextlib.suppress(FileNotFoundError):
            state = part.stat()
            if state.st_uid == os.getuid() and stat.S_IMODE(state.st_mode) & 0o077:
                part.chmod(0o600)
