// AVX-512 VNNI variant: vpdpbusd (u8 x s8, 4 products summed into an int32 lane). Activations
// are s8 in [-127, 127]; xor 0x80 turns them into u8 = a + 128, and the extra 128 * sum_k w is
// removed with the packed colsum, so the int32 result equals the scalar variant exactly.
// Register tile: MR (<= 8) rows x NP (<= 2) panels = 16 zmm accumulators. Decode (a block of
// <= 4 rows): MR x 4 panels, so four independent vpdpbusd chains hide its latency while each
// weight byte is read once.
#include <algorithm>
#include <cstring>

#include "int8_kernels.h"
#include "simd_math.h"

namespace deploykit {
namespace {

constexpr int kMR = 8;
constexpr int64_t kMC = 128;

template <int MR, int NP>
DK_AVX512 void micro(const int8_t* a, int64_t lda, const int8_t* wp, int64_t pstride, int64_t kg,
                     const int32_t* colsum, int32_t* c, int64_t ldc) {
  __m512i acc[MR][NP];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int p = 0; p < NP; ++p) acc[r][p] = _mm512_setzero_si512();
  for (int64_t g = 0; g < kg; ++g) {
    __m512i w[NP];
#pragma GCC unroll 4
    for (int p = 0; p < NP; ++p) w[p] = _mm512_loadu_si512(wp + p * pstride + g * 64);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      int32_t av;
      std::memcpy(&av, a + r * lda + 4 * g, 4);
      const __m512i au = _mm512_set1_epi32(av ^ static_cast<int32_t>(0x80808080u));  // a + 128 as u8
#pragma GCC unroll 4
      for (int p = 0; p < NP; ++p) acc[r][p] = _mm512_dpbusd_epi32(acc[r][p], au, w[p]);
    }
  }
#pragma GCC unroll 4
  for (int p = 0; p < NP; ++p) {
    const __m512i comp = _mm512_slli_epi32(_mm512_loadu_si512(colsum + p * kPanel), 7);  // 128 * colsum
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r)
      _mm512_storeu_si512(c + r * ldc + p * kPanel, _mm512_sub_epi32(acc[r][p], comp));
  }
}

template <int NP>
DK_AVX512 void run_micro(int mr, const int8_t* a, int64_t lda, const int8_t* wp, int64_t pstride,
                         int64_t kg, const int32_t* colsum, int32_t* c, int64_t ldc) {
  switch (mr) {
    case 8: micro<8, NP>(a, lda, wp, pstride, kg, colsum, c, ldc); break;
    case 7: micro<7, NP>(a, lda, wp, pstride, kg, colsum, c, ldc); break;
    case 6: micro<6, NP>(a, lda, wp, pstride, kg, colsum, c, ldc); break;
    case 5: micro<5, NP>(a, lda, wp, pstride, kg, colsum, c, ldc); break;
    case 4: micro<4, NP>(a, lda, wp, pstride, kg, colsum, c, ldc); break;
    case 3: micro<3, NP>(a, lda, wp, pstride, kg, colsum, c, ldc); break;
    case 2: micro<2, NP>(a, lda, wp, pstride, kg, colsum, c, ldc); break;
    default: micro<1, NP>(a, lda, wp, pstride, kg, colsum, c, ldc); break;
  }
}

template <int NP>
DK_AVX512 void run_micro_small(int mr, const int8_t* a, int64_t lda, const int8_t* wp, int64_t pstride,
                               int64_t kg, const int32_t* colsum, int32_t* c, int64_t ldc) {
  switch (mr) {
    case 4: micro<4, NP>(a, lda, wp, pstride, kg, colsum, c, ldc); break;
    case 3: micro<3, NP>(a, lda, wp, pstride, kg, colsum, c, ldc); break;
    case 2: micro<2, NP>(a, lda, wp, pstride, kg, colsum, c, ldc); break;
    default: micro<1, NP>(a, lda, wp, pstride, kg, colsum, c, ldc); break;
  }
}

