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

# Two pytest workers, a test file each at a time (its module fixtures stay in one process): a serial run
# leaves the 2 cores partly idle while tests wait on servers, subprocesses and store start-up (README, Tests).
test: $(VENV) lint
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

demo: $(VENV)
	$(BIN)/pneumo demo

bench: $(VENV)
	for b in benchmarks/*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) tfrecords/* mlruns/*
