"""Incremental decoding against the full decode, on the built-in model's tokenizer and on a
byte-fallback tokenizer (the SentencePiece kind: ``<0xE6>`` pieces) built here with
``tokenizers``."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from bot.config import BUILTIN_MODEL
from bot.generators import model_files
from bot.generators.reply_text import MAX_PENDING, ReplyDecoder

CACHE = Path("~/.cache/chinwag").expanduser()


@pytest.fixture(scope="module")
def builtin() -> Any:
    tokenizer, _config = model_files.load_tokenizer(BUILTIN_MODEL, CACHE)
    return tokenizer


def streamed(tokenizer: Any, ids: list[int]) -> tuple[list[str], int]:
    """The pieces a stream shows, and the widest window any step decoded."""
    decoder = ReplyDecoder(tokenizer)
    pieces, widest = [], 0
    for token in ids:
        pieces.append(decoder.step(token))
        widest = max(widest, decoder.window)
    return [*pieces, decoder.finish()], widest


@pytest.mark.model
def test_special_tokens_are_skipped_without_widening_the_window(builtin: Any) -> None:
    # <|endoftext|> over and over (ignore_eos), then text again: the window stays a few
    # tokens wide, so each token costs the same (it used to grow to the whole run).
    word = builtin.encode(" hello", add_special_tokens=False)
    ids = [*word, *[builtin.eos_token_id, 0, 1] * 700, *builtin.encode(" world 😀 日本",
                                                                      add_special_tokens=False)]
    pieces, widest = streamed(builtin, ids)
    assert "".join(pieces) == builtin.decode(ids, skip_special_tokens=True) == \
        " hello world 😀 日本"
    assert widest <= 8, widest


@pytest.mark.model
def test_a_long_run_of_broken_bytes_keeps_the_window_bounded(builtin: Any) -> None:
    broken = next(i for i in range(len(builtin))
                  if builtin.decode([i, i]) == "\ufffd\ufffd")  # a lone continuation byte
    ids = [*builtin.encode("Text", add_special_tokens=False), *[broken] * 1000,
           *builtin.encode(" more", add_special_tokens=False)]
    pieces, widest = streamed(builtin, ids)
    assert "".join(pieces) == builtin.decode(ids, skip_special_tokens=True)
    assert widest <= 2 * MAX_PENDING + 2, widest


def byte_fallback_tokenizer() -> tuple[Any, dict[str, int]]:
    """A Llama-style tokenizer: words, then one ``<0xNN>`` piece per byte of the rest."""
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    for word in ["▁", "▁Hello", "▁world", "▁a", "a", "b", "▁b", "!", "▁!", "x", "é", "日本"]:
        vocab.setdefault(word, len(vocab))
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True,
                                fuse_unk=True))
    core.normalizer = normalizers.Sequence([normalizers.Prepend("▁"),
                                            normalizers.Replace(" ", "▁")])
    core.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                      decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>",  # type: ignore[no-untyped-call]
                                        eos_token="</s>", unk_token="<unk>")
    return tokenizer, vocab


def test_byte_fallback_runs_stream_as_the_full_decode_shows_them() -> None:
    # A run of byte pieces decodes as a whole: one invalid byte anywhere in it turns every
    # byte of the run into U+FFFD, so "日" must not be shown before the run ends.
    tokenizer, vocab = byte_fallback_tokenizer()
    byte = {b: vocab[f"<0x{b:02X}>"] for b in range(256)}
    stray = [byte[b] for b in [*range(0x80, 0xC0), *range(0xC2, 0xF5)]]
    rng = random.Random(1)
    cases = [[*(byte[b] for b in "日".encode()), byte[0xAE], vocab["é"]]]
    for _ in range(3000):
        ids: list[int] = []
        for _ in range(rng.randint(1, 15)):
            roll = rng.random()
            if roll < 0.3:
                ids += [byte[b] for b in rng.choice(["é", "€", "😀", "日"]).encode()]
            elif roll < 0.45:
                ids.append(rng.choice(stray))
            elif roll < 0.55:
                ids.append(rng.choice([0, 1, 2]))
            else:
                ids.append(rng.randrange(3 + 256, len(vocab)))
        cases.append(ids)
    for ids in cases:
        pieces, _widest = streamed(tokenizer, ids)
        assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True), \
            (tokenizer.convert_ids_to_tokens(ids), pieces)
