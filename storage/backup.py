"""Copies of a SQLite database file, taken before a migration changes it."""

from __future__ import annotations

import logging
import os
import sqlite3
from contextlib import closing
from pathlib import Path

logger = logging.getLogger(__name__)

KEEP_BACKUPS = 3
"""How many copies of one database are kept; older ones are deleted."""


def backup_name(database: Path, revision: str) -> Path:
    return database.with_name(f"{database.name}.bak-{revision}")


def copy_aside(database_file: str | Path, revision: str, keep: int = KEEP_BACKUPS) -> Path:
    """Copy the database file (at schema ``revision``) to ``<name>.bak-<revision>`` and delete
    all but the ``keep`` newest copies; returns the copy's path.

    SQLite's online backup API gives a consistent copy even of a file in WAL mode with
    other connections open, which a file copy would not. It is written under a temporary
    name first, so a crash never leaves a half-written copy that looks whole."""
    database = Path(database_file).expanduser()
    target = backup_name(database, revision)
    partial = target.with_name(f".{target.name}.partial")
    with closing(sqlite3.connect(database)) as source, \
            closing(sqlite3.connect(partial)) as copy:
        source.backup(copy)
    os.replace(partial, target)
    others = [p for p in database.parent.glob(f"{database.name}.bak-*") if p != target]
    newest_other = max((p.stat().st_mtime_ns for p in others), default=0)
    if target.stat().st_mtime_ns <= newest_other:
        # Coarse file clocks can give two quick copies one time; this one is the newest.
        os.utime(target, ns=(newest_other + 1, newest_other + 1))
    copies = sorted([*others, target], key=lambda p: p.stat().st_mtime_ns)
    for old in copies[:-keep] if keep > 0 else copies:
        old.unlink(missing_ok=True)
    return target
