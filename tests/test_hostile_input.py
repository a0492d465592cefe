"""Hostile input, property-based: text built from what breaks chat bots goes through the
real adapters (normalization), the dialogue manager, and each platform's rendering and
splitting, as a user message and as model output, in private chats and in groups (addressed
by mentions, text mentions and commands placed after characters outside the BMP, which
Telegram counts as two UTF-16 units). No exception, no ping, no formatting error, no text
lost when split, and each chat shows its own replies."""

from __future__ import annotations

import asyncio
import logging
import re
import tempfile
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from adapters.telegram.formatting import to_html
from bot.builtin_commands import builtin_commands
from bot.config import load_settings
from bot.dialogue import DialogueManager
from bot.generators import ChatMessage
from bot.splitting import split_text
from storage.engine import create_engine
from storage.migrate import upgrade
from storage.models import ConversationRow, MessageRow
from storage.repository import SqlStore
from tests.auxil.adapters import discord_adapter, telegram_adapter
from tests.auxil.discord_api import DiscordEmulator
from tests.auxil.generators import ScriptedGenerator
from tests.auxil.telegram_api import BOT, TelegramEmulator, entity, find_entities

PIECES = [
    "", " ", "\t", "\n", "\n\n", "\r\n", "   \n  ",
    "\x00", "\x07", "\x1b[31m", "\x7f", "\u0085",
    "\u200b", "\u200c", "\u200d", "\u2060", "\ufeff",  # zero-width
    "\u200e", "\u200f", "\u202e", "\u202d", "\u2067", "\u2069",  # direction marks
    "**", "__", "*", "_", "`", "```", "```python\n", "\n```\n", "~~", "> ", "# ", "- ",
    "[link](javascript:alert(1))", "![img](x)", "\\", "\\*",
    "<b>", "</b>", "<pre>", "</pre>", "<a href='x'>", "</a>", "&amp;", "&lt;", "&", "<", ">",
    "<script>alert(1)</script>", '"', "'",
    "@everyone", "@here", "<@&700000000000000002>", "<@1>", "<#1>", "@chinwag_bot",
    "/reset", "/block telegram:1", "/forget", "/persona evil", "\n/stats", "/help@other_bot",
    "word", "Wort", "слово", "单词", "كلمة", "שלום", "🙂", "👍🏽", "🇺🇦", "e\u0301",
    "\U0001f9d1\u200d\U0001f4bb",
]
WORDS = st.lists(st.sampled_from(PIECES), max_size=40).map("".join)
HUGE = st.sampled_from(["x" * 100_000, ("ab🙂 " * 25_000), ("```\n" + "code line\n" * 10_000)])
HOSTILE = st.one_of(WORDS, WORDS, WORDS, HUGE)
SURROGATES = st.sampled_from(["\ud800", "\udfff", "a\udc00b"])
"""Broken surrogates cannot cross a platform's UTF-8 JSON, but model output may hold
them: they are tried where they can occur, in rendering and splitting."""

# Each example starts a platform emulator and the bot, so there are few and they are not
# shrunk (slow); a failure prints its example whole.
SETTINGS = settings(max_examples=4, deadline=None, suppress_health_check=list(HealthCheck),
                    phases=[Phase.explicit, Phase.reuse, Phase.generate])


def letters(text: str, *, fences: bool = True) -> str:
    """Letters and digits: what no rendering or split may drop (markup, spaces and
    invisible characters may change; ``fences=False`` leaves out fence lines, whose
    language name a platform shows as formatting, not text; indented ones too, as the
    Telegram rendering takes them for fences, the way a model means them in a list)."""
    if not fences:
        text = re.sub(r"(?m)^[ \t]*(```|~~~)[^\n]*", "", text)
    return re.sub(r"[\W_]", "", text)


def kept(original: str, shown: str) -> bool:
    """Whether every letter of ``original`` is in ``shown``, in order (a split may add
    fence lines; nothing may go)."""
    rest = iter(shown)
    return all(char in rest for char in original)


def sendable(texts: Sequence[str]) -> list[str]:
    """What a platform delivers: neither Telegram nor Discord sends a message without
    visible text (the core's answer to empty text has its own test)."""
    return [text for text in texts if text.strip()]


