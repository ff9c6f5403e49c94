// Int4 linear kernels: group-wise 4-bit weights x per-row int8 activations, unpacked in registers.
//
// Numeric contract (identical for every ISA variant):
//   activations: the int8 contract of int8_kernels.h (per row, symmetric, [-127, 127], sa[r]),
//                rows zero-padded to Kp = G * 32.
//   weights:     per output channel n and group g of 32 consecutive k: q[n, k] in [-8, 7] and a
//                scale sw[n, g] (llama.cpp's Q4_0 grid: the scale is max / -8 of the group's value
//                of largest magnitude, rounded to fp16, so deploykit's rounding writes Q4_0 blocks).
//   acc[r, n, g] = sum_{k in g} qa[r, k] * q[n, k]              exact in int32 (|acc| <= 32*127*8)
//   y[r, n]    = (fma over g in order: yf = fma(float(acc[r,n,g]), sw[n,g], yf)) * sa[r] + bias[n]
//   swiglu:      y = silu(g) * u of the gate/up pair, as in the int8 kernels.
// Every variant computes acc bit for bit as the scalar one and the fp32 fma chain in the same order.
//
// Packed layout: channels in panels of 16 (kPanel), like the int8 packs; nibbles are stored
// unsigned, u = q + 8 in [0, 15] (padding: u = 8, i.e. q = 0). Panel p, group g is 256 bytes:
// four blocks of 64 bytes; block i holds k-quads 2i (low nibbles) and 2i + 1 (high nibbles), and
// byte b of a block is channel b / 4, k = 4 * quad + b % 4 within the group. So one 64-byte load,
// masked and shifted, gives two registers in the int8 kernels' (16 channels x 4 k) lane layout.
// Because the weights are the unsigned operand, vpdpbusd (u8 x s8) and vpmaddubsw take them
// directly and the activations stay signed; the +8 is removed per (row, group) with the
// activation group sums asum[r, g] = sum_{k in g} qa[r, k]:  acc = sum u * qa - 8 * asum.
// Scales: sw[(p * G + g) * 16 + j] (0 in padding channels). Panel stride = G * 256 bytes.
#pragma once
#include <cstdint>
#include <vector>

#include "cpu_features.h"
#include "int8_kernels.h"

namespace deploykit {

constexpr int kGroup = 32;
constexpr int kGroupBytes = kGroup * kPanel / 2;  // 256: one panel-group of packed nibbles

struct Int4Args {
  const int8_t* qa = nullptr;    // (M, >= G*32) activations, row stride lda
  int64_t lda = 0;
  const float* sa = nullptr;     // (M,)
  const int32_t* asum = nullptr; // (M, >= G) activation group sums, row stride ldasum
  int64_t ldasum = 0;
  const uint8_t* w = nullptr;    // packed nibbles
  const float* sw = nullptr;     // (n_panels, G, 16)
  const float* bias = nullptr;   // (N,) or (2F,) = [gate; up] for SwiGlu
  int64_t M = 0, G = 0, n_panels = 0, N = 0;  // N: logical outputs (F for SwiGlu)
  Epilogue epi = Epilogue::Float;
  float* out = nullptr;          // (M, ldo)
  int64_t ldo = 0;
  int32_t* out_i32 = nullptr;    // Raw: (M, n_panels * 16, G) per internal channel and group
};

int64_t int4_units(const Int4Args& a);
void int4_block(Isa isa, const Int4Args& a, int64_t m0, int64_t m1, int64_t u0, int64_t u1);
// Several int4 GEMMs in one parallel call (q/k/v): pieces of about equal cost, as run_gemm_group.
void run_int4_group(const Int4Args* args, int64_t n, Isa isa, int nthreads, std::vector<GemmPiece>& pieces);
// asum[r, g] of quantized rows [0, M) (row stride lda), G groups.
void group_sums(Isa isa, const int8_t* qa, int64_t lda, int64_t M, int64_t G, int32_t* asum, int64_t ldasum);

void int4_block_scalar(const Int4Args& a, int64_t m0, int64_t m1, int64_t u0, int64_t u1);
void int4_block_avx2(const Int4Args& a, int64_t m0, int64_t m1, int64_t u0, int64_t u1);
void int4_block_avx512vnni(const Int4Args& a, int64_t m0, int64_t m1, int64_t u0, int64_t u1);
void group_sums_avx2(const int8_t* qa, int64_t lda, int64_t M, int64_t G, int32_t* asum, int64_t ldasum);

// The epilogue of one tile of float partials yf (rows m0.., internal panels of unit u, row
// stride ldy, already the fma chain over groups): y = yf * sa + bias, or silu(g) * u.
void int4_finish_scalar(const Int4Args& a, const float* yf, int64_t ldy, int64_t m0, int mr, int64_t u);

}  // namespace deploykit
