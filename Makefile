# Two entry points; each sets up .venv itself on a fresh machine.
#   make demo   export the built-in model, check parity, generate text
#   make test   run the test suite (what CI runs)
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test
setup:
	@scripts/setup_env.sh

demo: setup
	@$(PY) scripts/demo.py

test: setup
	@$(PY) -m pytest -q -rs tests
