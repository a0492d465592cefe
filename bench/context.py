"""Per-turn cost of a direct-chat turn at 10 and at 100,000 stored messages, side by side.

Each turn is the whole path through the dialogue manager on a real SQLite file: store the
user's message, select the context that fits, build the prompt, stream the reply (echo
generator, so the model's time is left out) and store the reply. Stored messages carry
their token counts (~150 each), so both conversations fill the same context budget and
the only difference is how much history lies in the database.

Usage: python bench/context.py [--turns N]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sqlalchemy import insert

from bot.builtin_commands import builtin_commands
from bot.config import load_settings
from bot.dialogue import DialogueManager
from bot.events import IncomingMessage
from bot.generators.echo import EchoGenerator
from storage.engine import create_engine
from storage.migrate import upgrade
from storage.models import MessageRow
from storage.repository import SqlStore

SIZES = (10, 100_000)
WORDS = " ".join(f"word{n}" for n in range(146))  # 150 tokens with the echo generator


class NullSink:
    max_message_length = 4096

    def fit(self, text: str) -> int:
        return min(len(text), self.max_message_length)

    async def send(self, text: str, *, final: bool = False) -> str:
        return f"out-{time.perf_counter_ns()}"

    async def edit(self, message_id: str, text: str, *, final: bool = False) -> None:
        return None

    async def delete(self, message_id: str) -> None:
        return None

    async def typing(self) -> None:
        return None


async def fill(store: SqlStore, engine_url: str, chat: str, count: int) -> None:
    conversation = await store.conversation(f"console:{chat}")
    engine = create_engine(engine_url)
    now = datetime.now(UTC)
    rows = [
        {"conversation_id": conversation.id, "role": "user" if n % 2 == 0 else "assistant",
         "platform": "console", "author_id": chat, "text": WORDS, "tokens": 150,
         "created_at": now}
        for n in range(count)
    ]
    async with engine.begin() as connection:
        for start in range(0, len(rows), 20_000):
            await connection.execute(insert(MessageRow), rows[start:start + 20_000])
    await engine.dispose()


def message(chat: str, n: int) -> IncomingMessage:
    return IncomingMessage(platform="console", chat_id=chat, author_id=chat, author_name=chat,
                           message_id=f"{chat}-{n}", text=f"question {n}: {WORDS[:200]}",
                           is_direct=True)


async def main(turns: int) -> None:
    with tempfile.TemporaryDirectory() as folder:
        settings = load_settings(data_dir=Path(folder), generator="echo", edit_interval=0.0)
        engine = create_engine(settings.database_url)
        await upgrade(engine)
        store = SqlStore(engine)
        started = time.perf_counter()
        for size in SIZES:
            await fill(store, settings.database_url, f"c{size}", size)
        print(f"filled {sum(SIZES)} messages in {time.perf_counter() - started:.1f} s")
        generator = EchoGenerator(pieces=4)
        timings: dict[int, list[float]] = {size: [] for size in SIZES}
        async with DialogueManager(store=store, generator=generator, settings=settings,
                                   commands=builtin_commands()) as manager:
            sink = NullSink()
            for size in SIZES:  # warm-up turn each
                await manager.handle(message(f"c{size}", -1), sink)
            for n in range(turns):
                # Interleaved, so machine noise hits both sides alike.
                for size in SIZES if n % 2 == 0 else reversed(SIZES):
                    t0 = time.perf_counter()
                    await manager.handle(message(f"c{size}", n), sink)
                    timings[size].append((time.perf_counter() - t0) * 1000)
        await engine.dispose()
    for size in SIZES:
        values = sorted(timings[size])
        print(f"{size:>7} stored messages: per turn p50 {statistics.median(values):.2f} ms, "
              f"p90 {values[int(len(values) * 0.9)]:.2f} ms over {len(values)} turns")
    small, large = (statistics.median(timings[size]) for size in SIZES)
    print(f"per_turn_10={small:.2f} per_turn_100000={large:.2f} ratio={large / small:.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=60)
    asyncio.run(main(parser.parse_args().turns))
