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
#include "thread_pool.h"

namespace deploykit {
namespace {

// Route T tokens. Single-threaded: O(T * E * k) with E, k small is a few microseconds.
void route(const float* logits, int64_t T, int64_t E, int64_t k, bool softmax_all, int32_t* ids,
           float* w, int32_t* counts, int32_t* offsets, int32_t* perm, int32_t* inv,
           int32_t* cursor) {
  std::fill(counts, counts + E, 0);
  for (int64_t t = 0; t < T; ++t) {
    const float* l = logits + t * E;
    int32_t* id = ids + t * k;
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
    const float lmax = l[id[0]];
    float* wt = w + t * k;
    float z = 0.f;
    if (softmax_all) {
      for (int64_t e = 0; e < E; ++e) z += std::exp(l[e] - lmax);
    } else {
      for (int64_t s = 0; s < k; ++s) z += std::exp(l[id[s]] - lmax);
    }
    for (int64_t s = 0; s < k; ++s) wt[s] = std::exp(l[id[s]] - lmax) / z;
    for (int64_t s = 0; s < k; ++s) ++counts[id[s]];
  }
  offsets[0] = 0;
  for (int64_t e = 0; e < E; ++e) offsets[e + 1] = offsets[e] + counts[e];
  // Counting sort of the flat (t, slot) indices: stable, so tokens stay ascending per expert.
  std::copy(offsets, offsets + E, cursor);
  for (int64_t i = 0; i < T * k; ++i) {
    const int32_t j = cursor[ids[i]]++;
    perm[j] = static_cast<int32_t>(i);
    inv[i] = j;
  }
}

void check_logits(const float* l, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    if (std::isnan(l[i]))
      throw py::value_error("moe_route: argument 'logits' contains NaN at flat index " +
                            std::to_string(i) + "; the router produced invalid values");
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
  grow(counts, w.E); grow(offsets, w.E + 1); grow(cursor, w.E);
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
        ws.offsets.data(), ws.perm.data(), ws.inv.data(), ws.cursor.data());
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
        if (k < 1 || k > E)
          throw py::value_error("moe_route: k must be in [1, E=" + std::to_string(E) + "], got " +
                                std::to_string(k));
        int32_t* id = check_array<int32_t>(ids, fn, "ids", {T, k}, true);
        float* w = check_array<float>(weights, fn, "weights", {T, k}, true);
        int32_t* c = check_array<int32_t>(counts, fn, "counts", {E}, true);
        int32_t* o = check_array<int32_t>(offsets, fn, "offsets", {E + 1}, true);
        int32_t* p = check_array<int32_t>(perm, fn, "perm", {T * k}, true);
        int32_t* iv = check_array<int32_t>(inv, fn, "inv", {T * k}, true);
        check_logits(l, T * E);
        std::vector<int32_t> cursor(E);
        py::gil_scoped_release nogil;
        route(l, T, E, k, softmax_all, id, w, c, o, p, iv, cursor.data());
      },
      py::arg("logits"), py::arg("k"), py::arg("softmax_all"), py::arg("ids"), py::arg("weights"),
      py::arg("counts"), py::arg("offsets"), py::arg("perm"), py::arg("inv"),
      "Top-k routing with lowest-index tie break, softmax weights, per-expert counts/offsets "
      "and the permutation grouping (token, slot) pairs by expert.");

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
        MoeWorkspace ws;
        moe_ffn_run(mw, xp, lp, T, k, softmax_all, o, ws, isa, nthreads);
      },
      py::arg("x"), py::arg("logits"), py::arg("k"), py::arg("softmax_all"), py::arg("w13"),
      py::arg("sw13"), py::arg("cs13"), py::arg("w2"), py::arg("sw2"), py::arg("cs2"),
      py::arg("F"), py::arg("out"), py::arg("nthreads") = 1, py::arg("isa") = "",
      "Whole MoE FFN: route, int8 SwiGLU experts (w13 = packed [w1; w3] per expert, w2 packed), "
      "weighted combine. out (T, D).");
}

}  // namespace deploykit
