// MoE routing on the GPU: (1) one thread per token selects top-k (ties -> lower index), writes
// softmax weights and atomically counts per expert; (2) one block prefix-sums the counts into
// offsets; (3) one block per expert ranks its (token, slot) entries in flat order with a block
// scan, which makes the permutation stable (tokens ascending within an expert) like the CPU.
#include <cub/block/block_scan.cuh>
#include <cstdint>

#include "kernels.h"

namespace deploykit::cuda {
namespace {

constexpr int kMaxK = 16;

__global__ void topk_kernel(const float* logits, int T, int E, int k, bool softmax_all,
                            int32_t* ids, float* weights, int32_t* counts) {
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  if (t >= T) return;
  const float* l = logits + static_cast<int64_t>(t) * E;
  int id[kMaxK];
  float v[kMaxK];
  int n = 0;
  for (int e = 0; e < E; ++e) {
    const float x = l[e];
    if (n == k && !(x > v[k - 1])) continue;
    int pos = n < k ? n++ : k - 1;
    while (pos > 0 && x > v[pos - 1]) { v[pos] = v[pos - 1]; id[pos] = id[pos - 1]; --pos; }
    v[pos] = x;
    id[pos] = e;
  }
  const float lmax = v[0];
  float z = 0.f;
  if (softmax_all) {
    for (int e = 0; e < E; ++e) z += expf(l[e] - lmax);
  } else {
    for (int s = 0; s < k; ++s) z += expf(v[s] - lmax);
  }
  for (int s = 0; s < k; ++s) {
    ids[t * k + s] = id[s];
    weights[t * k + s] = expf(v[s] - lmax) / z;
    atomicAdd(&counts[id[s]], 1);
  }
}

__global__ void offsets_kernel(const int32_t* counts, int E, int32_t* offsets) {
  if (threadIdx.x == 0) {  // E is small (<= a few hundred): a serial scan is fine
    int s = 0;
    offsets[0] = 0;
    for (int e = 0; e < E; ++e) { s += counts[e]; offsets[e + 1] = s; }
  }
}

template <int BLOCK>
__global__ void permute_kernel(const int32_t* ids, int n, const int32_t* offsets, int32_t* perm,
                               int32_t* inv) {
  using Scan = cub::BlockScan<int, BLOCK>;
  __shared__ typename Scan::TempStorage tmp;
  __shared__ int base;
  const int e = blockIdx.x;
  if (threadIdx.x == 0) base = offsets[e];
  __syncthreads();
  for (int i0 = 0; i0 < n; i0 += BLOCK) {
    const int i = i0 + threadIdx.x;
    const int hit = (i < n && ids[i] == e) ? 1 : 0;
    int rank, total;
    Scan(tmp).ExclusiveSum(hit, rank, total);
    if (hit) {
      const int j = base + rank;
      perm[j] = i;
      inv[i] = j;
    }
    __syncthreads();
    if (threadIdx.x == 0) base += total;
    __syncthreads();
  }
}

}  // namespace

cudaError_t moe_route(const float* logits, int T, int E, int k, bool softmax_all, int32_t* ids,
                      float* weights, int32_t* counts, int32_t* offsets, int32_t* perm,
                      int32_t* inv, cudaStream_t stream) {
  if (k < 1 || k > E || k > kMaxK) return cudaErrorInvalidValue;
  if (T > 0)
    topk_kernel<<<(T + 127) / 128, 128, 0, stream>>>(logits, T, E, k, softmax_all, ids, weights, counts);
  offsets_kernel<<<1, 32, 0, stream>>>(counts, E, offsets);
  if (T > 0) permute_kernel<256><<<E, 256, 0, stream>>>(ids, T * k, offsets, perm, inv);
  return cudaGetLastError();
}

}  // namespace deploykit::cuda
