// Int8 GEMM with dp4a (sm_61+) and the fused dequant / bias / SwiGLU epilogue.
// Tile: 64 x 64 outputs per 256-thread block, 4 x 4 per thread, K in steps of 32 bytes staged
// through shared memory as int32 words (4 int8 each) so every dp4a reads one word per operand.
#include <cstdint>

#include "kernels.h"

namespace deploykit::cuda {
namespace {

constexpr int BM = 64, BN = 64, BKW = 8;  // BKW int32 words = 32 int8 of K per stage
constexpr int TM = 4, TN = 4;

__device__ __forceinline__ float silu(float g) { return g / (1.f + __expf(-g)); }

// C[m, n] = sum_k A[m, k] * B[n, k] for rows [row0, row0 + BM) of A and [col0, col0 + BN) of B.
__device__ __forceinline__ void tile_dp4a(const int8_t* A, const int8_t* B, int M, int NB,
                                          int Kp, int row0, int col0, int acc[TM][TN]) {
  __shared__ int As[BKW][BM + 1];
  __shared__ int Bs[BKW][BN + 1];
  const int tid = threadIdx.x;
  const int ty = tid / (BN / TN), tx = tid % (BN / TN);
  const int Kw = Kp / 4;
  const int* A32 = reinterpret_cast<const int*>(A);
  const int* B32 = reinterpret_cast<const int*>(B);
  for (int kw0 = 0; kw0 < Kw; kw0 += BKW) {
    // 64 rows x 8 words = 512 words per operand, 2 per thread
    for (int i = tid; i < BM * BKW; i += blockDim.x) {
      const int r = i / BKW, c = i % BKW;
      const int gr = row0 + r, gk = kw0 + c;
      As[c][r] = (gr < M && gk < Kw) ? A32[static_cast<int64_t>(gr) * Kw + gk] : 0;
      const int gn = col0 + r;
      Bs[c][r] = (gn < NB && gk < Kw) ? B32[static_cast<int64_t>(gn) * Kw + gk] : 0;
    }
    __syncthreads();
#pragma unroll
    for (int c = 0; c < BKW; ++c) {
      int a[TM], b[TN];
#pragma unroll
      for (int i = 0; i < TM; ++i) a[i] = As[c][ty * TM + i];
#pragma unroll
      for (int j = 0; j < TN; ++j) b[j] = Bs[c][tx * TN + j];
#pragma unroll
      for (int i = 0; i < TM; ++i)
#pragma unroll
        for (int j = 0; j < TN; ++j) acc[i][j] = __dp4a(a[i], b[j], acc[i][j]);
    }
    __syncthreads();
  }
}

__global__ void gemm_kernel(const int8_t* qa, const int8_t* w, const float* sa, const float* sw,
                            const float* bias, float* out, int32_t* out_i32, int M, int N, int Kp,
                            int mode) {
  const int row0 = blockIdx.y * BM, col0 = blockIdx.x * BN;
  const int ty = threadIdx.x / (BN / TN), tx = threadIdx.x % (BN / TN);
  int acc[TM][TN] = {};
  if (mode == 1) {
    // gate rows [0, N), up rows [N, 2N) of w: two accumulators sets, combined in the epilogue
    int accu[TM][TN] = {};
    tile_dp4a(qa, w, M, N, Kp, row0, col0, acc);
    tile_dp4a(qa, w + static_cast<int64_t>(N) * Kp, M, N, Kp, row0, col0, accu);
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
      for (int j = 0; j < TN; ++j) {
        const int m = row0 + ty * TM + i, n = col0 + tx * TN + j;
        if (m >= M || n >= N) continue;
        float g = acc[i][j] * (sa[m] * sw[n]);
        float u = accu[i][j] * (sa[m] * sw[N + n]);
        if (bias) { g += bias[n]; u += bias[N + n]; }
        out[static_cast<int64_t>(m) * N + n] = silu(g) * u;
      }
    return;
  }
  tile_dp4a(qa, w, M, N, Kp, row0, col0, acc);
#pragma unroll
  for (int i = 0; i < TM; ++i)
#pragma unroll
    for (int j = 0; j < TN; ++j) {
      const int m = row0 + ty * TM + i, n = col0 + tx * TN + j;
      if (m >= M || n >= N) continue;
      if (mode == 2) {
        out_i32[static_cast<int64_t>(m) * N + n] = acc[i][j];
      } else {
        float y = acc[i][j] * (sa[m] * sw[n]);
        if (bias) y += bias[n];
        out[static_cast<int64_t>(m) * N + n] = y;
      }
    }
}

// One warp per row: amax by warp reduction, then quantize (round half to even, __float2int_rn).
__global__ void quantize_kernel(const float* x, int8_t* qa, float* sa, int M, int K, int Kp) {
  const int warp = (blockIdx.x * blockDim.x + threadIdx.x) / 32, lane = threadIdx.x % 32;
  if (warp >= M) return;
  const float* xr = x + static_cast<int64_t>(warp) * K;
  float amax = 0.f;
  for (int k = lane; k < K; k += 32) amax = fmaxf(amax, fabsf(xr[k]));
  for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
  const float inv = amax > 0.f ? 127.f / amax : 0.f;
  if (lane == 0) sa[warp] = amax / 127.f;
  int8_t* qr = qa + static_cast<int64_t>(warp) * Kp;
  for (int k = lane; k < Kp; k += 32) {
    int q = 0;
    if (k < K) q = max(-127, min(127, __float2int_rn(__fmul_rn(xr[k], inv))));
    qr[k] = static_cast<int8_t>(q);
  }
}

}  // namespace

cudaError_t int8_gemm(const int8_t* qa, const int8_t* w, const float* sa, const float* sw,
                      const float* bias, void* out, int M, int N, int Kp, int mode,
                      cudaStream_t stream) {
  if (M == 0 || N == 0) return cudaSuccess;
  dim3 grid((N + BN - 1) / BN, (M + BM - 1) / BM);
  gemm_kernel<<<grid, (BM / TM) * (BN / TN), 0, stream>>>(
      qa, w, sa, sw, bias, static_cast<float*>(out), static_cast<int32_t*>(out), M, N, Kp, mode);
  return cudaGetLastError();
}

cudaError_t quantize_rows(const float* x, int8_t* qa, float* sa, int M, int K, int Kp,
                          cudaStream_t stream) {
  if (M == 0) return cudaSuccess;
  const int threads = 256, rows_per_block = threads / 32;
  quantize_kernel<<<(M + rows_per_block - 1) / rows_per_block, threads, 0, stream>>>(x, qa, sa, M, K, Kp);
  return cudaGetLastError();
}

}  // namespace deploykit::cuda
