// MoE routing (top-k + softmax + counting sort), gather / weighted scatter-add, and the whole
// int8 MoE-FFN forward.
//
// Conventions (shared with deploykit's torch MoE):
//   top-k: experts ordered by logit descending; equal logits -> lower expert index first.
//   weights: softmax over the k chosen logits (== softmax over all E, then renormalised), or
//            with softmax_all the un-renormalised softmax-over-E probabilities.
//   perm:  positions of (token, slot) pairs grouped by expert (ascending), tokens ascending
//          within an expert; perm[j] = t * k + slot, inv[t * k + slot] = j.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "array_check.h"
#include "int8_kernels.h"
#include "moe.h"
#include "simd_math.h"
#include "thread_pool.h"

namespace deploykit {
namespace {

// Top-k of one token's logits l[0..E) into id[0..k): logit descending, ties to the lower index.
// k = 1 and k = 2 (the common routers) without branches on the data: random logits make the
// general insertion's branches mispredict several times per token.
inline void top_k(const float* l, int64_t E, int64_t k, int32_t* id) {
  if (k == 1) {
    int32_t b = 0;
    for (int32_t e = 1; e < E; ++e) b = l[e] > l[b] ? e : b;
    id[0] = b;
    return;
  }
  if (k == 2) {
    int32_t i0 = l[1] > l[0] ? 1 : 0, i1 = 1 - i0;
    float b0 = l[i0], b1 = l[i1];
    for (int32_t e = 2; e < E; ++e) {
      const float v = l[e];
      const bool gt0 = v > b0, gt1 = v > b1;  // strict: an equal later logit never displaces
      const float nb1 = gt0 ? b0 : (gt1 ? v : b1);
      const int32_t ni1 = gt0 ? i0 : (gt1 ? e : i1);
      b0 = gt0 ? v : b0;
      i0 = gt0 ? e : i0;
      b1 = nb1;
      i1 = ni1;
    }
    id[0] = i0;
    id[1] = i1;
    return;
  }
  // Insertion into a sorted list of k: strict '>' keeps the lower index ahead on ties.
  int64_t n = 0;
  for (int64_t e = 0; e < E; ++e) {
    const float v = l[e];
    if (n == k && !(v > l[id[k - 1]])) continue;
    int64_t pos = n < k ? n++ : k - 1;
    while (pos > 0 && v > l[id[pos - 1]]) {
      id[pos] = id[pos - 1];
      --pos;
    }
    id[pos] = static_cast<int32_t>(e);
  }
}

// Stable counting sort of the R flat (token, slot) pairs by expert: counts, offsets, perm, inv.
// The pairs are cut into kSortLanes contiguous runs handled side by side with their own counters
// (hist: kSortLanes x E): one counter per expert would make every increment wait on the last
// store to the same counter, and with 8 experts most increments hit a recent one. Run c's pairs
// of expert e go after those of runs < c, so the order is the single-counter order exactly.
constexpr int64_t kSortLanes = 4;

void sort_by_expert(const int32_t* ids, int64_t R, int64_t E, int32_t* counts, int32_t* offsets,
                    int32_t* perm, int32_t* inv, int32_t* hist) {
  const int64_t len = (R + kSortLanes - 1) / kSortLanes;
  int64_t end[kSortLanes];
  for (int64_t c = 0; c < kSortLanes; ++c) end[c] = std::min(R, (c + 1) * len);
  std::fill(hist, hist + kSortLanes * E, 0);
  for (int64_t i = 0; i < len; ++i)
    for (int64_t c = 0; c < kSortLanes; ++c)
      if (c * len + i < end[c]) ++hist[c * E + ids[c * len + i]];
  offsets[0] = 0;
  for (int64_t e = 0; e < E; ++e) {
    int32_t run = offsets[e];
    for (int64_t c = 0; c < kSortLanes; ++c) {
      const int32_t n = hist[c * E + e];
      hist[c * E + e] = run;  // now run c's cursor for expert e
      run += n;
    }
    counts[e] = run - offsets[e];
    offsets[e + 1] = run;
  }
  for (int64_t i = 0; i < len; ++i)
    for (int64_t c = 0; c < kSortLanes; ++c) {
      const int64_t x = c * len + i;
      if (x >= end[c]) continue;
      const int32_t j = hist[c * E + ids[x]]++;
      perm[j] = static_cast<int32_t>(x);
      inv[x] = j;
    }
}

#if defined(__x86_64__)
// Expert e's logits for a block of 16 tokens (row stride in li; 0 in masked-off lanes).
DK_AVX512 inline __m512 gather_logit(const float* lb, __m512i li, __mmask16 m, int64_t e,
                                     __mmask16& nan) {
  const __m512i idx = _mm512_add_epi32(li, _mm512_set1_epi32(static_cast<int32_t>(e)));
  const __m512 v = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, idx, lb, 4);
  nan |= _mm512_mask_cmp_ps_mask(m, v, v, _CMP_UNORD_Q);
  return v;
}

DK_AVX512 inline void load_transpose8(const float* lb, int n, __m512 v[8]);

// Expert e's logits of the block: from the transposed registers (E = 8) or a gather.
DK_AVX512 inline __m512 pick_logit(int64_t E, const __m512* v8, const float* lb, __m512i li,
                                   __mmask16 m, int64_t e, __mmask16& nan) {
  return E == 8 ? v8[e] : gather_logit(lb, li, m, e, nan);
}

// Index tables of the 16 x 8 transpose below (E = 8: 16 tokens' logits are 8 zmm registers).
// Three rounds of vpermt2ps: 2 tokens x 8 experts per register -> 4 x 4 -> 8 x 2 -> 16 x 1.
struct Transpose8 {
  alignas(64) int32_t s1[2][16], s2[2][16], s3[2][16];
  Transpose8() {
    for (int y = 0; y < 16; ++y)
      for (int h = 0; h < 2; ++h) {
        const int e1 = y / 4, t1 = y % 4;   // round 1 out: lane = expert (4) x token (4)
        s1[h][y] = (t1 / 2) * 16 + (t1 % 2) * 8 + 4 * h + e1;
        const int e2 = y / 8, t2 = y % 8;   // round 2 out: expert (2) x token (8)
        s2[h][y] = (t2 / 4) * 16 + (2 * h + e2) * 4 + t2 % 4;
        s3[h][y] = (y / 8) * 16 + h * 8 + y % 8;  // round 3 out: token (16)
      }
  }
};
const Transpose8 kT8;

// v[e] = expert e's logits of the 16 tokens at lb (row stride 8), n <= 16 valid tokens.
DK_AVX512 inline void load_transpose8(const float* lb, int n, __m512 v[8]) {
  __m512 r[8], a[8], b[8];
  for (int j = 0; j < 8; ++j) {  // register j: tokens 2j, 2j + 1
    const int valid = std::max(0, std::min(16, 8 * n - 16 * j));
    r[j] = _mm512_maskz_loadu_ps(static_cast<__mmask16>(valid == 16 ? 0xFFFF : (1u << valid) - 1), lb + 16 * j);
  }
  const __m512i s1[2] = {_mm512_load_si512(kT8.s1[0]), _mm512_load_si512(kT8.s1[1])};
  const __m512i s2[2] = {_mm512_load_si512(kT8.s2[0]), _mm512_load_si512(kT8.s2[1])};
  const __m512i s3[2] = {_mm512_load_si512(kT8.s3[0]), _mm512_load_si512(kT8.s3[1])};
  for (int i = 0; i < 4; ++i)  // a[2i + h]: tokens 4i.. x experts 4h..
    for (int h = 0; h < 2; ++h) a[2 * i + h] = _mm512_permutex2var_ps(r[2 * i], s1[h], r[2 * i + 1]);
  for (int q = 0; q < 2; ++q)  // b[4q + 2h + g]: tokens 8q.. x experts 4h + 2g..
    for (int h = 0; h < 2; ++h)
      for (int g = 0; g < 2; ++g)
        b[4 * q + 2 * h + g] = _mm512_permutex2var_ps(a[4 * q + h], s2[g], a[4 * q + 2 + h]);
  for (int hg = 0; hg < 4; ++hg)  // expert 2 * hg + ee over all 16 tokens
    for (int ee = 0; ee < 2; ++ee) v[2 * hg + ee] = _mm512_permutex2var_ps(b[hg], s3[ee], b[4 + hg]);
}

// k <= 2 for 16 tokens per step (AVX-512): the logits of expert e for the 16 tokens come from
// one gather, top-1/top-2 are kept with masked blends (strict '>' as in top_k), the weights use
// the vector exp (within 2 ulp of std::exp: the same weights to ~3e-7 relative, and the same
// on every machine with AVX-512). The tail of < 16 tokens runs masked through the same math, so
// a token's weights never depend on its position in the batch. Returns true if a logit is NaN.
DK_AVX512 bool route_tokens_avx512(const float* logits, int64_t T, int64_t E, int64_t k,
                                   bool softmax_all, int32_t* ids, float* w) {
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i li = _mm512_mullo_epi32(lane, _mm512_set1_epi32(static_cast<int32_t>(E)));
  const __m512i lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i hi = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  const __m512 one = _mm512_set1_ps(1.f);
  __mmask16 nan = 0;
  for (int64_t t = 0; t < T; t += 16) {
    const int n = static_cast<int>(std::min<int64_t>(16, T - t));
    const __mmask16 m = static_cast<__mmask16>(n == 16 ? 0xFFFF : (1u << n) - 1);
    const float* lb = logits + t * E;
    __m512 v8[8];
    if (E == 8) {  // one load + transpose instead of 8 gathers
      load_transpose8(lb, n, v8);
      for (int e = 0; e < 8; ++e) nan |= _mm512_mask_cmp_ps_mask(m, v8[e], v8[e], _CMP_UNORD_Q);
    }
    __mmask16 unused = 0;  // the NaN check of a second read of the same logits
    __m512 b0 = pick_logit(E, v8, lb, li, m, 0, nan), b1 = _mm512_setzero_ps();
    __m512i i0 = _mm512_setzero_si512(), i1 = _mm512_setzero_si512();
    int64_t e = 1;
    if (k == 2) {
      const __m512 v = pick_logit(E, v8, lb, li, m, 1, nan);
      const __mmask16 gt = _mm512_cmp_ps_mask(v, b0, _CMP_GT_OQ);
      b1 = _mm512_mask_blend_ps(gt, v, b0);
      b0 = _mm512_mask_blend_ps(gt, b0, v);
      i0 = _mm512_maskz_mov_epi32(gt, _mm512_set1_epi32(1));
      i1 = _mm512_maskz_mov_epi32(static_cast<__mmask16>(~gt), _mm512_set1_epi32(1));
      e = 2;
    }
    for (; e < E; ++e) {
      const __m512 v = pick_logit(E, v8, lb, li, m, e, nan);
      const __m512i ev = _mm512_set1_epi32(static_cast<int32_t>(e));
      const __mmask16 gt0 = _mm512_cmp_ps_mask(v, b0, _CMP_GT_OQ);
      if (k == 2) {
        const __mmask16 gt1 = _mm512_cmp_ps_mask(v, b1, _CMP_GT_OQ);
        b1 = _mm512_mask_blend_ps(gt0, _mm512_mask_blend_ps(gt1, b1, v), b0);
        i1 = _mm512_mask_blend_epi32(gt0, _mm512_mask_blend_epi32(gt1, i1, ev), i0);
      }
      b0 = _mm512_mask_blend_ps(gt0, b0, v);
      i0 = _mm512_mask_blend_epi32(gt0, i0, ev);
    }
    __m512 z = one, e1 = _mm512_setzero_ps();
    if (k == 2) e1 = exp512_ps(_mm512_sub_ps(b1, b0));
    if (softmax_all) {  // z over every expert, in expert order
      z = _mm512_setzero_ps();
      for (int64_t x = 0; x < E; ++x) z = _mm512_add_ps(z, exp512_ps(_mm512_sub_ps(pick_logit(E, v8, lb, li, m, x, unused), b0)));
    } else if (k == 2) {
      z = _mm512_add_ps(one, e1);
    }
    const __m512 w0 = _mm512_div_ps(one, z);
    if (k == 1) {
      _mm512_mask_storeu_epi32(ids + t, m, i0);
      _mm512_mask_storeu_ps(w + t, m, w0);
    } else {
      const __m512 w1 = _mm512_div_ps(e1, z);
      const __mmask16 mlo = static_cast<__mmask16>(n >= 8 ? 0xFFFF : (1u << (2 * n)) - 1);
      const __mmask16 mhi = static_cast<__mmask16>(n <= 8 ? 0 : n == 16 ? 0xFFFF : (1u << (2 * n - 16)) - 1);
      _mm512_mask_storeu_epi32(ids + 2 * t, mlo, _mm512_permutex2var_epi32(i0, lo, i1));
      _mm512_mask_storeu_epi32(ids + 2 * t + 16, mhi, _mm512_permutex2var_epi32(i0, hi, i1));
      _mm512_mask_storeu_ps(w + 2 * t, mlo, _mm512_permutex2var_ps(w0, lo, w1));
      _mm512_mask_storeu_ps(w + 2 * t + 16, mhi, _mm512_permutex2var_ps(w0, hi, w1));
    }
  }
  return nan != 0;
}
#endif

// Route T tokens: one pass over the logits (top-k, weights, counts; AVX-512 for k <= 2 where
// the variant allows it) and one over the T * k pairs (the counting sort). The scalar pass takes
// each exp once and sums z in the same order as always (slots, or experts for softmax_all).
// Returns false when a logit is NaN (the outputs are then meaningless); the check rides on the
// pass over the logits.
bool route(const float* logits, int64_t T, int64_t E, int64_t k, bool softmax_all, int32_t* ids,
           float* w, int32_t* counts, int32_t* offsets, int32_t* perm, int32_t* inv,
           int32_t* cursor, float* ex, Isa isa) {
  bool nan = false;
#if defined(__x86_64__)
  const bool vec = k <= 2 && (isa == Isa::Avx512Vnni || isa == Isa::Amx) && 16 * E < (1 << 30);
#else
  const bool vec = false;
#endif
  if (vec) {
#if defined(__x86_64__)
    nan = route_tokens_avx512(logits, T, E, k, softmax_all, ids, w);
#endif
  } else {
    for (int64_t t = 0; t < T; ++t) {
      const float* l = logits + t * E;
      for (int64_t e = 0; e < E; ++e) nan |= std::isnan(l[e]);
      int32_t* id = ids + t * k;
      top_k(l, E, k, id);
      const float lmax = l[id[0]];
      float* wt = w + t * k;
      float z = 0.f;
      if (!softmax_all && k <= 2) {  // in registers; exp(0) = 1 exactly, so the same floats
        const float e1 = k == 2 ? std::exp(l[id[1]] - lmax) : 0.f;
        z = 1.f + e1;
        wt[0] = 1.f / z;
        if (k == 2) wt[1] = e1 / z;
      } else if (softmax_all) {
        for (int64_t e = 0; e < E; ++e) z += (ex[e] = std::exp(l[e] - lmax));
        for (int64_t s = 0; s < k; ++s) wt[s] = ex[id[s]] / z;
      } else {
        for (int64_t s = 0; s < k; ++s) z += (ex[s] = std::exp(l[id[s]] - lmax));
        for (int64_t s = 0; s < k; ++s) wt[s] = ex[s] / z;
      }
    }
  }
  sort_by_expert(ids, T * k, E, counts, offsets, perm, inv, cursor);
  return !nan;
}

void check_logits(const float* l, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    if (std::isnan(l[i]))
      throw py::value_error("moe_route: argument 'logits' contains NaN at flat index " +
                            std::to_string(i) + "; the router produced invalid values");
}

void check_k(const char* fn, int64_t k, int64_t E) {
  if (k < 1 || k > E)
    throw py::value_error(std::string(fn) + ": k must be in [1, E=" + std::to_string(E) +
                          "], got " + std::to_string(k));
}

// route() for the bindings: per-thread scratch (grows, never shrinks: no allocation per call),
// the GIL released only where the work is worth the hand-off, NaN reported by flat index.
void route_checked(const float* l, int64_t T, int64_t E, int64_t k, bool softmax_all, int32_t* ids,
                   float* w, int32_t* counts, int32_t* offsets, int32_t* perm, int32_t* inv) {
  thread_local std::vector<int32_t> cursor;
  thread_local std::vector<float> ex;
  if (static_cast<int64_t>(cursor.size()) < kSortLanes * E) cursor.resize(static_cast<size_t>(kSortLanes * E));
  if (static_cast<int64_t>(ex.size()) < E) ex.resize(static_cast<size_t>(E));
  const Isa isa = selected_isa();
  bool ok;
  if (T * E >= (1 << 14)) {
    py::gil_scoped_release nogil;
    ok = route(l, T, E, k, softmax_all, ids, w, counts, offsets, perm, inv, cursor.data(), ex.data(), isa);
  } else {
    ok = route(l, T, E, k, softmax_all, ids, w, counts, offsets, perm, inv, cursor.data(), ex.data(), isa);
  }
  if (!ok) check_logits(l, T * E);  // names the first NaN
}

// out[t] = sum_s w[t, s] * ys[inv[t*k + s]], rows of D floats; parallel over tokens.
void scatter(const float* ys, const int32_t* inv, const float* w, int64_t T, int64_t k, int64_t D,
             float* out, int nthreads) {
  auto body = [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      float* o = out + t * D;
      const float* y0 = ys + static_cast<int64_t>(inv[t * k]) * D;
      const float w0 = w[t * k];
      for (int64_t d = 0; d < D; ++d) o[d] = w0 * y0[d];
      for (int64_t s = 1; s < k; ++s) {
        const float* y = ys + static_cast<int64_t>(inv[t * k + s]) * D;
        const float ws = w[t * k + s];
        for (int64_t d = 0; d < D; ++d) o[d] += ws * y[d];
      }
    }
  };
  if (T * k * D < (1 << 15) || nthreads <= 1) return body(0, T);
  const long long chunks = std::min<long long>(T, 4LL * nthreads);
  parallel_chunks(nthreads, chunks, [&](long long c) {
    long long b, e;
    split_range(T, c, chunks, b, e);
    body(b, e);
  });
}

