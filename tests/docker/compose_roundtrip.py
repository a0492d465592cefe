"""docker-compose.yml as shipped, end to end (step 5 of ``tests/docker/run.sh``; pytest does
not collect it): a ``.env`` made from ``.env.example`` as a user makes it, the bot pointed at
the Telegram emulator on this host; the built-in model, from the model-cache volume the
image filled, answers a message with nothing converted at start; the question and the
answer are stored in the compose PostgreSQL; both services turn healthy. They come down
again with their volumes.

The emulator listens on 127.0.0.1 and, for the containers, on the Docker bridge's gateway
address, which every compose network reaches as an address of this host.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import secrets
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from aiohttp import web

from tests.auxil.telegram_api import TelegramEmulator
from tests.auxil.waiting import until

T = TypeVar("T")
ROOT = Path(__file__).resolve().parents[2]
PROJECT = "chinwag-docker-test"
CHAT = 4242


class Compose:
    def __init__(self, command: str, project_dir: Path) -> None:
        self._base = [*shlex.split(command), "-p", PROJECT, "--project-directory",
                      str(project_dir), "-f", str(ROOT / "docker-compose.yml")]

    def run(self, *args: str, check: bool = True) -> str:
        done = subprocess.run([*self._base, *args], capture_output=True, text=True,
                              check=False, timeout=600)
        if check and done.returncode != 0:
            raise AssertionError(f"compose {' '.join(args)} exited {done.returncode}:\n"
                                 f"{done.stdout}{done.stderr}")
        return done.stdout

    async def arun(self, *args: str, check: bool = True) -> str:
        return await asyncio.to_thread(self.run, *args, check=check)


async def polled(query: Callable[[], T], holds: Callable[[T], bool], what: str, *,
                 within: float) -> T:
    """Ask ``query`` (blocking: a docker command) off the loop, which serves the emulator,
    until its answer ``holds``; fail after ``within`` seconds with the last answer."""
    deadline = time.monotonic() + within
    while not holds(answer := await asyncio.to_thread(query)):
        assert time.monotonic() < deadline, f"timed out after {within} s waiting for " \
                                            f"{what}; last: {answer!r}"
        await asyncio.sleep(0.5)
    return answer


def health(container: str) -> str:
    return subprocess.run(["docker", "inspect", "-f", "{{.State.Health.Status}}", container],
                          capture_output=True, text=True, check=True).stdout.strip()


def stored(compose: Compose) -> list[tuple[str, str]]:
    """(role, text) of every stored message, in order."""
    out = compose.run("exec", "-T", "postgres", "psql", "-U", "chinwag", "-d", "chinwag", "-tAc",
                      "SELECT json_agg(json_build_array(role, text) ORDER BY id) FROM messages",
                      check=False)
    return [(role, text) for role, text in json.loads(out.strip() or "null") or []]


async def roundtrip(args: argparse.Namespace) -> None:
    project = Path(args.work) / "compose"
    project.mkdir(parents=True)
    compose = Compose(args.compose, project)
    async with TelegramEmulator() as tg:
        # The emulator's own site is on 127.0.0.1; this one serves the containers.
        assert tg._runner is not None
        site = web.TCPSite(tg._runner, args.gateway, 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        env = (ROOT / ".env.example").read_text() + "\n".join([
            "", "# The test's own:",
            "CHINWAG_MAX_REPLY_TOKENS=24",
            "CHINWAG_TEMPERATURE=0",
            f"CHINWAG_TELEGRAM_TOKEN={tg.token}",
            f"CHINWAG_TELEGRAM_API_URL=http://{args.gateway}:{port}",
            f"POSTGRES_PASSWORD={secrets.token_hex(12)}",
            f"CHINWAG_IMAGE={args.image}",
            f"POSTGRES_IMAGE={args.postgres_image}", ""])
        (project / ".env").write_text(env)
        started = time.monotonic()
        try:
            # Returns once PostgreSQL is healthy and Chinwag has been started after it.
            await compose.arun("up", "-d", "--no-build")
            log(f"compose up took {time.monotonic() - started:.0f} s")
            await until(lambda: any(c.method == "getUpdates" for c in tg.calls),
                        "the bot to poll Telegram", within=120)
            question = "What is the capital of France?"
            tg.push_text(question, chat=CHAT, user=CHAT)
            # The answer is stored once it is whole.
            rows = await polled(lambda: stored(compose),
                                lambda rows: [role for role, _ in rows] == ["user", "assistant"],
                                "PostgreSQL to hold the question and the answer", within=180)
            (_, asked), (_, answer) = rows
            assert asked == question and answer.strip(), rows
            await until(lambda: " ".join(tg.final_text(CHAT)).split() == answer.split(),
                        f"Telegram to show the stored answer {answer!r}", within=30)
            log(f"answered {answer!r} through the emulator and stored it in the compose "
                f"PostgreSQL {time.monotonic() - started:.0f} s after up")
            logs = await compose.arun("logs", "--no-color", "chinwag")
            assert "converting" not in logs, f"the model was converted at start:\n{logs}"
            container = (await compose.arun("ps", "-q", "chinwag")).strip()
            await polled(lambda: health(container), lambda status: status == "healthy",
                         "chinwag to be healthy", within=60)
            log(f"both services healthy {time.monotonic() - started:.0f} s after up")
        except BaseException:
            sys.stderr.write(compose.run("logs", "--no-color", check=False))
            raise
        finally:
            await compose.arun("down", "-v", "--remove-orphans", check=False)


class _HungUp(logging.Filter):
    """Drops aiohttp's traceback for a request the client gave up mid-way: the bot cancels
    its "typing…" call when an answer is done first, which is no fault of either side."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], ConnectionResetError))


def log(text: str) -> None:
    print(f"[docker-test {time.strftime('%X')}] {text}", file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--compose", required=True, help='"docker compose" or "docker-compose"')
    parser.add_argument("--image", required=True)
    parser.add_argument("--postgres-image", required=True)
    parser.add_argument("--gateway", required=True, help="the Docker bridge's gateway address")
    parser.add_argument("--work", required=True, help="a folder for the compose project")
    logging.getLogger("aiohttp.server").addFilter(_HungUp())
    asyncio.run(roundtrip(parser.parse_args()))


if __name__ == "__main__":
    main()
