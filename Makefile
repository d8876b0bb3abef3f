# make run   : install, then train the built-in default (offline, CPU is fine)
# make test  : install, then the test suite (unit, config, integration; slow/gpu skipped), two workers
# make lint  : ruff's lint and format check (configured in pyproject.toml)
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
# Set TORCH_INDEX to a PyTorch wheel index (e.g. its CPU index) to choose the build pip installs.
TORCH_INDEX ?=

.PHONY: install run test test-all lint format clean

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
test: install
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n $(TEST_WORKERS)

test-all: install
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --runslow

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) runs .pytest_cache
