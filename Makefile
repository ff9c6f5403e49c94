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
# scikit-build-core's editable install maps the package's files at install time, so adding a Python
# module needs a reinstall: key a stamp on the list of module paths.
PY_LIST    := $(shell find deploykit plugins -name '*.py' 2>/dev/null | sort | cksum | cut -d' ' -f1)
FILES_STAMP := $(VENV)/.stamp-files-$(PY_LIST)
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

# torch first, by exact pin (a CPU wheel is available for it), then the build tools.
$(DEPS_STAMP): constraints.txt | $(BIN)/python
	$(PIP) install --disable-pip-version-check -q torch==2.13.0
	$(PIPC) -q "scikit-build-core>=0.10" "pybind11>=2.12"
	touch $@

# The project with every extra it uses (editable: builds the C++ extension); rerun when native
# sources or metadata (dependencies, entry points) change.
$(EXT_STAMP): $(DEPS_STAMP) pyproject.toml $(NATIVE_SRC)
	$(PIPC) -q --no-build-isolation -e ".[all]"
	rm -f $(VENV)/.stamp-files-*
	touch $@

$(FILES_STAMP): $(EXT_STAMP)
	@if ls $(VENV)/.stamp-files-* >/dev/null 2>&1; then $(PIPC) -q --no-build-isolation --no-deps -e .; fi
	rm -f $(VENV)/.stamp-files-*
	touch $@

setup: $(FILES_STAMP)

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
