#!/usr/bin/env bash
# The generation benchmark on an NVIDIA GPU with nothing but PyTorch and transformers
# (no network, no hub): randomly initialised weights of the SmolLM2-135M shape and of a
# ~1.7B Llama shape in bf16. Strategies: one-at-a-time `generate` (seq), one static padded
# batch (static), transformers' continuous batching without and with CUDA graphs (cb,
# cbgraph) and Chinwag's scheduler (chinwag, whose row adds ms per decoding step and the
# share of steps that replayed a CUDA graph). Two modes, each on both shapes, about 8
# minutes in all on an H200:
#   1. arrivals: N = 1, 16, 64, 256 requests arriving over 1 s, 64 new tokens each;
#      sequential only up to N = 16 (its rate does not grow with N);
#   2. steady state: N = 16, 64, 256 all at once, 256 new tokens each, without
#      sequential (at 256 tokens it alone would take minutes); the 135M part also checks
#      greedy agreement: 16 prompts' first 32 greedy tokens, batched vs alone.
# A part that fails is reported and the others still run; the exit status says so.
#
#   bash bench/gpu.sh              # on the GPU box
#   bash bench/gpu.sh --cpu --small   # a quick smoke run on any CPU (CI runs this)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}

if [[ "${1:-}" == "--cpu" ]]; then
    # --small: a few requests of a few tokens, to prove the script runs end to end, every
    # strategy included (cbgraph says it is not available off CUDA). In fp32, where greedy
    # tokens batched and alone must agree exactly (bf16 rounds differently per batch size).
    exec "$PYTHON" bench/generation.py --device cpu --dtype float32 --random-small --n 1,4 \
        --tokens 8 --spread 0.2 --strategies seq,cb,cbgraph,static,chinwag --agreement 2 \
        --repeat 1
fi

status=0
part() {  # a title, then generation.py's arguments
    echo "== $1 =="
    shift
    # One round each: the device's minutes are few, and a GPU lent whole is not noisy.
    "$PYTHON" bench/generation.py --device cuda --repeat 1 "$@" || { status=$?; echo "(failed: $status)"; }
}

ARRIVALS=(--n 1,16,64,256 --tokens 64 --spread 1.0 --strategies seq,cb,cbgraph,static,chinwag
          --seq-max 16)
STEADY=(--n 16,64,256 --tokens 256 --spread 0 --strategies cb,cbgraph,static,chinwag)

part "arrivals: SmolLM2-135M shape, random weights, bf16" --random-small "${ARRIVALS[@]}"
part "arrivals: ~1.7B Llama shape, random weights, bf16" --random-large "${ARRIVALS[@]}"
part "steady state, 256 tokens (no sequential): SmolLM2-135M shape" --random-small \
    "${STEADY[@]}" --agreement 16
part "steady state, 256 tokens (no sequential): ~1.7B Llama shape" --random-large \
    "${STEADY[@]}"
exit "$status"
