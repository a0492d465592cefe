"""Telegram entities (mentions, text mentions, commands) after emoji and other characters
outside the BMP, which Telegram counts as two UTF-16 code units: the real
python-telegram-bot client against the loopback Bot API."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from bot.dialogue import DialogueManager
from tests.auxil.adapters import telegram_adapter
from tests.auxil.telegram_api import BOT, TelegramEmulator, entity, find_entities

GROUP = -100
ASTRAL = "🙂👍🏽 𝔥𝔢𝔶 🇺🇦"
"""Emoji, a skin-tone modifier, mathematical letters and a flag: all outside the BMP."""


@pytest.fixture
async def tg(manager: DialogueManager) -> AsyncIterator[TelegramEmulator]:
    async with TelegramEmulator() as emulator, \
            telegram_adapter(emulator, manager):
        yield emulator


def test_the_emulator_counts_entity_offsets_in_utf16() -> None:
    text = f"{ASTRAL} @chinwag_bot /help@chinwag_bot"
    mention, command = find_entities(text)
    assert (mention["type"], command["type"]) == ("mention", "bot_command")
    assert mention["offset"] == 19  # 18 UTF-16 code units before it, 10 code points
    assert (mention["length"], command["offset"], command["length"]) == (12, 32, 17)


async def test_a_mention_after_astral_characters_is_answered(
        tg: TelegramEmulator, manager: DialogueManager) -> None:
    tg.push_text(f"{ASTRAL} @chinwag_bot what is 2+2?", chat=GROUP, user=5,
                 chat_type="supergroup")
    # The bot's handle is taken out of the question, and only it.
    await tg.wait_for(lambda: tg.final_text(GROUP) == [f"{ASTRAL} what is 2+2?"])


async def test_a_mention_after_astral_characters_in_a_caption_is_answered(
        tg: TelegramEmulator) -> None:
    caption = f"{ASTRAL} @chinwag_bot what is this?"
    message = tg.user_message(chat=GROUP, user=5, chat_type="supergroup",
                              photo=[{"file_id": "p", "file_unique_id": "p", "width": 1,
                                      "height": 1}],
                              caption=caption, caption_entities=find_entities(caption))
    tg.push_message(message)
    await tg.wait_for(lambda: tg.final_text(GROUP) == [f"{ASTRAL} what is this?"])


async def test_a_text_mention_after_astral_characters_is_answered(
        tg: TelegramEmulator) -> None:
    text = f"{ASTRAL} Chinwag, say hi"
    tg.push_text(text, chat=GROUP, user=5, chat_type="supergroup",
                 entities=[entity(text, "Chinwag", "text_mention", user=BOT)])
    await tg.wait_for(lambda: tg.final_text(GROUP) == [text])


async def test_commands_with_astral_arguments_and_after_astral_characters(
        tg: TelegramEmulator, manager: DialogueManager) -> None:
    tg.admins[GROUP] = {5}
    # A command aimed at the bot, with astral characters in its argument: run, the
    # "@chinwag_bot" suffix dropped and the argument whole.
    tg.push_text(f"/persona@chinwag_bot {ASTRAL} pirate", chat=GROUP, user=5,
                 chat_type="supergroup")
    await tg.wait_for(lambda: len(tg.final_text(GROUP)) == 1)
    tg.push_text("/persona", chat=GROUP, user=5, chat_type="supergroup")
    await tg.wait_for(lambda: tg.final_text(GROUP)[1:] == [f"Persona: {ASTRAL} pirate"])
    # After astral characters a "command" is only text, and this one is not for the bot.
    tg.push_text(f"{ASTRAL} /forget@chinwag_bot", chat=GROUP, user=5, chat_type="supergroup")
    # For another bot: left alone, even when it also mentions this one.
    tg.push_text(f"/help@other_bot {ASTRAL} @chinwag_bot", chat=GROUP, user=5,
                 chat_type="supergroup")
    tg.push_text(f"{ASTRAL} @chinwag_bot /help@other_bot", chat=GROUP, user=5,
                 chat_type="supergroup")
    await tg.wait_for(lambda: tg.final_text(GROUP)[2:] == [f"{ASTRAL} /help@other_bot"]
                      and tg.pending_updates == 0 and manager.active_conversations == 0)
    assert len(tg.final_text(GROUP)) == 3
