# The two quick-start commands: `make train` and `make test`. Each creates .venv on first use.
PYTHON ?= python3
VENV ?= .venv
CONFIG ?= experiments/mnist.py
WORKDIR ?= runs/mnist

.PHONY: install train test lint

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

lint: install
	$(VENV)/bin/ruff check .
