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
#include "thread_pool.h"

namespace deploykit {
namespace {

// Route T tokens. Single-threaded: O(T * E * k) with E, k small is a few microseconds.
void route(const float* logits, int64_t T, int64_t E, int64_t k, bool softmax_all, int32_t* ids,
           float* w, int32_t* counts, int32_t* offsets, int32_t* perm, int32_t* inv) {
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
  std::vector<int32_t> cursor(offsets, offsets + E);
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

// Run one GEMM stage over all experts in one parallel call: work items are (expert, unit
// range) pieces of about equal cost (rows x units), handed out dynamically.
void run_experts(const std::vector<GemmArgs>& args, Isa isa, int nthreads) {
  struct Piece { int64_t e, u0, u1; };
  double total = 0;
  for (const GemmArgs& a : args)
    if (a.M) total += static_cast<double>(a.M + 2) * n_units(a);  // +2: weight streaming cost
  if (total == 0) return;
  nthreads = std::max(1, nthreads);
  if (total * args[0].Kp * kPanel < 65536.0) nthreads = 1;
  const double target = total / (4.0 * nthreads);
  std::vector<Piece> pieces;
  for (size_t e = 0; e < args.size(); ++e) {
    if (!args[e].M) continue;
    const int64_t units = n_units(args[e]);
    const double cost = static_cast<double>(args[e].M + 2) * units;
    const int64_t parts = std::min<int64_t>(units, std::max<int64_t>(1, static_cast<int64_t>(cost / target + 0.5)));
    for (int64_t i = 0; i < parts; ++i) {
      long long b, en;
      split_range(units, i, parts, b, en);
      pieces.push_back({static_cast<int64_t>(e), b, en});
    }
  }
  parallel_chunks(nthreads, static_cast<long long>(pieces.size()), [&](long long c) {
    const Piece& p = pieces[c];
    gemm_block(isa, args[p.e], 0, args[p.e].M, p.u0, p.u1);
  });
}

}  // namespace

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
        py::gil_scoped_release nogil;
        route(l, T, E, k, softmax_all, id, w, c, o, p, iv);
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
        const int64_t R = T * k;  // routed rows
        std::vector<int32_t> ids(R), counts(E), offsets(E + 1), perm(R), inv(R);
        std::vector<float> wts(R);
        route(lp, T, E, k, softmax_all, ids.data(), wts.data(), counts.data(), offsets.data(),
              perm.data(), inv.data());
        // Quantize each token once, then gather the int8 rows: a token's quantization does not
        // depend on the expert, so this is k times less quantization work than per expert.
        std::vector<int8_t> qx(T * Dp), qxs(R * Dp), qh(R * Fp);
        std::vector<float> sx(T), sxs(R), h(R * F), sh(R), ys(R * D);
        quantize_rows(isa, xp, D, T, D, Dp, qx.data(), Dp, sx.data(), nthreads);
        gather(qx.data(), perm.data(), k, R, Dp, qxs.data(), nthreads);
        for (int64_t j = 0; j < R; ++j) sxs[j] = sx[perm[j] / k];
        // Stage 1: h = silu(x W1^T) * (x W3^T) per expert slice.
        std::vector<GemmArgs> a1(E), a2(E);
        for (int64_t e = 0; e < E; ++e) {
          GemmArgs& a = a1[e];
          a.qa = qxs.data() + offsets[e] * Dp; a.lda = Dp; a.sa = sxs.data() + offsets[e];
          a.w = W13 + e * np13 * Dp * kPanel; a.sw = S13 + e * np13 * kPanel;
          a.colsum = C13 + e * np13 * kPanel;
          a.M = counts[e]; a.Kp = Dp; a.n_panels = np13; a.N = F; a.epi = Epilogue::SwiGlu;
          a.out = h.data() + offsets[e] * F; a.ldo = F;
        }
        run_experts(a1, isa, nthreads);
        // Stage 2: ys = h W2^T per expert slice, on freshly quantized h rows.
        quantize_rows(isa, h.data(), F, R, F, Fp, qh.data(), Fp, sh.data(), nthreads);
        for (int64_t e = 0; e < E; ++e) {
          GemmArgs& a = a2[e];
          a.qa = qh.data() + offsets[e] * Fp; a.lda = Fp; a.sa = sh.data() + offsets[e];
          a.w = W2 + e * np2 * Fp * kPanel; a.sw = S2 + e * np2 * kPanel;
          a.colsum = C2 + e * np2 * kPanel;
          a.M = counts[e]; a.Kp = Fp; a.n_panels = np2; a.N = D; a.epi = Epilogue::Float;
          a.out = ys.data() + offsets[e] * D; a.ldo = D;
        }
        run_experts(a2, isa, nthreads);
        scatter(ys.data(), inv.data(), wts.data(), T, k, D, o, nthreads);
      },
      py::arg("x"), py::arg("logits"), py::arg("k"), py::arg("softmax_all"), py::arg("w13"),
      py::arg("sw13"), py::arg("cs13"), py::arg("w2"), py::arg("sw2"), py::arg("cs2"),
      py::arg("F"), py::arg("out"), py::arg("nthreads") = 1, py::arg("isa") = "",
      "Whole MoE FFN: route, int8 SwiGLU experts (w13 = packed [w1; w3] per expert, w2 packed), "
      "weighted combine. out (T, D).");
}

}  // namespace deploykit