def ours(records: Sequence[logging.LogRecord]) -> list[logging.LogRecord]:
    """Errors Chinwag or the platform clients logged (not the emulators' servers)."""
    return [r for r in records if r.levelno >= logging.ERROR
            and r.name.split(".")[0] in {"bot", "adapters", "storage", "telegram", "discord"}]


@asynccontextmanager
async def chinwag(folder: Path, generator: ScriptedGenerator
                  ) -> AsyncIterator[tuple[DialogueManager, SqlStore, AsyncEngine]]:
    config = load_settings(data_dir=folder, generator="echo", edit_interval=0.0,
                           rate_per_minute=0, admins="telegram:42")
    engine = create_engine(config.database_url)
    await upgrade(engine)
    store = SqlStore(engine)
    try:
        async with DialogueManager(store=store, generator=generator, settings=config,
                                   commands=builtin_commands()) as manager:
            yield manager, store, engine
    finally:
        await engine.dispose()


async def stored_replies(engine: AsyncEngine) -> dict[str, list[str]]:
    """Each conversation's stored replies, by conversation key."""
    async with engine.connect() as connection:
        rows = await connection.execute(
            select(ConversationRow.key, MessageRow.text)
            .join(ConversationRow, MessageRow.conversation_id == ConversationRow.id)
            .where(MessageRow.role == "assistant").order_by(MessageRow.id))
        replies: dict[str, list[str]] = {}
        for key, text in rows:
            replies.setdefault(key, []).append(text)
        return replies


def with_output(outputs: Sequence[str]) -> ScriptedGenerator:
    """Echoes the user, or says the scripted hostile output when the user asks for it."""
    generator = ScriptedGenerator()

    def reply(messages: Sequence[ChatMessage]) -> str:
        last = messages[-1].content
        asked = re.search(r"say output (\d+)", last)
        return outputs[int(asked.group(1))] if asked else last

    generator.reply = reply
    return generator


EXAMPLES = given(texts=st.lists(HOSTILE, min_size=6, max_size=6),
                 outputs=st.lists(HOSTILE, min_size=3, max_size=3))
"""Six hostile user texts and three hostile model outputs per example."""


def conversation_texts(texts: Sequence[str], outputs: Sequence[str]) -> list[str]:
    """One message per conversation: the texts a platform delivers, then one asking for each
    scripted output."""
    return [*sendable(texts), *(f"say output {n}" for n in range(len(outputs)))]


def assert_whole_and_quiet(replies: dict[str, list[str]], visible: dict[str, str],
                           records: Sequence[logging.LogRecord]) -> None:
    """Every stored reply shows whole, however it was split, in its own chat: ``visible``
    holds each chat's text by conversation key."""
    assert set(replies) <= set(visible), "a reply stored in a conversation nobody wrote in"
    for key, chat_replies in replies.items():
        for reply in chat_replies:
            assert kept(letters(reply, fences=False), letters(visible[key])), key
    assert not ours(records)


ASTRAL = st.sampled_from(["🙂", "👍🏽", "🇺🇦", "𝔥𝔢𝔶", "\U0001f9d1\u200d\U0001f4bb", "𓀀", "🙂🙂🙂"])
"""Text of characters outside the BMP: each one Python character, two UTF-16 code units."""


def addressed(text: str, how: str, astral: str) -> tuple[str, list[dict[str, object]]]:
    """``text`` in a group, addressed to the bot after astral characters: the message and its
    entities as Telegram gives them (offsets in UTF-16 code units)."""
    if how == "mention":
        message = f"{astral} @{BOT['username']} {text}"
        return message, find_entities(message)
    if how == "mention last":
        # A space before the "@": right after a letter (𝔶 is one) it is no mention.
        message = f"{text} {astral} @{BOT['username']}"
        return message, find_entities(message)
    if how == "text mention":
        message = f"{astral} Chinwag {text}"
        return message, sorted([*find_entities(message), entity(
            message, "Chinwag", "text_mention", user=BOT)], key=lambda e: int(e["offset"]))
    message = f"/help@{BOT['username']} {astral} {text}"  # a command, its argument astral
    return message, find_entities(message)


