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

// exp(x) for x <= 0 (softmax after subtracting the max): Cephes' expf polynomial with a
// round-to-nearest range reduction, plain arithmetic so the loop below vectorizes (std::exp
// does not without -ffast-math). ~2 ulp; exp(-87.3) and below flush to 0.
inline __attribute__((always_inline)) float exp_neg(float x) {
  x = x < -87.3365478515625f ? -87.3365478515625f : x;
  const float fx = static_cast<float>(static_cast<int32_t>(x * 1.44269504088896341f - 0.5f));  // round
  float r = x - fx * 0.693359375f;
  r = r - fx * -2.12194440e-4f;
  float y = 1.9875691500E-4f;
  y = y * r + 1.3981999507E-3f;
  y = y * r + 8.3334519073E-3f;
  y = y * r + 4.1665795894E-2f;
  y = y * r + 1.6666665459E-1f;
  y = y * r + 5.0000001201E-1f;
  y = y * (r * r) + (r + 1.f);
  const int32_t e = (static_cast<int32_t>(fx) + 127) << 23;
  float scale;
  std::memcpy(&scale, &e, 4);
  return y * scale;
}

}  // namespace

DK_CLONES float dot(const float* a, const float* b, int64_t n) { return dot_inline(a, b, n); }

DK_CLONES void attend_row(const float* q, const float* K, const float* V, int64_t ldk, int64_t n,
                          int64_t hd, float scale, float* sc, float* out) {
  float mx = -INFINITY;
  for (int64_t p = 0; p < n; ++p) {
    sc[p] = dot_inline(q, K + p * ldk, hd) * scale;
    mx = sc[p] > mx ? sc[p] : mx;
  }
  float sum = 0.f;
  for (int64_t p = 0; p < n; ++p) sc[p] = exp_neg(sc[p] - mx);
  for (int64_t p = 0; p < n; ++p) sum += sc[p];
  for (int64_t i = 0; i < hd; ++i) out[i] = 0.f;
  for (int64_t p = 0; p < n; ++p) {
    const float w = sc[p];
    const float* v = V + p * ldk;
    for (int64_t i = 0; i < hd; ++i) out[i] += w * v[i];
  }
  const float inv = 1.f / sum;
  for (int64_t i = 0; i < hd; ++i) out[i] *= inv;
}

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
