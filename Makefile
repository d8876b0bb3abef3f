# make run   : install, then train the built-in default (offline, CPU is fine)
# make test  : install, then the test suite (unit, config, integration; slow/gpu skipped)
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
# Set TORCH_INDEX to a PyTorch wheel index (e.g. its CPU index) to choose the build pip installs.
TORCH_INDEX ?=

.PHONY: install run test test-all bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/install_torch.sh
	$(PYTHON) -m venv $(VENV)
	TORCH_INDEX="$(TORCH_INDEX)" sh scripts/install_torch.sh $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

run: install
	$(BIN)/rredcot train $(ARGS)

test: install
	$(BIN)/python -m pytest -q

test-all: install
	$(BIN)/python -m pytest -q --runslow

clean:
	rm -rf $(VENV) runs .pytest_cache
