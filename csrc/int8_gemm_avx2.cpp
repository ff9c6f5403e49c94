// AVX2 variant: vpmaddubsw + vpmaddwd with the sign trick (see int8_kernels.h for why it is
// exact). Register tile: MR (<= 4) rows x 16 channels = 8 ymm accumulators, 2 ymm of weights
// and their absolute values, ones and temporaries within the 16 ymm registers. The unsigned
// factor is |w| (shared by the rows of a tile: ~8 % fewer uops at MR = 4, measured on Zen 5
// running this variant) or |a| for a single row.
#include <algorithm>
#include <cstring>

#include "int8_kernels.h"
#include "simd_math.h"

namespace deploykit {
namespace {

constexpr int kMR = 4;
constexpr int64_t kMC = 64;  // rows per L2 block: 64 x K int8 activations stay in L2 per panel sweep

// acc[r] += rows r of qa (4 bytes at a time) . panel, over all k-groups; writes int32 (mr, 16).
template <int MR>
DK_AVX2 void micro(const int8_t* a, int64_t lda, const int8_t* wp, int64_t kg, int32_t* c,
                   int64_t ldc) {
  __m256i acc0[MR], acc1[MR];
#pragma GCC unroll 4
  for (int r = 0; r < MR; ++r) acc0[r] = acc1[r] = _mm256_setzero_si256();
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t g = 0; g < kg; ++g) {
    const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp + g * 64));
    const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp + g * 64 + 32));
    // Two exact forms, both factors within +-127 (no int16 saturation in vpmaddubsw):
    //   MR >= 2: |w| (u8) x (a * sign w): the two abs are shared by the MR rows of the group;
    //   MR == 1: |a| (u8) x (w * sign a): one abs instead of two.
    const __m256i wa0 = MR > 1 ? _mm256_abs_epi8(w0) : w0, wa1 = MR > 1 ? _mm256_abs_epi8(w1) : w1;
#pragma GCC unroll 4
    for (int r = 0; r < MR; ++r) {
      int32_t av;
      std::memcpy(&av, a + r * lda + 4 * g, 4);  // unaligned-safe 4-byte load
      const __m256i ab = _mm256_set1_epi32(av);
      __m256i p0, p1;
      if constexpr (MR > 1) {
        p0 = _mm256_maddubs_epi16(wa0, _mm256_sign_epi8(ab, w0));
        p1 = _mm256_maddubs_epi16(wa1, _mm256_sign_epi8(ab, w1));
      } else {
        const __m256i aa = _mm256_abs_epi8(ab);
        p0 = _mm256_maddubs_epi16(aa, _mm256_sign_epi8(w0, ab));
        p1 = _mm256_maddubs_epi16(aa, _mm256_sign_epi8(w1, ab));
      }
      acc0[r] = _mm256_add_epi32(acc0[r], _mm256_madd_epi16(p0, ones));
      acc1[r] = _mm256_add_epi32(acc1[r], _mm256_madd_epi16(p1, ones));
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < MR; ++r) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(c + r * ldc), acc0[r]);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(c + r * ldc + 8), acc1[r]);
  }
}

DK_AVX2 void run_micro(int mr, const int8_t* a, int64_t lda, const int8_t* wp, int64_t kg,
                       int32_t* c, int64_t ldc) {
  switch (mr) {
    case 4: micro<4>(a, lda, wp, kg, c, ldc); break;
    case 3: micro<3>(a, lda, wp, kg, c, ldc); break;
    case 2: micro<2>(a, lda, wp, kg, c, ldc); break;
    default: micro<1>(a, lda, wp, kg, c, ldc); break;
  }
}

