"""Load: many conversations at once through the Telegram and Discord emulators.

Half the conversations are Telegram private chats, half Discord DMs. Each sends its
messages two at a time (the next one when the oldest is answered), so every conversation
always has one reply in flight and one waiting behind it. The generator is the echo one,
so the figures are Chinwag's own cost: platform client, dialogue manager, database and
streaming. Afterwards the database and the emulators are checked: every message stored
once and answered once, in order.

It runs twice: a light load first (10 conversations, one message in flight: the latency
of a message with nothing queued before it), then the full load. Each prints a line per
platform and a summary line:
    load: messages=… msgs_per_s=… latency_p50_ms=… latency_p99_ms=… peak_rss_mb=… lost=0 …

The emulators run in the same process and take part of its CPU, so msgs/s is a lower
bound for Chinwag alone. Under the full load every conversation always has a message
waiting, so its latency is mostly time queued: conversations / throughput.

Usage: python bench/load.py [--conversations 1000] [--messages 5] [--database-url URL]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import resource
import sys
import tempfile
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sqlalchemy import select

from adapters.discord import DiscordAdapter
from adapters.telegram import TelegramAdapter
from bot.builtin_commands import builtin_commands
from bot.config import load_settings
from bot.dialogue import DialogueManager
from bot.generators.echo import EchoGenerator
from storage.engine import create_engine
from storage.migrate import upgrade
from storage.models import MessageRow
from storage.repository import SqlStore
from tests.auxil.discord_api import DiscordEmulator
from tests.auxil.loopback import wait_until
from tests.auxil.telegram_api import TelegramEmulator

IN_FLIGHT = 2
LIGHT_CONVERSATIONS = 10


@dataclass
class Conversation:
    platform: str
    number: int
    texts: list[str]
    sent_at: dict[str, float] = field(default_factory=dict)
    expected: deque[str] = field(default_factory=deque)
    answered: list[str] = field(default_factory=list)
    next_index: int = 0


@dataclass
class Observer:
    """Watches the emulators' bot messages: a reply is complete when a message shows the
    whole text of the oldest unanswered message of its conversation."""

    tg: TelegramEmulator
    dc: DiscordEmulator
    conversations: dict[tuple[str, str], Conversation]
    latencies: dict[str, list[float]] = field(default_factory=lambda: {"telegram": [],
                                                                       "discord": []})
    out_of_order: int = 0
    duplicates: int = 0
    done_messages: set[tuple[str, str]] = field(default_factory=set)
    remaining: int = 0
    finished: asyncio.Event = field(default_factory=asyncio.Event)

    in_flight: int = IN_FLIGHT

    def send_next(self, conversation: Conversation) -> None:
        text = conversation.texts[conversation.next_index]
        conversation.next_index += 1
        conversation.expected.append(text)
        conversation.sent_at[text] = time.perf_counter()
        if conversation.platform == "telegram":
            self.tg.push_text(text, chat=conversation.number, user=conversation.number)
        else:
            self.dc.post(text, author=conversation.number, dm=True)

    def shown(self, platform: str, place: str, message_id: str, text: str) -> None:
        conversation = self.conversations.get((platform, place))
        if conversation is None or (platform, message_id) in self.done_messages:
            return
        if conversation.expected and text == conversation.expected[0]:
            self.done_messages.add((platform, message_id))
            conversation.expected.popleft()
            conversation.answered.append(text)
            self.latencies[platform].append(time.perf_counter() - conversation.sent_at[text])
            self.remaining -= 1
            if conversation.next_index < len(conversation.texts):
                self.send_next(conversation)
            if self.remaining == 0:
                self.finished.set()
        elif text in conversation.answered:
            self.duplicates += 1
            self.done_messages.add((platform, message_id))
        elif text in conversation.expected:
            self.out_of_order += 1
            self.done_messages.add((platform, message_id))

    def attach(self) -> None:
        tg, dc = self.tg, self.dc
        send, edit = tg._api_sendMessage, tg._api_editMessageText
        create, change = dc._create, dc._edit

        async def tg_send(params: dict[str, Any]) -> Any:
            result = await send(params)
            message_id = params["_message_id"]
            self.shown("telegram", str(params["chat_id"]), str(message_id),
                       tg.messages[message_id]["text"])
            return result

        async def tg_edit(params: dict[str, Any]) -> Any:
            result = await edit(params)
            message_id = int(params["message_id"])
            self.shown("telegram", str(params["chat_id"]), str(message_id),
                       tg.messages[message_id]["text"])
            return result

        def dc_create(channel_id: str, body: dict[str, Any]) -> dict[str, Any]:
            message = create(channel_id, body)
            self.shown("discord", channel_id, message["id"], message["content"])
            return message

        def dc_edit(message_id: str, body: dict[str, Any]) -> dict[str, Any]:
            message = change(message_id, body)
            self.shown("discord", message["channel_id"], message_id, message["content"])
            return message

        tg._api_sendMessage = tg_send  # type: ignore[method-assign]
        tg._api_editMessageText = tg_edit  # type: ignore[method-assign]
        dc._create = dc_create  # type: ignore[method-assign]
        dc._edit = dc_edit  # type: ignore[method-assign]


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))] if ordered \
        else float("nan")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


async def run(conversations: int, messages: int, database_url: str | None,
              folder: Path, *, in_flight: int = IN_FLIGHT, label: str = "load",
              first_number: int = 1, reply_timeout: float = 600) -> int:
    settings = load_settings(data_dir=folder, generator="echo", rate_per_minute=0,
                             **({"database_url": database_url} if database_url else {}))
    engine = create_engine(settings.database_url)
    await upgrade(engine)
    store = SqlStore(engine)
    rss_before = peak_rss_mb()
    async with TelegramEmulator() as tg, DiscordEmulator() as dc, \
            DialogueManager(store=store, generator=EchoGenerator(), settings=settings,
                            commands=builtin_commands()) as manager, \
            TelegramAdapter(tg.token, manager, builtin_commands(), api_url=tg.url,
                            poll_timeout=1), \
            DiscordAdapter(dc.token, manager, builtin_commands(), api_url=dc.api_url,
                           gateway_url=dc.gateway_url) as discord:
        serving = [asyncio.create_task(discord.serve())]
        await dc.ready(timeout=60)
        table: dict[tuple[str, str], Conversation] = {}
        for n in range(first_number, first_number + conversations):
            platform = "telegram" if n % 2 else "discord"
            texts = [f"{platform} conversation {n} message {k} of {messages}"
                     for k in range(1, messages + 1)]
            conversation = Conversation(platform, n, texts)
            place = str(n) if platform == "telegram" else dc.dm_channel(n)
            table[(platform, place)] = conversation
        observer = Observer(tg, dc, table, remaining=conversations * messages)
        observer.attach()
        started = time.perf_counter()
        for conversation in table.values():
            for _ in range(min(in_flight, messages)):
                observer.send_next(conversation)
        try:
            await asyncio.wait_for(observer.finished.wait(), timeout=reply_timeout)
        except TimeoutError:
            stuck = [(c.platform, c.number, c.expected[0]) for c in table.values()
                     if c.expected][:5]
            print(f"timed out with {observer.remaining} replies missing, e.g. {stuck}; "
                  f"{manager.active_conversations} conversations busy, "
                  f"{tg.pending_updates} Telegram updates unconfirmed", file=sys.stderr)
            for task in list(asyncio.all_tasks())[:8]:
                task.print_stack(limit=6, file=sys.stderr)
        elapsed = time.perf_counter() - started
        # The last replies are shown before they are stored: let the stores finish, then
        # every conversation's state must be gone (memory holds only work in progress).
        drained = time.perf_counter()
        with contextlib.suppress(AssertionError):  # reported as lanes_after below
            await wait_until(lambda: manager.active_conversations == 0, 60, str)
        drain_s = time.perf_counter() - drained
        await asyncio.sleep(1.0)  # anything arriving late would be a duplicate
        idle_lanes = manager.active_conversations
        await discord.stop_receiving()
        for task in serving:
            task.cancel()
        await asyncio.gather(*serving, return_exceptions=True)

    every = [t for c in table.values() for t in c.texts]
    async with engine.connect() as connection:
        user_texts = Counter((await connection.execute(
            select(MessageRow.text).where(MessageRow.role == "user",
                                          MessageRow.text.in_(every)))).scalars().all())
        # The echo generator's reply to a message is its text: one reply per question.
        reply_texts = Counter((await connection.execute(
            select(MessageRow.text).where(MessageRow.role == "assistant",
                                          MessageRow.text.in_(every)))).scalars().all())
    await engine.dispose()
    replies = sum(reply_texts.values())
    answered_once = sum(1 for t in every if reply_texts[t] == 1)

    total = conversations * messages
    lost = sum(1 for t in every if user_texts[t] == 0) + observer.remaining
    stored_twice = sum(1 for t in every if user_texts[t] > 1)
    order_kept = all(c.answered == c.texts for c in table.values())
    for platform in ("telegram", "discord"):
        values = observer.latencies[platform]
        print(f"{label}: {platform:9} replies={len(values)} "
              f"latency_p50_ms={percentile(values, 0.5) * 1000:.0f} "
              f"latency_p99_ms={percentile(values, 0.99) * 1000:.0f}")
    both = observer.latencies["telegram"] + observer.latencies["discord"]
    print(f"{label}: messages={total} conversations={conversations} in_flight={in_flight} "
          f"seconds={elapsed:.1f} "
          f"msgs_per_s={(total - observer.remaining) / elapsed:.0f} "
          f"latency_p50_ms={percentile(both, 0.5) * 1000:.0f} "
          f"latency_p99_ms={percentile(both, 0.99) * 1000:.0f} "
          f"peak_rss_mb={peak_rss_mb():.0f} rss_growth_mb={peak_rss_mb() - rss_before:.0f} "
          f"lost={lost} stored_twice={stored_twice} duplicates={observer.duplicates} "
          f"out_of_order={observer.out_of_order} replies_stored={replies} "
          f"answered_once={answered_once} order_kept={order_kept} "
          f"lanes_after={idle_lanes} drain_s={drain_s:.1f} backend={engine.dialect.name}")
    ok = (lost == 0 and stored_twice == 0 and observer.duplicates == 0 and order_kept
          and replies == total and answered_once == total and idle_lanes == 0)
    return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conversations", type=int, default=1000)
    parser.add_argument("--messages", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=600,
                        help="seconds to wait for every reply")
    parser.add_argument("--database-url", default=None,
                        help="default: a new SQLite file in a temporary folder")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    # The emulators' servers report clients hanging up at the end; that is not news here.
    logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL)
    # First a light load (a few conversations, one message at a time: the latency of one
    # message with nothing queued before it), then the full load, side by side.
    status = 0
    # The phases use different chats, so they can share a --database-url.
    for label, conversations, in_flight, first in (
            ("light", LIGHT_CONVERSATIONS, 1, 1_000_001),
            ("load", args.conversations, IN_FLIGHT, 1)):
        with tempfile.TemporaryDirectory() as folder:
            status |= asyncio.run(run(conversations, args.messages, args.database_url,
                                      Path(folder), in_flight=in_flight, label=label,
                                      first_number=first, reply_timeout=args.timeout))
    return status


if __name__ == "__main__":
    sys.exit(main())
