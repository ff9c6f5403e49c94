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

void rms_norm(const float* x, const float* w, float eps, int64_t n, float* y) {
  const float ms = dot(x, x, n) / static_cast<float>(n);
  const float r = 1.f / std::sqrt(ms + eps);
  for (int64_t i = 0; i < n; ++i) y[i] = w[i] * (x[i] * r);
}

void layer_norm(const float* x, const float* w, const float* b, float eps, int64_t n, float* y) {
  double s = 0;
  for (int64_t i = 0; i < n; ++i) s += x[i];
  const float mean = static_cast<float>(s / n);
  double v = 0;
  for (int64_t i = 0; i < n; ++i) v += static_cast<double>(x[i] - mean) * (x[i] - mean);
  const float r = 1.f / std::sqrt(static_cast<float>(v / n) + eps);
  for (int64_t i = 0; i < n; ++i) y[i] = (x[i] - mean) * r * w[i] + b[i];
}

void gelu(float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = 0.5f * y[i] * (1.f + std::erf(y[i] * 0.70710678118654752f));
}

}  // namespace engine
}  // namespace deploykit
