"""The real built-in model: token counting, streaming off the loop, and the terminal chat."""

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from bot.config import BUILTIN_MODEL
from bot.generators import ChatMessage, GenerationParams
from bot.generators.huggingface import TransformersGenerator
from tests.auxil.process import chinwag

pytestmark = pytest.mark.model

QUESTION = "What is the capital of France?"


CACHE = Path("~/.cache/chinwag").expanduser()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def model() -> AsyncIterator[TransformersGenerator]:
    # The conversion cache is shared with the user's own runs: converting takes ~20 s.
    async with TransformersGenerator(BUILTIN_MODEL, CACHE, "cpu") as generator:
        yield generator


@pytest.mark.asyncio(loop_scope="module")
async def test_token_counts_add_up_to_the_real_prompt(model: TransformersGenerator) -> None:
    messages = [ChatMessage("system", "You are a helpful assistant."),
                ChatMessage("user", "Hi there, how are you?"),
                ChatMessage("assistant", "I'm fine, thanks. And you?"),
                ChatMessage("user", QUESTION)]
    counted = sum(model.count_tokens(m.role, m.content) for m in messages)
    tokenizer = model._tokenizer
    real = len(tokenizer.apply_chat_template(
        [{"role": m.role, "content": m.content} for m in messages],
        add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])
    assert abs(counted + model.prompt_overhead - real) <= 2, (counted, real)
    assert model.context_window == 8192
    assert model.truncate("one two three four five six", 3) != "one two three four five six"


@pytest.mark.asyncio(loop_scope="module")
async def test_generation_streams_without_blocking_the_loop(
        model: TransformersGenerator) -> None:
    gaps: list[float] = []
    stop = asyncio.Event()

    async def ticker() -> None:
        last = time.monotonic()
        while not stop.is_set():
            await asyncio.sleep(0.01)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    task = asyncio.create_task(ticker())
    pieces = [piece async for piece in model.stream(
        [ChatMessage("system", "You are a helpful assistant."), ChatMessage("user", QUESTION)],
        GenerationParams(max_new_tokens=24, temperature=0.0))]
    stop.set()
    await task
    assert len(pieces) > 3
    assert "Paris" in "".join(pieces)
    assert max(gaps) < 0.5, max(gaps)


@pytest.mark.asyncio(loop_scope="module")
async def test_closing_the_stream_early_stops_generation(model: TransformersGenerator) -> None:
    params = GenerationParams(max_new_tokens=400, temperature=0.0)
    messages = [ChatMessage("user", "Write a long story about a dragon.")]
    started = time.monotonic()
    stream = model.stream(messages, params)
    async for _piece in stream:
        break
    await stream.aclose()  # type: ignore[attr-defined]
    # The worker stops at the next token, so the next request is not stuck behind 400.
    pieces = [p async for p in model.stream([ChatMessage("user", "Say hi.")],
                                            GenerationParams(max_new_tokens=5, temperature=0.0))]
    assert pieces
    assert time.monotonic() - started < 30


def test_terminal_chat_answers_and_remembers(tmp_path: Path) -> None:
    env = {"CHINWAG_DATA_DIR": str(tmp_path), "CHINWAG_TEMPERATURE": "0",
           "CHINWAG_MAX_REPLY_TOKENS": "64"}
    first = chinwag("console", stdin=QUESTION + "\n", env=env)
    assert first.returncode == 0, first.stderr
    assert "Paris" in first.stdout
    again = chinwag("console", stdin="/stats\n", env=env)
    assert again.returncode == 0, again.stderr
    assert "Messages: 1 from users, 1 replies" in again.stdout
    rows = sqlite3.connect(tmp_path / "chinwag.db").execute(
        "select role, text, tokens from messages order by id").fetchall()
    assert rows[0][:2] == ("user", QUESTION)
    assert rows[1][0] == "assistant" and "Paris" in rows[1][1] and rows[1][2] > 0


TRICKY = ["naïve café, façade", "😀👍🏽 and 🇫🇷 flags", "日本語のテキストと中文", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ∑ ≠ ∞",
          "  two  spaces\n\n\ttab and trailing space ", "a😀b日c\u200bd"]


def streamed(tokenizer: object, ids: list[int]) -> list[str]:
    from bot.generators.reply_text import ReplyDecoder

    decoder = ReplyDecoder(tokenizer)
    return [decoder.step(token) for token in ids] + [decoder.finish()]


