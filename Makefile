# Two commands: `make demo` and `make test`. Both create .venv when it is missing.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch; pip takes a local wheel where one is provided (PIP_FIND_LINKS).
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test docs test-xla lint bench bench-peer clean

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
	$(BIN)/ruff check trainer callbacks strategies examples tests benchmarks tools
	$(BIN)/mypy  # the type checker over trainer, callbacks and strategies ([tool.mypy] in pyproject.toml)
	$(BIN)/python -m pytest -q
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict  # not -q: it hides the warnings that --strict counts

# The documentation site (MkDocs, Material) into site/; --strict: a broken link, anchor or API reference fails it.
$(VENV)/.installed-docs: pyproject.toml $(VENV)/.installed-base
	$(BIN)/pip install --quiet -e ".[docs]"
	touch $@

docs: $(VENV)/.installed-docs
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

# XLA on the CPU (PJRT_DEVICE=CPU), in its own environment: torch_xla 2.9 needs torch 2.9, not the
# torch of .venv. About 7 GB (PyPI's torch 2.9 brings its CUDA libraries); kept out of `make test`.
XLA_VENV := .venv-xla
XLA_SPEC ?= torch==2.9.0 torch_xla==2.9.0

$(XLA_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(XLA_VENV)
	$(XLA_VENV)/bin/pip install --quiet --upgrade pip
	$(XLA_VENV)/bin/pip install --quiet $(XLA_SPEC)
	$(XLA_VENV)/bin/pip install --quiet -e . "pytest>=8" "pytest-timeout>=2.2" $(XLA_SPEC)
	touch $@

test-xla: $(XLA_VENV)/.installed
	PJRT_DEVICE=CPU $(XLA_VENV)/bin/python -m pytest -q tests/test_xla.py

lint: $(VENV)/.installed-test
	$(BIN)/ruff check trainer callbacks strategies examples tests benchmarks tools
	$(BIN)/mypy

bench: $(VENV)/.installed-base
	$(BIN)/python benchmarks/overhead.py
	$(BIN)/python benchmarks/big_model.py

# The same benchmarks with Accelerate installed beside this project, in an environment of their own
# (Accelerate is never a dependency of the project): they then also print project / Accelerate.
PEER_VENV := .venv-bench
PEER_SPEC ?= accelerate==1.15.0

$(PEER_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(PEER_VENV)
	$(PEER_VENV)/bin/pip install --quiet --upgrade pip
	$(PEER_VENV)/bin/pip install --quiet "$(TORCH_SPEC)"
	$(PEER_VENV)/bin/pip install --quiet -e . "$(PEER_SPEC)"
	touch $@

bench-peer: $(PEER_VENV)/.installed
	$(PEER_VENV)/bin/python benchmarks/checkpoint_io.py
	$(PEER_VENV)/bin/python benchmarks/big_model.py

clean:
	rm -rf $(VENV) $(XLA_VENV) $(PEER_VENV) outputs .pytest_cache site
