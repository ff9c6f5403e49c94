#!/usr/bin/env bash
# One go on a machine with an NVIDIA GPU: build the CUDA kernels for Hopper (sm_90) plus the
# default list, run the gpu tests, time the kernels, and write benchmarks/results/kernels_cuda.*
#   bash benchmarks/cuda/run_cuda_checks.sh            (uses .venv/bin/python, or $PYTHON)
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
nvidia-smi || true
# A CUDA build of torch is needed for the tensors; the extension itself only needs nvcc.
DEPLOYKIT_CUDA=ON "$PY" -m pip install --no-build-isolation --no-deps -e . \
  --config-settings=cmake.define.CMAKE_CUDA_ARCHITECTURES="80;90" 2>&1 | tail -3
"$PY" - <<'PYEOF'
from deploykit.native import cuda
print("cuda kernels built:", cuda.built(), "available:", cuda.available(), cuda.unavailable_reason() or "")
PYEOF
"$PY" -m pytest -q -m gpu tests/native/test_cuda.py 2>&1 | tee benchmarks/results/kernels_cuda_tests.txt
"$PY" benchmarks/cuda/bench_cuda.py