template <typename Tv>
void gather(const Tv* x, const int32_t* perm, int64_t k, int64_t rows, int64_t D, Tv* out,
            int nthreads) {
  auto body = [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j)
      std::memcpy(out + j * D, x + static_cast<int64_t>(perm[j] / k) * D, sizeof(Tv) * D);
  };
  if (rows * D * static_cast<int64_t>(sizeof(Tv)) < (1 << 17) || nthreads <= 1) return body(0, rows);
  const long long chunks = std::min<long long>(rows, 4LL * nthreads);
  parallel_chunks(nthreads, chunks, [&](long long c) {
    long long b, e;
    split_range(rows, c, chunks, b, e);
    body(b, e);
  });
}

}  // namespace

void MoeWorkspace::ensure(const MoeWeights& w, int64_t T, int64_t k) {
  const int64_t R = T * k;
  auto grow = [](auto& v, int64_t n) {
    if (static_cast<int64_t>(v.size()) < n) v.resize(static_cast<size_t>(n));
  };
  grow(ids, R); grow(perm, R); grow(inv, R); grow(wts, R);
  grow(counts, w.E); grow(offsets, w.E + 1); grow(cursor, kSortLanes * w.E); grow(ex, w.E);
  grow(qx, T * w.Dp()); grow(qxs, R * w.Dp()); grow(qh, R * w.Fp());
  grow(sx, T); grow(sxs, R); grow(h, R * w.F); grow(sh, R); grow(ys, R * w.D);
  grow(a1, w.E); grow(a2, w.E);
  if (static_cast<int64_t>(pieces.capacity()) < 8 * w.E + 64) pieces.reserve(static_cast<size_t>(8 * w.E + 64));
}

