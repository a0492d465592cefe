"""Long-term memory: recall quality with memory on and off, and search time.

Quality: conversations in which facts are stated early ("My sister's name is Ana."), then
200 filler turns, then a question about each fact, asked through the dialogue manager on a
real SQLite file (echo generator; the default 2,048-token window). A question counts as a
hit when its fact's turn is in the prompt: with memory on, among the (at most 3) recalled
turns; with memory off it can only be in the window, which the filler pushed it out of.

Search: 100,000 stored embeddings of one conversation, read once into the cache, then
one query at a time (the fingerprint check against the database, and the vectorised search)
as a reply does it; the built-in encoder's time for one query is shown apart.

Usage: python bench/memory.py [--filler N] [--embeddings N] [--queries N]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
from sqlalchemy import insert

from bench.context import NullSink  # the same sink that measures nothing
from bot.builtin_commands import builtin_commands
from bot.config import Settings, load_settings
from bot.dialogue import DialogueManager
from bot.events import IncomingMessage
from bot.generators import ChatMessage, GenerationParams
from bot.generators.echo import EchoGenerator
from bot.memory import Memory
from bot.memory.encoder import TransformersEncoder, load_encoder
from bot.memory.index import VectorCache
from bot.memory.recall import NOTE_HEADER
from bot.store import NewReply, NewUserMessage
from storage.engine import create_engine
from storage.migrate import upgrade
from storage.models import EmbeddingRow, MessageRow
from storage.repository import SqlStore

FACTS = [  # (stated early, asked later)
    ("My sister's name is Ana.", "What is my sister's name?"),
    ("I was born in Lisbon, in Portugal.", "Where was I born?"),
    ("My dog is a beagle called Rex.", "What is my dog called?"),
    ("I work as a nurse at the city hospital.", "What do I do for a living?"),
    ("My favourite colour is dark green.", "What is my favourite colour?"),
    ("I am allergic to peanuts.", "Which food am I allergic to?"),
    ("My wife's birthday is on the 14th of March.", "When is my wife's birthday?"),
    ("I drive an old red Volvo from 1998.", "What car do I drive?"),
    ("My son plays the cello in the school orchestra.", "Which instrument does my son play?"),
    ("I live on the fourth floor of a building with no lift.", "Which floor do I live on?"),
    ("My best friend from school is called Tomasz.", "What is my best friend's name?"),
    ("I studied chemistry at the University of Leeds.", "What did I study at university?"),
    ("My grandmother bakes the best apple pie in the family.",
     "Who in my family bakes the best pie?"),
    ("I am learning Japanese because we plan to visit Kyoto next spring.",
     "Which language am I learning?"),
    ("My cat Luna is afraid of the vacuum cleaner.", "What is my cat's name?"),
    ("I run five kilometres every Sunday morning.", "How often do I go running?"),
    ("My brother lives in Toronto with his two kids.", "Where does my brother live?"),
    ("My phone number ends in 4471.", "What are the last digits of my phone number?"),
    ("I can't stand coriander; it tastes like soap to me.", "Which herb do I dislike?"),
    ("My daughter starts university in September.", "When does my daughter start university?"),
    ("We got married in a small chapel in Galway.", "Where did we get married?"),
    ("My first teacher was Mrs Doyle, and I still remember her.",
     "Who was my first teacher?"),
    ("I keep my spare house key under the blue flower pot.", "Where is my spare key?"),
    ("My blood type is O negative.", "What is my blood type?"),
]
FACTS_PER_CONVERSATION = 8

TOPICS = [
    "photosynthesis", "the stock market", "sourdough baking", "black holes",
    "the French Revolution", "compound interest", "machine learning", "jazz improvisation",
    "composting", "chess openings", "the immune system", "electric cars", "medieval castles",
    "watercolour painting", "plate tectonics", "marathon training", "coffee roasting",
    "the Roman Empire", "quantum computing", "bird migration", "knitting", "public speaking",
    "solar panels", "ancient Egypt", "the water cycle", "poker strategy", "rock climbing",
    "origami", "wine tasting", "cloud computing", "beekeeping", "typography",
    "the Olympic games", "volcanoes", "submarines", "minimalism", "urban gardening",
    "film photography", "the printing press", "coral reefs",
]
ASKING = [
    "Can you explain how {topic} works?",
    "I was reading about {topic} yesterday; what are the main ideas?",
    "Give me three tips about {topic}.",
    "What is a common mistake people make with {topic}?",
    "Is {topic} worth learning about, in your opinion?",
]
CHATTING = [  # personal, but no answer to any question
    "I had pasta for dinner yesterday and it was too salty.",
    "The weather here has been rainy all week.",
    "I watched a documentary about penguins last night.",
    "My laptop is getting slow; I might need a new one soon.",
    "We are thinking about repainting the kitchen this summer.",
    "I finally finished that long novel I started in January.",
    "Traffic on the way to work was terrible this morning.",
    "I tried a new yoga class and my back feels much better.",
]
ANSWERING = [
    "Sure. {topic} is a broad subject: the basics are simple, but the details matter. "
    "Start with the fundamentals and practise a little every day.",
    "Good question. Most introductions to {topic} begin with its history, then the key "
    "terms, and finally a few worked examples you can try yourself.",
    "Here is a short overview of {topic}: it rewards patience, and the best way to learn "
    "it is to read a little, try a little, and ask when you get stuck.",
    "That sounds nice. Tell me more whenever you like.",
]
DIMENSION = 384


class RecordingGenerator(EchoGenerator):
    """The echo generator, keeping each prompt."""

    def __init__(self) -> None:
        super().__init__(pieces=1)
        self.prompts: list[Sequence[ChatMessage]] = []

    async def stream(self, messages: Sequence[ChatMessage],
                     params: GenerationParams) -> AsyncIterator[str]:
        self.prompts.append(list(messages))
        async for piece in super().stream(messages, params):
            yield piece


def filler_turns(count: int, rng: random.Random) -> list[tuple[str, str]]:
    """``count`` filler messages as (user, assistant) pairs."""
    pairs = []
    for _ in range(count // 2):
        if rng.random() < 0.2:
            pairs.append((rng.choice(CHATTING), ANSWERING[-1]))
            continue
        topic = rng.choice(TOPICS)
        pairs.append((rng.choice(ASKING).format(topic=topic),
                      rng.choice(ANSWERING[:-1]).format(topic=topic.capitalize())))
    return pairs


async def build(store: SqlStore, generator: EchoGenerator, filler: int,
                seed: int) -> list[tuple[str, str, str]]:
    """The conversations; returns (conversation key, fact, question) for each fact."""
    rng = random.Random(seed)
    cases = []
    number = 0
    for index in range(0, len(FACTS), FACTS_PER_CONVERSATION):
        key = f"console:c{index}"
        conversation = await store.conversation(key)
        facts = FACTS[index:index + FACTS_PER_CONVERSATION]
        turns = [(fact, "Thanks, I will keep that in mind.") for fact, _question in facts]
        for user, assistant in turns + filler_turns(filler, rng):
            number += 1
            admission = await store.add_user_message(NewUserMessage(
                conversation_id=conversation.id, platform="console", author_id=key,
                author_name="me", platform_message_id=f"m{number}", text=user,
                tokens=generator.count_tokens("user", user), reply_to_platform_id=None))
            await store.add_reply(NewReply(
                conversation_id=conversation.id, reply_to_id=admission.message.id,
                platform="console", author_id=key, text=assistant,
                tokens=generator.count_tokens("assistant", assistant), prompt_tokens=0,
                generation_ms=0, platform_message_ids=[f"r{number}"]))
        cases += [(key, fact, question) for fact, question in facts]
    return cases


async def ask(settings: Settings, encoder: TransformersEncoder | None,
              filler: int) -> tuple[float, int]:
    """Hits over the questions (memory on when ``encoder`` is given), and how many facts
    were still in the window (none should be)."""
    engine = create_engine(settings.database_url)
    await upgrade(engine)
    store = SqlStore(engine)
    generator = RecordingGenerator()
    cases = await build(store, generator, filler, seed=7)
    hits = in_window = 0
    try:
        if encoder is None:
            async with DialogueManager(store=store, generator=generator, settings=settings,
                                       commands=builtin_commands()) as manager:
                prompts = await questions(manager, cases, generator)
        else:
            async with Memory(store.memory_store(), encoder, recall=settings.memory_recall,
                              tokens=settings.memory_tokens, timeout=30.0) as memory:
                started = time.perf_counter()
                embedded = await memory.worker.catch_up()
                print(f"embedded {embedded} messages in {time.perf_counter() - started:.1f} s")
                async with DialogueManager(store=store, generator=generator,
                                           settings=settings, commands=builtin_commands(),
                                           memory=memory) as manager:
                    prompts = await questions(manager, cases, generator)
    finally:
        await engine.dispose()
    for (_key, fact, _question), prompt in zip(cases, prompts, strict=True):
        _system, _sep, note = prompt[0].content.partition(NOTE_HEADER)
        in_window += any(fact in m.content for m in prompt[1:])
        hits += f"- User: {fact}" in note if encoder is not None else \
            any(fact in m.content for m in prompt)
    return hits / len(cases), in_window


async def questions(manager: DialogueManager, cases: list[tuple[str, str, str]],
                    generator: RecordingGenerator) -> list[Sequence[ChatMessage]]:
    prompts = []
    sink = NullSink()
    for number, (key, _fact, question) in enumerate(cases):
        await manager.handle(IncomingMessage(
            platform="console", chat_id=key.partition(":")[2], author_id=key,
            author_name="me", message_id=f"q{number}", text=question, is_direct=True), sink)
        prompts.append(generator.prompts[-1])
    return prompts


async def search_times(folder: Path, encoder: TransformersEncoder, count: int,
                       queries: int) -> dict[str, float]:
    settings = load_settings(data_dir=folder / "search", generator="echo")
    engine = create_engine(settings.database_url)
    await upgrade(engine)
    store = SqlStore(engine)
    conversation = await store.conversation("console:big")
    rng = np.random.default_rng(3)
    now = datetime.now(UTC)
    started = time.perf_counter()
    async with engine.begin() as connection:
        for start in range(0, count, 10_000):
            size = min(10_000, count - start)
            await connection.execute(insert(MessageRow), [
                {"id": start + n + 1, "conversation_id": conversation.id,
                 "role": "user" if n % 2 == 0 else "assistant", "platform": "console",
                 "author_id": "big", "text": "filler", "tokens": 5, "created_at": now}
                for n in range(size)])
            vectors = rng.standard_normal((size, DIMENSION)).astype(np.float32)
            vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
            await connection.execute(insert(EmbeddingRow), [
                {"message_id": start + n + 1, "conversation_id": conversation.id,
                 "model": encoder.name, "dimension": DIMENSION, "vector": vectors[n].tobytes()}
                for n in range(size)])
    print(f"stored {count} embeddings of one conversation in "
          f"{time.perf_counter() - started:.1f} s")
    cache = VectorCache(store.memory_store(), encoder.name, DIMENSION)
    try:
        started = time.perf_counter()
        snapshot = await cache.snapshot(conversation.id)
        load_ms = (time.perf_counter() - started) * 1000
        assert len(snapshot.ids) == count
        check, search, encode = [], [], []
        for n in range(queries):
            text = f"What did I say about {TOPICS[n % len(TOPICS)]}?"
            started = time.perf_counter()
            [query] = encoder.encode([text])
            encode.append((time.perf_counter() - started) * 1000)
            started = time.perf_counter()
            snapshot = await cache.snapshot(conversation.id)  # the fingerprint check
            check.append((time.perf_counter() - started) * 1000)
            started = time.perf_counter()
            found = snapshot.search(query, after_id=0, before_id=count + 1, limit=6)
            search.append((time.perf_counter() - started) * 1000)
            assert len(found) == 6
    finally:
        await cache.close()
        await engine.dispose()
    return {"load_ms": load_ms, "check_ms_p50": statistics.median(check),
            "search_ms_p50": statistics.median(search),
            "search_ms_p90": sorted(search)[int(len(search) * 0.9)],
            "encode_ms_p50": statistics.median(encode)}


async def main(filler: int, embeddings: int, queries: int) -> None:
    started = time.perf_counter()
    encoder = load_encoder("builtin")
    print(f"loaded {encoder.name} in {time.perf_counter() - started:.1f} s")
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        results = {}
        for memory in (False, True):
            settings = load_settings(data_dir=folder / str(memory), generator="echo",
                                     edit_interval=0.0, rate_per_minute=0, memory=memory)
            recall, in_window = await ask(settings, encoder if memory else None, filler)
            results[memory] = recall
            print(f"memory {'on' if memory else 'off'}: recall@{settings.memory_recall} "
                  f"{recall:.3f} over {len(FACTS)} questions ({in_window} facts still in "
                  f"the window)")
        times = await search_times(folder, encoder, embeddings, queries)
    print(f"search over {embeddings} embeddings: load {times['load_ms']:.0f} ms once, then "
          f"per query: check {times['check_ms_p50']:.2f} ms, search "
          f"{times['search_ms_p50']:.2f} ms (p90 {times['search_ms_p90']:.2f}), "
          f"encoding the query {times['encode_ms_p50']:.1f} ms (p50 of {queries})")
    print(f"recall_at_3_on={results[True]:.3f} recall_at_3_off={results[False]:.3f} "
          f"search_ms_p50={times['search_ms_p50']:.2f} check_ms_p50={times['check_ms_p50']:.2f} "
          f"load_ms={times['load_ms']:.0f} embeddings={embeddings}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--filler", type=int, default=200,
                        help="filler messages between the facts and the questions")
    parser.add_argument("--embeddings", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=50)
    args = parser.parse_args()
    asyncio.run(main(args.filler, args.embeddings, args.queries))
