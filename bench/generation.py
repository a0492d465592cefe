"""Many conversations at once on one model: sequential `generate`, one static padded batch,
transformers' continuous batching (with and without CUDA graphs), and Chinwag's scheduler,
side by side in one run.

N requests arrive over ``--spread`` seconds (0: all at once, the steady state); each
generates exactly ``--tokens`` new tokens (EOS ignored), so every strategy does the same
work. Per strategy and N it prints aggregate generated tokens/s, the ratio to sequential,
time to first token p50/p95 and whole-reply latency p50/p95; Chinwag's row adds
``step_ms=`` (wall time per decoding step) and ``graphs=<replays>/<steps> (<pct>%)`` (steps
that replayed a CUDA graph). The static batch has every request present at the start by
definition (the spread does not apply to it). Every strategy runs ``--repeat`` rounds
(default 3), interleaved, and each row is its round with the median rate (``runs=`` lists
them all): the machine may be shared and noisy. ``--agreement K`` checks that Chinwag's first
32 greedy tokens are the same batched as alone. The last line sums up N = 16 (or the
largest N run): ``N=<n> chinwag=<tok/s> x_sequential= x_transformers_cb= x_static=
ttft_p95= cb_ttft_p95= config=``.

Usage: python bench/generation.py [--n 1,4,16,32] [--tokens 32] [--spread 1.0]
       [--model builtin|<folder>] [--device cpu|cuda] [--random-small | --random-large]
       [--strategies seq,cb,cbgraph,static,chinwag,chinwag2p] [--seq-max N] [--repeat R]
       [--agreement K]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.timing import (
    Timing,
    arrivals,
    first_token,
    isolated,
    percentile,
    replies,
    run_paced,
)
from bench.timing import run_sequential as generate_one_at_a_time

PROMPTS = ["What is the capital of France?", "Name three colours.",
           "Write a haiku about the sea.", "What is two plus two?",
           "Tell me a fun fact about cats.", "How do plants grow?",
           "Explain rain to a child.", "What is a prime number?"]


class Unavailable(Exception):
    """This strategy cannot run here (no such option in this transformers, not a GPU)."""


def load(args: argparse.Namespace) -> tuple[Any, Any]:
    import torch

    from bot.generators.huggingface import pick_device

    # Chinwag's own choice (CHINWAG_DTYPE=auto: bf16 on CUDA and on a CPU with native bf16),
    # the same model for every strategy.
    _device, dtype = pick_device(args.device, args.dtype)
    print(f"model dtype: {str(dtype).removeprefix('torch.')} on {args.device}")
    if args.random_small or args.random_large:
        from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

        size = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3) if args.random_small else \
            dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
                 num_attention_heads=32, num_key_value_heads=32)
        config = LlamaConfig(vocab_size=49152, max_position_embeddings=8192,
                             tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, **size)
        torch.manual_seed(0)
        with torch.device(args.device):  # initialise on the device: far quicker for 1.7B
            model = LlamaForCausalLM(config).to(dtype=dtype).eval()
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


def run_sequential(model: Any, prompts: list[list[int]], tokens: int,
                   spread: float) -> list[Timing]:
    """What most bots do: one `generate` at a time, in arrival order."""
    return generate_one_at_a_time(model, prompts, tokens, spread, pad_token_id=0)


def run_static(model: Any, prompts: list[list[int]], tokens: int,
               spread: float) -> list[Timing]:
    """One left-padded `generate` over every prompt: the classic static batch. Every request
    is present at the start by definition, so ``spread`` does not apply; each one's first
    token is the batch's first step and its end the batch's end."""
    import torch
    start = time.perf_counter()
    timings = [Timing(start) for _ in prompts]
    length = max(len(ids) for ids in prompts)
    inputs = torch.zeros((len(prompts), length), dtype=torch.long)
    mask = torch.zeros_like(inputs)
    for row, ids in enumerate(prompts):
        inputs[row, length - len(ids):] = torch.tensor(ids)
        mask[row, length - len(ids):] = 1

    def noted(at: float) -> None:
        for each in timings:
            each.first = at

    with torch.inference_mode():
        model.generate(inputs.to(model.device), attention_mask=mask.to(model.device),
                       max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                       streamer=first_token(noted), pad_token_id=0)
    done = time.perf_counter()
    for timing in timings:
        timing.done, timing.tokens = done, tokens
    return timings


def run_transformers_cb(model: Any, prompts: list[list[int]], tokens: int,
                        spread: float, graphs: bool = False) -> list[Timing]:
    """transformers' own continuous-batching manager, fed as requests arrive."""
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import (  # transformers >= 5.x
        ContinuousBatchingConfig,
    )

    options: dict[str, Any] = {}
    if graphs:
        if "use_cuda_graph" not in {f.name for f in dataclasses.fields(ContinuousBatchingConfig)}:
            raise Unavailable("this transformers' ContinuousBatchingConfig has no use_cuda_graph")
        if model.device.type != "cuda":
            raise Unavailable(f"CUDA graphs need a CUDA device, not {model.device.type}")
        options["use_cuda_graph"] = True
    config = copy.deepcopy(GenerationConfig(max_new_tokens=tokens, do_sample=False))
    # Room for every request's prompt and reply at once, above its 15% admission margin,
    # so it never has to run the batch in waves.
    page = ContinuousBatchingConfig().page_size
    pages = -(-(max(len(ids) for ids in prompts) + tokens + 1) // page)
    cb = ContinuousBatchingConfig(num_blocks=max(16, len(prompts) * pages * 5 // 4 + 4),
                                  max_batch_tokens=512, **options)
    attention = model.config._attn_implementation
    # Built, warmed up and started from threads that exit, as Chinwag's scheduler prepares
    # on its own thread: a live thread's OpenMP team would slow the manager's thread.
    manager = isolated(lambda: model.init_continuous_batching(
        generation_config=config, continuous_batching_config=cb))
    timings: dict[str, Timing] = {}
    failed: list[str] = []
    try:
        if graphs:
            isolated(manager.warmup)  # capture the graphs now, outside the measured window
        isolated(manager.start)
        start = time.perf_counter()
        timings = {f"r{i}": Timing(start + a)
                   for i, a in enumerate(arrivals(len(prompts), spread))}
        finished = threading.Event()

        def collect() -> None:
            left = len(timings)
            while left:
                result = manager.get_result(timeout=0.05)
                if result is None:
                    if not manager.is_running():  # its thread died: say so, do not hang
                        failed.append("transformers' generation thread stopped")
                        break
                    continue
                timing = timings[result.request_id]
                if not timing.first and result.generated_tokens:
                    timing.first = time.perf_counter()
                if result.is_finished():
                    if result.error:
                        failed.append(f"request {result.request_id}: {result.error}")
                    timing.done = time.perf_counter()
                    timing.tokens = len(result.generated_tokens)
                    left -= 1
            finished.set()

        collector = threading.Thread(target=collect, daemon=True)
        collector.start()
        for (request_id, timing), ids in zip(timings.items(), prompts, strict=True):
            time.sleep(max(0.0, timing.arrived - time.perf_counter()))
            manager.add_request(ids, request_id=request_id, max_new_tokens=tokens,
                                streaming=True, eos_token_id=-1)
        finished.wait()
    finally:
        if manager.is_running():
            manager.stop(block=True)
        restore_attention(model, attention)  # stop() does, but not for a manager never run
    if failed:
        raise RuntimeError(failed[0])
    return list(timings.values())


def run_transformers_cb_graphs(model: Any, prompts: list[list[int]], tokens: int,
                               spread: float) -> list[Timing]:
    """The same with ``use_cuda_graph=True`` (graphs captured before the clock starts)."""
    return run_transformers_cb(model, prompts, tokens, spread, graphs=True)


def run_chinwag(model: Any, prompts: list[list[int]], tokens: int,
                spread: float, workers: int = 1) -> list[Timing]:
    from bot.generators import GenerationParams
    from bot.generators.engine import make_scheduler

    scheduler: Any
    if workers > 1:
        scheduler = _POOLS[workers]
    else:
        scheduler = make_scheduler(model, eos_ids=[], max_sequences=256, max_queued=0)
        scheduler.start()
    _ENGINE["last"] = scheduler  # for its step figures in the table
    params = GenerationParams(max_new_tokens=tokens, temperature=0.0)
    try:
        return run_paced(scheduler, prompts, params, spread)
    finally:
        if workers == 1:
            scheduler.stop()  # which gives the model its attention back


def restore_attention(model: Any, attention: str) -> None:
    """Give the model back the attention it had: Chinwag's engine may install its own,
    which transformers' continuous batching refuses, and every strategy here shares the
    one model."""
    if model.config._attn_implementation == attention:
        return
    try:
        model.set_attn_implementation(attention)
    except (ValueError, AttributeError):  # releases that vet the name against their own
        model.config._attn_implementation = attention


_POOLS: dict[int, Any] = {}
_ENGINE: dict[str, Any] = {}
"""The scheduler of the latest Chinwag run."""


def step_figures(engine: Any) -> str:
    """Steady-state figures of a Chinwag run: wall time per decoding step and how many
    steps replayed a CUDA graph (empty where the engine does not count them)."""
    steps = getattr(engine, "steps", None)
    if steps is None:
        return ""
    seconds = getattr(engine, "decode_seconds", 0.0)
    replays = getattr(engine, "graph_replays", 0)
    step_ms = seconds / steps * 1000 if steps else float("nan")
    share = f"{100 * replays / steps:.0f}%" if steps else "n/a"
    return f"  step_ms={step_ms:.2f} graphs={replays}/{steps} ({share})"


def greedy_agreement(model: Any, prompts: list[list[int]], tokens: int = 32) -> int:
    """How many prompts get the same first ``tokens`` greedy tokens (EOS ignored) from
    Chinwag's scheduler when each runs alone as when all are submitted at once."""
    from bot.generators import GenerationParams
    from bot.generators.engine import make_scheduler

    params = GenerationParams(max_new_tokens=tokens, temperature=0.0)
    scheduler = make_scheduler(model, eos_ids=[], max_sequences=256, max_queued=0)

    def generate(batch: list[list[int]]) -> list[list[int]]:
        return [reply.tokens for reply in replies(scheduler, batch, params, ignore_eos=True)]

    scheduler.start()
    try:
        alone = [generate([ids])[0] for ids in prompts]
        batched = generate(prompts)
    finally:
        scheduler.stop()  # which gives the model its attention back
    return sum(a == b for a, b in zip(alone, batched, strict=True))


def run_chinwag_processes(model: Any, prompts: list[list[int]], tokens: int,
                          spread: float) -> list[Timing]:
    """Chinwag's scheduler in two worker processes with one torch thread each (CPU)."""
    if 2 not in _POOLS:
        from bot.generators.workers import WorkerPool

        _POOLS[2] = WorkerPool(_MODEL[0], Path("~/.cache/chinwag").expanduser(), 2,
                               dtype=str(model.dtype).removeprefix("torch."),
                               max_sequences=256, max_queued=0)
        _POOLS[2].start()
    return run_chinwag(model, prompts, tokens, spread, workers=2)


_MODEL = ["builtin"]
WIDTH = 22
"""Of the table's strategy column."""


STRATEGIES = {"seq": ("sequential", run_sequential),
              "static": ("static_batch", run_static),
              "cb": ("transformers_cb", run_transformers_cb),
              "cbgraph": ("transformers_cbgraph", run_transformers_cb_graphs),
              "chinwag": ("chinwag", run_chinwag),
              "chinwag2p": ("chinwag_2procs", run_chinwag_processes)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", default="1,4,16,32")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--model", default="builtin")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto",
                        choices=("auto", "float32", "bfloat16", "float16"),
                        help="as CHINWAG_DTYPE (auto: what Chinwag picks on this machine)")
    parser.add_argument("--spread", type=float, default=1.0, help="arrival window, seconds")
    parser.add_argument("--strategies", default="seq,cb,static,chinwag")
    parser.add_argument("--seq-max", type=int, default=0,
                        help="run sequential only up to this N (it is slow); 0: always")
    parser.add_argument("--random-small", action="store_true",
                        help="random weights of the SmolLM2-135M shape")
    parser.add_argument("--random-large", action="store_true",
                        help="random weights of a ~1.7B Llama shape")
    parser.add_argument("--repeat", type=int, default=3, metavar="R",
                        help="rounds of every strategy, interleaved; each row is the round "
                             "with the median rate (this machine may be shared and noisy)")
    parser.add_argument("--agreement", type=int, default=0, metavar="K",
                        help="check K prompts' first 32 greedy tokens batched vs alone")
    args = parser.parse_args()
    import torch

    if args.device == "cpu":
        torch.set_num_threads(max(1, torch.get_num_threads()))
    tokenizer, model = isolated(load, args)
    _MODEL[0] = args.model
    sizes = [int(n) for n in args.n.split(",")]
    # Warm up every strategy once, so no first-call costs land in a measurement.
    for key in args.strategies.split(","):
        try:
            isolated(STRATEGIES[key][1], model, prompt_ids(tokenizer, 2), 4, 0.0)
        except (ImportError, Unavailable):
            pass  # reported in the table
        except Exception:
            if not key.startswith("cb"):
                raise
            # transformers' own failure: its rows in the table say what it was.
    print(f"{'strategy':<{WIDTH}}{'N':>4}{'tok/s':>9}{'x_seq':>7}{'ttft_p50':>10}{'ttft_p95':>10}"
          f"{'lat_p50':>9}{'lat_p95':>9}")
    summary: dict[str, dict[str, float]] = {}
    for n in sizes:
        prompts = prompt_ids(tokenizer, n)
        keys = [key for key in args.strategies.split(",")
                if not (key == "seq" and args.seq_max and n > args.seq_max)]
        if len(keys) < len(args.strategies.split(",")):
            # Sequential cost is linear in N: extrapolate from the largest measured N.
            print(f"{STRATEGIES['seq'][0]:<{WIDTH}}{n:>4}   (not run above N={args.seq_max}; "
                  "its rate does not grow with N)")
        runs: dict[str, list[tuple[float, list[Timing], str]]] = {}
        for _round in range(args.repeat):  # rounds interleave the strategies: noise hits all
            for key in list(keys):
                name, run = STRATEGIES[key]
                try:
                    timings = isolated(run, model, prompts, args.tokens,
                                       args.spread if n > 1 else 0.0)
                except (ImportError, Unavailable) as exc:  # not in this transformers, no GPU
                    print(f"{name:<{WIDTH}}{n:>4}   (not available: {exc})")
                    keys.remove(key)
                    continue
                except Exception as exc:
                    if not key.startswith("cb"):
                        raise
                    # transformers' own manager failing is a finding, not a lost run; its
                    # rounds that did run still count.
                    print(f"{name:<{WIDTH}}{n:>4}   (failed: {type(exc).__name__}: {exc})")
                    if key not in runs:
                        keys.remove(key)
                    continue
                wall = max(t.done for t in timings) - min(t.arrived for t in timings)
                extra = step_figures(_ENGINE.pop("last", None)) \
                    if key.startswith("chinwag") else ""
                runs.setdefault(key, []).append(
                    (sum(t.tokens for t in timings) / wall, timings, extra))
        for key in keys:
            # The round with the median rate, whole (its latencies with it).
            rate, timings, extra = sorted(runs[key], key=lambda r: r[0])[len(runs[key]) // 2]
            if key == "seq":
                args.last_sequential = rate
            base = getattr(args, "last_sequential", None)
            ratio = rate / base if base else float("nan")
            ttft = [t.first - t.arrived for t in timings]
            latency = [t.done - t.arrived for t in timings]
            spread = f" runs={'/'.join(f'{r[0]:.0f}' for r in runs[key])}" \
                if len(runs[key]) > 1 else ""
            print(f"{STRATEGIES[key][0]:<{WIDTH}}{n:>4}{rate:>9.1f}{ratio:>7.2f}"
                  f"{percentile(ttft, .5):>10.3f}{percentile(ttft, .95):>10.3f}"
                  f"{percentile(latency, .5):>9.3f}{percentile(latency, .95):>9.3f}{extra}"
                  f"{spread}", flush=True)
            summary.setdefault(str(n), {})[key] = rate
            summary[str(n)][f"{key}_ttft_p95"] = percentile(ttft, .95)
    if args.agreement:
        same = isolated(greedy_agreement, model, prompt_ids(tokenizer, args.agreement))
        print(f"agreement={same}/{args.agreement} first 32 greedy tokens batched vs alone",
              flush=True)
    label = "16" if "16" in summary else str(sizes[-1])
    figures = summary[label]
    seq = figures.get("seq", float("nan"))
    cb = figures.get("cb", float("nan"))
    static = figures.get("static", float("nan"))
    # Chinwag's figure is its better configuration for this machine (threads or processes).
    best = max((k for k in ("chinwag", "chinwag2p") if k in figures),
               key=lambda k: figures[k], default="chinwag")
    ours = figures.get(best, float("nan"))
    print(f"N={label} chinwag={ours:.1f} x_sequential={ours / seq:.2f} "
          f"x_transformers_cb={ours / cb:.2f} ttft_p95={figures.get(f'{best}_ttft_p95', 0):.3f} "
          f"cb_ttft_p95={figures.get('cb_ttft_p95', 0):.3f} x_static={ours / static:.2f} "
          f"config={best}")


if __name__ == "__main__":
    main()
