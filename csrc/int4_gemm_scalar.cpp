// Portable reference variant of the int4 GEMM: plain loops over the packed layout. It defines the
// int32 group accumulators every vector variant must reproduce bit for bit, and the order of the
// fp32 fma chain over groups.
#include <cmath>

#include "int4_kernels.h"

namespace deploykit {

static inline float silu(float g) { return g / (1.f + std::exp(-g)); }

void int4_finish_scalar(const Int4Args& a, const float* yf, int64_t ldy, int64_t m0, int mr, int64_t u) {
  for (int r = 0; r < mr; ++r) {
    const int64_t m = m0 + r;
    const float* y = yf + r * ldy;
    for (int j = 0; j < kPanel; ++j) {
      const int64_t n = u * kPanel + j;
      if (n >= a.N) break;
      if (a.epi == Epilogue::SwiGlu) {
        float g = y[j] * a.sa[m], v = y[kPanel + j] * a.sa[m];
        if (a.bias) { g += a.bias[n]; v += a.bias[a.N + n]; }
        a.out[m * a.ldo + n] = silu(g) * v;
      } else {
        float v = y[j] * a.sa[m];
        if (a.bias) v += a.bias[n];
        a.out[m * a.ldo + n] = v;
      }
    }
  }
}

// Signed weight (channel j, k) of panel-group block `pg` (256 bytes).
static inline int32_t weight_at(const uint8_t* pg, int j, int k) {
  const int quad = k / 4, t = k % 4;
  const uint8_t b = pg[(quad / 2) * 64 + j * 4 + t];
  return static_cast<int32_t>((quad % 2) ? (b >> 4) : (b & 0x0F)) - 8;
}

void int4_block_scalar(const Int4Args& a, int64_t m0, int64_t m1, int64_t u0, int64_t u1) {
  const int np = a.epi == Epilogue::SwiGlu ? 2 : 1;
  const int64_t pstride = a.G * kGroupBytes;
  float yf[2 * kPanel];
  for (int64_t u = u0; u < u1; ++u) {
    for (int64_t m = m0; m < m1; ++m) {
      const int8_t* ar = a.qa + m * a.lda;
      for (int p = 0; p < np; ++p) {
        const int64_t panel = u * np + p;
        const uint8_t* wp = a.w + panel * pstride;
        for (int j = 0; j < kPanel; ++j) {
          float acc = 0.f;
          for (int64_t g = 0; g < a.G; ++g) {
            int32_t s = 0;
            for (int k = 0; k < kGroup; ++k) s += ar[g * kGroup + k] * weight_at(wp + g * kGroupBytes, j, k);
            if (a.epi == Epilogue::Raw)
              a.out_i32[(m * a.n_panels * kPanel + panel * kPanel + j) * a.G + g] = s;
            else
              acc = std::fma(static_cast<float>(s), a.sw[(panel * a.G + g) * kPanel + j], acc);
          }
          yf[p * kPanel + j] = acc;
        }
      }
      if (a.epi != Epilogue::Raw) int4_finish_scalar(a, yf, 2 * kPanel, m, 1, u);
    }
  }
}

}  // namespace deploykit
