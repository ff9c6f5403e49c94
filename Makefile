# Two commands set everything up on a fresh machine:
#   make demo   - virtualenv, install, build the C++ extension, run the main job on the embedded corpus
#   make test   - the same set-up, then the whole test suite
# Set-up is idempotent: stamps make a second run skip straight to the work.

PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip
# Every install after torch is constrained to the CPU torch pin, so nothing pulls a CUDA build.
PIPC   := $(PIP) install --disable-pip-version-check -c constraints.txt
DEPS_STAMP := $(VENV)/.stamp-deps
EXT_STAMP  := $(VENV)/.stamp-ext
NATIVE_SRC := $(shell find csrc -type f 2>/dev/null) CMakeLists.txt
DEMO_DIR   ?= runs/demo
THREADS    ?= 2

.PHONY: setup demo test test-all bench clean help

help:
	@echo "make demo   - set up, train the demo model, generate, convert to every backend, bench"
	@echo "make test   - set up, then run the test suite (slow and gpu tests excluded)"
	@echo "make test-all - include @slow tests"
	@echo "make bench  - regenerate benchmarks/results/ (micro, micro-moe across every backend)"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --disable-pip-version-check -q --upgrade pip wheel

# torch first, by exact pin (a CPU wheel is available for it); then build tools, then the project's
# dependencies with every extra it uses so far.
$(DEPS_STAMP): pyproject.toml constraints.txt | $(BIN)/python
	$(PIP) install --disable-pip-version-check -q torch==2.13.0
	$(PIPC) -q "scikit-build-core>=0.10" "pybind11>=2.12"
	$(PIPC) -q --no-build-isolation -e ".[all]"
	touch $@ $(EXT_STAMP)

# Rebuild the extension (and re-register entry points) when native sources or metadata change.
$(EXT_STAMP): $(DEPS_STAMP) $(NATIVE_SRC)
	$(PIPC) -q --no-build-isolation --no-deps -e .
	touch $@

setup: $(EXT_STAMP)

test: setup
	$(BIN)/python -m pytest -q

test-all: setup
	$(BIN)/python -m pytest -q -m "not gpu"

demo: setup
	$(BIN)/python benchmarks/demo.py --out $(DEMO_DIR) --threads $(THREADS)

bench: setup
	$(BIN)/python benchmarks/run_all.py --threads $(THREADS)

clean:
	rm -rf build $(VENV) .pytest_cache
