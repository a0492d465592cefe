"""Running ``chinwag`` as a subprocess, the way a user does."""

from __future__ import annotations

import asyncio
import asyncio.subprocess as aproc
import os
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import IO

ROOT = Path(__file__).resolve().parents[2]


def chinwag(*args: str, stdin: str = "", env: dict[str, str] | None = None,
            cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CHINWAG_")}
    clean.update({"HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), **(env or {})})
    return subprocess.run(
        [sys.executable, "-m", "bot", *args], input=stdin, capture_output=True, text=True,
        env=clean, cwd=cwd or ROOT, timeout=timeout, check=False,
    )


async def serve_until_sigterm(env: dict[str, str], tmp_path: Path,
                              scenario: Callable[[], Awaitable[None]]) -> str:
    """Run ``chinwag run`` with these settings while ``scenario`` runs, then SIGTERM it;
    checks it exits 0 and returns what it logged."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CHINWAG_")}
    clean.update({"CHINWAG_GENERATOR": "echo", "CHINWAG_DATA_DIR": str(tmp_path),
                  "NO_PROXY": "127.0.0.1", **env})
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bot", "run", env=clean, stdin=aproc.DEVNULL,
        stdout=aproc.PIPE, stderr=aproc.PIPE, cwd=ROOT)
    try:
        await scenario()
    finally:
        process.send_signal(signal.SIGTERM)
        _out, err = await asyncio.wait_for(process.communicate(), 30)
    log = err.decode()
    assert process.returncode == 0, log
    return log


def _run_log(tmp_path: Path) -> IO[bytes]:
    return open(tmp_path / f"run-{len(list(tmp_path.glob('run-*.log')))}.log", "wb")


async def start_run(env: dict[str, str], tmp_path: Path) -> aproc.Process:
    """``chinwag run`` with these settings (and the echo generator unless they say
    otherwise), its log going to ``tmp_path/run-<n>.log``."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CHINWAG_")}
    clean.update({"CHINWAG_GENERATOR": "echo", "CHINWAG_DATA_DIR": str(tmp_path),
                  "NO_PROXY": "127.0.0.1", **env})
    log = _run_log(tmp_path)
    try:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bot", "run", env=clean, stdin=aproc.DEVNULL,
            stdout=log, stderr=log, cwd=ROOT)
    finally:
        log.close()