void moe_ffn_run(const MoeWeights& w, const float* xp, const float* lp, int64_t T, int64_t k,
                 bool softmax_all, float* o, MoeWorkspace& ws, Isa isa, int nthreads) {
  if (T == 0) return;
  ws.ensure(w, T, k);
  const int64_t R = T * k, E = w.E, D = w.D, F = w.F, Dp = w.Dp(), Fp = w.Fp();
  const int64_t np13 = w.np13(), np2 = w.np2();
  route(lp, T, E, k, softmax_all, ws.ids.data(), ws.wts.data(), ws.counts.data(),
        ws.offsets.data(), ws.perm.data(), ws.inv.data(), ws.cursor.data(), ws.ex.data(), isa);
  const int32_t* offsets = ws.offsets.data();
  // Quantize each token once, then gather the int8 rows: a token's quantization does not
  // depend on the expert, so this is k times less quantization work than per expert.
  quantize_rows(isa, xp, D, T, D, Dp, ws.qx.data(), Dp, ws.sx.data(), nthreads);
  gather(ws.qx.data(), ws.perm.data(), k, R, Dp, ws.qxs.data(), nthreads);
  for (int64_t j = 0; j < R; ++j) ws.sxs[j] = ws.sx[ws.perm[j] / k];
  // Stage 1: h = silu(x W1^T) * (x W3^T) per expert slice.
  for (int64_t e = 0; e < E; ++e) {
    GemmArgs& a = ws.a1[e];
    a = GemmArgs();
    a.qa = ws.qxs.data() + offsets[e] * Dp; a.lda = Dp; a.sa = ws.sxs.data() + offsets[e];
    a.w = w.w13 + e * np13 * Dp * kPanel; a.sw = w.s13 + e * np13 * kPanel;
    a.colsum = w.c13 + e * np13 * kPanel;
    a.M = ws.counts[e]; a.Kp = Dp; a.n_panels = np13; a.N = F; a.epi = Epilogue::SwiGlu;
    a.out = ws.h.data() + offsets[e] * F; a.ldo = F;
  }
  run_gemm_group(ws.a1.data(), E, isa, nthreads, ws.pieces);
  // Stage 2: ys = h W2^T per expert slice, on freshly quantized h rows.
  quantize_rows(isa, ws.h.data(), F, R, F, Fp, ws.qh.data(), Fp, ws.sh.data(), nthreads);
  for (int64_t e = 0; e < E; ++e) {
    GemmArgs& a = ws.a2[e];
    a = GemmArgs();
    a.qa = ws.qh.data() + offsets[e] * Fp; a.lda = Fp; a.sa = ws.sh.data() + offsets[e];
    a.w = w.w2 + e * np2 * Fp * kPanel; a.sw = w.s2 + e * np2 * kPanel;
    a.colsum = w.c2 + e * np2 * kPanel;
    a.M = ws.counts[e]; a.Kp = Fp; a.n_panels = np2; a.N = D; a.epi = Epilogue::Float;
    a.out = ws.ys.data() + offsets[e] * D; a.ldo = D;
  }
  run_gemm_group(ws.a2.data(), E, isa, nthreads, ws.pieces);
  scatter(ws.ys.data(), ws.inv.data(), ws.wts.data(), T, k, D, o, nthreads);
}

