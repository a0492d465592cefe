"""The terminal adapter: lines from standard input, replies to standard output.

Works interactively (a prompt, streamed replies) and with piped input (exits at its end).
"""

from __future__ import annotations

import asyncio
import getpass
import itertools
import logging
import sys
import threading
import time
from typing import TextIO

from bot.dialogue import DialogueManager
from bot.events import IncomingMessage
from bot.i18n import SOURCE_LANGUAGE, translator

logger = logging.getLogger(__name__)

PLATFORM = "console"
MAX_MESSAGE_LENGTH = 1_000_000
_EOF = None


class ConsoleSink:
    """Prints a reply as it streams: edits that extend the text print only what is new."""

    def __init__(self, out: TextIO) -> None:
        self._out = out
        self._shown: dict[str, str] = {}
        # Unique across runs: stored reply ids must not collide with earlier sessions'.
        self._ids = (f"out-{time.time_ns()}-{n}" for n in itertools.count(1))

    @property
    def max_message_length(self) -> int:
        return MAX_MESSAGE_LENGTH

    def fit(self, text: str) -> int:
        return min(len(text), MAX_MESSAGE_LENGTH)

    async def send(self, text: str, *, final: bool = False) -> str:
        message_id = next(self._ids)
        self._shown[message_id] = ""
        await self.edit(message_id, text, final=final)
        return message_id

    async def edit(self, message_id: str, text: str, *, final: bool = False) -> None:
        shown = self._shown.get(message_id, "")
        if text.startswith(shown):
            self._out.write(text[len(shown):])
        else:  # the text changed behind the cursor: print it whole on a fresh line
            self._out.write("\n" + text)
        self._shown[message_id] = text
        if final:
            self._out.write("\n")
        self._out.flush()

    async def delete(self, message_id: str) -> None:
        self._shown.pop(message_id, None)  # printed lines stay: a terminal cannot take them back

    async def typing(self) -> None:
        return None


def normalize(line: str, user: str, message_id: str) -> IncomingMessage:
    """A line typed at the terminal: a direct message from the local user."""
    return IncomingMessage(
        platform=PLATFORM,
        chat_id=user,
        author_id=user,
        author_name=user,
        message_id=message_id,
        text=line.rstrip("\n"),
        is_direct=True,
    )


def _read_lines(stream: TextIO, interactive: bool, loop: asyncio.AbstractEventLoop,
                queue: asyncio.Queue[str | None], ready: threading.Event) -> None:
    """Reads in a daemon thread, so a blocked read never holds up shutdown."""
    while True:
        ready.wait()
        ready.clear()
        try:
            line: str | None = (input("you> ") + "\n") if interactive else stream.readline()
        except EOFError:
            line = None
        loop.call_soon_threadsafe(queue.put_nowait, line or _EOF)
        if not line:
            return


async def run_console(manager: DialogueManager, stdin: TextIO = sys.stdin,
                      stdout: TextIO = sys.stdout, language: str = SOURCE_LANGUAGE) -> None:
    """Chat until the input ends. The terminal gives no language: replies follow
    ``/language``, else ``language`` (``CHINWAG_LANGUAGE``), which the greeting uses."""
    _ = translator(language).gettext
    interactive = stdin.isatty() and stdout.isatty()
    user = getpass.getuser() or "you"
    if interactive:
        stdout.write(_("Chinwag: type a message, /help for commands, Ctrl-D to quit.") + "\n")
        stdout.flush()
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[str | None] = asyncio.Queue()
    ready = threading.Event()
    threading.Thread(target=_read_lines, args=(stdin, interactive, loop, queue, ready),
                     name="chinwag-console-input", daemon=True).start()
    sink = ConsoleSink(stdout)
    while True:
        ready.set()
        line = await queue.get()
        if line is _EOF:
            break
        assert line is not None
        if not line.strip() and not interactive:
            continue
        message = normalize(line, user, f"{time.time_ns()}")
        if interactive:
            stdout.write("chinwag> ")
            stdout.flush()
        await manager.handle(message, sink)
    if interactive:
        stdout.write("\n" + _("Bye.") + "\n")
        stdout.flush()
