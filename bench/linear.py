"""A CPU model's linear layers with plain weights and with weights packed for oneDNN
(``bot/generators/packed_linear.py``), side by side in one run.

One "pass" runs every ``nn.Linear`` of the model once on ``M`` rows, as one decoding step
of ``M`` conversations does (the output layer included). Plain and packed passes alternate,
``--rounds`` times each; the best and the median of each are printed, with the ratio of the
medians. Before timing, each packed linear's output is compared with the plain one's.

Usage: python bench/linear.py [--rows 1,16,64] [--dtype auto|float32|bfloat16]
       [--model builtin|<folder>] [--rounds 7]
Last line: dtype= rows= plain_ms= packed_ms= x_packed= (at the middle row count)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.timing import isolated


def load(model: str, dtype: str) -> Any:
    from bot.generators import model_files
    from bot.generators.huggingface import pick_device

    _device, torch_dtype = pick_device("cpu", dtype)
    _tokenizer, loaded = model_files.load(model, Path("~/.cache/chinwag").expanduser(), "cpu",
                                          torch_dtype)
    return loaded


def timed(function: Any, repeat: int = 3) -> float:
    started = time.perf_counter()
    for _ in range(repeat):
        function()
    return (time.perf_counter() - started) / repeat * 1000


def measure(model: Any, rows: list[int], rounds: int) -> list[tuple[int, float, float]]:
    import torch

    from bot.generators.torch_threads import intra_op_threads, use_threads

    use_threads(intra_op_threads())
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear]
    with torch.inference_mode():  # as the engine runs them
        return [measure_rows(model, linears, count, rounds) for count in rows]


def measure_rows(model: Any, linears: list[Any], count: int,
                 rounds: int) -> tuple[int, float, float]:
    """Plain against packed passes at ``count`` rows: ``(count, plain ms, packed ms)``,
    medians."""
    import torch

    from bot.generators.packed_linear import pack, unpack

    inputs = {m.in_features: torch.randn(count, m.in_features, dtype=model.dtype)
              for m in linears}

    def run() -> list[Any]:
        return [m(inputs[m.in_features]) for m in linears]

    plain_out = run()
    packed = pack(model)
    if packed is None:
        raise SystemExit("packing is not available here (see packed_linear.packable)")
    try:
        packed_out = run()
        worst = max(float((a.float() - b.float()).abs().max())
                    for a, b in zip(plain_out, packed_out, strict=True))
    finally:
        unpack(packed)
    plain_ms, packed_ms = [], []
    for _ in range(rounds):  # interleaved: the machine's noise falls on both
        run()
        plain_ms.append(timed(run))
        packed = pack(model)
        try:
            run()
            packed_ms.append(timed(run))
        finally:
            unpack(packed)
    plain, packed_median = statistics.median(plain_ms), statistics.median(packed_ms)
    print(f"rows={count:<4} plain best {min(plain_ms):7.2f} median {plain:7.2f} ms   "
          f"packed best {min(packed_ms):7.2f} median {packed_median:7.2f} ms   "
          f"x_packed={plain / packed_median:.2f}  max |diff| {worst:.2g}", flush=True)
    return count, plain, packed_median


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", default="1,16,64")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--model", default="builtin")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    model = isolated(load, args.model, args.dtype)
    linears = sum(1 for m in model.modules() if type(m).__name__ == "Linear")
    print(f"model dtype: {str(model.dtype).removeprefix('torch.')}, {linears} linear layers")
    rows = [int(r) for r in args.rows.split(",")]
    results = isolated(measure, model, rows, args.rounds)
    count, plain, packed = results[len(results) // 2]
    print(f"dtype={str(model.dtype).removeprefix('torch.')} rows={count} plain_ms={plain:.2f} "
          f"packed_ms={packed:.2f} x_packed={plain / packed:.2f}")


if __name__ == "__main__":
    main()
