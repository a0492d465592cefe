#!/usr/bin/env bash
# Everything the slot engine has to prove on an NVIDIA GPU, as one run for a lent machine
# (the `device` tool), about 10 minutes on an H200:
#   1. the GPU-only tests: at most one host sync per decoding step and >= 90% of steps
#      replaying a CUDA graph (tests/test_slot_engine.py), conversations parked in pinned
#      host memory and copied back (tests/test_prefix_cache.py);
#   2. bench/gpu.sh (arrivals and steady state, both shapes, agreement).
# The device image has torch and transformers but not the bot's own dependencies, and
# nothing can be installed from the network there. So, first, here (with the network):
#     bash bench/gpu_check.sh --fetch     # wheels for Python 3.12 into .whl/ (~25 MB)
# then run `bash bench/gpu_check.sh` there with `.whl` carried (run's `carry: [".whl"]`).
set -uo pipefail
cd "$(dirname "$0")/.."

# The bot's imports that the device image lacks, at this checkout's versions (.venv).
PACKAGES=(alembic annotated-types greenlet httpcore2 httpx2 mako pydantic pydantic-core
          pydantic-settings pytest-asyncio python-dotenv sqlalchemy truststore
          typing-inspection transformers tokenizers huggingface-hub safetensors)

if [[ "${1:-}" == "--fetch" ]]; then
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    pins=()
    for name in "${PACKAGES[@]}"; do
        version=$(.venv/bin/python -m pip show "$name" 2>/dev/null | sed -n 's/^Version: //p')
        [[ -n "$version" ]] || { echo "not in .venv: $name (run make setup first)"; exit 2; }
        pins+=("$name==$version")
    done
    exec .venv/bin/python -m pip download -q --no-deps --only-binary=:all: \
        --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "${pins[@]}"
fi

if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1
# run returns only the output's last 12,000 characters: the whole of it goes to $OUT too.
if [[ -n "${OUT:-}" && -z "${GPU_CHECK_TEED:-}" ]]; then
    GPU_CHECK_TEED=1 bash "$0" "$@" 2>&1 | tee "$OUT/gpu_check.log"
    exit "${PIPESTATUS[0]}"
fi
status=0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch, transformers; print('torch', torch.__version__, \
'transformers', transformers.__version__)"
# The device image's own versions of what the fetched wheels need (pytest-asyncio wants
# pytest >= 8.4, pydantic typing-extensions >= 4.16, httpx2 anyio >= 4.10).
python3 -m pip list 2>/dev/null | grep -iE '^(pytest|typing.extensions|anyio|idna|h11) ' || true
echo "== GPU-only tests =="
python3 -m pytest -q -p no:cacheprovider \
    tests/test_slot_engine.py tests/test_prefix_cache.py -k cuda || status=$?
PYTHON=python3 bash bench/gpu.sh || status=$?
exit "$status"
