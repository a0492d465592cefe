"""Streaming cost per token: what the event loop spends turning one more token into text.

It feeds a reply's token ids one at a time through ``ReplyText`` (incremental decoding,
stop strings held back, as ``TransformersGenerator.stream`` does) and through the former
way (the whole reply decoded again after each token), and prints the mean cost per token
at a short and a long reply. Flat means the long reply's figure is about the short one's.
The reply is mixed text (English, accents, CJK, emoji) from the built-in model's tokenizer.
A second reply is one word then nothing but special tokens (``<|endoftext|>`` over and
over, as with ``ignore_eos``): tokens that add no text, which must not widen the window.

Usage: python bench/decode.py [--short 100] [--long 4000] [--repeat 5]
Last line: per_token_100_us=… per_token_4000_us=… ratio=… full_decode_ratio=…
special_ratio=…
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SAMPLE = ("The lighthouse keeper wrote in his log: «calm sea, naïve gulls» — 今日は静かな海。 "
          "He smiled 😀 and counted the ships: one, two, three… 🚢🚢 Then the fog came in.\n")
STOP = ("\nUser:", "<|im_end|>")


def reply_ids(tokenizer: Any, count: int) -> list[int]:
    ids: list[int] = []
    while len(ids) < count:
        ids += tokenizer.encode(SAMPLE, add_special_tokens=False)
    return ids[:count]


def special_ids(tokenizer: Any, count: int) -> list[int]:
    """One word, then only the end-of-text token."""
    word = tokenizer.encode(" hello", add_special_tokens=False)
    return [*word, *[tokenizer.eos_token_id] * (count - len(word))]


def incremental(tokenizer: Any, ids: list[int]) -> str:
    from bot.generators.reply_text import ReplyText

    reply = ReplyText(tokenizer, STOP)
    return "".join([reply.add(token) for token in ids]) + reply.end()


def full_decode(tokenizer: Any, ids: list[int]) -> str:
    """What ``stream`` did before: decode everything so far after every token."""
    text = ""
    for end in range(1, len(ids) + 1):
        text = tokenizer.decode(ids[:end], skip_special_tokens=True)
    return str(text)


def per_token_us(run: Callable[[Any, list[int]], str], tokenizer: Any, ids: list[int],
                 repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        run(tokenizer, ids)
        best = min(best, time.perf_counter() - started)
    return best / len(ids) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--short", type=int, default=100)
    parser.add_argument("--long", type=int, default=4000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    from bot.config import BUILTIN_MODEL
    from bot.generators import model_files

    tokenizer, _config = model_files.load_tokenizer(BUILTIN_MODEL,
                                                    Path("~/.cache/chinwag").expanduser())
    short, long = reply_ids(tokenizer, args.short), reply_ids(tokenizer, args.long)
    special_short, special_long = special_ids(tokenizer, args.short), \
        special_ids(tokenizer, args.long)
    for ids in (long, special_long):
        assert incremental(tokenizer, ids) == tokenizer.decode(ids, skip_special_tokens=True)
    figures = {}
    for name, run in (("incremental", incremental), ("full_decode", full_decode)):
        for ids in (short, long):
            cost = per_token_us(run, tokenizer, ids, args.repeat)
            figures[name, len(ids)] = cost
            print(f"{name:<12} reply_tokens={len(ids):>5} per_token_us={cost:8.1f}", flush=True)
    for ids in (special_short, special_long):
        cost = per_token_us(incremental, tokenizer, ids, args.repeat)
        figures["special", len(ids)] = cost
        print(f"{'special':<12} reply_tokens={len(ids):>5} per_token_us={cost:8.1f}", flush=True)
    ours_short, ours_long = figures["incremental", len(short)], figures["incremental", len(long)]
    old_ratio = figures["full_decode", len(long)] / figures["full_decode", len(short)]
    print(f"per_token_{len(short)}_us={ours_short:.1f} per_token_{len(long)}_us={ours_long:.1f} "
          f"ratio={ours_long / ours_short:.2f} full_decode_ratio={old_ratio:.1f} "
          f"special_ratio={figures['special', args.long] / figures['special', args.short]:.2f}")


if __name__ == "__main__":
    main()
