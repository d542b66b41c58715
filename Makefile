# The two quick-start commands: `make train` and `make test`. Each creates .venv on first use.
# `make test-fast` is the edit loop's tier: no MNIST files, no kernel build (README: its time).
PYTHON ?= python3
VENV ?= .venv
CONFIG ?= experiments/mnist.py
WORKDIR ?= runs/mnist

.PHONY: install train test test-fast lint

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -c constraints.txt -e ".[test]"
	touch $@

install: $(VENV)/.installed

train: install
	$(VENV)/bin/python launch.py --config=$(CONFIG) --workdir=$(WORKDIR)

test: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/python -m pytest -q

test-fast: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/python -m pytest -q -m "not slow"

lint: install
	$(VENV)/bin/ruff check .
