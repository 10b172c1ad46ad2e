# Mandant — `make serve` and `make test` are the whole set-up.
PYTHON     ?= python3
VENV       ?= .venv
BIN        := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: install install-test serve test lint typecheck protos protos-check clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch first, pinned: a plain `torch` requirement would pull a multi-GB CUDA build.
$(VENV)/.installed: $(BIN)/python pyproject.toml clients/python/pyproject.toml
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e clients/python -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

serve: install
	$(BIN)/mandant serve $(ARGS)

protos: install-test
	$(BIN)/python protos/generate.py

protos-check: install-test
	$(BIN)/python protos/generate.py --check

lint: install-test
	$(BIN)/ruff check server clients tests benchmarks

typecheck: install-test
	$(BIN)/mypy server/mandant clients/python/mandant_client

test: install-test protos-check lint typecheck
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
