# Two set-up commands: `make demo` and `make test`. Both create .venv and install when needed.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
PYTHON ?= python3.11

.PHONY: demo test lint clean

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@# torch first and exactly pinned: pip takes the CPU wheel on disk; a looser pin pulls a CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/edgekit build

# System packages (sshd, dockerd, qemu) and the offline base images' Debian packages and wheels come from the
# package registries here, once; the tests themselves reach nothing beyond 127.0.0.1. Two pytest-xdist workers,
# each test file on one worker (its module fixtures built once); the end-to-end build is shared (tests/conftest.py).
test: $(STAMP)
	bash tests/system_deps.sh
	$(PY) -m edgekit.device.images fetch x86-64 rpi5
	$(PY) -m pytest -q -n 2 --dist loadfile

lint: $(STAMP)
	$(VENV)/bin/ruff check edgekit tests benchmarks

clean:
	rm -rf runs .pytest_cache
