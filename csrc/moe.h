// The int8 MoE-FFN forward, callable from C++ (the engine) with caller-owned scratch.
#pragma once
#include <cstdint>
#include <vector>

#include "int8_kernels.h"

namespace deploykit {

// E SwiGLU experts in the kernel layout: w13 = SwiGLU pack of [w1; w3], w2 plain, per expert.
struct MoeWeights {
  const int8_t* w13 = nullptr;
  const float* s13 = nullptr;
  const int32_t* c13 = nullptr;
  const int8_t* w2 = nullptr;
  const float* s2 = nullptr;
  const int32_t* c2 = nullptr;
  int64_t E = 0, D = 0, F = 0;
  int64_t Dp() const { return (D + 3) / 4 * 4; }
  int64_t Fp() const { return (F + 3) / 4 * 4; }
  int64_t np13() const { return 2 * ((F + kPanel - 1) / kPanel); }
  int64_t np2() const { return (D + kPanel - 1) / kPanel; }
};

// Scratch of one moe_ffn_run caller; grows to the largest T seen and is then reused.
struct MoeWorkspace {
  std::vector<int32_t> ids, counts, offsets, perm, inv, cursor;  // cursor: the sort's 4 x E counters
  std::vector<int8_t> qx, qxs, qh;
  std::vector<float> wts, sx, sxs, h, sh, ys, ex;
  std::vector<GemmArgs> a1, a2;
  std::vector<GemmPiece> pieces;
  void ensure(const MoeWeights& w, int64_t T, int64_t k);
};

// out (T, D) = sum_s w[t, s] * expert_{ids[t, s]}(x[t]); routing as in moe.cpp's header.
void moe_ffn_run(const MoeWeights& w, const float* x, const float* logits, int64_t T, int64_t k,
                 bool softmax_all, float* out, MoeWorkspace& ws, Isa isa, int nthreads);

}  // namespace deploykit
