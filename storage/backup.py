"""Copies of a SQLite database file, taken before a migration changes it.

A copy is named ``<file>.bak-<revision>-<UTC time>`` (``chinwag.db.bak-0005-20261201T
231502123456Z``): the schema revision it holds and when it was taken, so copies are
never overwritten and sort oldest first by their names alone.
"""

from __future__ import annotations

import logging
import os
import re
import sqlite3
import tempfile
from collections.abc import Callable
from contextlib import closing
from datetime import UTC, datetime
from pathlib import Path

logger = logging.getLogger(__name__)

KEEP_BACKUPS = 3
"""How many copies of one database are kept; older ones are deleted."""


def copy_aside(database_file: str | Path, revision: str,
               now: Callable[[], datetime] = lambda: datetime.now(UTC)) -> Path:
    """Copy the database file (at schema ``revision``) next to it; returns the copy's path.

    SQLite's online backup API gives a consistent copy even of a file in WAL mode with
    other connections open, which a file copy would not. The copy is one self-contained
    file (journal mode DELETE), written under a unique temporary name first, so two
    processes never write the same file and a crash never leaves a half-written copy
    that looks whole."""
    database = Path(database_file).expanduser()
    stamp = now().astimezone(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    target = database.with_name(f"{database.name}.bak-{revision}-{stamp}")
    handle, partial = tempfile.mkstemp(prefix=f".{database.name}.", suffix=".partial",
                                       dir=database.parent)
    os.close(handle)
    try:
        with closing(sqlite3.connect(database)) as source, \
                closing(sqlite3.connect(partial)) as copy:
            source.backup(copy)
            copy.execute("PRAGMA journal_mode=DELETE")  # opening it leaves no -wal beside it
        os.replace(partial, target)
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise
    return target


def copies_of(database_file: str | Path) -> list[Path]:
    """The copies of a database, oldest first."""
    database = Path(database_file).expanduser()
    name = re.compile(re.escape(database.name) + r"\.bak-[0-9A-Za-z_]+-(\d{8}T\d{12}Z)")
    found = [(match.group(1), path) for path in database.parent.iterdir()
             if (match := name.fullmatch(path.name))]
    return [path for _stamp, path in sorted(found)]


def prune(database_file: str | Path, keep: int = KEEP_BACKUPS) -> list[Path]:
    """Delete all but the ``keep`` newest copies (at least one is kept); returns those
    deleted."""
    old = copies_of(database_file)[:-max(keep, 1)]
    for path in old:
        path.unlink(missing_ok=True)
    return old
