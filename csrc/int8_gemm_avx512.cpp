// AVX-512 VNNI variant: vpdpbusd (u8 x s8, 4 products summed into an int32 lane). Activations
// are s8 in [-127, 127]; xor 0x80 turns them into u8 = a + 128, and the extra 128 * sum_k w is
// removed with the packed colsum, so the int32 result equals the scalar variant exactly (the
// int32 lanes may wrap on the way for K > 66,000; the final value fits, so the wrap cancels).
//
// Register tile MR rows x NP panels (MR * NP zmm accumulators, NP zmm of weights, one broadcast):
//   M <= 4 (decode): MR = M, NP = 4: at least four independent chains, each weight byte read
//                    once, the next weights prefetched (the kernel streams weights, little else);
//   M 5..8:          MR = M, NP = 3 (2 for SwiGLU, whose units are gate/up panel pairs);
//   M > 8:           cache-blocked, MR x NP = 8 x 3 where the panel range is a multiple of 3
//                    (it measured a few % faster), else 6 x 4 (and always for SwiGLU: pairs).
// Blocking for M > 8 (GotoBLAS order, measured on Zen 5 with 1 MiB L2 per core): rows in blocks
// whose int8 activations fill about 256 KiB of L2; for each group of NP panels every row tile of
// the block runs over K while the group's weights (NP x Kp x 16 bytes, <= 192 KiB for K <= 4096)
// stay in L2, so each weight byte comes from memory once per row block instead of once per row
// tile. K is sliced only past kKC (the int32 partial sums then go through a per-thread buffer):
// on Zen 5 slicing K to keep the weights in L1 measured slower than streaming them from L2.
#include <algorithm>
#include <cstring>
#include <vector>

#include "int8_kernels.h"
#include "simd_math.h"

namespace deploykit {
namespace {

constexpr int64_t kKC = 4096;         // k values per slice of the blocked path
constexpr int64_t kL2A = 256 << 10;   // bytes of int8 activations per row block
constexpr int64_t kPrefetch = 32;     // k-groups (= cache lines per panel) prefetched ahead

// Tile (MR rows x NP panels) over k-groups [0, kg) of rows a (stride lda) and panels wp (stride
// pstride), starting from zero or from c (accumulate). colsum != nullptr: last slice, subtract
// 128 * colsum to make the exact s8 x s8 sums. Stores the tile to c (row stride ldc).
template <int MR, int NP, bool PF>
DK_AVX512 void micro(const int8_t* a, int64_t lda, const int8_t* wp, int64_t pstride, int64_t kg,
                     const int32_t* colsum, int32_t* c, int64_t ldc, bool accumulate) {
  __m512i acc[MR][NP];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int p = 0; p < NP; ++p)
      acc[r][p] = accumulate ? _mm512_loadu_si512(c + r * ldc + p * kPanel) : _mm512_setzero_si512();
  const __m512i flip = _mm512_set1_epi32(static_cast<int32_t>(0x80808080u));
  for (int64_t g = 0; g < kg; ++g) {
    __m512i w[NP];
#pragma GCC unroll 4
    for (int p = 0; p < NP; ++p) {
      // a prefetch past the end of the weights is harmless (prefetches never fault)
      if (PF) _mm_prefetch(reinterpret_cast<const char*>(wp + p * pstride + (g + kPrefetch) * 64), _MM_HINT_T0);
      w[p] = _mm512_loadu_si512(wp + p * pstride + g * 64);
    }
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      int32_t av;
      std::memcpy(&av, a + r * lda + 4 * g, 4);
      const __m512i au = _mm512_xor_si512(_mm512_set1_epi32(av), flip);  // a + 128 as u8
#pragma GCC unroll 4
      for (int p = 0; p < NP; ++p) acc[r][p] = _mm512_dpbusd_epi32(acc[r][p], au, w[p]);
    }
  }
#pragma GCC unroll 4
  for (int p = 0; p < NP; ++p) {
    const __m512i comp = colsum ? _mm512_slli_epi32(_mm512_loadu_si512(colsum + p * kPanel), 7)
                                : _mm512_setzero_si512();  // 128 * colsum
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r)
      _mm512_storeu_si512(c + r * ldc + p * kPanel, _mm512_sub_epi32(acc[r][p], comp));
  }
}

using MicroFn = void (*)(const int8_t*, int64_t, const int8_t*, int64_t, int64_t, const int32_t*,
                         int32_t*, int64_t, bool);

// f[mr - 1][np - 1] for mr <= 8, np <= 4: every shape the drivers ask for; 4 panels only up to
// 6 rows (7 x 4 or 8 x 4 accumulators plus the weights would not fit the 32 zmm registers).
template <bool PF>
struct MicroTable {
  MicroFn f[8][4] = {};
  template <int MR>
  void row() {
    f[MR - 1][0] = &micro<MR, 1, PF>;
    f[MR - 1][1] = &micro<MR, 2, PF>;
    f[MR - 1][2] = &micro<MR, 3, PF>;
    if constexpr (MR <= 6) f[MR - 1][3] = &micro<MR, 4, PF>;
  }
  MicroTable() { row<1>(); row<2>(); row<3>(); row<4>(); row<5>(); row<6>(); row<7>(); row<8>(); }
};
const MicroTable<true> kStream;    // single row tile: weights streamed once, prefetched
const MicroTable<false> kBlocked;  // weights reused from L2 by the row tiles of a block

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

