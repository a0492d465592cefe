"""The benchmarks keep running: a short smoke run of each (figures are not asserted here)."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_context_bench_prints_its_summary_line() -> None:
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "context.py"), "--turns", "2"],
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("per_turn_10=") and " per_turn_100000=" in last and " ratio=" in last


def test_gpu_bench_runs_on_the_cpu_when_asked() -> None:
    result = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh"), "--cpu", "--small"],
                            capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    chinwag = [line for line in lines if line.startswith("chinwag ")]
    assert len(chinwag) == 2 and all(" step_ms=" in line and " graphs=" in line
                                     for line in chinwag)
    static = [line.split() for line in lines if line.startswith("static_batch ")]
    assert [row[1] for row in static] == ["1", "4"] and all(len(row) == 8 for row in static)
    graphs = [line for line in lines if line.startswith("transformers_cbgraph ")]
    assert len(graphs) == 2 and all("(not available: " in line for line in graphs)
    # On the CPU in fp32, batching must not change a single greedy token.
    assert "agreement=2/2 first 32 greedy tokens batched vs alone" in lines
    assert lines[-1].startswith("N=4 chinwag=") and " x_transformers_cb=" in lines[-1]
    assert " x_sequential=" in lines[-1] and " ttft_p95=" in lines[-1]
    assert " cb_ttft_p95=" in lines[-1] and " x_static=" in lines[-1]
    assert " x_static=nan" not in lines[-1]


def test_load_bench_loses_nothing_in_a_small_run() -> None:
    env = {**os.environ, "NO_PROXY": "127.0.0.1"}
    env = {k: v for k, v in env.items() if not k.startswith("CHINWAG_")}
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "load.py"),
                             "--conversations", "10", "--messages", "3"],
                            capture_output=True, text=True, timeout=300, check=False, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("load: messages=30 ")
    assert " lost=0 " in last and " order_kept=True " in last


def test_decode_bench_prints_its_summary_line() -> None:
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "decode.py"), "--short", "20",
                             "--long", "200", "--repeat", "1"],
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("per_token_20_us=") and " per_token_200_us=" in last
    assert " ratio=" in last and " full_decode_ratio=" in last


def test_encoder_decoder_bench_prints_its_summary_line() -> None:
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "encoder_decoder.py"),
                             "--n", "1,3", "--tokens", "4", "--spread", "0.1"],
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("N=3 shape=t5-small chinwag=") and " x_sequential=" in last
    assert " join_ms=" in last and " step_ms=" in last


def test_memory_bench_prints_its_summary_line() -> None:
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "memory.py"), "--filler",
                             "10", "--embeddings", "1000", "--queries", "3"],
                            capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("recall_at_3_on=") and " recall_at_3_off=" in last
    assert " search_ms_p50=" in last and last.endswith(" embeddings=1000")


def test_train_bench_prints_its_summary_line() -> None:
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "train.py"), "--quick"],
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert sum(line.startswith("  > ") for line in lines) == 5
    assert lines[-1].startswith("train: unigram_ppl=") and " ratio=" in lines[-1]
    assert " seconds=" in lines[-1] and " target_met=" in lines[-1]


def test_sampling_bench_prints_its_summary_line() -> None:
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "sampling.py"), "--n", "2",
                             "--tokens", "4", "--rounds", "1"],
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("n=2 sort_step_ms=") and " candidates_step_ms=" in last
    assert " x_step=" in last