void register_moe(py::module_& m) {
  m.def(
      "moe_route",
      [](py::array logits, int64_t k, bool softmax_all, py::array ids, py::array weights,
         py::array counts, py::array offsets, py::array perm, py::array inv) {
        const char* fn = "moe_route";
        const float* l = check_array<float>(logits, fn, "logits", {-1, -1});
        const int64_t T = logits.shape(0), E = logits.shape(1);
        check_k(fn, k, E);
        int32_t* id = check_array<int32_t>(ids, fn, "ids", {T, k}, true);
        float* w = check_array<float>(weights, fn, "weights", {T, k}, true);
        int32_t* c = check_array<int32_t>(counts, fn, "counts", {E}, true);
        int32_t* o = check_array<int32_t>(offsets, fn, "offsets", {E + 1}, true);
        int32_t* p = check_array<int32_t>(perm, fn, "perm", {T * k}, true);
        int32_t* iv = check_array<int32_t>(inv, fn, "inv", {T * k}, true);
        route_checked(l, T, E, k, softmax_all, id, w, c, o, p, iv);
      },
      py::arg("logits"), py::arg("k"), py::arg("softmax_all"), py::arg("ids"), py::arg("weights"),
      py::arg("counts"), py::arg("offsets"), py::arg("perm"), py::arg("inv"),
      "Top-k routing with lowest-index tie break, softmax weights, per-expert counts/offsets "
      "and the permutation grouping (token, slot) pairs by expert.");

  // The same routing into fresh arrays made here: one call from Python instead of allocating
  // six outputs there and passing them in (at T = 256 that overhead was most of the call).
  m.def(
      "moe_route_arrays",
      [](py::array logits, int64_t k, bool softmax_all) {
        const float* l = check_array<float>(logits, "moe_route", "logits", {-1, -1});
        const int64_t T = logits.shape(0), E = logits.shape(1);
        check_k("moe_route", k, E);
        py::array_t<int32_t> ids({T, k}), counts(E), offsets(E + 1), perm(T * k), inv(T * k);
        py::array_t<float> weights({T, k});
        route_checked(l, T, E, k, softmax_all, ids.mutable_data(), weights.mutable_data(),
                      counts.mutable_data(), offsets.mutable_data(), perm.mutable_data(),
                      inv.mutable_data());
        return py::make_tuple(ids, weights, counts, offsets, perm, inv);
      },
      py::arg("logits"), py::arg("k"), py::arg("softmax_all"),
      "moe_route into new arrays: (ids (T, k), weights (T, k), counts (E,), offsets (E + 1,), "
      "perm (T*k,), inv (T*k,)).");

  m.def(
      "moe_gather",
      [](py::array x, py::array perm, int64_t k, py::array out, int nthreads) {
        const char* fn = "moe_gather";
        const float* xp = check_array<float>(x, fn, "x", {-1, -1});
        const int64_t T = x.shape(0), D = x.shape(1);
        const int32_t* p = check_array<int32_t>(perm, fn, "perm", {T * k});
        float* o = check_array<float>(out, fn, "out", {T * k, D}, true);
        for (int64_t j = 0; j < T * k; ++j)
          if (p[j] < 0 || p[j] >= T * k) throw py::value_error("moe_gather: perm entry out of range");
        py::gil_scoped_release nogil;
        gather(xp, p, k, T * k, D, o, nthreads);
      },
      py::arg("x"), py::arg("perm"), py::arg("k"), py::arg("out"), py::arg("nthreads") = 1,
      "out[j] = x[perm[j] // k]: token rows in expert-grouped order.");

  m.def(
      "moe_scatter",
      [](py::array ys, py::array inv, py::array weights, py::array out, int nthreads) {
        const char* fn = "moe_scatter";
        const int32_t* iv = check_array<int32_t>(inv, fn, "inv", {-1});
        const float* w = check_array<float>(weights, fn, "weights", {-1, -1});
        const int64_t T = weights.shape(0), k = weights.shape(1);
        const float* y = check_array<float>(ys, fn, "ys", {T * k, -1});
        const int64_t D = ys.shape(1);
        check_array<int32_t>(inv, fn, "inv", {T * k});
        float* o = check_array<float>(out, fn, "out", {T, D}, true);
        for (int64_t j = 0; j < T * k; ++j)
          if (iv[j] < 0 || iv[j] >= T * k) throw py::value_error("moe_scatter: inv entry out of range");
        py::gil_scoped_release nogil;
        if (k == 0) { std::fill(o, o + T * D, 0.f); return; }
        scatter(y, iv, w, T, k, D, o, nthreads);
      },
      py::arg("ys"), py::arg("inv"), py::arg("weights"), py::arg("out"), py::arg("nthreads") = 1,
      "out[t] = sum_s weights[t, s] * ys[inv[t*k + s]] (weighted scatter-add, deterministic).");

  m.def(
      "moe_ffn",
      [](py::array x, py::array logits, int64_t k, bool softmax_all, py::array w13,
         py::array sw13, py::array cs13, py::array w2, py::array sw2, py::array cs2, int64_t F,
         py::array out, int nthreads, const std::string& isa_name) {
        const char* fn = "moe_ffn";
        const float* xp = check_array<float>(x, fn, "x", {-1, -1});
        const int64_t T = x.shape(0), D = x.shape(1);
        const float* lp = check_array<float>(logits, fn, "logits", {T, -1});
        const int64_t E = logits.shape(1);
        if (k < 1 || k > E)
          throw py::value_error("moe_ffn: k must be in [1, E=" + std::to_string(E) + "], got " +
                                std::to_string(k));
        auto round_up = [](int64_t v, int64_t mlt) { return (v + mlt - 1) / mlt * mlt; };
        const int64_t Dp = round_up(D, 4), Fp = round_up(F, 4);
        const int64_t np13 = 2 * ((F + kPanel - 1) / kPanel), np2 = (D + kPanel - 1) / kPanel;
        const int8_t* W13 = check_array<int8_t>(w13, fn, "w13", {E, np13 * Dp * kPanel});
        const float* S13 = check_array<float>(sw13, fn, "sw13", {E, np13 * kPanel});
        const int32_t* C13 = check_array<int32_t>(cs13, fn, "cs13", {E, np13 * kPanel});
        const int8_t* W2 = check_array<int8_t>(w2, fn, "w2", {E, np2 * Fp * kPanel});
        const float* S2 = check_array<float>(sw2, fn, "sw2", {E, np2 * kPanel});
        const int32_t* C2 = check_array<int32_t>(cs2, fn, "cs2", {E, np2 * kPanel});
        float* o = check_array<float>(out, fn, "out", {T, D}, true);
        check_logits(lp, T * E);
        const Isa isa = resolve_isa(isa_name);
        py::gil_scoped_release nogil;
        if (T == 0) return;
        MoeWeights mw{W13, S13, C13, W2, S2, C2, E, D, F};
        // Per-thread scratch kept across calls: a fresh one allocated (and page-faulted) every
        // buffer of the layer on every call.
        thread_local MoeWorkspace ws;
        moe_ffn_run(mw, xp, lp, T, k, softmax_all, o, ws, isa, nthreads);
      },
      py::arg("x"), py::arg("logits"), py::arg("k"), py::arg("softmax_all"), py::arg("w13"),
      py::arg("sw13"), py::arg("cs13"), py::arg("w2"), py::arg("sw2"), py::arg("cs2"),
      py::arg("F"), py::arg("out"), py::arg("nthreads") = 1, py::arg("isa") = "",
      "Whole MoE FFN: route, int8 SwiGLU experts (w13 = packed [w1; w3] per expert, w2 packed), "
      "weighted combine. out (T, D).");
}

}  // namespace deploykit
