// Int8 linear kernels: shared layout, numeric contract and per-ISA entry points.
//
// Numeric contract (identical for every ISA, so results are bit-identical in int32):
//   activations: per row r, amax = max|x[r,:]|, inv = 127/amax (0 if amax == 0),
//                qa = clamp(round_half_even(x * inv), -127, 127), sa[r] = amax / 127
//   weights:     per output channel n, qw in [-127, 127] (symmetric), sw[n]
//   acc[r, n]  = sum_k qa[r,k] * qw[n,k]       exact in int32 (|acc| <= 127*127*K, K < 2^17)
//   y[r, n]    = float(acc) * (sa[r] * sw[n]) + bias[n]
//   swiglu:      y = silu(g) * u with g, u the two dequantized outputs of a gate/up pair.
// -127..127 (not -128) on both sides is what keeps the AVX2 path exact: with the sign trick
// (|w| as u8 times a * sign(w), or |a| times w * sign(a)) vpmaddubsw pairs are at most
// 2*127*127 = 32258 < 32767, so its int16 saturation never triggers. AVX-512 VNNI adds 128 to the activations (u8) and
// subtracts 128 * sum_k qw[n,k] (precomputed colsum) afterwards, also exact.
//
// Packed weight layout ("panels"): output channels in groups of 16 (kPanel), K padded with
// zeros to Kp = round_up(K, 4). Panel p holds, for each k-group g in [0, Kp/4):
//   64 bytes = 16 channels x 4 consecutive k values  (channel-major within the group)
// so one 32-bit lane holds one channel's 4 k values: what vpdpbusd and the
// vpmaddubsw + vpmaddwd pair reduce into one int32 lane. Panel stride = Kp * 16 bytes.
// Swiglu packs interleave panels: 2j = gate channels [16j, 16j+16), 2j+1 = up channels.
#pragma once
#include <cstdint>
#include <vector>

#include "cpu_features.h"

namespace deploykit {

constexpr int kPanel = 16;

enum class Epilogue { Float = 0, SwiGlu = 1, Raw = 2 };

struct GemmArgs {
  const int8_t* qa = nullptr;   // (M, Kp) quantized activations, row stride lda
  int64_t lda = 0;
  const float* sa = nullptr;    // (M,) activation scales
  const int8_t* w = nullptr;    // packed panels
  const float* sw = nullptr;    // (n_panels*16,) per internal channel scale, 0 in padding
  const int32_t* colsum = nullptr;  // (n_panels*16,) sum_k qw, for the VNNI compensation
  const float* bias = nullptr;  // logical bias: (N,) for Float, (2F,) = [gate; up] for SwiGlu
  int64_t M = 0, Kp = 0;
  int64_t n_panels = 0;         // internal panels
  int64_t N = 0;                // logical output columns (F for swiglu)
  Epilogue epi = Epilogue::Float;
  float* out = nullptr;         // (M, ldo) float output
  int32_t* out_i32 = nullptr;   // (M, ldo) raw accumulators (Raw): logical columns
  int64_t ldo = 0;
  // Raw epilogue on a swiglu pack: F, so internal panel u maps to logical columns
  // [gate F | up F]; 0 for plain packs.
  int64_t raw_pair_F = 0;
};

// Runs the GEMM with the given variant over rows [0, M) and all units, on nthreads threads.
void run_gemm(const GemmArgs& a, Isa isa, int nthreads);

// Several GEMMs in one parallel call (the engine's q/k/v, the MoE experts): work items are
// (GEMM, unit range) pieces of about equal cost, handed out dynamically. `pieces` is the
// caller's scratch (cleared, reused: no allocation once it has grown).
struct GemmPiece { int64_t g, u0, u1; };
void run_gemm_group(const GemmArgs* args, int64_t n, Isa isa, int nthreads,
                    std::vector<GemmPiece>& pieces);
int64_t n_units(const GemmArgs& a);
// Dispatch one block to the variant.
void gemm_block(Isa isa, const GemmArgs& a, int64_t m0, int64_t m1, int64_t u0, int64_t u1);
// Quantize rows [0, M) with the variant (parallel when large).
void quantize_rows(Isa isa, const float* x, int64_t ldx, int64_t M, int64_t K, int64_t Kp,
                   int8_t* qa, int64_t lda, float* sa, int nthreads);

// Compute rows [m0, m1) x panel units [u0, u1). A unit is one panel (Float/Raw) or one
// gate/up panel pair (SwiGlu), so units never split a pair.
void gemm_block_scalar(const GemmArgs& a, int64_t m0, int64_t m1, int64_t u0, int64_t u1);
void gemm_block_avx2(const GemmArgs& a, int64_t m0, int64_t m1, int64_t u0, int64_t u1);
void gemm_block_avx512vnni(const GemmArgs& a, int64_t m0, int64_t m1, int64_t u0, int64_t u1);
void gemm_block_amx(const GemmArgs& a, int64_t m0, int64_t m1, int64_t u0, int64_t u1);

// Quantize rows [m0, m1) of x (row stride ldx) into qa (row stride lda, zero-padded to Kp).
void quantize_rows_scalar(const float* x, int64_t ldx, int64_t K, int64_t Kp, int8_t* qa,
                          int64_t lda, float* sa, int64_t m0, int64_t m1);
void quantize_rows_avx2(const float* x, int64_t ldx, int64_t K, int64_t Kp, int8_t* qa,
                        int64_t lda, float* sa, int64_t m0, int64_t m1);

// Shared scalar epilogue for one tile (used by the scalar variant and for tails).
// c: int32 accumulators of internal panels [p, p + np) for rows [m0, m0 + mr), row stride ldc.
void epilogue_scalar(const GemmArgs& a, const int32_t* c, int64_t ldc, int64_t m0, int mr,
                     int64_t unit);

}  // namespace deploykit
