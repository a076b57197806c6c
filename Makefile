# Two commands: `make demo` and `make test`. Both create .venv when it is missing.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch; pip takes a local wheel where one is provided (PIP_FIND_LINKS).
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed-base: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[examples]"
	touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.installed-base
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

demo: $(VENV)/.installed-base
	$(BIN)/python examples/demo.py --output-dir outputs/demo

test: $(VENV)/.installed-test
	$(BIN)/ruff check trainer callbacks strategies examples tests benchmarks
	$(BIN)/python -m pytest -q

lint: $(VENV)/.installed-test
	$(BIN)/ruff check trainer callbacks strategies examples tests benchmarks

bench: $(VENV)/.installed-base
	$(BIN)/python benchmarks/overhead.py
	$(BIN)/python benchmarks/big_model.py

clean:
	rm -rf $(VENV) outputs .pytest_cache
