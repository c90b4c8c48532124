# `make demo` and `make test` work on a fresh machine: they create .venv when it is missing and install into it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
RUNS ?= runs/demo
RESULTS ?= results/demo

.PHONY: demo test install clean-demo bench

$(VENV)/.installed: requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

install: $(VENV)/.installed

# The main job on the built-in default data (scikit-learn's 8x8 digits), CPU, a few minutes.
demo: install
	$(PY) scripts/demo.py --runs-root $(RUNS) --results-root $(RESULTS)

test: install
	$(PY) -m pytest -q -n auto --maxprocesses 4 tests

bench: install
	$(PY) benchmarks/run_all.py

clean-demo:
	rm -rf $(RUNS) $(RESULTS)