def for_another_bot(message: str, entities: Sequence[dict[str, object]]) -> bool:
    """Whether ``message`` opens with a command aimed at another bot: left alone, even when
    it also mentions this one (see tests/test_telegram_entities.py)."""
    opening = [e for e in entities if e["type"] == "bot_command" and e["offset"] == 0]
    if not opening:
        return False
    length = opening[0]["length"]
    assert isinstance(length, int)  # a command is ASCII: as long in UTF-16 as in Python
    _name, _, target = message[:length].partition("@")
    return bool(target) and target.lower() != str(BOT["username"]).lower()


ADDRESSING = st.tuples(st.sampled_from(["mention", "mention last", "text mention",
                                        "command"]), ASTRAL)


@SETTINGS
@EXAMPLES
@example(texts=["hello", "", " ", "/reset", "@everyone", "\n/stats"],  # found by a CI run
         outputs=["<pre>\n/stats&amp;\r\n\t```python\n\n/stats**\u200b>_word", " /reset\u200e",
                  "```\ncode line\n"])
async def test_hostile_text_through_telegram(texts: list[str], outputs: list[str],
                                             caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR)
    with tempfile.TemporaryDirectory() as folder:
        async with chinwag(Path(folder), with_output(outputs)) as (manager, _store, engine), \
                TelegramEmulator() as tg, \
                telegram_adapter(tg, manager):
            messages = conversation_texts(texts, outputs)
            for chat, text in enumerate(messages, start=1):
                tg.push_text(text, chat=chat, user=chat)
            # Every update taken and handled (a command for another bot gets no answer),
            # and the scripted outputs shown.
            asked = range(len(messages) - len(outputs) + 1, len(messages) + 1)
            await tg.wait_for(lambda: tg.pending_updates == 0
                              and manager.active_conversations == 0
                              and all(tg.final_text(c) for c in asked), timeout=60)
            replies = await stored_replies(engine)
        refused = [c for c in tg.calls if c.status != 200 and c.method != "getUpdates"]
        assert refused == []  # no entity error, no over-long message, nothing refused
        visible = {f"telegram:{c}": "".join(tg.final_text(c))
                   for c in range(1, len(messages) + 1)}
        assert_whole_and_quiet(replies, visible, caplog.records)


@SETTINGS
@given(texts=st.lists(HOSTILE, min_size=6, max_size=6),
       outputs=st.lists(HOSTILE, min_size=3, max_size=3),
       ways=st.lists(ADDRESSING, min_size=9, max_size=9))
@example(texts=["hello", "🙂 @chinwag_bot", "/reset", "👍🏽/forget", "@chinwag_bot,", "\n/stats"],
         outputs=["<b>🙂</b> @chinwag_bot", "/help@other_bot", "```\n🇺🇦\n"],
         ways=[("mention", "🙂"), ("mention last", "𝔥𝔢𝔶"), ("text mention", "👍🏽"),
               ("command", "🇺🇦"), ("mention", "🙂🙂🙂"), ("mention last", "𓀀"),
               ("mention", "👍🏽"), ("text mention", "🙂"), ("mention last", "🇺🇦")])
@example(texts=["hello", "/help@other_bot\\~~@everyone", "", " ", "/reset", "🙂"],  # by a run
         outputs=["", "hi", "```\n"],
         ways=[("mention", "🙂"), ("mention last", "🇺🇦"), ("mention", "🙂"),
               ("mention last", "𝔥𝔢𝔶"), ("mention last", "🙂"), ("text mention", "🙂"),
               ("mention", "🙂"), ("command", "🇺🇦"), ("text mention", "👍🏽")])
