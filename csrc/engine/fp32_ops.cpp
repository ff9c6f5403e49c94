#include "engine/fp32_ops.h"

#include <cmath>
#include <cstring>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(DK_NO_CLONES)
#define DK_CLONES __attribute__((target_clones("avx512f", "arch=haswell", "default")))
#else
#define DK_CLONES
#endif

namespace deploykit {
namespace engine {

constexpr int kLanes = 16;

namespace {

inline __attribute__((always_inline)) float dot_inline(const float* a, const float* b, int64_t n) {
  float acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) acc[j] += a[i + j] * b[i + j];
  for (int j = 0; i + j < n; ++j) acc[j] += a[i + j] * b[i + j];
  // Fixed pairwise tree: the same order in every clone.
  for (int w = kLanes / 2; w > 0; w /= 2)
    for (int j = 0; j < w; ++j) acc[j] += acc[j + w];
  return acc[0];
}

inline __attribute__((always_inline)) float tree_sum(float* acc) {
  for (int w = kLanes / 2; w > 0; w /= 2)
    for (int j = 0; j < w; ++j) acc[j] += acc[j + w];
  return acc[0];
}

}  // namespace

void to_f16(const float* x, uint16_t* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    uint32_t b;
    std::memcpy(&b, &x[i], 4);
    const uint32_t sign = (b >> 16) & 0x8000, ab = b & 0x7fffffff;
    uint16_t h;
    if (ab >= 0x477ff000u) {  // rounds to >= 65520: inf (NaN stays NaN)
      h = static_cast<uint16_t>(ab > 0x7f800000u ? 0x7e00 : 0x7c00);
    } else if (ab < 0x38800000u) {  // below fp16's smallest normal: a subnormal (or 0), via float rounding
      float f;
      std::memcpy(&f, &ab, 4);
      h = static_cast<uint16_t>(std::nearbyint(f * 0x1p24f));  // units of 2^-24, round half to even
    } else {  // normal: drop 13 mantissa bits, round half to even
      const uint32_t r = ab + 0x0fffu + ((ab >> 13) & 1u);
      h = static_cast<uint16_t>((r - 0x38000000u) >> 13);
    }
    y[i] = static_cast<uint16_t>(sign | h);
  }
}

void to_i8(const float* x, int8_t* y, float* s, int64_t n) {
  float amax = 0.f;
  for (int64_t i = 0; i < n; ++i) amax = std::fmax(amax, std::fabs(x[i]));
  const float inv = amax > 0.f ? 127.f / amax : 0.f;
  *s = amax / 127.f;
  for (int64_t i = 0; i < n; ++i) {
    const float v = std::nearbyint(x[i] * inv);
    y[i] = static_cast<int8_t>(v > 127.f ? 127.f : (v < -127.f ? -127.f : v));
  }
}

DK_CLONES float dot(const float* a, const float* b, int64_t n) { return dot_inline(a, b, n); }

DK_CLONES void axpy(float alpha, const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

DK_CLONES void scale(float alpha, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] *= alpha;
}

DK_CLONES void add(const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += x[i];
}

void linear_f32(const float* x, int64_t T, int64_t K, const float* w, const float* bias, int64_t n0,
                int64_t n1, float* out, int64_t ldo) {
  // Columns outside, rows inside: each weight row is read once from memory for all T rows.
  for (int64_t n = n0; n < n1; ++n) {
    const float* wr = w + n * K;
    const float b = bias ? bias[n] : 0.f;
    for (int64_t t = 0; t < T; ++t) out[t * ldo + n] = dot(x + t * K, wr, K) + b;
  }
}

DK_CLONES void rms_norm(const float* x, const float* w, float eps, int64_t n, float* y) {
  const float ms = dot(x, x, n) / static_cast<float>(n);
  const float r = 1.f / std::sqrt(ms + eps);
  for (int64_t i = 0; i < n; ++i) y[i] = w[i] * (x[i] * r);
}

DK_CLONES void layer_norm(const float* x, const float* w, const float* b, float eps, int64_t n, float* y) {
  float acc[kLanes] = {};  // 16 partial sums, a fixed tree: the same in every clone
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) acc[j] += x[i + j];
  for (int j = 0; i + j < n; ++j) acc[j] += x[i + j];
  const float mean = tree_sum(acc) / static_cast<float>(n);
  for (int j = 0; j < kLanes; ++j) acc[j] = 0.f;
  for (i = 0; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) acc[j] += (x[i + j] - mean) * (x[i + j] - mean);
  for (int j = 0; i + j < n; ++j) acc[j] += (x[i + j] - mean) * (x[i + j] - mean);
  const float r = 1.f / std::sqrt(tree_sum(acc) / static_cast<float>(n) + eps);
  for (i = 0; i < n; ++i) y[i] = (x[i] - mean) * r * w[i] + b[i];
}

namespace {
// erf(x) as Eigen's generic_fast_erf_float: a rational fit on [-4, 4] (erf rounds to +-1 beyond), max abs
// error 4.2e-7 against math.erf; branch-free, so the loop below vectorizes (std::erf does not).
inline __attribute__((always_inline)) float erf_fast(float x) {
  x = x < -4.f ? -4.f : (x > 4.f ? 4.f : x);
  const float x2 = x * x;
  float p = x2 * -2.72614225801306e-10f + 2.77068142495902e-08f;
  p = p * x2 + -2.10102402082508e-06f;
  p = p * x2 + -5.69250639462346e-05f;
  p = p * x2 + -7.34990630326855e-04f;
  p = p * x2 + -2.95459980854025e-03f;
  p = p * x2 + -1.60960333262415e-02f;
  float q = x2 * -1.45660718464996e-05f + -2.13374055278905e-04f;
  q = q * x2 + -1.68282697438203e-03f;
  q = q * x2 + -7.37332916720468e-03f;
  q = q * x2 + -1.42647390514189e-02f;
  return p * x / q;
}
}  // namespace

DK_CLONES void gelu(float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = 0.5f * y[i] * (1.f + erf_fast(y[i] * 0.70710678118654752f));
}

}  // namespace engine
}  // namespace deploykit
