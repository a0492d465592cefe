"""Long-term memory with the real all-MiniLM-L6-v2 encoder: a fact that fell out of the
window comes back into the prompt as a note; never another conversation's turn, never one
from before a /reset; /forget deletes the caller's embeddings; /memory shows what was
recalled; embeddings are stored on SQLite and PostgreSQL; the worker embeds a backlog in
batches; a slow encoder costs the recall, not the reply; through Telegram too."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import replace

import numpy as np
import pytest
import torch
from sqlalchemy import delete
from sqlalchemy.ext.asyncio import AsyncEngine

from bot.app import open_chinwag
from bot.builtin_commands import builtin_commands
from bot.config import Settings
from bot.dialogue import DialogueManager
from bot.errors import EncoderError, ModelUnavailable
from bot.generators import ChatMessage
from bot.memory import Memory
from bot.memory.encoder import BUILTIN_NAME, Encoder, TransformersEncoder, load_encoder
from bot.memory.index import Snapshot, VectorCache
from bot.memory.recall import NOTE_HEADER
from bot.memory.store import NewEmbedding, Unembedded
from bot.memory.worker import EmbeddingWorker
from bot.store import NewUserMessage
from storage.engine import create_engine
from storage.memory import SqlMemoryStore
from storage.migrate import upgrade
from storage.models import MessageRow
from storage.repository import SqlStore
from tests.auxil.adapters import discord_adapter, telegram_adapter
from tests.auxil.discord_api import DiscordEmulator
from tests.auxil.factories import dm
from tests.auxil.generators import ScriptedGenerator
from tests.auxil.postgres import PostgresServer
from tests.auxil.sinks import RecordingSink
from tests.auxil.telegram_api import TelegramEmulator
from tests.auxil.waiting import until

# Long turns about anything but family, pets or passwords: a few fill the small window.
FILLER = [
    "Tell me about volcanoes. I read that the eruption of Krakatoa in 1883 was heard "
    "thousands of kilometres away and cooled the whole planet for a year afterwards.",
    "I have been baking sourdough bread this week and the crust keeps coming out too "
    "pale, even though the oven is hot and the dough rises well overnight.",
    "What do you think about jazz from the fifties? Miles Davis and John Coltrane recorded "
    "some albums back then that people still argue about today.",
    "The train to the coast was late again this morning because of repairs on the line, "
    "so I spent an hour reading the timetable and drinking bad coffee.",
    "Explain how a compiler turns source code into machine instructions, step by step, "
    "with parsing, type checking, optimisation and register allocation.",
    "My garden tomatoes are finally ripening after a cold spring, but the slugs have "
    "eaten half of the lettuce and most of the young basil plants.",
    "Chess openings confuse me: the Sicilian Defence seems to have a hundred variations "
    "and every book recommends learning a different one first.",
    "The football match last night went to penalties after a goalless draw, and the "
    "keeper saved three shots in a row to win the cup for the home side.",
]


def filler(count: int) -> list[str]:
    return [FILLER[i % len(FILLER)] for i in range(count)]


@pytest.fixture(scope="module")
def encoder() -> Iterator[TransformersEncoder]:
    threads = torch.get_num_threads()
    yield load_encoder("builtin")
    torch.set_num_threads(threads)  # the loader's one thread is for the bot's own process


@pytest.fixture
def settings(settings: Settings) -> Settings:
    # A small window (about 180 prompt tokens with the echo generator's word counts): a
    # few long turns push the first ones out of it.
    return settings.model_copy(update={"context_tokens": 256, "max_reply_tokens": 64,
                                       "memory": True})


async def all_embedded(memory: Memory, store: SqlMemoryStore, encoder: Encoder) -> None:
    """Until the worker has embedded every stored message."""
    for _ in range(3000):
        if not await store.unembedded(encoder.name, 0, 1):
            return
        memory.stored()
        await asyncio.sleep(0.01)
    raise AssertionError("the worker did not embed every message within 30 s")


class Chat:
    """A conversation with a memory-backed manager, and what its prompts held."""

    def __init__(self, manager: DialogueManager, memory: Memory, store: SqlMemoryStore,
                 encoder: Encoder, generator: ScriptedGenerator) -> None:
        self.manager = manager
        self.memory = memory
        self.store = store
        self.encoder = encoder
        self.generator = generator
        self.sink = RecordingSink()

    async def say(self, *texts: str, user: str = "u1") -> None:
        for text in texts:
            await self.manager.handle(dm(text, user=user), self.sink)

    async def ask(self, text: str, user: str = "u1") -> list[ChatMessage]:
        """Ask once every earlier turn is embedded; the prompt the question got."""
        await all_embedded(self.memory, self.store, self.encoder)
        await self.say(text, user=user)
        return self.generator.prompts[-1]

    async def command(self, text: str, user: str = "u1") -> str:
        await self.say(text, user=user)
        return self.sink.texts[-1]


@pytest.fixture
async def memory(store: SqlStore, encoder: TransformersEncoder) -> AsyncIterator[Memory]:
    async with Memory(store.memory_store(), encoder, recall=3, tokens=256) as memory:
        yield memory


@pytest.fixture
async def chat(store: SqlStore, memory: Memory, encoder: TransformersEncoder,
               generator: ScriptedGenerator, settings: Settings) -> AsyncIterator[Chat]:
    async with DialogueManager(store=store, generator=generator, settings=settings,
                               commands=builtin_commands(), memory=memory) as manager:
        yield Chat(manager, memory, store.memory_store(), encoder, generator)


def note_of(prompt: Sequence[ChatMessage]) -> str:
    """The recall note at the end of the system prompt ('' when there is none)."""
    _system, _sep, note = prompt[0].content.partition(NOTE_HEADER)
    return note


def window(prompt: Sequence[ChatMessage]) -> str:
    """The turns in the prompt, the system prompt left out."""
    return "\n".join(m.content for m in prompt[1:])


# Recall.

async def test_a_fact_out_of_the_window_comes_back_as_a_note(chat: Chat) -> None:
    await chat.say("My sister's name is Ana and she lives in Porto.", *filler(8))
    prompt = await chat.ask("What is my sister called?")
    assert "Ana" not in window(prompt)  # the budget dropped it...
    assert "- User: My sister's name is Ana and she lives in Porto." in note_of(prompt)
    assert prompt[0].content.startswith(chat.generator.prompts[0][0].content + "\n\n")
    # ...and /memory says so, to whoever asked.
    shown = await chat.command("/memory")
    lines = shown.splitlines()
    assert lines[0].startswith("Recalled for your last message")
    assert lines[1].endswith("— you: My sister's name is Ana and she lives in Porto.")
    assert 0.3 <= float(lines[1].split(" ")[0]) <= 1.0


async def test_without_dropped_turns_nothing_is_recalled(chat: Chat) -> None:
    await chat.say("My sister's name is Ana.")
    prompt = await chat.ask("What is my sister called?")
    assert note_of(prompt) == "" and "Ana" in window(prompt)
    assert await chat.command("/memory") == (
        "Nothing from earlier in this conversation was recalled for your last message.")


async def test_unrelated_turns_are_not_recalled(chat: Chat) -> None:
    await chat.say("My sister's name is Ana.", *filler(8))
    prompt = await chat.ask("Good morning!")
    assert NOTE_HEADER not in prompt[0].content


async def test_memory_on_postgresql_too(any_engine: AsyncEngine, encoder: TransformersEncoder,
                                        settings: Settings) -> None:
    store = SqlStore(any_engine)
    generator = ScriptedGenerator()
    async with Memory(store.memory_store(), encoder, recall=3, tokens=256) as memory, \
            DialogueManager(store=store, generator=generator, settings=settings,
                            commands=builtin_commands(), memory=memory) as manager:
        chat = Chat(manager, memory, store.memory_store(), encoder, generator)
        await chat.say("My dog is called Biscuit.", *filler(8))
        prompt = await chat.ask("What is the name of my dog?")
    assert "- User: My dog is called Biscuit." in note_of(prompt)
    assert "Biscuit" not in window(prompt)


# What may never be recalled.

async def test_a_secret_is_never_recalled_into_another_conversation(chat: Chat) -> None:
    secret = "The password to my safe is tulip-7731."
    await chat.say(secret, *filler(8), user="alice")
    # Bob's conversation: his own similar turn, dropped by the budget, then a question
    # worded like Alice's secret.
    await chat.say("The password to my locker is orchid-1155.", *filler(8), user="bob")
    prompt = await chat.ask("The password to my safe is what?", user="bob")
    assert "orchid-1155" in note_of(prompt)  # recall works here...
    assert all("tulip" not in m.content for m in prompt)  # ...but never reaches Alice's
    assert "tulip" not in await chat.command("/memory", user="bob")
    alice = await chat.ask("The password to my safe is what?", user="alice")
    assert "tulip-7731" in note_of(alice)


async def test_nothing_from_before_a_reset_is_recalled(chat: Chat) -> None:
    await chat.say("My sister's name is Ana.", *filler(8), "/reset")
    await chat.say("My brother's name is Tom.", *filler(8))
    prompt = await chat.ask("What are the names of my sister and my brother?")
    note = note_of(prompt)
    assert "- User: My brother's name is Tom." in note
    assert all("Ana" not in m.content for m in prompt)


async def test_forget_deletes_the_callers_embeddings(chat: Chat, store: SqlStore) -> None:
    await chat.say("My sister's name is Ana.", *filler(8), user="alice")
    await chat.say("My dog is called Biscuit.", *filler(2), user="bob")
    await chat.ask("What is my sister called?", user="alice")
    alice = await store.find_conversation("telegram:alice")
    bob = await store.find_conversation("telegram:bob")
    assert alice is not None and bob is not None
    await all_embedded(chat.memory, chat.store, chat.encoder)
    before = await chat.store.embedding_state(alice.id, BUILTIN_NAME)
    assert before.count == 20 and chat.memory.cache.conversations >= 1
    assert (await chat.store.last_recall(alice.id, "alice")).turns  # type: ignore[union-attr]

    assert (await chat.command("/forget", user="alice")).startswith("Done: I deleted 20")
    assert (await chat.store.embedding_state(alice.id, BUILTIN_NAME)).count == 0
    assert await chat.store.last_recall(alice.id, "alice") is None
    assert chat.memory.cache.conversations == 0  # no copy of their vectors is kept
    assert (await chat.store.embedding_state(bob.id, BUILTIN_NAME)).count == 6  # Bob's stay


async def test_memory_command_when_memory_is_off(manager: DialogueManager) -> None:
    sink = RecordingSink()
    await manager.handle(dm("/memory"), sink)
    assert sink.texts == [
        "Long-term memory is off here; the operator turns it on with CHINWAG_MEMORY=on."]


async def test_the_app_opens_memory_when_it_is_on(settings: Settings,
                                                   generator: ScriptedGenerator) -> None:
    sink = RecordingSink()
    async with open_chinwag(settings, generator) as manager:
        await manager.handle(dm("/memory"), sink)
    assert sink.texts == [
        "Nothing from earlier in this conversation was recalled for your last message."]
    missing = settings.model_copy(update={"memory_model": str(settings.data_dir / "nothing")})
    with pytest.raises(ModelUnavailable, match="cannot load the memory's encoder"):
        async with open_chinwag(missing, generator):
            pass


# Failures cost the recall, not the reply.

class SlowEncoder:
    """The real encoder, after a pause."""

    def __init__(self, encoder: TransformersEncoder, pause: float) -> None:
        self._encoder = encoder
        self.pause = pause
        self.name = encoder.name
        self.dimension = encoder.dimension

    def encode(self, texts: Sequence[str]) -> object:
        time.sleep(self.pause)
        return self._encoder.encode(texts)


async def test_a_slow_encoder_means_a_reply_without_recall(
        store: SqlStore, encoder: TransformersEncoder, generator: ScriptedGenerator,
        settings: Settings, caplog: pytest.LogCaptureFixture) -> None:
    slow = SlowEncoder(encoder, pause=0.0)
    async with Memory(store.memory_store(), slow, recall=3,  # type: ignore[arg-type]
                      tokens=256, timeout=0.3) as memory, \
            DialogueManager(store=store, generator=generator, settings=settings,
                            commands=builtin_commands(), memory=memory) as manager:
        chat = Chat(manager, memory, store.memory_store(), encoder, generator)
        await chat.say("My sister's name is Ana.", *filler(8))
        await all_embedded(memory, chat.store, encoder)
        slow.pause = 2.0
        with caplog.at_level(logging.WARNING, logger="bot.memory.recall"):
            await chat.say("What is my sister called?")
    assert chat.sink.texts[-1] == "What is my sister called?"  # answered all the same
    assert note_of(generator.prompts[-1]) == ""
    assert any("without recall: it took over 0.3 s" in r.getMessage()
               for r in caplog.records)


# Storage and the worker.

def _question(conversation_id: int, text: str, number: int) -> NewUserMessage:
    return NewUserMessage(conversation_id=conversation_id, platform="telegram",
                          author_id="u1", author_name="Ann", platform_message_id=f"p{number}",
                          text=text, tokens=3, reply_to_platform_id=None)


async def test_embeddings_are_stored_and_deleted_with_their_messages(
        any_engine: AsyncEngine, encoder: TransformersEncoder) -> None:
    store = SqlStore(any_engine)
    memory_store = store.memory_store()
    conversation = await store.conversation("telegram:1")
    first = await store.add_user_message(_question(conversation.id, "hello there", 1))
    second = await store.add_user_message(_question(conversation.id, "my cat is grey", 2))
    worker = EmbeddingWorker(memory_store, encoder)
    assert await worker.catch_up() == 2

    stored = await memory_store.embeddings(conversation.id, BUILTIN_NAME, 0)
    assert list(stored.ids) == [first.message.id, second.message.id]
    assert [len(v) for v in stored.vectors] == [4 * 384] * 2
    state = await memory_store.embedding_state(conversation.id, BUILTIN_NAME)
    assert (state.count, state.newest_id) == (2, second.message.id)
    assert await memory_store.unembedded(BUILTIN_NAME, 0, 10) == []
    # Another model's embeddings are not this one's: that model embeds them again.
    assert len(await memory_store.unembedded("another/model", 0, 10)) == 2

    await memory_store.remember_recall(second.message.id, [(first.message.id, 0.5)])
    last = await memory_store.last_recall(conversation.id, "u1")
    assert last is not None and last.message.id == second.message.id
    assert [(t.message.text, t.similarity) for t in last.turns] == [("hello there", 0.5)]

    assert await store.forget_user("telegram", "u1") == 2
    assert (await memory_store.embedding_state(conversation.id, BUILTIN_NAME)).count == 0
    assert await memory_store.last_recall(conversation.id, "u1") is None
    # An embedding of a message deleted meanwhile is not stored.
    await memory_store.add_embeddings(BUILTIN_NAME, 384, [
        NewEmbedding(first.message.id, conversation.id, bytes(4 * 384))])
    assert (await memory_store.embedding_state(conversation.id, BUILTIN_NAME)).count == 0


async def test_an_embedding_for_a_message_being_forgotten_is_left_out(
        postgres_server: PostgresServer) -> None:
    # PostgreSQL: /forget's delete, not yet committed, when the worker stores a batch.
    engine = create_engine(postgres_server.create_database())
    try:
        await upgrade(engine)
        store = SqlStore(engine)
        conversation = await store.conversation("telegram:1")
        first = await store.add_user_message(_question(conversation.id, "hello there", 1))
        second = await store.add_user_message(_question(conversation.id, "my cat", 2))
        async with engine.connect() as forgetting:
            async with forgetting.begin():
                await forgetting.execute(delete(MessageRow)
                                         .where(MessageRow.id == first.message.id))
                adding = asyncio.create_task(store.memory_store().add_embeddings("m", 2, [
                    NewEmbedding(message.id, conversation.id, _unit(1, 0))
                    for message in (first.message, second.message)]))
                await asyncio.sleep(0.2)  # it waits for the delete's transaction
            await adding  # neither a foreign key error nor the deleted one's embedding
        stored = await store.memory_store().embeddings(conversation.id, "m", 0)
        assert list(stored.ids) == [second.message.id]
    finally:
        await engine.dispose()


class CountingStore:
    """The real memory store, counting the batches the worker stores."""

    def __init__(self, store: SqlMemoryStore) -> None:
        self._store = store
        self.batches: list[int] = []

    def __getattr__(self, name: str) -> object:
        return getattr(self._store, name)

    async def add_embeddings(self, model: str, dimension: int,
                             embeddings: Sequence[NewEmbedding]) -> None:
        self.batches.append(len(embeddings))
        await self._store.add_embeddings(model, dimension, embeddings)

    async def unembedded(self, model: str, after_id: int,
                         limit: int) -> Sequence[Unembedded]:
        return await self._store.unembedded(model, after_id, limit)


async def test_the_worker_catches_up_on_a_backlog_in_batches(
        store: SqlStore, encoder: TransformersEncoder) -> None:
    conversation = await store.conversation("telegram:1")
    for number in range(10):  # stored before memory was turned on
        await store.add_user_message(_question(conversation.id, f"message {number}", number))
    counting = CountingStore(store.memory_store())
    async with EmbeddingWorker(counting, encoder, batch=4) as worker:  # type: ignore[arg-type]
        for _ in range(3000):
            if worker.embedded == 10:
                break
            await asyncio.sleep(0.01)
        assert counting.batches == [4, 4, 2]
        # A message stored later is embedded once the worker is told.
        await store.add_user_message(_question(conversation.id, "one more", 10))
        worker.wake()
        for _ in range(3000):
            if worker.embedded == 11:
                break
            await asyncio.sleep(0.01)
    assert counting.batches == [4, 4, 2, 1]
    state = await store.memory_store().embedding_state(conversation.id, BUILTIN_NAME)
    assert state.count == 11


class RefusingEncoder:
    """Refuses any text with "refused" in it, as the real one refuses a lone surrogate."""

    name = "refusing"
    dimension = 2

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        if any("refused" in text for text in texts):
            raise EncoderError("TextEncodeInput must be Union[...]")
        vectors = np.zeros((len(texts), 2), dtype=np.float32)
        vectors[:, 0] = 1.0
        return vectors


@pytest.mark.parametrize("batch", [1, 4])
async def test_a_text_the_encoder_refuses_costs_only_its_own_embedding(
        store: SqlStore, batch: int) -> None:
    conversation = await store.conversation("telegram:1")
    for number, text in enumerate(["refused", *(f"message {n}" for n in range(5))]):
        await store.add_user_message(_question(conversation.id, text, number))
    async with EmbeddingWorker(store.memory_store(), RefusingEncoder(),
                               batch=batch, idle=0.05) as worker:
        await until(lambda: worker.embedded == 5, "the five others to be embedded")
    state = await store.memory_store().embedding_state(conversation.id, "refusing")
    assert state.count == 5


def _unit(*values: float) -> bytes:
    vector = np.array(values, dtype=np.float32)
    return (vector / np.linalg.norm(vector)).tobytes()


async def test_the_cache_adds_new_embeddings_and_notices_deletions(store: SqlStore) -> None:
    memory_store = store.memory_store()
    conversation = await store.conversation("telegram:1")
    ids = []
    for number, author in enumerate(["u1", "u2", "u1"]):
        admission = await store.add_user_message(replace(
            _question(conversation.id, f"message {number}", number), author_id=author))
        ids.append(admission.message.id)
    await memory_store.add_embeddings("m", 2, [
        NewEmbedding(message_id, conversation.id, _unit(1, number))
        for number, message_id in enumerate(ids)])
    trusting = VectorCache(memory_store, "m", 2, verify_every=3600)
    checking = VectorCache(memory_store, "m", 2, verify_every=0)
    assert list((await trusting.snapshot(conversation.id)).ids) == ids

    newer = await store.add_user_message(_question(conversation.id, "and more", 9))
    await memory_store.add_embeddings("m", 2, [
        NewEmbedding(newer.message.id, conversation.id, _unit(0, 1))])
    snapshot = await trusting.snapshot(conversation.id)
    assert list(snapshot.ids) == [*ids, newer.message.id]  # appended, not read again
    found = snapshot.search(np.array([0, 1], dtype=np.float32), after_id=0,
                            before_id=newer.message.id, limit=2)
    assert [message_id for message_id, _score in found] == [ids[2], ids[1]]

    await store.forget_user("telegram", "u2")  # not through /forget: nothing is told
    assert list((await checking.snapshot(conversation.id)).ids) == \
        [ids[0], ids[2], newer.message.id]


def test_search_keeps_to_the_ids_asked_for_and_leaves_out_what_a_reset_hid() -> None:
    # Messages 1-6; 5 is a reply stored after a reset at 4 to message 3, from before it.
    snapshot = Snapshot(ids=np.array([1, 2, 3, 4, 5, 6], dtype=np.int64),
                        anchors=np.array([1, 2, 3, 4, 3, 6], dtype=np.int64),
                        matrix=np.ones((6, 2), dtype=np.float32) / np.sqrt(2))
    query = np.array([1, 1], dtype=np.float32) / np.sqrt(2)
    assert [i for i, _s in snapshot.search(query, after_id=0, before_id=6, limit=9)] == \
        [1, 2, 3, 4, 5]
    assert [i for i, _s in snapshot.search(query, after_id=4, before_id=9, limit=9)] == [6]
    assert len(snapshot.search(query, after_id=0, before_id=9, limit=2)) == 2
    assert snapshot.search(query, after_id=5, before_id=6, limit=3) == []


def test_the_encoder_gives_unit_vectors_and_finds_the_answer(
        encoder: TransformersEncoder) -> None:
    vectors = encoder.encode(["My sister's name is Ana.", "What is my sister called?",
                              "The football match went to penalties."])
    assert vectors.shape == (3, 384) and str(vectors.dtype) == "float32"
    assert all(abs(float((v * v).sum()) - 1.0) < 1e-4 for v in vectors)
    similar, unrelated = float(vectors[0] @ vectors[1]), float(vectors[2] @ vectors[1])
    assert similar > 0.5 > unrelated


# On a platform.

@pytest.fixture
async def telegram() -> AsyncIterator[TelegramEmulator]:
    async with TelegramEmulator() as emulator:
        yield emulator


async def test_recall_and_memory_command_on_telegram(telegram: TelegramEmulator,
                                                     chat: Chat) -> None:
    async with telegram_adapter(telegram, chat.manager):
        for number, text in enumerate(["My dog is called Biscuit.", *filler(6)], start=1):
            telegram.push_text(text, chat=9, user=9)
            await telegram.wait_for(lambda n=number: len(telegram.final_text(9)) == n)
        await all_embedded(chat.memory, chat.store, chat.encoder)
        telegram.push_text("What is the name of my dog?", chat=9, user=9)
        await telegram.wait_for(lambda: len(telegram.final_text(9)) == 8)
        telegram.push_text("/memory", chat=9, user=9)
        await telegram.wait_for(lambda: len(telegram.final_text(9)) == 9)
    assert "- User: My dog is called Biscuit." in note_of(chat.generator.prompts[-1])
    assert telegram.final_text(9)[-1].splitlines()[1].endswith(
        "— you: My dog is called Biscuit.")


async def test_memory_slash_command_on_discord(chat: Chat) -> None:
    await chat.say("My sister's name is Ana.", *filler(8), user="8")
    await chat.ask("What is my sister called?", user="8")
    async with DiscordEmulator() as discord, discord_adapter(discord, chat.manager):
        mine = discord.interact("memory", author=8, dm=True)
        await discord.wait_for(lambda: len(discord.interaction_replies[mine]) >= 2)
    # Recorded per conversation: user 8's DM on Discord is not their Telegram chat.
    assert discord.interaction_replies[mine][1]["content"] == (
        "Nothing from earlier in this conversation was recalled for your last message.")
    shown = await chat.command("/memory", user="8")
    assert "— you: My sister's name is Ana." in shown
