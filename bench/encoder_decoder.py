"""Encoder–decoder models under load: one `generate` at a time against Chinwag's
encoder–decoder batcher (``bot/generators/encoder_decoder.py``), on random weights of a
real model's shape.

N requests arrive over about a second; each generates exactly ``--tokens`` new tokens (EOS
ignored). Per strategy and N it prints generated tokens/s, the ratio to sequential and
time to first token p50/p95; for Chinwag also what joining the running batch cost (the
padding copy, per admitted group) against a mean decoding step. The last line sums up the
largest N.

Usage: python bench/encoder_decoder.py [--n 1,4,16] [--tokens 32] [--shape t5-small|bart-base]
       [--device cpu|cuda] [--threads 1]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.timing import Timing, isolated, percentile, run_paced
from bench.timing import run_sequential as generate_one_at_a_time

PROMPT_TOKENS = 64


def load(shape: str, device: str) -> Any:
    import torch
    import transformers as tf

    torch.manual_seed(0)
    if shape == "t5-small":
        model: Any = tf.T5ForConditionalGeneration(tf.T5Config(
            vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_heads=8,
            decoder_start_token_id=0))
    else:
        model = tf.BartForConditionalGeneration(tf.BartConfig(
            vocab_size=50265, d_model=768, encoder_layers=6, decoder_layers=6,
            encoder_attention_heads=12, decoder_attention_heads=12, encoder_ffn_dim=3072,
            decoder_ffn_dim=3072, max_position_embeddings=1024))
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    return model.to(device=device, dtype=dtype).eval()


def prompts(n: int) -> list[list[int]]:
    return [[100 + (7 * i + j) % 5000 for j in range(PROMPT_TOKENS - 1)] + [1]
            for i in range(n)]


def run_chinwag(model: Any, ids: list[list[int]], tokens: int, spread: float,
                joins: list[float]) -> tuple[list[Timing], float]:
    """The timings, and the mean decoding step in seconds."""
    from bot.generators import GenerationParams, encoder_decoder
    from bot.generators.encoder_decoder import EncoderDecoderScheduler

    merge = encoder_decoder._merge

    def timed_merge(old: Any, new: Any) -> Any:
        started = time.perf_counter()
        try:
            return merge(old, new)
        finally:
            joins.append(time.perf_counter() - started)

    encoder_decoder._merge = timed_merge  # type: ignore[assignment]
    scheduler = EncoderDecoderScheduler(model, eos_ids=[], max_sequences=256, max_queued=0)
    decode, steps = scheduler._decode_batch, []

    def timed_decode(batch: Any) -> None:
        started = time.perf_counter()
        decode(batch)
        steps.append(time.perf_counter() - started)

    scheduler._decode_batch = timed_decode  # type: ignore[method-assign]
    scheduler.start()
    params = GenerationParams(max_new_tokens=tokens, temperature=0.0)
    try:
        timings = run_paced(scheduler, ids, params, spread)
    finally:
        scheduler.stop()
        encoder_decoder._merge = merge  # type: ignore[assignment]
    return timings, sum(steps) / max(1, len(steps))


def run_sequential(model: Any, ids: list[list[int]], tokens: int,
                   spread: float) -> list[Timing]:
    # On a thread of its own, as the scheduler runs: torch on a busy CPU was measured here
    # 4x slower on the main thread than on another one.
    return isolated(generate_one_at_a_time, model, ids, tokens, spread)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", default="1,4,16")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--spread", type=float, default=1.0)
    parser.add_argument("--shape", choices=["t5-small", "bart-base"], default="t5-small")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: steadiest on a shared CPU)")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    model = load(args.shape, args.device)
    sizes = [int(n) for n in args.n.split(",")]
    run_sequential(model, prompts(1), 4, 0.0)  # warm-up: first calls allocate and trace
    run_chinwag(model, prompts(2), 4, 0.0, [])
    summary = ""
    for n in sizes:
        ids = prompts(n)
        sequential = run_sequential(model, ids, args.tokens, args.spread)
        joins: list[float] = []
        batched, step = run_chinwag(model, ids, args.tokens, args.spread, joins)
        rates = {}
        for name, timings in (("sequential", sequential), ("chinwag", batched)):
            elapsed = max(t.done for t in timings) - min(t.arrived for t in timings)
            rates[name] = sum(t.tokens for t in timings) / elapsed
            ttft = [t.first - t.arrived for t in timings]
            print(f"{name:10} N={n:<3} tok/s={rates[name]:8.1f} "
                  f"ttft_p50={percentile(ttft, 0.5):.3f}s ttft_p95={percentile(ttft, 0.95):.3f}s")
        join_ms = 1000 * sum(joins) / len(joins) if joins else 0.0
        print(f"{'':10} N={n:<3} x_sequential={rates['chinwag'] / rates['sequential']:.2f} "
              f"joins={len(joins)} join_ms={join_ms:.2f} step_ms={1000 * step:.2f}")
        summary = (f"N={n} shape={args.shape} chinwag={rates['chinwag']:.1f} "
                   f"x_sequential={rates['chinwag'] / rates['sequential']:.2f} "
                   f"join_ms={join_ms:.2f} step_ms={1000 * step:.2f}")
    print(summary)


if __name__ == "__main__":
    main()