DK_AVX2 void epilogue(const GemmArgs& a, const int32_t* c, int64_t ldc, int64_t m0, int mr,
                      int64_t u) {
  if (a.epi == Epilogue::Raw || (u + 1) * kPanel > a.N) {
    epilogue_scalar(a, c, ldc, m0, mr, u);  // tests' raw path and the ragged last panel
    return;
  }
  const int64_t n0 = u * kPanel;
  for (int r = 0; r < mr; ++r) {
    const int64_t m = m0 + r;
    const __m256 sa = _mm256_set1_ps(a.sa[m]);
    float* o = a.out + m * a.ldo + n0;
    const int32_t* cr = c + r * ldc;
    for (int h = 0; h < 2; ++h) {
      const __m256 acc = _mm256_cvtepi32_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(cr + 8 * h)));
      if (a.epi == Epilogue::SwiGlu) {
        const int64_t ig = 2 * u * kPanel + 8 * h, iu = ig + kPanel;
        const __m256 accu = _mm256_cvtepi32_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(cr + kPanel + 8 * h)));
        __m256 g = _mm256_mul_ps(acc, _mm256_mul_ps(sa, _mm256_loadu_ps(a.sw + ig)));
        __m256 uu = _mm256_mul_ps(accu, _mm256_mul_ps(sa, _mm256_loadu_ps(a.sw + iu)));
        if (a.bias) {
          g = _mm256_add_ps(g, _mm256_loadu_ps(a.bias + n0 + 8 * h));
          uu = _mm256_add_ps(uu, _mm256_loadu_ps(a.bias + a.N + n0 + 8 * h));
        }
        _mm256_storeu_ps(o + 8 * h, swiglu256(g, uu));
      } else {
        __m256 y = _mm256_mul_ps(acc, _mm256_mul_ps(sa, _mm256_loadu_ps(a.sw + n0 + 8 * h)));
        if (a.bias) y = _mm256_add_ps(y, _mm256_loadu_ps(a.bias + n0 + 8 * h));
        _mm256_storeu_ps(o + 8 * h, y);
      }
    }
  }
}

}  // namespace

DK_AVX2 void gemm_block_avx2(const GemmArgs& a, int64_t m0, int64_t m1, int64_t u0, int64_t u1) {
  const int np = a.epi == Epilogue::SwiGlu ? 2 : 1;
  const int64_t kg = a.Kp / 4, pstride = a.Kp * kPanel;
  alignas(32) int32_t c[kMR * 2 * kPanel];
  const int64_t ldc = 2 * kPanel;
  for (int64_t mc = m0; mc < m1; mc += kMC) {
    const int64_t mc_end = std::min(m1, mc + kMC);
    for (int64_t u = u0; u < u1; ++u) {
      for (int64_t m = mc; m < mc_end; m += kMR) {
        const int mr = static_cast<int>(std::min<int64_t>(kMR, mc_end - m));
        for (int p = 0; p < np; ++p)
          run_micro(mr, a.qa + m * a.lda, a.lda, a.w + (u * np + p) * pstride, kg,
                    c + p * kPanel, ldc);
        epilogue(a, c, ldc, m, mr, u);
      }
    }
  }
}

DK_AVX2 void quantize_rows_avx2(const float* x, int64_t ldx, int64_t K, int64_t Kp, int8_t* qa,
                                int64_t lda, float* sa, int64_t m0, int64_t m1) {
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256i perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (int64_t m = m0; m < m1; ++m) {
    const float* xr = x + m * ldx;
    int8_t* qr = qa + m * lda;
    __m256 vmax = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) vmax = _mm256_max_ps(vmax, _mm256_and_ps(_mm256_loadu_ps(xr + k), absmask));
    alignas(32) float t[8];
    _mm256_store_ps(t, vmax);
    float amax = 0.f;
    for (int i = 0; i < 8; ++i) amax = std::max(amax, t[i]);
    for (; k < K; ++k) amax = std::max(amax, xr[k] < 0 ? -xr[k] : xr[k]);
    const float inv = amax > 0.f ? 127.f / amax : 0.f;
    sa[m] = amax / 127.f;
    const __m256 vinv = _mm256_set1_ps(inv);
    k = 0;
    for (; k + 32 <= K; k += 32) {
      // cvtps2dq rounds half to even (default MXCSR), like nearbyint in the scalar variant;
      // |x * inv| <= 127 up to rounding; the signed packs saturate, the max clamps -128.
      __m256i q0 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xr + k), vinv));
      __m256i q1 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xr + k + 8), vinv));
      __m256i q2 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xr + k + 16), vinv));
      __m256i q3 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xr + k + 24), vinv));
      __m256i p01 = _mm256_packs_epi32(q0, q1), p23 = _mm256_packs_epi32(q2, q3);
      __m256i b = _mm256_packs_epi16(p01, p23);
      b = _mm256_max_epi8(b, _mm256_set1_epi8(-127));
      b = _mm256_permutevar8x32_epi32(b, perm);  // undo the per-128-bit-lane interleave of packs
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(qr + k), b);
    }
    for (; k < K; ++k) {
      float q = __builtin_nearbyintf(xr[k] * inv);
      q = std::min(127.f, std::max(-127.f, q));
      qr[k] = static_cast<int8_t>(q);
    }
    for (k = K; k < Kp; ++k) qr[k] = 0;
  }
}

}  // namespace deploykit
