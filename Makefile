# make run   : install, then train the built-in default (offline, CPU is fine)
# make test  : install, then the test suite (unit, config, integration; slow/gpu skipped), two workers
# make lint  : ruff's lint and format check (configured in pyproject.toml)
# make bench : the benchmark suite (benchmarks/; ~10 min on 2 cores), writes benchmarks/results.json
# make test-compat         : a subset of the suite on the lowest supported releases (.venv-compat; not in CI)
# make check-vllm-resolves : whether the vllm extra resolves on PyPI beside today's torch/transformers (network)
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
# Set TORCH_INDEX to a PyTorch wheel index (e.g. its CPU index) to choose the build pip installs.
TORCH_INDEX ?=

.PHONY: install run test test-all test-compat check-vllm-resolves lint format clean bench

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/install_torch.sh
	$(PYTHON) -m venv $(VENV)
	TORCH_INDEX="$(TORCH_INDEX)" sh scripts/install_torch.sh $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

run: install
	$(BIN)/rredcot train $(ARGS)

# Two workers of one torch thread each fill a 2-core machine; more cores: TEST_WORKERS=auto.
TEST_WORKERS ?= 2
# --dist loadgroup: measured 7:22 for the suite against 9:27 with xdist's default load scheduling (2026-12-03)
test: install
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadgroup

test-all: install
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadgroup --runslow

# The compat matrix (issue 22): pyproject.toml's floors (scripts/compat/floors.txt), CPU torch, and the tests that
# touch the libraries' APIs: config, unit, the model presets and the fake-vLLM integration tests.
COMPAT_VENV ?= .venv-compat
COMPAT_TESTS = tests/config tests/unit tests/integration/test_model_presets.py \
	tests/integration/test_vllm_fake.py tests/integration/test_vllm_server_cli.py

$(COMPAT_VENV)/.installed: pyproject.toml scripts/compat/floors.txt scripts/compat/install.sh scripts/install_torch.sh
	PYTHON=$(PYTHON) TORCH_INDEX="$(TORCH_INDEX)" sh scripts/compat/install.sh $(COMPAT_VENV)
	touch $@

test-compat: $(COMPAT_VENV)/.installed
	OMP_NUM_THREADS=1 $(COMPAT_VENV)/bin/python -m pytest -q -n $(TEST_WORKERS) $(COMPAT_TESTS)

check-vllm-resolves: install
	PIP=$(BIN)/pip sh scripts/compat/resolve_vllm.sh

# Not part of `make test` (tests/integration/test_benchmarks.py runs each benchmark's --quick size there).
# The README's performance table: `$(BIN)/python -m benchmarks.report` after a run.
bench: install
	$(BIN)/python -m benchmarks $(ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) runs .pytest_cache