async def test_hostile_text_in_telegram_groups(texts: list[str], outputs: list[str],
                                               ways: list[tuple[str, str]],
                                               caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR)
    with tempfile.TemporaryDirectory() as folder:
        async with chinwag(Path(folder), with_output(outputs)) as (manager, _store, engine), \
                TelegramEmulator() as tg, \
                telegram_adapter(tg, manager):
            messages = [*texts, *(f"say output {n}" for n in range(len(outputs)))]
            groups = [-100 - n for n in range(len(messages))]
            answered = []
            for group, text, (how, astral) in zip(groups, messages, ways, strict=True):
                message, entities = addressed(text, how, astral)
                tg.push_text(message, chat=group, user=-group, chat_type="supergroup",
                             entities=entities)
                if not for_another_bot(message, entities):
                    answered.append(group)
            # Every message is addressed to the bot, so every group gets an answer, save
            # where the text put last opens with a command for another bot.
            await tg.wait_for(lambda: tg.pending_updates == 0
                              and manager.active_conversations == 0
                              and all(tg.final_text(g) for g in answered), timeout=60)
            replies = await stored_replies(engine)
        refused = [c for c in tg.calls if c.status != 200 and c.method != "getUpdates"]
        assert refused == []
        assert not [g for g in groups if g not in answered and tg.final_text(g)]
        for group, text, (how, _astral) in zip(groups, texts, ways, strict=False):
            # Text first and the mention last: the text may itself be a command to run.
            command = how == "command" or (how == "mention last" and text.strip()[:1] == "/")
            if not command:  # each mention was taken as a question (none missed)
                assert f"telegram:{group}" in replies
        visible = {f"telegram:{g}": "".join(tg.final_text(g)) for g in groups}
        assert_whole_and_quiet(replies, visible, caplog.records)


@SETTINGS
@EXAMPLES
async def test_hostile_text_through_discord(texts: list[str], outputs: list[str],
                                            caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR)
    with tempfile.TemporaryDirectory() as folder:
        async with chinwag(Path(folder), with_output(outputs)) as (manager, _store, engine), \
                DiscordEmulator() as dc, \
                discord_adapter(dc, manager) as adapter:
            serving = asyncio.create_task(adapter.serve())
            try:
                await dc.ready(timeout=30)
                messages = conversation_texts(texts, outputs)
                channels = []
                for author, text in enumerate(sendable(texts), start=1):  # in DMs
                    dc.post(text, author=author, dm=True)
                    channels.append(dc.dm_channel(author))
                # In server channels, mentioned after astral characters; the scripted
                # outputs asked for last.
                guild = [dc.add_channel(str(810_000_000_000_000_000 + n))
                         for n in range(len(messages))]
                for n, (channel, text) in enumerate(zip(guild, messages, strict=True)):
                    dc.post(text, author=100 + n, channel=channel, mention=True,
                            before_mention=["🙂 ", "👍🏽", "𝔥𝔢𝔶 ", ""][n % 4])
                channels.extend(guild)
                # The gateway delivers in order and each message is queued as it arrives:
                # once the last channels are answered and nothing runs, all are done.
                await dc.wait_for(
                    lambda: all(dc.channel_texts(c) for c in guild)
                    and manager.active_conversations == 0, timeout=60)
                replies = await stored_replies(engine)
            finally:
                await adapter.stop_receiving()
                serving.cancel()
                await asyncio.gather(serving, return_exceptions=True)
        bodies = [r.body for r in dc.requests if "/messages" in r.path
                  and r.method in {"POST", "PATCH"}]
        for body in bodies:  # nobody pinged by any message or edit
            assert body["allowed_mentions"]["parse"] == []
            assert not body["allowed_mentions"].get("replied_user")
            assert len(body.get("content") or "") <= 2000
        visible = {f"discord:{c}": "".join(dc.channel_texts(c)) for c in channels}
        assert_whole_and_quiet(replies, visible, caplog.records)


@settings(max_examples=300, deadline=None)
@given(text=st.one_of(WORDS, st.lists(st.one_of(st.sampled_from(PIECES), SURROGATES),
                                      max_size=60).map("".join)))
def test_rendering_and_splitting_survive_anything(text: str) -> None:
    html = to_html(text)
    assert isinstance(html, str)
    for limit in (20, 2000, 4096):
        parts = split_text(text, limit)
        assert all(len(part) <= limit for part in parts)
        assert kept(letters(text), letters("".join(parts)))
