# Two commands do all set-up on a fresh machine: `make demo` (a real search + report) and `make test`.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup system-deps demo test test-all lint bench

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,bench,nni]'
	touch $@

setup: $(VENV)/.installed

# Debian packages the tests use: Chromium for the report's browser tests; qemu-user and the
# aarch64 cross compiler for the emulated ARM board (tests marked arm).
system-deps:
	@command -v chromium >/dev/null && command -v qemu-aarch64-static >/dev/null && \
	  command -v aarch64-linux-gnu-g++ >/dev/null || { $(SUDO) apt-get update -q && \
	  $(SUDO) apt-get install -y -q chromium qemu-user-static gcc-aarch64-linux-gnu \
	  g++-aarch64-linux-gnu; }

demo: setup
	$(VENV)/bin/hwnas search --space mbv2-sparse --strategy random --device x86-local \
	  --trials 6 --epochs 2 --out runs/demo

# The tests share a study in PostgreSQL too: scripts/test-postgres.sh starts Debian's server on
# 127.0.0.1 and prints the URL. Most of the suite's time is single-threaded (starting Python
# processes that import torch and TVM), so TEST_WORKERS pytest-xdist workers run its modules
# side by side (each module on one worker: its fixtures are built once). On 2 cores, 3 workers
# were slower than 2 (fresh clone: 17m05s against 15m55s).
TEST_WORKERS ?= 2
test: setup system-deps
	$(VENV)/bin/ruff check .
	HWNAS_TEST_POSTGRES=$$(bash scripts/test-postgres.sh) $(PY) -m pytest -q \
	  -n $(TEST_WORKERS) --dist loadfile --durations=15

test-all: setup system-deps
	HWNAS_TEST_POSTGRES=$$(bash scripts/test-postgres.sh) $(PY) -m pytest -q -m ''

bench: setup
	$(PY) benchmarks/kernels.py
