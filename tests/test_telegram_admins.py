"""Telegram group administrators (as getChatAdministrators reports them) are exempt from the
rate limit, as the README promises; other members are not. Real python-telegram-bot client,
loopback Bot API, real SQLite."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from bot.config import Settings
from bot.dialogue import DialogueManager
from bot.intake import RATE_LIMITED_NOTE
from tests.auxil.adapters import telegram_adapter
from tests.auxil.telegram_api import TelegramEmulator

GROUP = -100
BURST = 3
ADMIN, MEMBER = 8, 9


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"rate_per_minute": 1.0, "rate_burst": BURST})


@pytest.fixture
async def tg(manager: DialogueManager) -> AsyncIterator[TelegramEmulator]:
    async with TelegramEmulator() as emulator, \
            telegram_adapter(emulator, manager):
        yield emulator


async def test_group_admins_are_not_rate_limited_members_are(
        tg: TelegramEmulator, manager: DialogueManager) -> None:
    tg.admins[GROUP] = {ADMIN}
    count = BURST + 3
    for n in range(count):  # pushed at once: they arrive together, in one getUpdates
        tg.push_mention(f"admin question {n}", chat=GROUP, user=ADMIN)
        tg.push_mention(f"member question {n}", chat=GROUP, user=MEMBER)
    await tg.wait_for(lambda: tg.pending_updates == 0 and manager.active_conversations == 0
                      and len(tg.final_text(GROUP)) >= count + BURST + 1, timeout=30)
    texts = tg.final_text(GROUP)
    assert [t for t in texts if t.startswith("admin")] == [
        f"admin question {n}" for n in range(count)]
    assert [t for t in texts if t.startswith("member")] == [
        f"member question {n}" for n in range(BURST)]
    notes = [t for t in texts if t.startswith(RATE_LIMITED_NOTE.split("{")[0])]
    assert len(notes) == 1  # the member is told once; the admin never
    assert len(texts) == count + BURST + 1
    # One question to Telegram for the whole burst: the answer is cached.
    assert len(tg.sent("getChatAdministrators")) == 1
