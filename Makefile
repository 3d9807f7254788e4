# Pollinate: `make demo` runs the default simulated federation, `make test` the test suite, `make bench` the
# benchmarks. Each creates .venv and installs the project on first use. Pass Hydra overrides with ARGS="...".
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test test-fast bench bench-strategies bench-deploy bench-render clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install -qq --disable-pip-version-check -e '.[test]'
	@touch $(STAMP)

demo: $(STAMP)
	$(PY) -m simulations.run $(ARGS)

test: $(STAMP)  # the whole suite, as CI runs it
	$(PY) -m pytest -q $(ARGS)

test-fast: $(STAMP)  # the edit loop: unit tests only, no engines, processes or slow tests
	$(PY) -m pytest -q -m "not integration and not slow" $(ARGS)

bench: $(STAMP)  # every section into benchmarks/results/, rendered into BENCHMARKS.md (hours on 2 cores); ARGS="--quick" or ARGS="--only quality,memory"
	$(PY) benchmarks/run.py $(ARGS)

bench-render: $(STAMP)  # seconds: BENCHMARKS.md from benchmarks/results/*.json again (after a change to benchmarks/render.py)
	$(PY) benchmarks/render.py

bench-strategies: $(STAMP)  # about 25 minutes: every strategy, DP off and at epsilon 8
	$(PY) benchmarks/compare_strategies.py $(ARGS)

bench-deploy: $(STAMP)  # about 10 minutes: a loopback deployment (SuperLink + 3 devices) against a simulation
	$(PY) benchmarks/deployment.py $(ARGS)

clean:
	rm -rf outputs multirun .pytest_cache
