"""Many conversations at once on one model: sequential `generate`, transformers' continuous
batching, and Chinwag's scheduler, side by side in one run.

N requests arrive over about a second; each generates exactly ``--tokens`` new tokens (EOS
ignored), so every strategy does the same work. Per strategy and N it prints aggregate
generated tokens/s, the ratio to sequential, time to first token p50/p95 and whole-reply
latency p50/p95. The last line sums up N = 16 (or the largest N run).

Usage: python bench/generation.py [--n 1,4,16,32] [--tokens 32] [--model builtin|<folder>]
       [--device cpu|cuda] [--random-small | --random-large] [--strategies seq,cb,chinwag]
"""

from __future__ import annotations

import argparse
import copy
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROMPTS = ["What is the capital of France?", "Name three colours.",
           "Write a haiku about the sea.", "What is two plus two?",
           "Tell me a fun fact about cats.", "How do plants grow?",
           "Explain rain to a child.", "What is a prime number?"]


@dataclass
class Timing:
    arrived: float
    first: float = 0.0
    done: float = 0.0
    tokens: int = 0


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def load(args: argparse.Namespace) -> tuple[Any, Any]:
    import torch

    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    if args.random_small or args.random_large:
        from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

        size = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3) if args.random_small else \
            dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
                 num_attention_heads=32, num_key_value_heads=32)
        config = LlamaConfig(vocab_size=49152, max_position_embeddings=8192,
                             tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, **size)
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).to(device=args.device, dtype=dtype).eval()
        tokenizer = None
        try:
            from bot.generators import model_files

            folder = model_files.local_weights(model_files.resolve("builtin"),
                                               Path("~/.cache/chinwag").expanduser())
            tokenizer = AutoTokenizer.from_pretrained(folder)
        except Exception:  # no built-in model here: prompts become plain token ids
            tokenizer = None
        return tokenizer, model
    from bot.generators import model_files

    return model_files.load(args.model, Path("~/.cache/chinwag").expanduser(), args.device,
                            dtype)


