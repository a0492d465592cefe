"""Encoder–decoder models (T5, BART, Marian…) in the transformers generator, on tiny
random models and a tokenizer trained here, loaded from a folder as a user's model is."""

from __future__ import annotations

import logging
import re
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio

from adapters.openai_server import OpenAIServer
from bot.config import Settings
from bot.generators import ChatMessage, GenerationParams
from bot.generators.encoder_decoder import EncoderDecoderScheduler
from bot.generators.encoder_prompt import DEFAULT_INPUT_TOKENS, input_limit
from bot.generators.huggingface import TransformersGenerator
from bot.generators.scheduler import Request
from bot.store import Role
from storage.repository import SqlStore
from tests.auxil.platform_replies import AskOn, ask_on_discord, ask_on_telegram
from tests.auxil.process import chinwag
from tests.auxil.waiting import until

WORDS = ("the a cat dog sat on mat red blue green sky sea sun moon star tree house road car "
         "bird fish runs jumps sleeps eats sings big small old new happy sad fast slow hello "
         "there how are you what is capital of France Paris User Bot : , . ? ! one two three "
         "four five six seven eight nine ten").split()
SPECIALS = ["<pad>", "</s>", "<s>", "<unk>"]  # ids 0, 1, 2, 3
PAD, EOS, BOS = 0, 1, 2
TOKENIZER_LIMIT = 48
POSITIONS = 64
QUESTIONS = ["hello there", "what is the capital of France ?", "one two three",
             "the red car runs fast", "big dog eats fish"]
SMALL: dict[str, Any] = {
    "d_model": 32, "encoder_layers": 2, "decoder_layers": 2, "encoder_attention_heads": 4,
    "decoder_attention_heads": 4, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64,
    "max_position_embeddings": POSITIONS, "pad_token_id": PAD, "eos_token_id": EOS,
    "bos_token_id": BOS}
"""The size of the BART-like models here: tiny, so that the tests take a second."""


def greedy(tokens: int = 20, stop: tuple[str, ...] = ()) -> GenerationParams:
    # A repetition penalty keeps a random model from saying one word for ever.
    return GenerationParams(max_new_tokens=tokens, temperature=0.0, repetition_penalty=1.5,
                            stop=stop)


def tokenizer(limit: int | None = TOKENIZER_LIMIT, chat_template: str | None = None) -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    model = Tokenizer(models.WordLevel(unk_token="<unk>"))
    model.pre_tokenizer = pre_tokenizers.Whitespace()
    model.train_from_iterator([" ".join(WORDS)],
                              trainers.WordLevelTrainer(special_tokens=SPECIALS))
    # Like T5's: each text ends with </s>.
    model.post_processor = processors.TemplateProcessing(single="$A </s>",
                                                         special_tokens=[("</s>", EOS)])
    extra = {} if limit is None else {"model_max_length": limit}
    fast = PreTrainedTokenizerFast(tokenizer_object=model, pad_token="<pad>", eos_token="</s>",
                                   bos_token="<s>", unk_token="<unk>", **extra)
    if chat_template is not None:
        fast.chat_template = chat_template
    return fast


