// fp32 helpers of the decode engine (norms, fp32 linears, KV-cache rounding); attention is attention.h.
//
// Each hot loop is one plain C++ source compiled three times by GCC/Clang function
// multi-versioning (target_clones: AVX-512F, AVX2+FMA, baseline), the best clone picked once by
// the loader. The baseline clone is the scalar reference; the loops keep 16 independent partial
// sums, so every clone is deterministic (the same inputs give the same bits on one machine).
#pragma once
#include <cstdint>

namespace deploykit {
namespace engine {

float dot(const float* a, const float* b, int64_t n);        // sum_i a[i] * b[i]
void axpy(float alpha, const float* x, float* y, int64_t n);  // y += alpha * x
void scale(float alpha, float* y, int64_t n);                 // y *= alpha
void add(const float* x, float* y, int64_t n);                // y += x

// out[t, n] = dot(x[t, :], w[n, :]) (+ bias[n]) for rows [0, T), columns [n0, n1).
void linear_f32(const float* x, int64_t T, int64_t K, const float* w, const float* bias, int64_t n0,
                int64_t n1, float* out, int64_t ldo);

// y = x * rsqrt(mean(x^2) + eps) * w           (deploykit RMSNorm, fp32)
void rms_norm(const float* x, const float* w, float eps, int64_t n, float* y);
// y = (x - mean) * rsqrt(var + eps) * w + b   (torch.nn.LayerNorm, biased variance)
void layer_norm(const float* x, const float* w, const float* b, float eps, int64_t n, float* y);
// fp32 -> fp16 bits, round to nearest even (finite inputs; beyond fp16's range: inf).
void to_f16(const float* x, uint16_t* y, int64_t n);
// One head row to int8: s = max|x| / 127, y = round_half_even(x / s) (s = 0, y = 0 for a zero row).
void to_i8(const float* x, int8_t* y, float* s, int64_t n);
// erf GELU in place, as F.gelu(approximate="none"), through a rational erf (max abs error 4.2e-7)
void gelu(float* y, int64_t n);

}  // namespace engine
}  // namespace deploykit
