# The two README commands are `make book` and `make test`; everything else is a helper.
SHELL := /bin/bash
VENV := $(shell scripts/ensure_env.sh)
PY := $(VENV)/bin/python
export PYTHONPATH := $(CURDIR)$(if $(PYTHONPATH),:$(PYTHONPATH))
export MADEIT_DATA ?= $(abspath $(CURDIR)/../shared/data)
PROFILE ?= smoke

.PHONY: test unit lint book book-html book-deps book-check notebooks nbval clean env

env:
	@echo "environment: $(VENV)"

## make test: lint, unit tests, then the notebooks executed at the smoke profile and checked by nbval
test: lint unit notebooks

lint:
	$(VENV)/bin/ruff check madeit_core tests scripts

unit:
	$(PY) -m pytest -q -p no:cacheprovider tests

## Execute the notebooks at the smoke profile (only those whose library, source, parameters or
## reference inputs changed), then re-run each in a fresh kernel with nbval: every cell must run
## without error, and the cells tagged nbval-check-output must reproduce their outputs.
notebooks:
	$(PY) scripts/run_notebooks.py --profile smoke
	$(PY) -m pytest -q -p no:cacheprovider --nbval-lax --nbval-current-env \
	  --nbval-sanitize-with notebooks/nbval_sanitize.cfg notebooks/_executed

## make book: execute every notebook at PROFILE (default smoke) and build the HTML book.
## The build fails on any Sphinx warning (-W -n --keep-going reports them all first).
book: book-deps
	@if [ -f scripts/run_notebooks.py ]; then \
	  $(PY) scripts/run_notebooks.py --profile $(PROFILE); \
	else \
	  echo "scripts/run_notebooks.py is missing: the notebooks cannot be executed" >&2; exit 1; \
	fi
	$(PY) scripts/draw_diagrams.py --out book/_figures
	$(VENV)/bin/jupyter-book build . --all --config _config.yml --toc book/_toc.yml -W -n --keep-going
	@echo "book: $(CURDIR)/_build/html/index.html"

## Build the HTML from the notebooks already executed (no papermill run).
book-html: book-deps
	$(PY) scripts/draw_diagrams.py --out book/_figures
	$(VENV)/bin/jupyter-book build . --all --config _config.yml --toc book/_toc.yml -W -n --keep-going

## The book's local MathJax comes from the pinned PyPI package sphinx-mathjax-offline, which
## scripts/ensure_env.sh installs with requirements.txt; this only checks that it is there.
book-deps:
	@$(PY) -c "import importlib.util as u, sys; sys.exit(u.find_spec('sphinx-mathjax-offline') is None)" \
	  || $(PY) -m pip install -q "$$(grep -i '^sphinx-mathjax-offline==' requirements.txt)"

## Screenshot every page of the built book in headless Chromium and check math and images.
book-check:
	$(PY) scripts/check_book.py _build/html --out _build/screenshots

clean:
	rm -rf _build notebooks/_executed book/_figures
