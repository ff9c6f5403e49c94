// deploykit._native_cuda: CUDA kernels bound with raw device pointers (torch data_ptr(), checked
// on the Python side in deploykit/native/cuda.py). Importing never needs a GPU.
#include <pybind11/pybind11.h>

#include <cuda_runtime.h>
#include <stdexcept>
#include <string>

#include "kernels.h"

namespace py = pybind11;
namespace dc = deploykit::cuda;

namespace {
template <typename T>
T* ptr(uintptr_t p) { return reinterpret_cast<T*>(p); }

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess)
    throw std::runtime_error(std::string(what) + ": CUDA error " + cudaGetErrorName(e) + ": " +
                             cudaGetErrorString(e));
}
cudaStream_t stream_of(uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }
}  // namespace

PYBIND11_MODULE(_native_cuda, m) {
  m.doc() = "deploykit CUDA kernels: int8 GEMM (dp4a) with fused epilogue and MoE routing";
  m.def("device_count", [] {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) { cudaGetLastError(); return 0; }
    return n;
  }, "Number of visible CUDA devices (0 when no driver or GPU).");
  m.def("int8_gemm", [](uintptr_t qa, uintptr_t w, uintptr_t sa, uintptr_t sw, uintptr_t bias,
                        uintptr_t out, int M, int N, int Kp, int mode, uintptr_t stream) {
    if (Kp % 4) throw std::invalid_argument("int8_gemm: Kp must be a multiple of 4");
    if (mode < 0 || mode > 2) throw std::invalid_argument("int8_gemm: mode must be 0, 1 or 2");
    check(dc::int8_gemm(ptr<const int8_t>(qa), ptr<const int8_t>(w), ptr<const float>(sa),
                        ptr<const float>(sw), ptr<const float>(bias), ptr<void>(out), M, N, Kp,
                        mode, stream_of(stream)), "int8_gemm");
  }, py::arg("qa"), py::arg("w"), py::arg("sa"), py::arg("sw"), py::arg("bias"), py::arg("out"),
     py::arg("M"), py::arg("N"), py::arg("Kp"), py::arg("mode"), py::arg("stream") = 0);
  m.def("quantize_rows", [](uintptr_t x, uintptr_t qa, uintptr_t sa, int M, int K, int Kp,
                            uintptr_t stream) {
    check(dc::quantize_rows(ptr<const float>(x), ptr<int8_t>(qa), ptr<float>(sa), M, K, Kp,
                            stream_of(stream)), "quantize_rows");
  }, py::arg("x"), py::arg("qa"), py::arg("sa"), py::arg("M"), py::arg("K"), py::arg("Kp"),
     py::arg("stream") = 0);
  m.def("moe_route", [](uintptr_t logits, int T, int E, int k, bool softmax_all, uintptr_t ids,
                        uintptr_t weights, uintptr_t counts, uintptr_t offsets, uintptr_t perm,
                        uintptr_t inv, uintptr_t stream) {
    check(dc::moe_route(ptr<const float>(logits), T, E, k, softmax_all, ptr<int32_t>(ids),
                        ptr<float>(weights), ptr<int32_t>(counts), ptr<int32_t>(offsets),
                        ptr<int32_t>(perm), ptr<int32_t>(inv), stream_of(stream)), "moe_route");
  }, py::arg("logits"), py::arg("T"), py::arg("E"), py::arg("k"), py::arg("softmax_all"),
     py::arg("ids"), py::arg("weights"), py::arg("counts"), py::arg("offsets"), py::arg("perm"),
     py::arg("inv"), py::arg("stream") = 0);
}
