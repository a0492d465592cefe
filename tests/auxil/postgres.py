"""A real PostgreSQL server for the tests: its own cluster in a temporary folder, on
127.0.0.1 at a free port, started and stopped by the tests (Debian's ``postgresql``
package provides the programs; ``.ci/run`` installs it)."""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

REQUIRED_ENV = "CHINWAG_TEST_POSTGRES"
"""Set to ``required`` (CI does) to fail, not skip, where PostgreSQL is missing."""


def bin_dir() -> Path | None:
    config = shutil.which("pg_config")
    if config:
        found = Path(subprocess.run([config, "--bindir"], capture_output=True, text=True,
                                    check=False).stdout.strip())
        if (found / "initdb").exists():
            return found
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                        key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0)
    return Path(candidates[-1]).parent if candidates else None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class PostgresServer:
    """One throwaway cluster. As root, the server runs as the ``postgres`` user, since
    PostgreSQL refuses to run as root."""

    def __init__(self, programs: Path) -> None:
        self._bin = programs
        self.root = Path(tempfile.mkdtemp(prefix="chinwag-pg-"))
        self.data = self.root / "data"
        self.port = _free_port()
        self._names = itertools.count(1)
        self._as: list[str] = []
        if os.geteuid() == 0:
            account = pwd.getpwnam("postgres")
            os.chown(self.root, account.pw_uid, account.pw_gid)
            self._as = ["runuser", "-u", "postgres", "--"]

    def _run(self, program: str, *args: str) -> None:
        result = subprocess.run([*self._as, str(self._bin / program), *args],
                                capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"{program} failed: {result.stdout}{result.stderr}")

    def init(self) -> None:
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "chinwag",
                  "-E", "UTF8", "--no-sync")

    def start(self) -> None:
        options = (f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 "
                   "-c fsync=off -c synchronous_commit=off -c full_page_writes=off")
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "log"), "-o", options,
                  "-w", "-t", "30", "start")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+asyncpg://chinwag@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        """A new empty database; returns its URL."""
        name = f"chinwag_test_{next(self._names)}"
        self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "chinwag", name)
        return self.url(name)

    def remove(self) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
