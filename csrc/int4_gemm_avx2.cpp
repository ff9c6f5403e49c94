// AVX2 variant of the int4 GEMM. A ymm holds 8 channels x 4 k, so a panel is two halves. With the
// nibbles (0..15) as vpmaddubsw's unsigned operand and the int8 activations (|a| <= 127) as its
// signed one, each int16 lane gets 2 products; summed over the 8 quads of a group it holds 16
// products, at most 16 * 15 * 127 = 30480 < 32767, so a whole group accumulates exactly in int16
// and one vpmaddwd per group widens it. Then acc - 8 * asum and the fp32 fma with the scales.
#include <algorithm>
#include <cstring>

#include "int4_kernels.h"
#include "simd_math.h"

namespace deploykit {
namespace {

constexpr int kMR = 3;

// Rows [m0, m0 + MR) x one panel: fp32 partials into yf (row stride ldy) or raw into out_i32.
template <int MR, bool RAW>
DK_AVX2 void micro(const Int4Args& a, int64_t m0, int64_t panel, float* yf, int64_t ldy) {
  const __m256i low = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  const uint8_t* wp = a.w + panel * a.G * kGroupBytes;
  const int8_t* arow = a.qa + m0 * a.lda;
  __m256 facc[MR][2];
#pragma GCC unroll 4
  for (int r = 0; r < MR; ++r) facc[r][0] = facc[r][1] = _mm256_setzero_ps();
  for (int64_t g = 0; g < a.G; ++g) {
    __m256i acc[MR][2];
#pragma GCC unroll 4
    for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
    const uint8_t* wg = wp + g * kGroupBytes;
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i) {
      const __m256i b0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wg + i * 64));
      const __m256i b1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wg + i * 64 + 32));
      const __m256i lo0 = _mm256_and_si256(b0, low), hi0 = _mm256_and_si256(_mm256_srli_epi16(b0, 4), low);
      const __m256i lo1 = _mm256_and_si256(b1, low), hi1 = _mm256_and_si256(_mm256_srli_epi16(b1, 4), low);
#pragma GCC unroll 4
      for (int r = 0; r < MR; ++r) {
        int32_t v0, v1;
        std::memcpy(&v0, arow + r * a.lda + g * kGroup + 8 * i, 4);
        std::memcpy(&v1, arow + r * a.lda + g * kGroup + 8 * i + 4, 4);
        const __m256i a0 = _mm256_set1_epi32(v0), a1 = _mm256_set1_epi32(v1);
        // int16 adds wrap, but every partial sum is within +-30480 (see above): exact.
        acc[r][0] = _mm256_add_epi16(acc[r][0], _mm256_add_epi16(_mm256_maddubs_epi16(lo0, a0),
                                                                 _mm256_maddubs_epi16(hi0, a1)));
        acc[r][1] = _mm256_add_epi16(acc[r][1], _mm256_add_epi16(_mm256_maddubs_epi16(lo1, a0),
                                                                 _mm256_maddubs_epi16(hi1, a1)));
      }
    }
#pragma GCC unroll 4
    for (int r = 0; r < MR; ++r) {
      const __m256i corr = _mm256_set1_epi32(8 * a.asum[(m0 + r) * a.ldasum + g]);
      for (int h = 0; h < 2; ++h) {
        const __m256i v = _mm256_sub_epi32(_mm256_madd_epi16(acc[r][h], ones), corr);
        if (RAW) {
          alignas(32) int32_t t[8];
          _mm256_store_si256(reinterpret_cast<__m256i*>(t), v);
          int32_t* o = a.out_i32 + ((m0 + r) * a.n_panels * kPanel + panel * kPanel + 8 * h) * a.G + g;
          for (int j = 0; j < 8; ++j) o[j * a.G] = t[j];
        } else {
          const __m256 s = _mm256_loadu_ps(a.sw + (panel * a.G + g) * kPanel + 8 * h);
          facc[r][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(v), s, facc[r][h]);
        }
      }
    }
  }
  if (!RAW)
