"""The process is killed (SIGKILL) while replies stream on Telegram, then started again:
every user message is stored once and answered once, on SQLite and on PostgreSQL."""

import asyncio
import signal
from collections import Counter
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import aliased

from storage.engine import create_engine
from storage.models import MessageRow
from tests.auxil.openai_api import FakeOpenAI
from tests.auxil.postgres import PostgresServer
from tests.auxil.process import start_run
from tests.auxil.telegram_api import TelegramEmulator

CHATS = 12


def question(chat: int, n: int) -> str:
    return f"chat {chat} question {n}, long enough to stream for a while"


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
async def test_sigkill_mid_stream_then_restart_answers_each_message_once(
        backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    if backend == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / 'chinwag.db'}"
    else:
        server: PostgresServer = request.getfixturevalue("postgres_server")
        url = server.create_database()
    async with TelegramEmulator() as tg, FakeOpenAI(echo=True, chunk_chars=4,
                                                    chunk_delay=0.15) as model:
        env = {"CHINWAG_TELEGRAM_TOKEN": tg.token, "CHINWAG_TELEGRAM_API_URL": tg.url,
               "CHINWAG_GENERATOR": "openai", "CHINWAG_OPENAI_BASE_URL": model.url,
               "CHINWAG_MODEL": "fake-model", "CHINWAG_DATABASE_URL": url,
               "CHINWAG_EDIT_INTERVAL": "0.3"}
        first = await start_run(env, tmp_path)
        try:
            for chat in range(1, CHATS + 1):
                tg.push_text(question(chat, 1), chat=chat, user=chat)
            # Some replies are streaming (half shown), none finished...
            await tg.wait_for(lambda: model.running >= CHATS // 2
                              and sum(1 for c in tg.calls if c.method == "editMessageText")
                              >= 3, timeout=60)
            for chat in range(1, CHATS // 2 + 1):  # ...and some chats have a second waiting
                tg.push_text(question(chat, 2), chat=chat, user=chat)
            await asyncio.sleep(0.3)
        finally:
            first.send_signal(signal.SIGKILL)
            await first.wait()
        half_shown = [chat for chat in range(1, CHATS + 1)
                      if tg.final_text(chat) and tg.final_text(chat)[0] != question(chat, 1)]
        assert half_shown, "the kill came after every reply had finished"

        model.chunk_delay = 0.001
        every = [question(chat, n) for chat in range(1, CHATS + 1)
                 for n in ([1, 2] if chat <= CHATS // 2 else [1])]
        second = await start_run(env, tmp_path)
        try:
            # Every reply is stored only after its last message was shown, so once all are
            # stored nothing more can arrive.
            for _ in range(900):
                users, pairs = await stored(url)
                if len(pairs) >= len(every):
                    break
                await asyncio.sleep(0.1)
            for chat in range(1, CHATS + 1):  # one message per answer: no stubs
                assert tg.final_text(chat) == [t for t in every if t.startswith(f"chat {chat} ")]
        finally:
            second.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(second.wait(), 30) == 0

    users, pairs = await stored(url)
    assert Counter(users) == Counter(every)  # each stored exactly once
    assert Counter(q for q, _a in pairs) == Counter(every)  # each answered exactly once
    assert all(q == a for q, a in pairs)


async def stored(url: str) -> tuple[list[str], list[tuple[str, str]]]:
    """The stored user messages' texts, and each answered one with its reply's text."""
    engine = create_engine(url)
    reply = aliased(MessageRow)
    try:
        async with engine.connect() as connection:
            users = (await connection.execute(
                select(MessageRow.text).where(MessageRow.role == "user"))).scalars().all()
            pairs = [(question, answer) for question, answer in await connection.execute(
                select(MessageRow.text, reply.text)
                .join(reply, reply.reply_to_id == MessageRow.id)
                .where(MessageRow.role == "user"))]
    finally:
        await engine.dispose()
    return list(users), pairs
