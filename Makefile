# Two commands for a new user: `make demo` (the main job) and `make test`.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Run state stays under the run root; no telemetry leaves the machine.
export RAY_USAGE_STATS_ENABLED := 0
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := 1
PYTEST_ARGS ?=

.PHONY: setup demo test test-fast bench clean

setup: $(STAMP)

# Reinstalls only when pyproject.toml changed; torch/torchvision come from the local disk
# cache when pip's find-links has them, from PyPI otherwise.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "Installing bmoe and its dependencies into $(VENV) (first time: about 3 minutes)..."
	@$(BIN)/python -m pip install --quiet --progress-bar off -e '.[test]' 2> $(VENV)/pip-errors.log \
		|| { grep -v 'is ignored: it is neither' $(VENV)/pip-errors.log; exit 1; }
	@touch $(STAMP)

demo: setup
	$(BIN)/bmoe demo

# Inside a private network namespace with only loopback up when the machine allows it:
# proves the suite needs no network. tests/test_binds.py runs first, outside it, where the
# machine's own address exists: every port a local run opens must still be on 127.0.0.1.
test: setup
	@if unshare -n true 2>/dev/null && command -v ip >/dev/null; then \
		echo "pytest tests/test_binds.py on the machine's network, then the rest in a private network namespace (loopback only)"; \
		{ $(BIN)/python -m pytest tests/test_binds.py $(PYTEST_ARGS) || [ $$? -eq 5 ]; } && \
		unshare -n bash -c 'ip link set lo up && exec $(BIN)/python -m pytest --ignore=tests/test_binds.py $(PYTEST_ARGS)'; \
	else \
		echo "pytest (no private network namespace on this machine: plain run)"; \
		$(BIN)/python -m pytest $(PYTEST_ARGS); \
	fi

# The edit-test loop: everything not marked slow (no Ray, no Serve, no training), in about a minute.
test-fast: setup
	$(BIN)/python -m pytest -m "not slow" -q $(PYTEST_ARGS)

bench: setup
	$(BIN)/python bench/core.py

clean:
	rm -rf bmoe-runs .pytest_cache
