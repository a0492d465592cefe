"""The classic seq2seq model: corpora, tokenizer, training, decoding, the model folder, the
generator, and ``chinwag train seq2seq`` end to end (trained, then chatted with through the
console). Models here are tiny and train on slices, so that each test takes seconds."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from sqlalchemy.ext.asyncio import AsyncEngine

from bot.app import stored_exchanges
from bot.config import Settings, load_settings
from bot.errors import Busy, ConfigError, GenerationError, ModelUnavailable, TrainingError
from bot.generators import seq2seq as seq2seq_generator
from bot.generators.base import ChatMessage, GenerationParams
from bot.generators.seq2seq import Seq2SeqGenerator
from bot.seq2seq import files
from bot.seq2seq.corpus import Pair, load_pairs, split_by_prompt
from bot.seq2seq.decoding import beam_search, greedy, greedy_steps, sequence_log_prob
from bot.seq2seq.model import Seq2Seq
from bot.seq2seq.options import ModelConfig, TrainOptions
from bot.seq2seq.tokenizer import Seq2SeqTokenizer, encoder_input
from bot.seq2seq.training import Trained, make_examples, train
from bot.store import NewReply, NewUserMessage, Role
from storage.repository import SqlStore
from tests.auxil.platform_replies import AskOn, ask_on_discord, ask_on_telegram
from tests.auxil.process import chinwag
from tests.auxil.waiting import until

TINY = ModelConfig(vocab_size=400, hidden=32, embedding=24, max_source_len=24,
                   max_target_len=24, dropout=0.1)
FAST = TrainOptions(model=TINY, epochs=1, batch_size=16, lr=5e-3)


@pytest.fixture(scope="module")
def english() -> list[Pair]:
    return load_pairs("chatterbot:english")


@pytest.fixture(scope="module")
def trained(english: list[Pair]) -> Trained:
    """One tiny model for the decoding and generator tests (a few epochs on a slice)."""
    return train(english[:400], replace(FAST, epochs=4))


# Corpora


def test_the_chatterbot_corpora_are_read_from_the_installed_package(
        english: list[Pair]) -> None:
    assert len(english) > 2000
    assert Pair("What is AI?", "Artificial Intelligence is the branch of engineering and "
                "science devoted to constructing machines that think.") in english
    chinese = load_pairs("chatterbot:chinese")
    assert len(chinese) > 400 and Pair("你好", "嗨") in chinese
    with pytest.raises(TrainingError, match=r"no language 'klingon'.*english"):
        load_pairs("chatterbot:klingon")


def test_yaml_tsv_and_jsonl_files_give_the_same_pairs(tmp_path: Path) -> None:
    expected = [Pair("Hi", "Hello!"), Pair("Hello!", "How are you?"), Pair("Bye", "See you")]
    (tmp_path / "c.yml").write_text("conversations:\n- - Hi\n  - Hello!\n  - How are you?\n"
                                    "- - Bye\n  - See you\n")
    (tmp_path / "c.yaml").write_text('- [Hi, "Hello!"]\n- ["Hello!", "How are you?"]\n'
                                     "- [Bye, See you]\n")
    (tmp_path / "c.tsv").write_text("Hi\tHello!\nHello!\tHow are you?\n\nBye\tSee you\n")
    (tmp_path / "c.jsonl").write_text("\n".join(
        json.dumps({"prompt": p.prompt, "reply": p.reply}) for p in expected) + "\n")
    for name in ("c.yml", "c.yaml", "c.tsv", "c.jsonl"):
        pairs = load_pairs(str(tmp_path / name))
        assert [Pair(p.prompt, p.reply) for p in pairs] == expected, name
    # A conversation's later turn keeps the turns before it (chat shows the model those too).
    assert [p.context for p in load_pairs(str(tmp_path / "c.yml"))] == [(), ("Hi",), ()]
    assert all(p.context == () for p in load_pairs(str(tmp_path / "c.tsv")))


@pytest.mark.parametrize(("name", "content", "message"), [
    ("bad.tsv", "Hi\tHello\nno tab here\n", r"bad.tsv:2: expected a prompt and a reply"),
    ("bad.tsv", "a\tb\tc\n", r"bad.tsv:1: .*found 3 field"),
    ("bad.jsonl", '{"prompt": "Hi", "reply": "Hello"}\n{"prompt": "Hi"\n',
     r"bad.jsonl:2: not valid JSON"),
    ("bad.jsonl", '{"prompt": "Hi", "answer": "Hello"}\n',
     r"bad.jsonl:1: expected an object with text fields 'prompt' and 'reply'"),
    ("bad.yml", "conversations: [[Hi, [nested]]]\n", r"bad.yml: conversation 1 has a turn"),
    ("bad.yml", "conversations:\n- - only one turn\n", r"conversation 1 is not a list of two"),
    ("bad.yml", "conversations: [\n", r"bad.yml: not valid YAML"),
    ("bad.yml", "just text\n", r"expected a 'conversations' list"),
    ("empty.tsv", "\n\n", r"holds no dialogue pairs"),
    ("pairs.csv", "Hi,Hello\n", r"a corpus file is .yml, .yaml, .tsv or .jsonl"),
])
def test_a_bad_corpus_file_is_one_clear_error(tmp_path: Path, name: str, content: str,
                                              message: str) -> None:
    (tmp_path / name).write_text(content)
    with pytest.raises(TrainingError, match=message):
        load_pairs(str(tmp_path / name))


def test_a_missing_corpus_file_says_so(tmp_path: Path) -> None:
    with pytest.raises(TrainingError, match="cannot read the corpus"):
        load_pairs(str(tmp_path / "nothing.tsv"))


def test_the_split_keeps_each_prompt_on_one_side(english: list[Pair]) -> None:
    train_pairs, held = split_by_prompt(english, 0.1, seed=3)
    assert len(train_pairs) + len(held) == len(english)
    assert {p.prompt for p in train_pairs}.isdisjoint({p.prompt for p in held})
    # The corpus repeats prompts: some held-out prompts have several replies.
    assert len(held) > len({p.prompt for p in held})
    assert split_by_prompt(english, 0.1, seed=3) == (train_pairs, held)


# Tokenizer


def test_the_tokenizer_splits_chinese_per_character_and_english_in_subwords() -> None:
    chinese = load_pairs("chatterbot:chinese")
    tokenizer = Seq2SeqTokenizer.train([t for p in chinese for t in (p.prompt, p.reply)], 2000)
    assert tokenizer.tokens("你好吗?我很好") == ["你", "好", "吗", "?", "我", "很", "好"]
    english = load_pairs("chatterbot:english")
    tokenizer = Seq2SeqTokenizer.train([t for p in english for t in (p.prompt, p.reply)], 1000)
    assert tokenizer.tokens("What is your name?") == ["What", " is", " your", " name", "?"]


def test_any_text_round_trips_through_the_tokenizer(trained: Trained) -> None:
    tokenizer = trained.tokenizer
    for text in ("Hello  world\n", "emoji 😀 and 中文 and naïve", "\u200b\t", "<eos><bot>"):
        assert tokenizer.decode(tokenizer.encode(text)) == text
    # A marker typed in a message is text: it neither ends nor fakes a turn.
    assert not set(tokenizer.encode("<eos> <bot> <user> <pad>")) & set(
        tokenizer.all_special_ids)


def test_head_keeps_at_most_that_many_tokens(trained: Trained) -> None:
    tokenizer = trained.tokenizer
    text = "Unbelievable things happen 你好 😀 every single day"
    for size in range(len(tokenizer.encode(text)) + 1):
        head = tokenizer.head(text, size)
        assert text.startswith(head) and len(tokenizer.encode(head)) <= size
    assert tokenizer.head(text, 1000) == text


def test_the_encoder_input_keeps_the_newest_turns(trained: Trained) -> None:
    tokenizer = trained.tokenizer
    turns = [("user", f"question number {n}") if n % 2 == 0 else ("assistant", f"answer {n}")
             for n in range(40)]
    ids = encoder_input(tokenizer, turns, 24)
    newest = [tokenizer.user_id, *tokenizer.encode("question number 38"),
              tokenizer.bot_id, *tokenizer.encode("answer 39")]
    assert len(ids) == 24 and ids[-len(newest):] == newest
    assert encoder_input(tokenizer, turns[:1], 24) == [tokenizer.user_id,
                                                        *tokenizer.encode("question number 0")]


# Training


def test_training_lowers_the_held_out_perplexity_and_beats_nothing_by_chance(
        trained: Trained) -> None:
    assert trained.held_out_perplexity < trained.initial_perplexity
    assert [e.epoch for e in trained.epochs] == [1, 2, 3, 4]
    assert trained.best_epoch == min(trained.epochs,
                                     key=lambda e: e.held_out_perplexity).epoch
    held = {p.prompt for p in trained.held_out_pairs}
    assert held and held.isdisjoint(p.prompt for p in trained.train_pairs)


def test_the_same_seed_gives_the_same_weights(english: list[Pair]) -> None:
    first = train(english[:150], FAST).model.state_dict()
    again = train(english[:150], FAST).model.state_dict()
    other = train(english[:150], replace(FAST, seed=1)).model.state_dict()
    assert all(torch.equal(first[name], again[name]) for name in first)
    assert not all(torch.equal(first[name], other[name]) for name in first)


@pytest.mark.parametrize("shape", [
    {"cell": "lstm", "bidirectional": True, "attention": "dot"},
    {"cell": "lstm", "bidirectional": False, "attention": "concat", "layers": 2},
    {"cell": "gru", "bidirectional": False, "attention": "general", "layers": 2},
    {"cell": "gru", "bidirectional": True, "attention": "concat"},
])
def test_every_cell_and_attention_trains_saves_and_loads(
        english: list[Pair], shape: dict[str, object], tmp_path: Path) -> None:
    options = replace(FAST, model=replace(TINY, **shape))  # type: ignore[arg-type]
    result = train(english[:200], options)
    assert result.held_out_perplexity < result.initial_perplexity
    files.save(tmp_path, result.model, result.tokenizer, {"corpus": "test"})
    saved = files.load(tmp_path)
    assert saved.model.config == result.model.config and saved.training == {"corpus": "test"}
    source = encoder_input(result.tokenizer, [("user", "What is AI?")], 24)
    bos, eos = result.tokenizer.bos_id, result.tokenizer.eos_id
    assert greedy(saved.model, source, bos, eos, 24) == greedy(result.model, source, bos, eos,
                                                               24)


def test_a_corpus_with_one_prompt_is_refused() -> None:
    with pytest.raises(TrainingError, match="too few"):
        train([Pair("hi", "hello"), Pair("hi", "hey")], FAST)


# Decoding


def _source(trained: Trained, prompt: str) -> list[int]:
    return encoder_input(trained.tokenizer, [("user", prompt)], TINY.max_source_len)


def test_greedy_scores_are_the_model_s_own_probabilities(trained: Trained) -> None:
    bos, eos = trained.tokenizer.bos_id, trained.tokenizer.eos_id
    for prompt in ("Hello", "What is AI?", "Tell me a joke"):
        source = _source(trained, prompt)
        reply = greedy(trained.model, source, bos, eos, 24)
        rescored = sequence_log_prob(trained.model, source, reply.ids, bos, eos)
        assert reply.log_prob == pytest.approx(rescored, abs=1e-4)


def test_beam_search_finds_at_least_what_greedy_finds(trained: Trained) -> None:
    bos, eos = trained.tokenizer.bos_id, trained.tokenizer.eos_id
    for prompt in ("Hello", "What is AI?", "Tell me a joke", "Who are you?"):
        source = _source(trained, prompt)
        best_greedy = greedy(trained.model, source, bos, eos, 24)
        # Width 1 is greedy decoding itself, found by the search alone.
        alone = beam_search(trained.model, source, bos, eos, 24, beam=1, with_greedy=False)
        assert (alone.ids, alone.finished) == (best_greedy.ids, best_greedy.finished)
        assert alone.log_prob == pytest.approx(best_greedy.log_prob, abs=1e-4)
        for width in (2, 4):
            found = beam_search(trained.model, source, bos, eos, 24, beam=width)
            assert found.score() >= best_greedy.score()
            assert found.log_prob == pytest.approx(sequence_log_prob(
                trained.model, source, found.ids, bos, eos), abs=1e-4)


def test_beam_search_wide_enough_finds_the_best_reply_of_all() -> None:
    """Against brute force: every reply of 1 or 2 tokens over a 7-token vocabulary."""
    torch.manual_seed(5)
    model = Seq2Seq(replace(TINY, vocab_size=7, dropout=0.0))
    with torch.no_grad():  # sharper than at initialisation, so that the choices matter
        model.output_bias.copy_(torch.randn(7) * 3)
    source, bos, eos = [3, 5, 6], 1, 2
    vocab = [t for t in range(7) if t != eos]
    replies = [*((a,) for a in vocab), *((a, b) for a in vocab for b in vocab)]
    best = max(replies, key=lambda r: sequence_log_prob(model, source, r, bos, eos))
    found = beam_search(model, source, bos, eos, 2, beam=100, length_penalty=0.0)
    assert found.ids == best
    assert found.log_prob == pytest.approx(sequence_log_prob(model, source, best, bos, eos),
                                           abs=1e-5)
    # A narrow beam is no better, and greedy no better than that.
    narrow = beam_search(model, source, bos, eos, 2, beam=2, length_penalty=0.0)
    assert greedy(model, source, bos, eos, 2).log_prob <= narrow.log_prob <= found.log_prob


# The model folder


def test_loading_a_folder_that_is_not_a_model_says_what_is_wrong(trained: Trained,
                                                                 tmp_path: Path) -> None:
    with pytest.raises(ModelUnavailable, match="not a folder"):
        files.load(tmp_path / "missing")
    with pytest.raises(ModelUnavailable, match=r"has no model\.safetensors"):
        files.load(tmp_path)
    files.save(tmp_path, trained.model, trained.tokenizer, {})
    config = json.loads((tmp_path / "config.json").read_text())
    config["model"]["hidden"] = 64
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelUnavailable, match="cannot load the seq2seq model"):
        files.load(tmp_path)
    files.save(tmp_path, trained.model, trained.tokenizer, {})
    (tmp_path / "tokenizer.json").write_text("{broken")
    with pytest.raises(ModelUnavailable, match="cannot load the tokenizer"):
        files.load(tmp_path)


def test_the_setting_must_name_a_model_folder(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="CHINWAG_MODEL: with CHINWAG_GENERATOR=seq2seq"):
        load_settings(generator="seq2seq")
    with pytest.raises(ConfigError, match="is not a folder"):
        load_settings(generator="seq2seq", model=str(tmp_path / "nowhere"))
    assert load_settings(generator="seq2seq", model=str(tmp_path)).generator == "seq2seq"


# The generator


@pytest.fixture(scope="module")
def model_dir(trained: Trained, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("seq2seq")
    files.save(folder, trained.model, trained.tokenizer, {})
    return folder


PARAMS = GenerationParams(max_new_tokens=20, temperature=0.7)


async def test_the_generator_streams_the_greedy_reply_token_by_token(
        trained: Trained, model_dir: Path) -> None:
    messages = [ChatMessage("system", "You are a helpful assistant."),
                ChatMessage("user", "What is AI?")]
    source = _source(trained, "What is AI?")
    expected = greedy(trained.model, source, trained.tokenizer.bos_id,
                      trained.tokenizer.eos_id, 20)
    async with Seq2SeqGenerator(model_dir) as generator:
        assert generator.health() is None and generator.context_window is None
        assert generator.source_ids(messages) == source  # the system prompt is left out
        pieces = [piece async for piece in generator.stream(messages, PARAMS)]
    assert "".join(pieces) == trained.tokenizer.decode(expected.ids)
    assert len(pieces) > 1
    assert generator.health() == "the model is not loaded"


async def test_training_renders_a_later_turn_as_chat_renders_the_turns_before_it(
        trained: Trained, model_dir: Path, english: list[Pair]) -> None:
    # The shortest, so that all three turns fit in the tiny model's 24 source tokens.
    pair = min((p for p in english if len(p.context) == 2),
               key=lambda p: len("".join([*p.context, p.prompt])))
    first, answer = pair.context
    messages = [ChatMessage("system", "You are a helpful assistant."),
                ChatMessage("user", first), ChatMessage("assistant", answer),
                ChatMessage("user", pair.prompt)]
    [example] = make_examples([pair], trained.tokenizer, TINY)
    async with Seq2SeqGenerator(model_dir) as generator:
        assert example.source == generator.source_ids(messages)
    tokenizer = trained.tokenizer
    assert example.source == encoder_input(
        tokenizer, [("user", first), ("assistant", answer), ("user", pair.prompt)],
        TINY.max_source_len)
    assert tokenizer.bot_id in example.source  # the <bot> marker is trained on
    [single] = make_examples([Pair(pair.prompt, pair.reply)], tokenizer, TINY)
    assert single.source == _source(trained, pair.prompt)


async def test_beam_search_shows_the_reply_at_once(trained: Trained, model_dir: Path) -> None:
    source = _source(trained, "Hello")
    expected = beam_search(trained.model, source, trained.tokenizer.bos_id,
                           trained.tokenizer.eos_id, 20, beam=3)
    async with Seq2SeqGenerator(model_dir, beam=3) as generator:
        pieces = [p async for p in generator.stream([ChatMessage("user", "Hello")], PARAMS)]
    assert expected.ids and pieces == [trained.tokenizer.decode(expected.ids)]


async def test_a_stop_string_ends_the_reply_there(trained: Trained, model_dir: Path) -> None:
    async with Seq2SeqGenerator(model_dir) as generator:
        whole = "".join([p async for p in generator.stream([ChatMessage("user", "Hi")],
                                                           PARAMS)])
        stop = whole[len(whole) // 2:][:2]
        assert stop
        cut = "".join([p async for p in generator.stream(
            [ChatMessage("user", "Hi")], replace(PARAMS, stop=(stop,)))])
    assert cut == whole[:whole.index(stop)]


async def test_closing_the_stream_early_stops_the_decoding(model_dir: Path) -> None:
    async with Seq2SeqGenerator(model_dir, max_requests=1) as generator:
        stream = generator.stream([ChatMessage("user", "Hello")], PARAMS)
        assert await anext(stream)
        with pytest.raises(Busy):  # one reply at a time here, and one is being written
            await anext(generator.stream([ChatMessage("user", "Hi")], PARAMS))
        await stream.aclose()
        # Its place is free again, and the decoding thread is too.
        assert "".join([p async for p in generator.stream([ChatMessage("user", "Hi")],
                                                          PARAMS)])


async def test_closing_drops_a_queued_reply_with_an_error_not_a_hang(
        model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    started, release = threading.Event(), threading.Event()

    def held_steps(*args: Any, **kwargs: Any) -> Iterator[tuple[int, torch.Tensor]]:
        if not started.is_set():  # the first reply holds the only decoding thread
            started.set()
            release.wait(timeout=30)
        yield from greedy_steps(*args, **kwargs)

    monkeypatch.setattr(seq2seq_generator, "greedy_steps", held_steps)

    async def reply(generator: Seq2SeqGenerator, text: str) -> str:
        return "".join([p async for p in generator.stream([ChatMessage("user", text)],
                                                          PARAMS)])

    generator = Seq2SeqGenerator(model_dir, threads=1)
    await generator.__aenter__()
    # Started together, on one thread: the first's decoding runs (and is held) while the
    # second's waits for the thread, its input already encoded.
    first = asyncio.create_task(reply(generator, "Hello"))
    second = asyncio.create_task(reply(generator, "Hi"))
    await until(started.is_set, "the first reply's decoding")
    pool = generator._pool
    assert pool is not None
    await until(lambda: pool._work_queue.qsize() == 1, "the second reply's decoding queued")
    closing = asyncio.create_task(generator.__aexit__(None, None, None))
    try:
        with pytest.raises(GenerationError, match="the model is shutting down"):
            await asyncio.wait_for(second, 10)  # before the fix: waited for ever
    finally:
        release.set()
        await closing
    assert await first  # the running one finished
    assert generator.health() == "the model is not loaded"


async def test_tokens_are_counted_and_a_long_history_is_cut_from_its_oldest_end(
        trained: Trained, model_dir: Path) -> None:
    tokenizer = trained.tokenizer
    history = [ChatMessage("user" if n % 2 == 0 else "assistant", f"turn number {n} here")
               for n in range(30)]
    async with Seq2SeqGenerator(model_dir) as generator:
        assert generator.count_tokens("user", "What is AI?") == \
            len(tokenizer.encode("What is AI?")) + 1
        assert generator.count_tokens("system", "You are a bot.") == 0
        assert generator.truncate("What is AI?", 2) == tokenizer.head("What is AI?", 2)
        source = generator.source_ids([ChatMessage("system", "persona"), *history])
        newest = [tokenizer.user_id, *tokenizer.encode("turn number 28 here"),
                  tokenizer.bot_id, *tokenizer.encode("turn number 29 here")]
        assert len(source) == TINY.max_source_len and source[-len(newest):] == newest
        # However long the history, the reply comes (the encoder sees its newest tokens).
        pieces = [p async for p in generator.stream(history * 50, PARAMS)]
        assert "".join(pieces)


async def test_the_generator_refuses_a_folder_without_a_model(tmp_path: Path) -> None:
    with pytest.raises(ModelUnavailable, match="has no"):
        async with Seq2SeqGenerator(tmp_path):
            pass


# The bot's own conversations as a corpus


async def test_stored_exchanges_pair_each_user_message_with_its_reply(
        any_engine: AsyncEngine, any_database_url: str) -> None:
    store = SqlStore(any_engine)
    conversation = await store.conversation("telegram:1")

    async def ask(text: str, platform_id: str) -> int:
        admission = await store.add_user_message(NewUserMessage(
            conversation_id=conversation.id, platform="telegram", author_id="u1",
            author_name="U", platform_message_id=platform_id, text=text, tokens=1,
            reply_to_platform_id=None))
        return admission.message.id

    async def answer(question: int, text: str, platform_id: str) -> None:
        await store.add_reply(NewReply(
            conversation_id=conversation.id, reply_to_id=question, platform="telegram",
            author_id="u1", text=text, tokens=1, prompt_tokens=1, generation_ms=1,
            platform_message_ids=[platform_id]))

    first = await ask("hello", "m1")
    unanswered = await ask("anyone?", "m2")
    third = await ask("how are you", "m3")
    await answer(third, "fine, thanks", "b1")
    await answer(first, "hi there", "b2")
    assert unanswered
    exchanges = await store.exchanges(0, 10)
    assert [(e.prompt, e.reply) for e in exchanges] == [("how are you", "fine, thanks"),
                                                         ("hello", "hi there")]
    assert [e.prompt for e in await store.exchanges(exchanges[0].reply_id, 10)] == ["hello"]
    assert await store.exchanges(0, 1) == exchanges[:1]
    assert await stored_exchanges(any_database_url, page=1) == [
        Pair("how are you", "fine, thanks"), Pair("hello", "hi there")]


# The command, end to end


def test_train_then_chat_through_the_console(tmp_path: Path) -> None:
    corpus = tmp_path / "pairs.tsv"
    corpus.write_text("".join(f"question {n}\tI am a bot.\n" for n in range(30)))
    out = tmp_path / "model"
    env = {"CHINWAG_DATA_DIR": str(tmp_path / "data"), "CHINWAG_GENERATOR": "seq2seq",
           "CHINWAG_MODEL": str(out)}  # set already: training does not need it to exist
    result = chinwag("train", "seq2seq", "--corpus", str(corpus), "--out", str(out),
                     "--epochs", "12", "--hidden", "32", "--embedding", "24", "--vocab", "300",
                     "--lr", "0.01", "--batch-size", "8", env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "30 pairs from" in result.stdout and "epoch 1: loss" in result.stdout
    assert f"saved to {out}" in result.stdout
    assert {p.name for p in out.iterdir()} == {"model.safetensors", "config.json",
                                              "tokenizer.json"}
    summary = json.loads((out / "config.json").read_text())["training"]
    assert summary["held_out_perplexity"] < summary["unigram_perplexity"]
    chat = chinwag("console", stdin="question 7\nsomething new\n", env=env, timeout=120)
    assert chat.returncode == 0, chat.stderr
    assert chat.stdout.splitlines() == ["I am a bot.", "I am a bot."], chat.stdout


def test_train_on_the_bot_s_own_conversations(tmp_path: Path) -> None:
    env = {"CHINWAG_DATA_DIR": str(tmp_path), "CHINWAG_GENERATOR": "echo"}
    said = "".join(f"echo {n}\n" for n in range(12))
    assert chinwag("console", stdin=said, env=env, timeout=120).returncode == 0
    result = chinwag("train", "seq2seq", "--corpus", "db", "--epochs", "1", "--hidden", "16",
                     "--embedding", "16", "--vocab", "280", env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("12 pairs from db")
    assert (tmp_path / "models" / "seq2seq-db" / "model.safetensors").is_file()


def test_a_bad_corpus_stops_the_command_with_one_line(tmp_path: Path) -> None:
    (tmp_path / "bad.jsonl").write_text("{not json}\n")
    result = chinwag("train", "seq2seq", "--corpus", str(tmp_path / "bad.jsonl"),
                     env={"CHINWAG_DATA_DIR": str(tmp_path)}, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("chinwag: error: ")
    assert "bad.jsonl:1: not valid JSON" in result.stderr and "Traceback" not in result.stderr


# Review regressions: hostile model folders, --out, corpus names


@pytest.mark.parametrize("change", [
    {"vocab_size": 10 ** 12}, {"hidden": 10 ** 9}, {"layers": 0}, {"max_source_len": -1},
    {"hidden": True}, {"dropout": 2.0}, {"bidirectional": "no"}])
def test_a_config_with_absurd_sizes_is_refused_without_allocating_them(
        trained: Trained, tmp_path: Path, change: dict[str, object]) -> None:
    files.save(tmp_path, trained.model, trained.tokenizer, {})
    config = json.loads((tmp_path / "config.json").read_text())
    config["model"].update(change)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelUnavailable, match="cannot load the seq2seq model"):
        files.load(tmp_path)


def test_a_config_that_is_not_an_object_is_refused(trained: Trained, tmp_path: Path) -> None:
    files.save(tmp_path, trained.model, trained.tokenizer, {})
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ModelUnavailable, match="cannot load the seq2seq model"):
        files.load(tmp_path)


def test_out_never_overwrites_another_model_s_folder(trained: Trained, tmp_path: Path) -> None:
    other = tmp_path / "qwen"
    other.mkdir()
    (other / "config.json").write_text('{"model_type": "qwen2"}')
    (other / "tokenizer.json").write_text("{}")
    with pytest.raises(TrainingError, match="another kind of model"):
        files.save(other, trained.model, trained.tokenizer, {})
    assert (other / "tokenizer.json").read_text() == "{}"
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("keep me")
    with pytest.raises(TrainingError, match="not empty"):
        files.check_writable(notes)
    files.save(tmp_path / "mine", trained.model, trained.tokenizer, {})
    files.save(tmp_path / "mine", trained.model, trained.tokenizer, {})  # retraining: fine
    assert files.load(tmp_path / "mine").model.config == trained.model.config


def test_a_chatterbot_language_is_a_name_not_a_path() -> None:
    with pytest.raises(TrainingError, match="has no language"):
        load_pairs("chatterbot:../data/english")


def test_the_command_refuses_a_foreign_out_folder_before_training(tmp_path: Path) -> None:
    from bot.seq2seq.command import TrainCommand, run

    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    read: list[str] = []

    def stored() -> list[Pair]:
        read.append("db")
        return [Pair("a", "b"), Pair("c", "d")]

    with pytest.raises(TrainingError, match="another kind of model"):
        run(TrainCommand("db", tmp_path, FAST), tmp_path, stored, write=lambda _: None)
    assert read == []  # refused before the corpus was even read


# Through the platforms


@pytest.mark.parametrize("ask", [ask_on_telegram, ask_on_discord],
                         ids=["telegram", "discord"])
async def test_a_trained_model_answers_through_the_platform(
        ask: AskOn, model_dir: Path, store: SqlStore, settings: Settings,
        monkeypatch: pytest.MonkeyPatch) -> None:
    settings = settings.model_copy(update={"max_reply_tokens": 16})
    async with Seq2SeqGenerator(model_dir) as generator:
        answered = await ask(store, settings, generator, monkeypatch, "What is AI?")
    assert answered.shown.strip() and answered.shown == answered.own
    assert [(row.role, row.text) for row in answered.stored] == [
        (Role.USER, "What is AI?"), (Role.ASSISTANT, answered.shown)]
