#!/usr/bin/env bash
# The generation benchmark on an NVIDIA GPU with nothing but PyTorch and transformers
# (no network, no hub): randomly initialised weights of the SmolLM2-135M shape and of a
# ~1.7B Llama shape in bf16, N = 1, 16, 64, 256. Under 4 minutes on an H200.
#
#   bash bench/gpu.sh              # on the GPU box
#   bash bench/gpu.sh --cpu --small   # a quick smoke run on any CPU (CI runs this)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}

if [[ "${1:-}" == "--cpu" ]]; then
    # --small: a few requests of a few tokens, to prove the script runs end to end.
    exec "$PYTHON" bench/generation.py --device cpu --random-small --n 1,4 --tokens 8 \
        --spread 0.2
fi

echo "== SmolLM2-135M shape, random weights, bf16 =="
"$PYTHON" bench/generation.py --device cuda --random-small --n 1,16,64,256 --tokens 64 \
    --spread 1.0 --strategies seq,cb,chinwag --seq-max 16
echo "== ~1.7B Llama shape, random weights, bf16 =="
"$PYTHON" bench/generation.py --device cuda --random-large --n 1,16,64,256 --tokens 64 \
    --spread 1.0 --strategies seq,cb,chinwag --seq-max 16
