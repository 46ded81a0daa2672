# batchgen — set-up, example run, tests.
#   make run    venv + install + run recipes/example.yaml on builtin:tiny
#   make test   venv + install + the whole test suite
#   make lint   ruff + mypy
# Override TORCH for another build, e.g. `make run TORCH="torch==2.13.0 --index-url <cuda index>"`.

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup run test lint format tiny-model clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "batchgen needs Python >= 3.11; set PYTHON=python3.11")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

run: setup
	$(BIN)/batchgen run recipes/example.yaml

test: setup
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check batchgen tests tools
	$(BIN)/ruff format --check batchgen tests tools
	$(BIN)/mypy batchgen

format: setup
	$(BIN)/ruff format batchgen tests tools
	$(BIN)/ruff check --fix batchgen tests tools

tiny-model: setup
	$(BIN)/python tools/make_tiny_model.py

clean:
	rm -rf $(VENV) build *.egg-info