@pytest.mark.asyncio(loop_scope="module")
async def test_incremental_decoding_equals_the_full_decode(
        model: TransformersGenerator) -> None:
    import random

    tokenizer = model._tokenizer
    cases = [tokenizer.encode(text, add_special_tokens=False) for text in TRICKY]
    emoji = tokenizer.encode(" 😀", add_special_tokens=False)
    assert len(emoji) > 1  # byte-level pieces of one character
    cases.append([*cases[0], *emoji[:-1]])  # ends in half a character
    cases.append([*emoji[1:], *cases[2]])  # starts with the tail of one
    cases.append([*cases[1][:3], tokenizer.convert_tokens_to_ids("<|im_end|>"), *cases[3]])
    rng = random.Random(11)
    cases += [[rng.randrange(len(tokenizer)) for _ in range(60)] for _ in range(30)]
    for ids in cases:
        pieces = streamed(tokenizer, ids)
        assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True), ids
        # Streamed piece by piece, not all at the end.
        assert sum(1 for piece in pieces[:-1] if piece) > len(ids) // 4, ids


@pytest.mark.asyncio(loop_scope="module")
async def test_a_stop_string_ends_the_stream_and_is_never_shown(
        model: TransformersGenerator) -> None:
    messages = [ChatMessage("system", "You are a helpful assistant."),
                ChatMessage("user", QUESTION)]
    greedy = GenerationParams(max_new_tokens=24, temperature=0.0)
    full = "".join([piece async for piece in model.stream(messages, greedy)])
    assert "Paris" in full
    stop = GenerationParams(max_new_tokens=24, temperature=0.0, stop=("Paris", "XYZ"))
    pieces = [piece async for piece in model.stream(messages, stop)]
    assert "".join(pieces) == full[:full.index("Paris")]
    assert not any("Par" in piece for piece in pieces)


BIG = "lorem ipsum dolor sit amet " * 80_000  # about 2 MB: a second to tokenize


async def outcome(stream: AsyncIterator[str]) -> tuple[str | BaseException, float]:
    """The first piece of a stream (or what it raised), and when it came."""
    try:
        first: str | BaseException = await anext(stream)
    except BaseException as exc:  # the kind is what the tests look at
        first = exc
    finally:
        await stream.aclose()  # type: ignore[attr-defined]
    return first, asyncio.get_running_loop().time()


async def tokenizing_time(model: TransformersGenerator, text: str) -> float:
    loop = asyncio.get_running_loop()
    started = loop.time()
    await asyncio.to_thread(model.prompt_ids, [ChatMessage("user", text)])
    return loop.time() - started


@pytest.mark.asyncio(loop_scope="module")
async def test_a_long_prompt_being_tokenized_does_not_hold_up_another_request(
        model: TransformersGenerator) -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    big = asyncio.create_task(outcome(model.stream([ChatMessage("user", BIG)],
                                                   GenerationParams(4, 0.0))))
    await asyncio.sleep(0)  # the big prompt is being tokenized
    try:
        piece, at = await asyncio.wait_for(outcome(model.stream(
            [ChatMessage("user", "Say hi.")], GenerationParams(4, 0.0))), timeout=60)
    finally:
        big.cancel()  # before it reaches the model: 500,000 tokens is beyond its window
    assert isinstance(piece, str)
    # It waited for neither the big prompt's tokenizing nor a one-thread queue behind it.
    assert at - started < await tokenizing_time(model, BIG) / 2


@pytest.mark.asyncio(loop_scope="module")
async def test_beyond_the_limits_busy_comes_before_the_prompt_is_tokenized() -> None:
    from bot.errors import Busy

    async with TransformersGenerator(BUILTIN_MODEL, CACHE, "cpu", max_sequences=1,
                                     max_queued=0) as full:
        held = full.stream([ChatMessage("user", "Count to a thousand.")],
                           GenerationParams(2000, 0.0), ignore_eos=True)
        await anext(held)  # the only place is taken
        loop = asyncio.get_running_loop()
        started = loop.time()
        big = asyncio.create_task(outcome(full.stream([ChatMessage("user", BIG)],
                                                      GenerationParams(4, 0.0))))
        small = await outcome(full.stream([ChatMessage("user", "hi")],
                                          GenerationParams(4, 0.0)))
        refused = [small, await big]
        await held.aclose()  # type: ignore[attr-defined]
        assert all(isinstance(error, Busy) for error, _at in refused), refused
        # Neither waited for the big prompt's tokens: it was refused before tokenizing.
        assert max(at for _error, at in refused) - started \
            < await tokenizing_time(full, BIG) / 4


@pytest.mark.asyncio(loop_scope="module")
async def test_shutting_down_while_prompts_are_tokenized_ends_their_streams_clearly() -> None:
    from bot.errors import GenerationError

    generator = TransformersGenerator(BUILTIN_MODEL, CACHE, "cpu")
    await generator.__aenter__()
    streams = [asyncio.create_task(outcome(generator.stream(
        [ChatMessage("user", text)], GenerationParams(4, 0.0)))) for text in (BIG, "hi")]
    await asyncio.sleep(0)  # both are now waiting for their prompts' tokens
    await generator.__aexit__(None, None, None)
    ended = [error for error, _at in await asyncio.gather(*streams)]
    # Not AttributeError (a scheduler gone), not CancelledError (the caller's own).
    assert all(isinstance(error, GenerationError) and "shutting down" in str(error)
               for error in ended), ended