def save(folder: Path, family: str, limit: int | None = TOKENIZER_LIMIT,
         chat_template: str | None = None) -> Path:
    """A random model of this family and the local tokenizer, as ``save_pretrained``
    writes them for a user's folder."""
    import torch
    import transformers as tf

    tok = tokenizer(limit, chat_template)
    torch.manual_seed(0)
    # Large initial weights (initializer_factor, init_std) make a random model's words
    # depend on its input, so that the replies compared here differ from prompt to prompt.
    vocab = len(tok)
    if family == "t5":
        model: Any = tf.T5ForConditionalGeneration(tf.T5Config(
            vocab_size=vocab, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
            initializer_factor=10.0, pad_token_id=PAD, eos_token_id=EOS,
            decoder_start_token_id=PAD))
    elif family == "bart":
        model = tf.BartForConditionalGeneration(tf.BartConfig(
            vocab_size=vocab, init_std=0.5, decoder_start_token_id=EOS, **SMALL))
        # Forced first tokens go through the decoder prefix, as BART summarisers' do.
        model.generation_config.forced_bos_token_id = BOS
    elif family == "marian":
        model = tf.MarianMTModel(tf.MarianConfig(
            vocab_size=vocab, decoder_vocab_size=vocab, init_std=0.5,
            decoder_start_token_id=PAD, **SMALL))
    else:  # m2m_100: positions the scheduler cannot set per row
        model = tf.M2M100ForConditionalGeneration(tf.M2M100Config(
            vocab_size=vocab, init_std=0.5, decoder_start_token_id=EOS, **SMALL))
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    made: dict[tuple[Any, ...], Path] = {}

    def folder(family: str, limit: int | None = TOKENIZER_LIMIT,
               chat_template: str | None = None) -> Path:
        key = (family, limit, chat_template)
        if key not in made:
            made[key] = save(tmp_path_factory.mktemp(family), family, limit, chat_template)
        return made[key]

    return folder


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def t5(folders: Callable[..., Path],
             tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[TransformersGenerator]:
    async with TransformersGenerator(str(folders("t5")), tmp_path_factory.mktemp("cache"),
                                     "cpu", dtype="float32", max_sequences=8) as generator:
        yield generator


def scheduler_of(generator: TransformersGenerator) -> EncoderDecoderScheduler:
    scheduler = generator.scheduler
    assert isinstance(scheduler, EncoderDecoderScheduler)
    return scheduler


class Run:
    """One request straight to the scheduler, its token ids collected. With ``hold_at``,
    the scheduler's thread waits at that token until ``release`` is set, so that a test
    knows where the batch is when the next request arrives."""

    def __init__(self, generator: TransformersGenerator, text: str,
                 params: GenerationParams, *, ignore_eos: bool = False,
                 hold_at: int | None = None) -> None:
        self.tokens: list[int] = []
        self.ended = threading.Event()
        self.held, self.release = threading.Event(), threading.Event()
        self._hold_at = hold_at
        self.request = Request(generator.prompt_ids([ChatMessage("user", text)]), params,
                               self._emit, ignore_eos=ignore_eos)
        scheduler_of(generator).submit(self.request)

    def _emit(self, item: int | BaseException | None) -> None:
        if isinstance(item, int):
            self.tokens.append(item)
            if len(self.tokens) == self._hold_at:
                self.held.set()
                self.release.wait(timeout=30)
        else:
            assert item is None, item
            self.ended.set()

    async def done(self) -> list[int]:
        await until(self.ended.is_set, "the reply's end")
        return self.tokens


async def stream(generator: TransformersGenerator, messages: list[ChatMessage],
                 params: GenerationParams) -> list[str]:
    return [piece async for piece in generator.stream(messages, params)]


@pytest.mark.asyncio(loop_scope="module")
async def test_the_config_picks_the_encoder_decoder_path_and_its_input_limit(
        t5: TransformersGenerator, folders: Callable[..., Path], tmp_path: Path) -> None:
    from transformers import AutoConfig, T5ForConditionalGeneration

    scheduler = scheduler_of(t5)
    assert isinstance(scheduler._model, T5ForConditionalGeneration)
    assert t5.context_window == TOKENIZER_LIMIT  # the tokenizer's model_max_length
    assert not t5.window_holds_reply
    # Without a tokenizer limit: BART's position table; T5 (relative positions): 512.
    assert input_limit(AutoConfig.from_pretrained(folders("bart", limit=None)),
                       tokenizer(limit=None)) == POSITIONS
    assert input_limit(AutoConfig.from_pretrained(folders("t5", limit=None)),
                       tokenizer(limit=None)) == DEFAULT_INPUT_TOKENS


@pytest.mark.asyncio(loop_scope="module")
async def test_replies_stream_in_pieces(t5: TransformersGenerator) -> None:
    pieces = await stream(t5, [ChatMessage("user", "hello there how are you ?")], greedy())
    assert len(pieces) > 3
    assert all(word in WORDS for word in "".join(pieces).split())


@pytest.mark.parametrize("family", ["t5", "bart", "marian", "m2m_100"])
@pytest.mark.asyncio(loop_scope="module")
async def test_greedy_tokens_are_the_same_alone_and_joining_a_running_batch(
        family: str, folders: Callable[..., Path], tmp_path: Path) -> None:
    # fp32: greedy tokens alone and batched are identical there (bf16 rounds per batch).
    async with TransformersGenerator(str(folders(family)), tmp_path, "cpu",
                                     dtype="float32") as generator:
        params = greedy(24)
        alone = [await Run(generator, q, params, ignore_eos=True).done() for q in QUESTIONS]
        assert len({tuple(tokens) for tokens in alone}) == len(QUESTIONS)  # the test can fail
        # Two start together; each of the others joins three tokens after the one before.
        runs = [Run(generator, QUESTIONS[0], params, ignore_eos=True),
                Run(generator, QUESTIONS[1], params, ignore_eos=True, hold_at=3)]
        for question in QUESTIONS[2:]:
            await until(runs[-1].held.is_set, "the batch to be mid-reply")
            runs.append(Run(generator, question, params, ignore_eos=True, hold_at=3))
            runs[-2].release.set()
        runs[-1].release.set()
        together = [await run.done() for run in runs]
        scheduler = scheduler_of(generator)
    assert together == alone
    if family == "m2m_100":  # admitted groups decode side by side, one forward each
        assert not scheduler._merging
    else:
        assert scheduler._merging and scheduler.max_batch >= 4


@pytest.mark.parametrize("family", ["t5", "bart"])
@pytest.mark.asyncio(loop_scope="module")
async def test_greedy_replies_are_transformers_generates(
        family: str, folders: Callable[..., Path], tmp_path: Path) -> None:
    import torch

    # fp32: greedy tokens alone and batched are identical there (bf16 rounds per batch).
    async with TransformersGenerator(str(folders(family)), tmp_path, "cpu",
                                     dtype="float32") as generator:
        model = scheduler_of(generator)._model
        prefix = 2 if family == "bart" else 1  # BART's forced BOS is generate's first token
        for question in QUESTIONS:
            run = Run(generator, question, greedy(20))
            ours = await run.done()
            prompt = torch.tensor([run.request.prompt])
            # generate's repetition penalty counts the decoder's input, start token included.
            theirs = model.generate(prompt, attention_mask=torch.ones_like(prompt),
                                    max_new_tokens=20 + prefix - 1, do_sample=False,
                                    num_beams=1, repetition_penalty=1.5, min_length=0,
                                    no_repeat_ngram_size=0, forced_eos_token_id=None,
                                    eos_token_id=EOS, pad_token_id=PAD)[0].tolist()[prefix:]
            assert ours == (theirs[:theirs.index(EOS)] if EOS in theirs else theirs)


@pytest.mark.asyncio(loop_scope="module")
async def test_max_tokens_and_stop_strings_are_honoured(t5: TransformersGenerator) -> None:
    ask = [ChatMessage("system", "the cat sat ."),
           ChatMessage("user", "what is the capital of France ?")]
    run = Run(t5, "the red car runs fast", greedy(7), ignore_eos=True)
    assert len(await run.done()) == 7
    full = "".join(await stream(t5, ask, greedy(20)))
    words = full.split()
    assert len(words) > 4
    cut = "".join(await stream(t5, ask, greedy(20, stop=(" " + words[3],))))
    assert cut == full[:full.index(" " + words[3])]


@pytest.mark.asyncio(loop_scope="module")
async def test_the_decoder_stops_at_the_end_of_its_position_table(
        folders: Callable[..., Path], tmp_path: Path) -> None:
    # fp32: greedy tokens alone and batched are identical there (bf16 rounds per batch).
    async with TransformersGenerator(str(folders("bart")), tmp_path, "cpu",
                                     dtype="float32") as generator:
        run = Run(generator, "hello", greedy(1000), ignore_eos=True)
        # Start token and forced BOS take the first two of its 64 positions.
        assert len(await run.done()) == POSITIONS - 2


@pytest.mark.asyncio(loop_scope="module")
async def test_closing_a_stream_frees_its_row(t5: TransformersGenerator) -> None:
    scheduler = scheduler_of(t5)
    params = GenerationParams(max_new_tokens=5000, temperature=0.0)
    pieces = t5.stream([ChatMessage("user", "one two three")], params, ignore_eos=True)
    for _ in range(3):
        await anext(pieces)
    assert len(scheduler._rows) == 1
    await pieces.aclose()  # type: ignore[attr-defined]
    await until(lambda: not scheduler._rows and not scheduler._batches
                and scheduler._count == 0, "the row to be freed")
    assert len(await Run(t5, "hello", greedy(4), ignore_eos=True).done()) == 4


@pytest.mark.asyncio(loop_scope="module")
async def test_token_counts_add_up_to_the_rendered_prompt(t5: TransformersGenerator) -> None:
    messages = [ChatMessage("system", "the cat sat on the mat ."),
                ChatMessage("user", "hello there , how are you ?"),
                ChatMessage("assistant", "happy ! and you ?"),
                ChatMessage("user", "what is the capital of France ?")]
    ids = t5.prompt_ids(messages)
    counted = sum(t5.count_tokens(m.role, m.content) for m in messages) + t5.prompt_overhead
    assert counted == len(ids)
    words = t5._tokenizer.decode(ids, skip_special_tokens=True).split()
    assert words[:8] == "the cat sat on the mat . User".split()
    assert words[-6:] == "capital of France ? Bot :".split()


@pytest.mark.asyncio(loop_scope="module")
async def test_a_long_history_is_cut_from_the_oldest_end(t5: TransformersGenerator) -> None:
    system = ChatMessage("system", "the cat sat .")
    turns = [ChatMessage("user" if n % 2 == 0 else "assistant",
                         f"{WORDS[n]} {WORDS[n + 1]} {WORDS[n + 2]} {WORDS[n + 3]}")
             for n in range(20)]  # 20 turns of 7 tokens each: far beyond 48
    ids = t5.prompt_ids([system, *turns])
    assert len(ids) <= TOKENIZER_LIMIT
    counts = [t5.count_tokens(m.role, m.content) for m in turns]
    room = TOKENIZER_LIMIT - t5.prompt_overhead - t5.count_tokens("system", system.content)
    kept = max(n for n in range(len(turns) + 1) if sum(counts[len(turns) - n:]) <= room)
    assert 0 < kept < len(turns)
    assert ids == t5.prompt_ids([system, *turns[len(turns) - kept:]])
    # Even one message beyond the limit: its newest tokens are kept.
    huge = " ".join(WORDS * 2)
    ids = t5.prompt_ids([system, ChatMessage("user", huge)])
    assert len(ids) == TOKENIZER_LIMIT
    assert t5._tokenizer.decode(ids, skip_special_tokens=True).endswith("ten Bot :")


TEMPLATE = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} . {% endfor %}"
            "{% if add_generation_prompt %}Bot :{% endif %}")


