# Two commands do all the set-up on a fresh clone:
#   make chat   - create .venv, install kvchat, fetch the embedded model, open the chat
#   make test   - the same set-up, then the whole test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kvchat-installed

.PHONY: chat test setup bench

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)
	$(VENV)/bin/kvchat setup

chat: setup
	$(VENV)/bin/kvchat

test: setup
	$(PY) -m pytest -n 2 -q

bench: setup
	$(PY) benchmarks/run_all.py
