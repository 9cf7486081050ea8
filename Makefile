# kpjax: `make demo` sets up .venv and trains the demo model; `make test` sets up the test extras
# and runs the suite. Both only need Python 3.11 and the package registries.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= workdir/demo
PYTEST_ARGS ?= -n 2

.PHONY: setup setup-test demo test clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .
	touch $@

# torch is pinned to 2.13.0, the CPU build (a bare `torch` would pull a multi-GB CUDA build).
$(VENV)/.installed-test: $(VENV)/.installed
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

setup: $(VENV)/.installed
setup-test: $(VENV)/.installed-test

demo: $(VENV)/.installed
	$(PY) -m kpjax.train --config configs/demo.py --workdir $(WORKDIR)

test: $(VENV)/.installed-test
	$(PY) -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) workdir .pytest_cache
