# `make test` and `make demo` work on a fresh machine: both build .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: test demo lint bench clean lock

# The dependencies come from requirements.lock (every version pinned, every file's sha256 checked: pip's
# hash-checking mode), then the project itself without resolving anything more. Re-installed whenever the
# lock or pyproject.toml changes (the stamp is older than them). `make lock` refreshes the lock.
$(VENV): $(VENV)/.installed
$(VENV)/.installed: requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet --require-hashes -r requirements.lock
	$(BIN)/pip install --quiet --no-deps -e .
	touch $@

# Resolve pyproject.toml's ranges (the dev extra, which composes the others) to exact versions with hashes,
# with pip-tools in a throwaway venv. The project's own entry (the dev extra names `pneumo[...]`, a local path
# with no hash) is dropped, as is the machine's --find-links: the lock names PyPI releases only.
LOCK_TOOLS := $(or $(TMPDIR),/tmp)/pneumo-lock-tools
lock:
	test -x $(LOCK_TOOLS)/bin/pip-compile || ($(PYTHON) -m venv $(LOCK_TOOLS) && $(LOCK_TOOLS)/bin/pip install --quiet pip-tools)
	cd $(CURDIR) && $(LOCK_TOOLS)/bin/pip-compile --quiet --generate-hashes --allow-unsafe --strip-extras \
		--extra dev --no-emit-index-url --no-emit-find-links --output-file requirements.lock pyproject.toml
	awk '/^# WARNING: pip install will require/{skip=1} skip && /^[a-zA-Z]/ && !/^pneumo @/{skip=0} !skip' \
		requirements.lock > requirements.lock.tmp && mv requirements.lock.tmp requirements.lock

lint: $(VENV)
	$(BIN)/ruff check .

# Two pytest workers, a test file each at a time (its module fixtures stay in one process): a serial run
# leaves the 2 cores partly idle while tests wait on servers, subprocesses and store start-up (README, Tests).
# Files go out in collection order, the heaviest first (tests/conftest.py: HEAVIEST_FIRST), not xdist's
# most-tests-first order, which left the minute-long files for last.
test: $(VENV) lint
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder

demo: $(VENV)
	$(BIN)/pneumo demo

bench: $(VENV)
	for b in benchmarks/*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) tfrecords/* mlruns/*
