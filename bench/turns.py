"""Conversations that go on: time to first token of each turn with finished conversations'
keys and values kept (``CHINWAG_PREFIX_CACHE_MB``, ``bot/generators/prefix_cache.py``) and
without, side by side in one run.

``--conversations`` chats of ``--turns`` turns each, through the built-in model and its
chat template, as the bot builds prompts: the system prompt, every earlier message and
reply, the new message. A turn is sent once the previous reply has ended (a person reads,
then writes), the conversations taking turns; replies end at the model's end token or at
``--tokens``. Each round runs the whole set once without the cache and once with it (the
order alternating), each on a scheduler of its own; figures are over all rounds. Per turn:
the prompt's length and the mean TTFT each way; then TTFT p50/p95 from the second turn on
(the first has nothing to reuse), the ratio, and the share of prompt tokens reused.

Usage: python bench/turns.py [--conversations 4] [--turns 8] [--tokens 64] [--rounds 2]
Last line: turns= conversations= ttft_off_p50= ttft_on_p50= ttft_off_p95= ttft_on_p95=
x_ttft_p50= reused=
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.timing import isolated, load_builtin, percentile, replies

MESSAGES = [
    "Hi! I am planning a trip to the mountains next month with two friends. We like long "
    "walks, cheap food and quiet places. Where should we start?",
    "That sounds good. What should we pack for a week of walking if the weather changes "
    "every day and we carry everything ourselves?",
    "One of my friends has never walked more than ten kilometres in a day. How do we plan "
    "the days so that nobody is left behind or too tired?",
    "We will cook some of our meals. Which simple dishes can we make on a small stove, "
    "with food that keeps for a week without a fridge?",
    "What should we do if the fog comes down while we are on a ridge and we cannot see "
    "the path any more?",
    "Thanks. Can you sum up everything we talked about as a short checklist, one line per "
    "item, so that I can print it?",
    "Last question: how do we keep our phones charged for a whole week in the hills?",
    "And how early should we book the huts, if we decide to sleep in them?",
]


def chat(model: Any, tokenizer: Any, args: argparse.Namespace,
         budget_mb: int) -> tuple[list[list[tuple[int, float]]], int, int]:
    """Every conversation's turns on a new scheduler: per turn ``(prompt tokens, ttft)``,
    and the prompt tokens sent and reused in all."""
    from bot.config import DEFAULT_SYSTEM_PROMPT
    from bot.generators import GenerationParams
    from bot.generators.engine import make_scheduler
    from bot.generators.scheduler import eos_ids

    params = GenerationParams(max_new_tokens=args.tokens, temperature=0.0,
                              repetition_penalty=1.1)

    scheduler = make_scheduler(model, eos_ids=eos_ids(model), max_sequences=8,
                               prefix_cache_bytes=budget_mb << 20)
    scheduler.start()
    histories: list[list[dict[str, str]]] = [
        [{"role": "system", "content": DEFAULT_SYSTEM_PROMPT}]
        for _ in range(args.conversations)]
    turns: list[list[tuple[int, float]]] = [[] for _ in range(args.turns)]
    sent = 0
    try:
        for turn in range(args.turns):
            for index, history in enumerate(histories):
                history.append({"role": "user",
                                "content": MESSAGES[(turn + index) % len(MESSAGES)]})
                prompt = list(tokenizer.apply_chat_template(
                    history, add_generation_prompt=True, tokenize=True,
                    return_dict=True)["input_ids"])
                [reply] = replies(scheduler, [prompt], params)
                history.append({"role": "assistant",
                                "content": tokenizer.decode(reply.tokens,
                                                            skip_special_tokens=True)})
                turns[turn].append((len(prompt), reply.ttft))
                sent += len(prompt)
        reused = getattr(getattr(scheduler, "prefixes", None), "reused_tokens", 0)
    finally:
        scheduler.stop()
    return turns, sent, reused


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--conversations", type=int, default=4)
    parser.add_argument("--turns", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--cache-mb", type=int, default=1024)
    args = parser.parse_args()
    tokenizer, model = isolated(load_builtin)
    print(f"model dtype: {str(model.dtype).removeprefix('torch.')}; {args.conversations} "
          f"conversations of {args.turns} turns, replies of at most {args.tokens} tokens")
    results: dict[str, list[list[list[tuple[int, float]]]]] = {"off": [], "on": []}
    totals = {"sent": 0, "reused": 0}
    for round_ in range(args.rounds):
        for mode in (("off", "on") if round_ % 2 == 0 else ("on", "off")):
            turns, sent, reused = isolated(chat, model, tokenizer, args,
                                           args.cache_mb if mode == "on" else 0)
            results[mode].append(turns)
            if mode == "on":
                totals["sent"] += sent
                totals["reused"] += reused
    print(f"{'turn':>4}{'prompt':>8}{'ttft_off':>10}{'ttft_on':>9}")
    for turn in range(args.turns):
        row = {mode: [item for run in runs for item in run[turn]]
               for mode, runs in results.items()}
        length = sum(n for n, _ in row["on"]) / len(row["on"])
        off = sum(t for _, t in row["off"]) / len(row["off"])
        on = sum(t for _, t in row["on"]) / len(row["on"])
        print(f"{turn + 1:>4}{length:>8.0f}{off:>10.3f}{on:>9.3f}", flush=True)
    later = {mode: [t for run in runs for turn in run[1:] for _, t in turn]
             for mode, runs in results.items()}
    off50, on50 = percentile(later["off"], .5), percentile(later["on"], .5)
    print(f"turns={args.turns} conversations={args.conversations} ttft_off_p50={off50:.3f} "
          f"ttft_on_p50={on50:.3f} ttft_off_p95={percentile(later['off'], .95):.3f} "
          f"ttft_on_p95={percentile(later['on'], .95):.3f} x_ttft_p50={off50 / on50:.2f} "
          f"reused={totals['reused'] / max(1, totals['sent']):.2f}")


if __name__ == "__main__":
    main()
