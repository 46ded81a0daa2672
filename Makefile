# batchgen — set-up, example run, tests.
#   make run    venv + install + run recipes/example.yaml on builtin:tiny
#   make test   venv + install + Chromium when possible (report.html's browser test) + the suite
#   make test-slow   the long tests (30 kills of a real run)
#   make bench  batchgen against a plain diffusers loop (benchmarks/sweep.py)
#   make lint   ruff + mypy
#   make gpu-kit   the wheels a lent GPU machine lacks, into .whl/ (benchmarks/README.md)
# Override TORCH for another build, e.g. `make run TORCH="torch==2.13.0 --index-url <cuda index>"`.

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup run test test-slow bench browser lint format tiny-model gpu-kit clean

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

test: setup browser
	$(BIN)/python -m pytest

test-slow: setup
	$(BIN)/python -m pytest -m slow

# The same sweep as a plain diffusers loop and through batchgen; figures in benchmarks/RESULTS.md.
bench: setup
	$(BIN)/python benchmarks/sweep.py --repeat 2

# tests/test_report.py opens report.html in headless Chromium: install Debian's package when
# no Chromium is on PATH (CI runs as root); where it cannot be installed that test is skipped.
browser:
	@for name in chromium chromium-browser google-chrome; do \
	  command -v $$name >/dev/null && exit 0; \
	done; \
	(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) \
	  >/dev/null 2>&1 || echo "chromium not installable: the browser test will be skipped"

lint: setup
	$(BIN)/ruff check batchgen tests tools benchmarks
	$(BIN)/ruff format --check batchgen tests tools benchmarks
	$(BIN)/mypy batchgen

format: setup
	$(BIN)/ruff format batchgen tests tools benchmarks
	$(BIN)/ruff check --fix batchgen tests tools benchmarks

tiny-model: setup
	@echo "training builtin:tiny on the CPU: about 35 minutes on 2 cores (resumes from build/tiny-training/)"
	nice -n 15 $(BIN)/python tools/train_tiny.py

# The wheels a lent GPU machine lacks, into .whl/ (see tools/gpu_kit.py).
gpu-kit: setup
	$(BIN)/python tools/gpu_kit.py

clean:
	rm -rf $(VENV) build *.egg-info