// One unit (16 logical columns) of the tile.
DK_AVX512 void epilogue(const GemmArgs& a, const int32_t* c, int64_t ldc, int64_t m0, int mr,
                        int64_t u) {
  if (a.epi == Epilogue::Raw || (u + 1) * kPanel > a.N) {
    epilogue_scalar(a, c, ldc, m0, mr, u);
    return;
  }
  const int64_t n0 = u * kPanel;
  for (int r = 0; r < mr; ++r) {
    const int64_t m = m0 + r;
    const __m512 sa = _mm512_set1_ps(a.sa[m]);
    const __m512 acc = _mm512_cvtepi32_ps(_mm512_loadu_si512(c + r * ldc));
    float* o = a.out + m * a.ldo + n0;
    if (a.epi == Epilogue::SwiGlu) {
      const int64_t ig = 2 * u * kPanel, iu = ig + kPanel;
      const __m512 accu = _mm512_cvtepi32_ps(_mm512_loadu_si512(c + r * ldc + kPanel));
      __m512 g = _mm512_mul_ps(acc, _mm512_mul_ps(sa, _mm512_loadu_ps(a.sw + ig)));
      __m512 uu = _mm512_mul_ps(accu, _mm512_mul_ps(sa, _mm512_loadu_ps(a.sw + iu)));
      if (a.bias) {
        g = _mm512_add_ps(g, _mm512_loadu_ps(a.bias + n0));
        uu = _mm512_add_ps(uu, _mm512_loadu_ps(a.bias + a.N + n0));
      }
      _mm512_storeu_ps(o, swiglu512(g, uu));
    } else {
      __m512 y = _mm512_mul_ps(acc, _mm512_mul_ps(sa, _mm512_loadu_ps(a.sw + n0)));
      if (a.bias) y = _mm512_add_ps(y, _mm512_loadu_ps(a.bias + n0));
      _mm512_storeu_ps(o, y);
    }
  }
}

}  // namespace

DK_AVX512 void gemm_block_avx512vnni(const GemmArgs& a, int64_t m0, int64_t m1, int64_t u0,
                                     int64_t u1) {
  const bool swiglu = a.epi == Epilogue::SwiGlu;
  const int64_t kg = a.Kp / 4, pstride = a.Kp * kPanel;
  alignas(64) int32_t c[kMR * 4 * kPanel];
  if (m1 <= m0) return;
  if (m1 - m0 <= 4) {  // decode: up to 4 rows against 4 panels at a time
    const int64_t ldc = 4 * kPanel;
    const int mr = static_cast<int>(m1 - m0);
    const int8_t* ap = a.qa + m0 * a.lda;
    const int64_t ustep = swiglu ? 2 : 4;
    for (int64_t u = u0; u < u1; u += ustep) {
      const int nu = static_cast<int>(std::min<int64_t>(ustep, u1 - u));  // units in this call
      const int np = swiglu ? 2 * nu : nu;                                  // panels in this call
      const int64_t p0 = swiglu ? 2 * u : u;
      const int8_t* wp = a.w + p0 * pstride;
      const int32_t* cs = a.colsum + p0 * kPanel;
      switch (np) {
        case 4: run_micro_small<4>(mr, ap, a.lda, wp, pstride, kg, cs, c, ldc); break;
        case 3: run_micro_small<3>(mr, ap, a.lda, wp, pstride, kg, cs, c, ldc); break;
        case 2: run_micro_small<2>(mr, ap, a.lda, wp, pstride, kg, cs, c, ldc); break;
        default: run_micro_small<1>(mr, ap, a.lda, wp, pstride, kg, cs, c, ldc); break;
      }
      for (int i = 0; i < nu; ++i) epilogue(a, c + i * (swiglu ? 2 : 1) * kPanel, ldc, m0, mr, u + i);
    }
    return;
  }
  const int64_t ldc = 2 * kPanel;
  for (int64_t mc = m0; mc < m1; mc += kMC) {
    const int64_t mc_end = std::min(m1, mc + kMC);
    // Float/Raw: two units (= two adjacent panels) per micro call; SwiGlu: one unit = 2 panels.
    const int64_t ustep = swiglu ? 1 : 2;
    for (int64_t u = u0; u < u1; u += ustep) {
      const int np = swiglu ? 2 : static_cast<int>(std::min<int64_t>(2, u1 - u));
      const int64_t p0 = swiglu ? 2 * u : u;
      for (int64_t m = mc; m < mc_end; m += kMR) {
        const int mr = static_cast<int>(std::min<int64_t>(kMR, mc_end - m));
        const int8_t* ap = a.qa + m * a.lda;
        const int8_t* wp = a.w + p0 * pstride;
        if (np == 2)
          run_micro<2>(mr, ap, a.lda, wp, pstride, kg, a.colsum + p0 * kPanel, c, ldc);
        else
          run_micro<1>(mr, ap, a.lda, wp, pstride, kg, a.colsum + p0 * kPanel, c, ldc);
        if (swiglu) {
          epilogue(a, c, ldc, m, mr, u);
        } else {
          for (int p = 0; p < np; ++p) epilogue(a, c + p * kPanel, ldc, m, mr, u + p);
        }
      }
    }
  }
}

}  // namespace deploykit