// Epilogue of a finished tile: rows [m, m + mr) x internal panels [p0, p0 + np) in c.
DK_AVX512 void finish(const GemmArgs& a, const int32_t* c, int64_t ldc, int64_t m, int mr,
                      int64_t p0, int np) {
  if (a.epi == Epilogue::SwiGlu) {
    for (int p = 0; p < np; p += 2) epilogue(a, c + p * kPanel, ldc, m, mr, (p0 + p) / 2);
  } else {
    for (int p = 0; p < np; ++p) epilogue(a, c + p * kPanel, ldc, m, mr, p0 + p);
  }
}

// Per-thread int32 tiles of one row block x panel group; grows to the largest block, then reused.
int32_t* tile_buffer(int64_t n) {
  thread_local std::vector<int32_t> buf;
  if (static_cast<int64_t>(buf.size()) < n) buf.resize(static_cast<size_t>(n));
  return buf.data();
}

// Rows [m0, m1) (one tile of <= 8) x internal panels [p0, p1), full K, np panels per call.
DK_AVX512 void stream_rows(const GemmArgs& a, int64_t m0, int mr, int64_t p0, int64_t p1, int npw) {
  const int64_t kg = a.Kp / 4, pstride = a.Kp * kPanel, ldc = 4 * kPanel;
  alignas(64) int32_t c[8 * 4 * kPanel];
  const int8_t* ap = a.qa + m0 * a.lda;
  for (int64_t p = p0; p < p1; p += npw) {
    const int np = static_cast<int>(std::min<int64_t>(npw, p1 - p));
    kStream.f[mr - 1][np - 1](ap, a.lda, a.w + p * pstride, pstride, kg, a.colsum + p * kPanel, c,
                              ldc, false);
    finish(a, c, ldc, m0, mr, p, np);
  }
}

// Rows [m0, m1) (> 8) x internal panels [p0, p1) with MR x NP tiles, blocked as in the header.
template <int MR, int NP>
DK_AVX512 void blocked_rows(const GemmArgs& a, int64_t m0, int64_t m1, int64_t p0, int64_t p1) {
  const int64_t kg = a.Kp / 4, pstride = a.Kp * kPanel, ldc = NP * kPanel;
  const int64_t M = m1 - m0;
  // Row blocks of near-equal size, a multiple of MR, each about kL2A bytes of activations.
  const int64_t max_rows = std::max<int64_t>(MR, kL2A / std::max<int64_t>(a.Kp, 1));
  const int64_t n_blocks = (M + max_rows - 1) / max_rows;
  const int64_t mc_rows = ((M + n_blocks - 1) / n_blocks + MR - 1) / MR * MR;
  // Near-equal K slices; K = 0 is one empty slice (its epilogue still writes bias / zeros).
  const int64_t n_slices = std::max<int64_t>(1, (kg + kKC / 4 - 1) / (kKC / 4));
  const int64_t kc_groups = std::max<int64_t>(1, (kg + n_slices - 1) / n_slices);
  int32_t* cbuf = tile_buffer(std::min(mc_rows, M + MR) * ldc);
  for (int64_t mc = m0; mc < m1; mc += mc_rows) {
    const int64_t mc_end = std::min(m1, mc + mc_rows);
    for (int64_t p = p0; p < p1; p += NP) {
      const int np = static_cast<int>(std::min<int64_t>(NP, p1 - p));
      const int8_t* wp = a.w + p * pstride;
      for (int64_t g0 = 0; g0 < std::max<int64_t>(kg, 1); g0 += kc_groups) {
        const int64_t ng = std::min(kc_groups, kg - g0);  // 0 only when K = 0
        const bool last = g0 + ng == kg;
        const int32_t* cs = last ? a.colsum + p * kPanel : nullptr;
        for (int64_t m = mc; m < mc_end; m += MR) {
          const int mr = static_cast<int>(std::min<int64_t>(MR, mc_end - m));
          int32_t* c = cbuf + (m - mc) * ldc;
          kBlocked.f[mr - 1][np - 1](a.qa + m * a.lda + 4 * g0, a.lda, wp + g0 * 64, pstride, ng, cs,
                                     c, ldc, g0 > 0);
          if (last) finish(a, c, ldc, m, mr, p, np);
        }
      }
    }
  }
}

}  // namespace

DK_AVX512 void gemm_block_avx512vnni(const GemmArgs& a, int64_t m0, int64_t m1, int64_t u0,
                                     int64_t u1) {
  if (m1 <= m0 || u1 <= u0) return;
  const bool swiglu = a.epi == Epilogue::SwiGlu;
  const int64_t p0 = swiglu ? 2 * u0 : u0, p1 = swiglu ? 2 * u1 : u1;  // internal panels
  const int64_t M = m1 - m0;
  if (M <= 8)
    stream_rows(a, m0, static_cast<int>(M), p0, p1, M <= 4 ? 4 : (swiglu ? 2 : 3));
  else if (!swiglu && (p1 - p0) % 3 == 0)  // 8 x 3 only where it leaves no narrow tail tile
    blocked_rows<8, 3>(a, m0, m1, p0, p1);
  else
    blocked_rows<6, 4>(a, m0, m1, p0, p1);
}

}  // namespace deploykit
