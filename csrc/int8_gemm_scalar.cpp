// Portable reference variant. Plain loops over the packed layout; it defines the results the
// vector variants must reproduce bit for bit (int32) and to rounding (fp32 epilogue).
#include <algorithm>
#include <cmath>
#include <cstring>

#include "int8_kernels.h"

namespace deploykit {

void quantize_rows_scalar(const float* x, int64_t ldx, int64_t K, int64_t Kp, int8_t* qa,
                          int64_t lda, float* sa, int64_t m0, int64_t m1) {
  for (int64_t m = m0; m < m1; ++m) {
    const float* xr = x + m * ldx;
    int8_t* qr = qa + m * lda;
    float amax = 0.f;
    for (int64_t k = 0; k < K; ++k) amax = std::max(amax, std::fabs(xr[k]));
    const float inv = amax > 0.f ? 127.f / amax : 0.f;
    sa[m] = amax / 127.f;
    for (int64_t k = 0; k < K; ++k) {
      float q = std::nearbyint(xr[k] * inv);  // round half to even, as cvtps2dq does
      q = std::min(127.f, std::max(-127.f, q));
      qr[k] = static_cast<int8_t>(q);
    }
    for (int64_t k = K; k < Kp; ++k) qr[k] = 0;
  }
}

static inline float silu(float g) { return g / (1.f + std::exp(-g)); }

void epilogue_scalar(const GemmArgs& a, const int32_t* c, int64_t ldc, int64_t m0, int mr,
                     int64_t unit) {
  for (int r = 0; r < mr; ++r) {
    const int64_t m = m0 + r;
    const int32_t* cr = c + r * ldc;
    if (a.epi == Epilogue::SwiGlu) {
      // c holds [gate panel | up panel] for logical columns [16*unit, 16*unit + 16)
      const int64_t F = a.N;
      for (int j = 0; j < kPanel; ++j) {
        const int64_t n = unit * kPanel + j;
        if (n >= F) break;
        const int64_t ig = (2 * unit) * kPanel + j, iu = (2 * unit + 1) * kPanel + j;
        float g = static_cast<float>(cr[j]) * (a.sa[m] * a.sw[ig]);
        float u = static_cast<float>(cr[kPanel + j]) * (a.sa[m] * a.sw[iu]);
        if (a.bias) { g += a.bias[n]; u += a.bias[F + n]; }
        a.out[m * a.ldo + n] = silu(g) * u;
      }
    } else if (a.epi == Epilogue::Raw && a.raw_pair_F > 0) {
      // internal panel `unit` of a swiglu pack -> logical [gate F | up F] columns
      const int64_t F = a.raw_pair_F, half = unit % 2;
      for (int j = 0; j < kPanel; ++j) {
        const int64_t n = (unit / 2) * kPanel + j;
        if (n >= F) break;
        a.out_i32[m * a.ldo + half * F + n] = cr[j];
      }
    } else {
      for (int j = 0; j < kPanel; ++j) {
        const int64_t n = unit * kPanel + j;
        if (n >= a.N) break;
        if (a.epi == Epilogue::Raw) {
          a.out_i32[m * a.ldo + n] = cr[j];
        } else {
          float y = static_cast<float>(cr[j]) * (a.sa[m] * a.sw[n]);
          if (a.bias) y += a.bias[n];
          a.out[m * a.ldo + n] = y;
        }
      }
    }
  }
}

void gemm_block_scalar(const GemmArgs& a, int64_t m0, int64_t m1, int64_t u0, int64_t u1) {
  const int np = a.epi == Epilogue::SwiGlu ? 2 : 1;  // internal panels per unit
  const int64_t kg = a.Kp / 4;
  const int64_t pstride = a.Kp * kPanel;
  int32_t c[2 * kPanel];
  for (int64_t u = u0; u < u1; ++u) {
    for (int64_t m = m0; m < m1; ++m) {
      const int8_t* ar = a.qa + m * a.lda;
      for (int p = 0; p < np; ++p) {
        const int8_t* wp = a.w + (u * np + p) * pstride;
        for (int j = 0; j < kPanel; ++j) {
          int32_t s = 0;
          for (int64_t g = 0; g < kg; ++g)
            for (int t = 0; t < 4; ++t)
              s += static_cast<int32_t>(ar[4 * g + t]) * wp[g * 64 + j * 4 + t];
          c[p * kPanel + j] = s;
        }
      }
      epilogue_scalar(a, c, 2 * kPanel, m, 1, u);
    }
  }
}

}  // namespace deploykit
