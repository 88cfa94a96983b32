# Two commands do all set-up on a fresh machine: `make demo` (a real search + report) and `make test`.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup system-deps demo test test-all lint bench

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,bench]'
	touch $@

setup: $(VENV)/.installed

# Debian packages the tests use: Chromium for the report's browser tests.
system-deps:
	@command -v chromium >/dev/null || { $(SUDO) apt-get update -q && \
	  $(SUDO) apt-get install -y -q chromium; }

demo: setup
	$(VENV)/bin/hwnas search --space mbv2-sparse --strategy random --device x86-local \
	  --trials 6 --epochs 2 --out runs/demo

test: setup system-deps
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

test-all: setup system-deps
	$(PY) -m pytest -q -m ''

bench: setup
	$(PY) benchmarks/kernels.py
