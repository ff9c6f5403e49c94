// AVX-512 VNNI variant of the int4 GEMM. Per group of 32 k: four 64-byte loads per panel, each
// split into two registers of nibbles (and 0x0F / shift by 4), eight vpdpbusd per (row, panel)
// with the nibbles as the unsigned operand and the broadcast int8 activations as the signed one;
// then acc - 8 * asum[r, g], converted and fma'd with the group's 16 scales into fp32 partials.
// Tiles: decode (<= 2 rows) x 4 panels, else up to 6 rows x 2 panels (int32 + fp32 accumulators
// stay in the 32 zmm registers).
#include <algorithm>
#include <cstring>

#include "int4_kernels.h"
#include "simd_math.h"

namespace deploykit {
namespace {

template <int MR, int NP, bool RAW>
DK_AVX512 void micro(const Int4Args& a, int64_t m0, int64_t p0, float* yf, int64_t ldy) {
  const int64_t pstride = a.G * kGroupBytes;
  const __m512i low = _mm512_set1_epi8(0x0F);
  __m512 facc[MR][NP];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int p = 0; p < NP; ++p) facc[r][p] = _mm512_setzero_ps();
  const int8_t* arow = a.qa + m0 * a.lda;
  for (int64_t g = 0; g < a.G; ++g) {
    __m512i acc[MR][NP];
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
      for (int p = 0; p < NP; ++p) acc[r][p] = _mm512_setzero_si512();
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i) {
      __m512i wlo[NP], whi[NP];
#pragma GCC unroll 4
      for (int p = 0; p < NP; ++p) {
        const __m512i b = _mm512_loadu_si512(a.w + (p0 + p) * pstride + g * kGroupBytes + i * 64);
        wlo[p] = _mm512_and_si512(b, low);
        whi[p] = _mm512_and_si512(_mm512_srli_epi16(b, 4), low);
      }
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) {
        int32_t v0, v1;
        std::memcpy(&v0, arow + r * a.lda + g * kGroup + 8 * i, 4);
        std::memcpy(&v1, arow + r * a.lda + g * kGroup + 8 * i + 4, 4);
        const __m512i a0 = _mm512_set1_epi32(v0), a1 = _mm512_set1_epi32(v1);
#pragma GCC unroll 4
        for (int p = 0; p < NP; ++p) {
          acc[r][p] = _mm512_dpbusd_epi32(acc[r][p], wlo[p], a0);
          acc[r][p] = _mm512_dpbusd_epi32(acc[r][p], whi[p], a1);
        }
      }
    }
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m512i corr = _mm512_set1_epi32(8 * a.asum[(m0 + r) * a.ldasum + g]);
#pragma GCC unroll 4
      for (int p = 0; p < NP; ++p) {
        const __m512i v = _mm512_sub_epi32(acc[r][p], corr);
        if (RAW) {
          alignas(64) int32_t t[kPanel];
          _mm512_store_si512(t, v);
          int32_t* o = a.out_i32 + ((m0 + r) * a.n_panels * kPanel + (p0 + p) * kPanel) * a.G + g;
          for (int j = 0; j < kPanel; ++j) o[j * a.G] = t[j];
        } else {
          const __m512 s = _mm512_loadu_ps(a.sw + ((p0 + p) * a.G + g) * kPanel);
          facc[r][p] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(v), s, facc[r][p]);
        }
      }
    }
  }
  if (!RAW)
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
      for (int p = 0; p < NP; ++p) _mm512_storeu_ps(yf + r * ldy + p * kPanel, facc[r][p]);
}