#pragma GCC unroll 4
    for (int r = 0; r < MR; ++r) {
      _mm256_storeu_ps(yf + r * ldy, facc[r][0]);
      _mm256_storeu_ps(yf + r * ldy + 8, facc[r][1]);
    }
}

template <bool RAW>
DK_AVX2 void run_rows(int mr, const Int4Args& a, int64_t m0, int64_t panel, float* yf, int64_t ldy) {
  switch (mr) {
    case 3: micro<3, RAW>(a, m0, panel, yf, ldy); break;
    case 2: micro<2, RAW>(a, m0, panel, yf, ldy); break;
    default: micro<1, RAW>(a, m0, panel, yf, ldy); break;
  }
}

DK_AVX2 void finish(const Int4Args& a, const float* yf, int64_t ldy, int64_t m0, int mr, int64_t u) {
  if ((u + 1) * kPanel > a.N) {
    int4_finish_scalar(a, yf, ldy, m0, mr, u);
    return;
  }
  const int64_t n0 = u * kPanel;
  for (int r = 0; r < mr; ++r) {
    const __m256 sa = _mm256_set1_ps(a.sa[m0 + r]);
    for (int h = 0; h < 2; ++h) {
      const float* y = yf + r * ldy + 8 * h;
      __m256 v = _mm256_mul_ps(_mm256_loadu_ps(y), sa);
      if (a.bias) v = _mm256_add_ps(v, _mm256_loadu_ps(a.bias + n0 + 8 * h));
      if (a.epi == Epilogue::SwiGlu) {
        __m256 up = _mm256_mul_ps(_mm256_loadu_ps(y + kPanel), sa);
        if (a.bias) up = _mm256_add_ps(up, _mm256_loadu_ps(a.bias + a.N + n0 + 8 * h));
        v = swiglu256(v, up);
      }
      _mm256_storeu_ps(a.out + (m0 + r) * a.ldo + n0 + 8 * h, v);
    }
  }
}

}  // namespace

DK_AVX2 void int4_block_avx2(const Int4Args& a, int64_t m0, int64_t m1, int64_t u0, int64_t u1) {
  const bool raw = a.epi == Epilogue::Raw;
  const int upp = a.epi == Epilogue::SwiGlu ? 2 : 1;
  alignas(32) float yf[kMR * 2 * kPanel];
  const int64_t ldy = 2 * kPanel;
  for (int64_t u = u0; u < u1; ++u) {
    for (int64_t m = m0; m < m1; m += kMR) {
      const int mr = static_cast<int>(std::min<int64_t>(kMR, m1 - m));
      for (int p = 0; p < upp; ++p) {
        if (raw) run_rows<true>(mr, a, m, u * upp + p, yf, ldy);
        else run_rows<false>(mr, a, m, u * upp + p, yf + p * kPanel, ldy);
      }
      if (!raw) finish(a, yf, ldy, m, mr, u);
    }
  }
}

DK_AVX2 void group_sums_avx2(const int8_t* qa, int64_t lda, int64_t M, int64_t G, int32_t* asum, int64_t ldasum) {
  // sum of 32 signed bytes = sad(a ^ 0x80, 0) - 32 * 128 (a ^ 0x80 = a + 128 as u8)
  const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80)), zero = _mm256_setzero_si256();
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < G; ++g) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qa + m * lda + g * kGroup));
      const __m256i s = _mm256_sad_epu8(_mm256_xor_si256(v, flip), zero);  // 4 x u64 partial sums
      const __m128i t = _mm_add_epi64(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
      const int64_t total = _mm_cvtsi128_si64(t) + _mm_extract_epi64(t, 1);
      asum[m * ldasum + g] = static_cast<int32_t>(total - 32 * 128);
    }
}

}  // namespace deploykit