@pytest.mark.asyncio(loop_scope="module")
async def test_a_chat_template_is_used_when_the_tokenizer_has_one(
        folders: Callable[..., Path], tmp_path: Path) -> None:
    messages = [ChatMessage("system", "the cat sat ."), ChatMessage("user", "hello there")]
    async with TransformersGenerator(str(folders("t5", chat_template=TEMPLATE)), tmp_path,
                                     "cpu") as generator:
        tok = generator._tokenizer
        expected = tok.apply_chat_template([{"role": m.role, "content": m.content}
                                            for m in messages],
                                           add_generation_prompt=True, tokenize=True,
                                           return_dict=True)["input_ids"]
        assert generator.prompt_ids(messages) == list(expected)
        assert "User" not in tok.decode(expected)  # not the plain rendering
        counted = sum(generator.count_tokens(m.role, m.content) for m in messages)
        assert abs(counted + generator.prompt_overhead - len(expected)) <= 2
        assert await stream(generator, messages, greedy(6))


@pytest.mark.asyncio(loop_scope="module")
async def test_several_workers_asked_for_still_run_it_in_this_process(
        folders: Callable[..., Path], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="bot.generators.huggingface")
    async with TransformersGenerator(str(folders("bart")), tmp_path, "cpu",
                                     workers=2) as generator:
        assert isinstance(generator.scheduler, EncoderDecoderScheduler)
        assert await stream(generator, [ChatMessage("user", "hello")], greedy(4))
    assert "runs in this process (CHINWAG_WORKERS=2" in caplog.text