def prompt_ids(tokenizer: Any, n: int) -> list[list[int]]:
    if tokenizer is None:
        return [[1, *range(100 + 7 * i, 140 + 7 * i)] for i in range(n)]
    return [list(tokenizer.apply_chat_template(
        [{"role": "system", "content": "You are a helpful assistant."},
         {"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
        add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])
        for i in range(n)]


def arrivals(n: int, spread: float) -> list[float]:
    return [spread * i / max(1, n - 1) if n > 1 else 0.0 for i in range(n)]


def run_sequential(model: Any, prompts: list[list[int]], tokens: int,
                   spread: float) -> list[Timing]:
    """What most bots do: one `generate` at a time, in arrival order."""
    import torch
    from transformers import TextStreamer

    start = time.perf_counter()
    timings = [Timing(start + a) for a in arrivals(len(prompts), spread)]

    class First(TextStreamer):
        def __init__(self, timing: Timing) -> None:
            self.timing, self.calls = timing, 0

        def put(self, value: Any) -> None:
            self.calls += 1
            if self.calls == 2:  # the first call hands over the prompt
                self.timing.first = time.perf_counter()

        def end(self) -> None:
            pass

    for ids, timing in zip(prompts, timings, strict=True):
        time.sleep(max(0.0, timing.arrived - time.perf_counter()))
        inputs = torch.tensor([ids], device=model.device)
        with torch.inference_mode():
            model.generate(inputs, attention_mask=torch.ones_like(inputs),
                           max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                           streamer=First(timing), pad_token_id=0)
        timing.done, timing.tokens = time.perf_counter(), tokens
    return timings


def run_transformers_cb(model: Any, prompts: list[list[int]], tokens: int,
                        spread: float) -> list[Timing]:
    """transformers' own continuous-batching manager, fed as requests arrive."""
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import (  # transformers >= 5.x
        ContinuousBatchingConfig,
    )

    config = copy.deepcopy(GenerationConfig(max_new_tokens=tokens, do_sample=False))
    cb = ContinuousBatchingConfig(num_blocks=max(16, len(prompts) * 2), max_batch_tokens=512)
    manager = model.init_continuous_batching(generation_config=config,
                                             continuous_batching_config=cb)
    manager.start()
    start = time.perf_counter()
    timings = {f"r{i}": Timing(start + a) for i, a in enumerate(arrivals(len(prompts), spread))}
    finished = threading.Event()

    def collect() -> None:
        left = len(timings)
        while left:
            result = manager.get_result(timeout=0.05)
            if result is None:
                continue
            timing = timings[result.request_id]
            if not timing.first and result.generated_tokens:
                timing.first = time.perf_counter()
            if result.is_finished():
                timing.done, timing.tokens = time.perf_counter(), len(result.generated_tokens)
                left -= 1
        finished.set()

    collector = threading.Thread(target=collect, daemon=True)
    collector.start()
    for (request_id, timing), ids in zip(timings.items(), prompts, strict=True):
        time.sleep(max(0.0, timing.arrived - time.perf_counter()))
        manager.add_request(ids, request_id=request_id, max_new_tokens=tokens, streaming=True,
                            eos_token_id=-1)
    finished.wait()
    manager.stop(block=True)
    return list(timings.values())


def run_chinwag(model: Any, prompts: list[list[int]], tokens: int,
                spread: float, workers: int = 1) -> list[Timing]:
    from bot.generators import GenerationParams
    from bot.generators.scheduler import BatchScheduler, Request
    from bot.generators.workers import WorkerPool

    scheduler: BatchScheduler | WorkerPool
    if workers > 1:
        scheduler = _POOLS[workers]
    else:
        scheduler = BatchScheduler(model, eos_ids=[], max_sequences=256, max_queued=0)
        scheduler.start()
    params = GenerationParams(max_new_tokens=tokens, temperature=0.0)
    start = time.perf_counter()
    timings = [Timing(start + a) for a in arrivals(len(prompts), spread)]
    done = threading.Semaphore(0)

    def emitter(timing: Timing) -> Callable[[Any], None]:
        def emit(item: Any) -> None:
            if item is None or isinstance(item, BaseException):
                timing.done = time.perf_counter()
                done.release()
                return
            timing.tokens += 1
            if timing.tokens == 1:
                timing.first = time.perf_counter()
        return emit

    for ids, timing in zip(prompts, timings, strict=True):
        time.sleep(max(0.0, timing.arrived - time.perf_counter()))
        scheduler.submit(Request(ids, params, emitter(timing), ignore_eos=True))
    for _ in prompts:
        done.acquire()
    if workers == 1:
        scheduler.stop()
    return timings


_POOLS: dict[int, Any] = {}


def run_chinwag_processes(model: Any, prompts: list[list[int]], tokens: int,
                          spread: float) -> list[Timing]:
    """Chinwag's scheduler in two worker processes with one torch thread each (CPU)."""
    if 2 not in _POOLS:
        from bot.generators.workers import WorkerPool

        _POOLS[2] = WorkerPool(_MODEL[0], Path("~/.cache/chinwag").expanduser(), 2,
                               max_sequences=256, max_queued=0)
        _POOLS[2].start()
    return run_chinwag(model, prompts, tokens, spread, workers=2)


_MODEL = ["builtin"]


STRATEGIES = {"seq": ("sequential", run_sequential),
              "cb": ("transformers_cb", run_transformers_cb),
              "chinwag": ("chinwag", run_chinwag),
              "chinwag2p": ("chinwag_2procs", run_chinwag_processes)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", default="1,4,16,32")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--model", default="builtin")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--spread", type=float, default=1.0, help="arrival window, seconds")
    parser.add_argument("--strategies", default="seq,cb,chinwag")
    parser.add_argument("--seq-max", type=int, default=0,
                        help="run sequential only up to this N (it is slow); 0: always")
    parser.add_argument("--random-small", action="store_true",
                        help="random weights of the SmolLM2-135M shape")
    parser.add_argument("--random-large", action="store_true",
                        help="random weights of a ~1.7B Llama shape")
    args = parser.parse_args()
    import torch

    if args.device == "cpu":
        torch.set_num_threads(max(1, torch.get_num_threads()))
    tokenizer, model = load(args)
    _MODEL[0] = args.model
    sizes = [int(n) for n in args.n.split(",")]
    # Warm up every strategy once, so no first-call costs land in a measurement.
    for key in args.strategies.split(","):
        try:
            STRATEGIES[key][1](model, prompt_ids(tokenizer, 2), 4, 0.0)
        except ImportError:
            pass  # reported in the table
    print(f"{'strategy':<16}{'N':>4}{'tok/s':>9}{'x_seq':>7}{'ttft_p50':>10}{'ttft_p95':>10}"
          f"{'lat_p50':>9}{'lat_p95':>9}")
    summary: dict[str, dict[str, float]] = {}
    for n in sizes:
        prompts = prompt_ids(tokenizer, n)
        sequential_rate = None
        for key in args.strategies.split(","):
            name, run = STRATEGIES[key]
            if key == "seq" and args.seq_max and n > args.seq_max:
                # Sequential cost is linear in N: extrapolate from the largest measured N.
                print(f"{name:<16}{n:>4}   (not run above N={args.seq_max}; its rate does "
                      "not grow with N)")
                continue
            try:
                timings = run(model, prompts, args.tokens, args.spread if n > 1 else 0.0)
            except ImportError as exc:  # an older transformers without this feature
                print(f"{name:<16}{n:>4}   (not available: {exc})")
                continue
            wall = max(t.done for t in timings) - min(t.arrived for t in timings)
            rate = sum(t.tokens for t in timings) / wall
            if key == "seq":
                sequential_rate = rate
                args.last_sequential = rate
            base = sequential_rate or getattr(args, "last_sequential", None)
            ratio = rate / base if base else float("nan")
            ttft = [t.first - t.arrived for t in timings]
            latency = [t.done - t.arrived for t in timings]
            print(f"{name:<16}{n:>4}{rate:>9.1f}{ratio:>7.2f}{percentile(ttft, .5):>10.3f}"
                  f"{percentile(ttft, .95):>10.3f}{percentile(latency, .5):>9.3f}"
                  f"{percentile(latency, .95):>9.3f}", flush=True)
            summary.setdefault(str(n), {})[key] = rate
            summary[str(n)][f"{key}_ttft_p95"] = percentile(ttft, .95)
    n = "16" if "16" in summary else str(sizes[-1])
    figures = summary[n]
    seq = figures.get("seq", float("nan"))
    cb = figures.get("cb", float("nan"))
    # Chinwag's figure is its better configuration for this machine (threads or processes).
    best = max((k for k in ("chinwag", "chinwag2p") if k in figures),
               key=lambda k: figures[k], default="chinwag")
    ours = figures.get(best, float("nan"))
    print(f"N={n} chinwag={ours:.1f} x_sequential={ours / seq:.2f} "
          f"x_transformers_cb={ours / cb:.2f} ttft_p95={figures.get(f'{best}_ttft_p95', 0):.3f} "
          f"cb_ttft_p95={figures.get('cb_ttft_p95', 0):.3f} config={best}")


if __name__ == "__main__":
    main()
