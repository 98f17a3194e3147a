# `make test` and `make demo` work on a fresh machine: both build .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: test demo lint bench clean

# Re-install whenever pyproject.toml changes (the stamp is older than it).
$(VENV): $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

lint: $(VENV)
	$(BIN)/ruff check .

test: $(VENV) lint
	$(BIN)/python -m pytest -q

demo: $(VENV)
	$(BIN)/pneumo demo

bench: $(VENV)
	for b in benchmarks/*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) tfrecords/* mlruns/*
