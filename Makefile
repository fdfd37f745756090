# oncoslide: `make demo` sets up and runs the main job; `make test` sets up and runs the tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --constraint constraints.txt
DEMO_OUT ?= demo-out

.PHONY: demo demo-heatmap test test-all lint typecheck bench clean

$(VENV)/.base: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -e .
	touch $@

$(VENV)/.dev: $(VENV)/.base
	$(PIP) -e '.[dev]'
	touch $@

demo: $(VENV)/.base
	$(VENV)/bin/oncoslide demo --out $(DEMO_OUT)

demo-heatmap: $(VENV)/.base
	$(VENV)/bin/oncoslide demo --heatmap --out $(DEMO_OUT)

test: $(VENV)/.dev
	$(PY) -m pytest -q -m "not slow" -n 2 --dist loadfile --no-loadscope-reorder

test-all: $(VENV)/.dev
	$(PY) -m pytest -q

lint: $(VENV)/.dev
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

typecheck: $(VENV)/.dev
	$(VENV)/bin/mypy

bench: $(VENV)/.base
	$(PY) benchmarks/bench_train.py

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache .mypy_cache .ruff_cache
