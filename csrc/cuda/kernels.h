// Host-side launchers of the CUDA kernels (device pointers in, async on `stream`).
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

namespace deploykit::cuda {

// mode 0: y = acc * sa * sw + bias ; mode 1: swiglu over rows [gate F | up F] of w (2F, Kp),
// y (M, F) = silu(g) * u ; mode 2: raw int32 accumulators (M, N).
// qa (M, Kp) and w (rows, Kp) are row-major int8 with Kp % 4 == 0 (zero padded).
cudaError_t int8_gemm(const int8_t* qa, const int8_t* w, const float* sa, const float* sw,
                      const float* bias, void* out, int M, int N, int Kp, int mode,
                      cudaStream_t stream);

// Per-row symmetric quantization (same contract as the CPU kernels): qa (M, Kp), sa (M,).
cudaError_t quantize_rows(const float* x, int8_t* qa, float* sa, int M, int K, int Kp,
                          cudaStream_t stream);

// Top-k (ties -> lower index), softmax over the k (or all E), counts, offsets, and the stable
// expert-grouped permutation. counts must be zeroed by the caller (it is accumulated).
cudaError_t moe_route(const float* logits, int T, int E, int k, bool softmax_all, int32_t* ids,
                      float* weights, int32_t* counts, int32_t* offsets, int32_t* perm,
                      int32_t* inv, cudaStream_t stream);

}  // namespace deploykit::cuda
