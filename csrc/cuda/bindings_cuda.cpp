// deploykit._native_cuda: CUDA kernels. Importing never needs a GPU; calls check for one.
#include <pybind11/pybind11.h>
#include <cuda_runtime.h>
namespace py = pybind11;

PYBIND11_MODULE(_native_cuda, m) {
  m.doc() = "deploykit CUDA kernels: int8 GEMM with fused epilogue and MoE routing";
  m.def("device_count", [] {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) { cudaGetLastError(); return 0; }
    return n;
  }, "Number of visible CUDA devices (0 when no driver or GPU).");
}