@pytest.mark.asyncio(loop_scope="module")
async def test_chinwag_serve_keeps_no_room_for_the_reply_in_the_encoders_window(
        t5: TransformersGenerator) -> None:
    async with OpenAIServer(t5, "tiny-t5", host="127.0.0.1", port=0) as server, \
            httpx.AsyncClient(base_url=server.url) as http:
        answered = await http.post("/chat/completions", json={
            "model": "tiny-t5", "max_tokens": 200, "temperature": 0,
            "messages": [{"role": "user", "content": "hello there"}]})
        refused = await http.post("/chat/completions", json={
            "model": "tiny-t5", "max_tokens": 5,
            "messages": [{"role": "user", "content": " ".join(WORDS)}]})
    assert answered.status_code == 200, answered.text
    assert answered.json()["choices"][0]["message"]["content"]
    assert refused.status_code == 400
    message = refused.json()["error"]["message"]
    assert f"context window of {TOKENIZER_LIMIT}" in message
    assert "max_tokens" not in message  # lowering it would not help: the reply is not in it


def test_the_console_answers_with_an_encoder_decoder_model(
        folders: Callable[..., Path], tmp_path: Path) -> None:
    lines = ["hello there", "what is the capital of France ?", "the red car runs fast",
             "big dog eats fish", "the sun and the moon"]
    env = {"CHINWAG_DATA_DIR": str(tmp_path), "CHINWAG_MODEL": str(folders("t5")),
           "CHINWAG_DEVICE": "cpu", "CHINWAG_TEMPERATURE": "0",
           "CHINWAG_SYSTEM_PROMPT": "the cat sat .", "CHINWAG_MAX_REPLY_TOKENS": "20",
           "CHINWAG_MODEL_CACHE_DIR": str(tmp_path / "cache")}
    result = chinwag("-v", "console", stdin="\n".join(lines) + "\n", env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    rows = sqlite3.connect(tmp_path / "chinwag.db").execute(
        "select role, text, tokens, state from messages order by id").fetchall()
    assert [row[0] for row in rows] == ["user", "assistant"] * len(lines)
    assert all(state == "answered" for *_, state in rows[::2])
    replies = [text for _, text, tokens, _ in rows[1::2] if text and tokens > 0]
    assert len(replies) >= 3 and all(text in result.stdout for text in replies)
    prompts = [int(n) for n in re.findall(r"answering \S+ with (\d+) prompt tokens",
                                          result.stderr)]
    assert len(prompts) == len(lines) and max(prompts) <= TOKENIZER_LIMIT
    # The history fills the encoder's window, none of it kept for the reply: a decoder-only
    # budget would keep 20 of the 48 tokens free and allow prompts of 20 at most.
    assert max(prompts) > TOKENIZER_LIMIT - 20


@pytest.mark.parametrize("ask", [ask_on_telegram, ask_on_discord],
                         ids=["telegram", "discord"])
async def test_an_encoder_decoder_model_answers_through_the_platform(
        ask: AskOn, folders: Callable[..., Path], store: SqlStore, settings: Settings,
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Greedy (temperature 0), so that the generator asked again writes the same reply.
    settings = settings.model_copy(update={"temperature": 0.0, "max_reply_tokens": 16,
                                           "repetition_penalty": 1.5})
    async with TransformersGenerator(str(folders("t5")), tmp_path / "cache",
                                     "cpu") as generator:
        answered = await ask(store, settings, generator, monkeypatch, "hello there")
    assert answered.shown.strip() and answered.shown == answered.own
    assert all(word in WORDS for word in answered.shown.split())
    assert [(row.role, row.text) for row in answered.stored] == [
        (Role.USER, "hello there"), (Role.ASSISTANT, answered.shown)]