template <int NP, bool RAW>
DK_AVX512 void run_rows(int mr, const Int4Args& a, int64_t m0, int64_t p0, float* yf, int64_t ldy) {
  switch (mr) {
    case 6: micro<6, NP, RAW>(a, m0, p0, yf, ldy); break;
    case 5: micro<5, NP, RAW>(a, m0, p0, yf, ldy); break;
    case 4: micro<4, NP, RAW>(a, m0, p0, yf, ldy); break;
    case 3: micro<3, NP, RAW>(a, m0, p0, yf, ldy); break;
    case 2: micro<2, NP, RAW>(a, m0, p0, yf, ldy); break;
    default: micro<1, NP, RAW>(a, m0, p0, yf, ldy); break;
  }
}

template <bool RAW>
DK_AVX512 void run_panels(int np, int mr, const Int4Args& a, int64_t m0, int64_t p0, float* yf, int64_t ldy) {
  switch (np) {
    case 4: if (mr <= 2) { mr == 2 ? micro<2, 4, RAW>(a, m0, p0, yf, ldy) : micro<1, 4, RAW>(a, m0, p0, yf, ldy); }
            break;
    case 3: if (mr <= 2) { mr == 2 ? micro<2, 3, RAW>(a, m0, p0, yf, ldy) : micro<1, 3, RAW>(a, m0, p0, yf, ldy); }
            break;
    case 2: run_rows<2, RAW>(mr, a, m0, p0, yf, ldy); break;
    default: run_rows<1, RAW>(mr, a, m0, p0, yf, ldy); break;
  }
}

// y = yf * sa (+ bias) or silu(g) * u for one full unit; ragged units go to the scalar finish.
DK_AVX512 void finish(const Int4Args& a, const float* yf, int64_t ldy, int64_t m0, int mr, int64_t u) {
  if ((u + 1) * kPanel > a.N) {
    int4_finish_scalar(a, yf, ldy, m0, mr, u);
    return;
  }
  const int64_t n0 = u * kPanel;
  for (int r = 0; r < mr; ++r) {
    const __m512 sa = _mm512_set1_ps(a.sa[m0 + r]);
    const float* y = yf + r * ldy;
    __m512 v = _mm512_mul_ps(_mm512_loadu_ps(y), sa);
    if (a.bias) v = _mm512_add_ps(v, _mm512_loadu_ps(a.bias + n0));
    if (a.epi == Epilogue::SwiGlu) {
      __m512 up = _mm512_mul_ps(_mm512_loadu_ps(y + kPanel), sa);
      if (a.bias) up = _mm512_add_ps(up, _mm512_loadu_ps(a.bias + a.N + n0));
      v = swiglu512(v, up);
    }
    _mm512_storeu_ps(a.out + (m0 + r) * a.ldo + n0, v);
  }
}

}  // namespace

DK_AVX512 void int4_block_avx512vnni(const Int4Args& a, int64_t m0, int64_t m1, int64_t u0, int64_t u1) {
  if (m1 <= m0) return;
  const bool swiglu = a.epi == Epilogue::SwiGlu, raw = a.epi == Epilogue::Raw;
  const int upp = swiglu ? 2 : 1;  // panels per unit
  alignas(64) float yf[6 * 4 * kPanel];
  const bool decode = m1 - m0 <= 2;
  const int mr_max = decode ? 2 : 6;
  const int64_t ustep = decode ? (swiglu ? 2 : 4) : (swiglu ? 1 : 2);  // units per micro call
  for (int64_t u = u0; u < u1; u += ustep) {
    const int nu = static_cast<int>(std::min<int64_t>(ustep, u1 - u));
    const int np = nu * upp;
    const int64_t ldy = np * kPanel;
    for (int64_t m = m0; m < m1; m += mr_max) {
      const int mr = static_cast<int>(std::min<int64_t>(mr_max, m1 - m));
      if (raw) { run_panels<true>(np, mr, a, m, u * upp, yf, ldy); continue; }
      run_panels<false>(np, mr, a, m, u * upp, yf, ldy);
      for (int i = 0; i < nu; ++i) finish(a, yf + i * upp * kPanel, ldy, m, mr, u + i);
    }
  }
}

}  // namespace deploykit
