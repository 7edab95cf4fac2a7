# Set-up is idempotent: the venv is rebuilt only when pyproject.toml changes.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test check lint format clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first, pinned: the CPU build; an open range would pull a CUDA build.
	$(BIN)/python -m pip install --quiet "torch==2.13.0"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/coevo demo

test: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest

check: $(STAMP)
	$(BIN)/ruff check coevo tests benchmarks examples
	$(BIN)/ruff format --check coevo tests benchmarks examples
	$(BIN)/mypy coevo

format: $(STAMP)
	$(BIN)/ruff format coevo tests benchmarks examples
	$(BIN)/ruff check --fix coevo tests benchmarks examples

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
