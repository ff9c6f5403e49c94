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
# llama-cpp-python (the gguf backend's runtime) has no CPU wheel on PyPI: it compiles llama.cpp,
# about 4 minutes on 2 cores. Build it once into a kept wheel folder and install from there on
# every later run. GGML_NATIVE=OFF compiles the portable AVX2/FMA/F16C baseline (and avoids the
# AMX crash of native builds, see README "Installing"); the folder is keyed on the flags, so a
# wheel built with other flags is never picked up by mistake.
LLAMA_CPP_VERSION ?= 0.3.36
LLAMA_CMAKE_ARGS  ?= -DGGML_NATIVE=OFF -DGGML_OPENMP=ON -DGGML_BLAS=OFF -DLLAVA_BUILD=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TOOLS=OFF
WHEEL_CACHE ?= $(HOME)/.cache/deploykit/wheels
LLAMA_KEY   := $(shell echo '$(LLAMA_CPP_VERSION) $(LLAMA_CMAKE_ARGS) $(PYTHON)' | cksum | cut -d' ' -f1)
LLAMA_WHEELS := $(WHEEL_CACHE)/llama-cpp-$(LLAMA_KEY)
LLAMA_STAMP  := $(VENV)/.stamp-llama-cpp-$(LLAMA_KEY)

.PHONY: setup demo test test-all bench align-demo clean help llama-cpp-wheel

help:
	@echo "make demo   - set up, train the demo model, generate, convert to every backend, bench"
	@echo "make test   - set up, then run the test suite (slow and gpu tests excluded)"
	@echo "make test-all - include @slow tests"
	@echo "make bench  - regenerate benchmarks/results/ (micro, micro-moe across every backend)"
	@echo "make align-demo - base -> SFT -> reward model -> PPO / DPO, table in benchmarks/results/alignment.md"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --disable-pip-version-check -q --upgrade pip wheel

# torch first, by exact pin (a CPU wheel is available for it), then the build tools.
$(DEPS_STAMP): constraints.txt | $(BIN)/python
	$(PIP) install --disable-pip-version-check -q torch==2.13.0
	$(PIPC) -q "scikit-build-core>=0.10" "pybind11>=2.12"
	touch $@

# Build the llama-cpp-python wheel unless the kept folder already has it (pip wheel does not
# look in the wheel cache for a source build, so the check is ours).
llama-cpp-wheel: | $(BIN)/python
	@if ls $(LLAMA_WHEELS)/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl >/dev/null 2>&1; then \
	  echo "llama-cpp-python $(LLAMA_CPP_VERSION): reusing $(LLAMA_WHEELS)"; \
	else \
	  echo "llama-cpp-python $(LLAMA_CPP_VERSION): building once into $(LLAMA_WHEELS) (about 4 min)"; \
	  mkdir -p $(LLAMA_WHEELS) && \
	  CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=2 \
	    $(PIP) wheel --disable-pip-version-check -q --no-deps -w $(LLAMA_WHEELS) \
	    llama-cpp-python==$(LLAMA_CPP_VERSION); \
	fi

# Installed before the project so that ".[all]" (whose gguf extra asks for llama-cpp-python) finds
# it satisfied instead of compiling it again.
$(LLAMA_STAMP): $(DEPS_STAMP)
	$(MAKE) --no-print-directory llama-cpp-wheel
	$(PIPC) -q --only-binary=llama-cpp-python --find-links $(LLAMA_WHEELS) llama-cpp-python==$(LLAMA_CPP_VERSION)
	rm -f $(VENV)/.stamp-llama-cpp-*
	touch $@

# The project with every extra it uses (editable: builds the C++ extension); rerun when native
# sources or metadata (dependencies, entry points) change. ".[all]" brings the edge backends' tools
# too: tensorflow-cpu + ai-edge-litert (tflite) and coremltools + scikit-learn (coreml), seen
# together with torch 2.13 at tensorflow-cpu 2.21 and coremltools 9.0. tensorrt is not in it: its
# libraries come from NVIDIA's index and need a GPU (README).
$(EXT_STAMP): $(DEPS_STAMP) $(LLAMA_STAMP) pyproject.toml $(NATIVE_SRC)
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

# base -> SFT -> reward model -> PPO and DPO on the embedded tasks; writes benchmarks/results/alignment.*
align-demo: setup
	$(BIN)/python benchmarks/alignment.py --base $(DEMO_DIR) --work runs/align --threads $(THREADS)

bench: setup
	$(BIN)/python benchmarks/run_all.py --threads $(THREADS)

clean:
	rm -rf build $(VENV) .pytest_cache
