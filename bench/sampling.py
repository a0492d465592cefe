"""Replies sampled as the bot samples them by default (temperature 0.7, top-p 0.9, repetition
penalty 1.1), with top-p looking among the most probable tokens first on the CPU
(``bot/generators/sampling.py``) and with the whole vocabulary sorted every step, side by
side in one run.

``--n`` conversations start at once on the slot engine and each generates ``--tokens``
tokens (EOS ignored). Each round runs both ways (the order alternating), each on a
scheduler of its own; per way the median of the rounds' ms per decoding step and tokens/s,
then their ratio. ``bench/generation.py`` decodes greedily, as its peers do: it does not see
what sampling costs.

Usage: python bench/sampling.py [--n 16] [--tokens 48] [--rounds 3]
Last line: n= sort_step_ms= candidates_step_ms= x_step=
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.generation import prompt_ids
from bench.timing import isolated, load_builtin, replies


def run(model: Any, prompts: list[list[int]], tokens: int, candidates: int) -> tuple[float,
                                                                                       float]:
    """ms per decoding step and tokens/s of one run with ``candidates`` looked among."""
    from bot.config import Settings
    from bot.generators import GenerationParams, sampling
    from bot.generators.engine import make_scheduler

    defaults = {name: Settings.model_fields[name].default
                for name in ("temperature", "top_p", "repetition_penalty")}
    params = GenerationParams(max_new_tokens=tokens, **defaults)
    kept, sampling.CANDIDATES = sampling.CANDIDATES, candidates  # type: ignore[misc]
    scheduler = make_scheduler(model, eos_ids=[], max_sequences=len(prompts))
    scheduler.start()
    try:
        started = time.perf_counter()
        got = replies(scheduler, prompts, params, ignore_eos=True)
        elapsed = time.perf_counter() - started
    finally:
        scheduler.stop()
        sampling.CANDIDATES = kept  # type: ignore[misc]
    generated = sum(len(reply.tokens) for reply in got)
    steps = max(1, getattr(scheduler, "steps", 0))
    return 1000 * getattr(scheduler, "decode_seconds", 0.0) / steps, generated / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    tokenizer, model = isolated(load_builtin)
    prompts = prompt_ids(tokenizer, args.n)
    print(f"model dtype: {str(model.dtype).removeprefix('torch.')}; {args.n} conversations "
          f"of {args.tokens} tokens")
    from bot.generators.sampling import CANDIDATES

    ways = {"sort": 10**9, "candidates": CANDIDATES}
    results: dict[str, list[tuple[float, float]]] = {way: [] for way in ways}
    for round_ in range(args.rounds):
        for way in (list(ways) if round_ % 2 == 0 else list(reversed(ways))):
            results[way].append(isolated(run, model, prompts, args.tokens, ways[way]))
    medians = {}
    for way, runs in results.items():
        step = statistics.median(ms for ms, _ in runs)
        rate = statistics.median(rate for _, rate in runs)
        medians[way] = step
        print(f"{way:<11} step_ms={step:7.2f} tok/s={rate:7.1f} "
              f"runs={'/'.join(f'{ms:.1f}' for ms, _ in runs)}")
    print(f"n={args.n} sort_step_ms={medians['sort']:.2f} "
          f"candidates_step_ms={medians['candidates']:.2f} "
          f"x_step={medians['sort'] / medians['candidates']:.2f}")


if __name__ == "__main__":
    main()
