// Int8 linear: weight packing, the threaded driver, and its bindings.
#include <algorithm>
#include <cstring>
#include <vector>

#include "array_check.h"
#include "int8_kernels.h"
#include "thread_pool.h"

namespace deploykit {

int64_t n_units(const GemmArgs& a) {
  return a.epi == Epilogue::SwiGlu ? a.n_panels / 2 : a.n_panels;
}

void gemm_block(Isa isa, const GemmArgs& a, int64_t m0, int64_t m1, int64_t u0, int64_t u1) {
  switch (isa) {
    case Isa::Amx: gemm_block_amx(a, m0, m1, u0, u1); break;
    case Isa::Avx512Vnni: gemm_block_avx512vnni(a, m0, m1, u0, u1); break;
    case Isa::Avx2: gemm_block_avx2(a, m0, m1, u0, u1); break;
    default: gemm_block_scalar(a, m0, m1, u0, u1); break;
  }
}

// Chunk c of `parts` over [0, n) units, with boundaries on multiples of 12 units (or 4) where
// that still leaves every part work: the vector tiles cover 2, 3 or 4 panels, so such chunks
// split into whole tiles instead of leaving a narrow tail tile in every chunk.
static void split_units(int64_t n, int64_t c, int64_t parts, int64_t& b, int64_t& e) {
  const int64_t grain = n >= 12 * parts ? 12 : n >= 4 * parts ? 4 : 1;
  long long gb, ge;
  split_range((n + grain - 1) / grain, c, parts, gb, ge);
  b = std::min<int64_t>(n, gb * grain);
  e = std::min<int64_t>(n, ge * grain);
}

void run_gemm(const GemmArgs& a, Isa isa, int nthreads) {
  const int64_t units = n_units(a);
  if (a.M == 0 || units == 0) return;
  // Below ~1M MACs (a few microseconds on one core with AVX-512 VNNI) a second thread saves at
  // most a microsecond or two, and on a shared machine a worker descheduled inside its chunk
  // can cost a whole time slice.
  const double macs = static_cast<double>(a.M) * a.Kp * units * kPanel;
  if (macs < 1048576.0) nthreads = 1;
  nthreads = std::max(1, nthreads);
  // Split output tiles: over channel units when there are enough (each thread then streams
  // only its own weights), else over rows.
  const bool split_n = units >= 2 * nthreads || a.M < 2 * nthreads;
  // A few chunks per thread, handed out dynamically (see thread_pool.h).
  const long long n = split_n ? units : a.M;
  const long long chunks = nthreads == 1 ? 1 : std::min<long long>(n, 4LL * nthreads);
  parallel_chunks(nthreads, chunks, [&](long long c) {
    int64_t b, e;
    if (split_n) {
      split_units(n, c, chunks, b, e);
      if (b < e) gemm_block(isa, a, 0, a.M, b, e);
    } else {
      long long rb, re;
      split_range(n, c, chunks, rb, re);
      if (rb < re) gemm_block(isa, a, rb, re, 0, units);
    }
  });
}

void run_gemm_group(const GemmArgs* args, int64_t n, Isa isa, int nthreads,
                    std::vector<GemmPiece>& pieces) {
  double total = 0;
  int64_t kp = 0;
  for (int64_t i = 0; i < n; ++i)
    if (args[i].M) {
      total += static_cast<double>(args[i].M + 2) * n_units(args[i]);  // +2: weight streaming cost
      kp = std::max(kp, args[i].Kp);
    }
  if (total == 0) return;
  nthreads = std::max(1, nthreads);
  if (total * kp * kPanel < 65536.0) nthreads = 1;
  const double target = total / (4.0 * nthreads);
  pieces.clear();
  for (int64_t i = 0; i < n; ++i) {
    if (!args[i].M) continue;
    const int64_t units = n_units(args[i]);
    const double cost = static_cast<double>(args[i].M + 2) * units;
    const int64_t parts = nthreads == 1 ? 1 : std::min<int64_t>(
        units, std::max<int64_t>(1, static_cast<int64_t>(cost / target + 0.5)));
    for (int64_t j = 0; j < parts; ++j) {
      int64_t b, e;
      split_units(units, j, parts, b, e);
      if (b < e) pieces.push_back({i, b, e});
    }
  }
  parallel_chunks(nthreads, static_cast<long long>(pieces.size()), [&](long long c) {
    const GemmPiece& p = pieces[c];
    gemm_block(isa, args[p.g], 0, args[p.g].M, p.u0, p.u1);
  });
}

void quantize_rows(Isa isa, const float* x, int64_t ldx, int64_t M, int64_t K, int64_t Kp,
                   int8_t* qa, int64_t lda, float* sa, int nthreads) {
  auto body = [&](int64_t m0, int64_t m1) {
    if (isa == Isa::Scalar)
      quantize_rows_scalar(x, ldx, K, Kp, qa, lda, sa, m0, m1);
    else  // the AVX-512 variant quantizes with AVX2: the activations are a small share of the work
      quantize_rows_avx2(x, ldx, K, Kp, qa, lda, sa, m0, m1);
  };
  if (M * K < (1 << 16) || nthreads <= 1) {
    body(0, M);
    return;
  }
  const long long chunks = std::min<long long>(M, 4LL * nthreads);
  parallel_chunks(nthreads, chunks, [&](long long c) {
    long long b, e;
    split_range(M, c, chunks, b, e);
    if (b < e) body(b, e);
  });
}

namespace {

int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// Reusable scratch for quantized activations; grows, never shrinks (no page faults per call).
struct Scratch {
  std::vector<int8_t> qa;
  std::vector<float> sa;
};
Scratch& scratch() {
  thread_local Scratch s;
  return s;
}

// Internal panel count for a pack of `n` logical channels.
int64_t panels_for(int64_t n, bool swiglu) {
  return swiglu ? 2 * ((n / 2 + kPanel - 1) / kPanel) : (n + kPanel - 1) / kPanel;
}

// Layout metadata the Python side keeps with a packed weight.
struct PackInfo {
  int64_t N, K, Kp, n_panels;
  bool swiglu;
};

PackInfo check_pack(const char* fn, const py::array& packed, const py::array& sw,
                    const py::array& colsum, int64_t K, int64_t N, bool swiglu) {
  if (K < 0 || N < 0) throw py::value_error(std::string(fn) + ": K and N must be >= 0");
  PackInfo p{N, K, round_up(K, 4), panels_for(swiglu ? 2 * N : N, swiglu), swiglu};
  check_array<int8_t>(packed, fn, "packed", {p.n_panels * p.Kp * kPanel});
  check_array<float>(sw, fn, "scales", {p.n_panels * kPanel});
  check_array<int32_t>(colsum, fn, "colsum", {p.n_panels * kPanel});
  return p;
}

GemmArgs make_args(const PackInfo& p, const py::array& packed, const py::array& sw,
                   const py::array& colsum) {
  GemmArgs a;
  a.w = static_cast<const int8_t*>(packed.data());
  a.sw = static_cast<const float*>(sw.data());
  a.colsum = static_cast<const int32_t*>(colsum.data());
  a.Kp = p.Kp;
  a.n_panels = p.n_panels;
  a.N = p.N;
  a.epi = p.swiglu ? Epilogue::SwiGlu : Epilogue::Float;
  return a;
}

}  // namespace

void register_int8(py::module_& m) {
  m.attr("PANEL") = kPanel;

  m.def(
      "pack_int8_weight",
      [](py::array qw, py::array scales, bool swiglu, py::array packed, py::array sw_out,
         py::array colsum) {
        const char* fn = "pack_int8_weight";
        const int8_t* q = check_array<int8_t>(qw, fn, "qw", {-1, -1});
        const int64_t rows = qw.shape(0), K = qw.shape(1);
        const float* s = check_array<float>(scales, fn, "scales", {rows});
        if (swiglu && rows % 2)
          throw py::value_error("pack_int8_weight: swiglu packs need qw = [gate; up] with an even "
                                "number of rows, got " + std::to_string(rows));
        const int64_t Kp = round_up(K, 4), np = panels_for(rows, swiglu);
        int8_t* dst = check_array<int8_t>(packed, fn, "packed", {np * Kp * kPanel}, true);
        float* sdst = check_array<float>(sw_out, fn, "sw_out", {np * kPanel}, true);
        int32_t* cdst = check_array<int32_t>(colsum, fn, "colsum", {np * kPanel}, true);
        for (int64_t i = 0; i < rows * K; ++i)
          if (q[i] == -128)
            throw py::value_error("pack_int8_weight: qw must be in [-127, 127] (symmetric "
                                  "quantization); found -128 at flat index " + std::to_string(i));
        const int64_t F = rows / 2;
        py::gil_scoped_release nogil;
        std::memset(dst, 0, static_cast<size_t>(np * Kp * kPanel));
        std::fill(sdst, sdst + np * kPanel, 0.f);
        std::fill(cdst, cdst + np * kPanel, 0);
        for (int64_t p = 0; p < np; ++p) {
          for (int j = 0; j < kPanel; ++j) {
            int64_t row;  // source row of internal channel (p, j), or -1 for padding
            if (swiglu) {
              const int64_t n = (p / 2) * kPanel + j;
              row = n < F ? (p % 2) * F + n : -1;
            } else {
              const int64_t n = p * kPanel + j;
              row = n < rows ? n : -1;
            }
            if (row < 0) continue;
            int32_t cs = 0;
            for (int64_t k = 0; k < K; ++k) {
              const int8_t v = q[row * K + k];
              dst[p * Kp * kPanel + (k / 4) * 64 + j * 4 + (k % 4)] = v;
              cs += v;
            }
            sdst[p * kPanel + j] = s[row];
            cdst[p * kPanel + j] = cs;
          }
        }
      },
      py::arg("qw"), py::arg("scales"), py::arg("swiglu"), py::arg("packed"), py::arg("sw_out"),
      py::arg("colsum"),
      "Pack int8 weights qw (N, K) in [-127, 127] with per-row scales into the kernel layout. "
      "swiglu=True: qw = [gate; up] (2F, K), panels interleaved.");

  m.def("packed_sizes",
        [](int64_t N, int64_t K, bool swiglu) {
          const int64_t Kp = round_up(K, 4), np = panels_for(N, swiglu);
          return py::make_tuple(np * Kp * kPanel, np * kPanel);
        },
        py::arg("rows"), py::arg("K"), py::arg("swiglu"),
        "(packed bytes, padded channel count) for a pack of `rows` weight rows.");

  m.def(
      "quantize_rows",
      [](py::array x, py::array qa, py::array sa, const std::string& isa_name) {
        const char* fn = "quantize_rows";
        const float* xp = check_array<float>(x, fn, "x", {-1, -1});
        const int64_t M = x.shape(0), K = x.shape(1);
        int8_t* q = check_array<int8_t>(qa, fn, "qa", {M, K}, true);
        float* s = check_array<float>(sa, fn, "sa", {M}, true);
        const Isa isa = resolve_isa(isa_name);
        py::gil_scoped_release nogil;
        quantize_rows(isa, xp, K, M, K, K, q, K, s, 1);
      },
      py::arg("x"), py::arg("qa"), py::arg("sa"), py::arg("isa") = "",
      "Dynamic per-row symmetric quantization: qa = round_half_even(x * 127 / amax_row), "
      "sa = amax_row / 127.");

  m.def(
      "int8_gemm_s32",
      [](py::array qa, py::array packed, py::array sw, py::array colsum, int64_t N, bool swiglu,
         py::array out, int nthreads, const std::string& isa_name) {
        const char* fn = "int8_gemm_s32";
        const int8_t* q = check_array<int8_t>(qa, fn, "qa", {-1, -1});
        const int64_t M = qa.shape(0), K = qa.shape(1);
        const PackInfo p = check_pack(fn, packed, sw, colsum, K, N, swiglu);
        const int64_t ncols = swiglu ? 2 * N : N;
        int32_t* o = check_array<int32_t>(out, fn, "out", {M, ncols}, true);
        for (int64_t i = 0; i < M * K; ++i)
          if (q[i] == -128) throw py::value_error("int8_gemm_s32: qa must be in [-127, 127]");
        const Isa isa = resolve_isa(isa_name);
        py::gil_scoped_release nogil;
        // The kernels read Kp-padded rows: copy into a padded buffer when K % 4 != 0.
        std::vector<int8_t> padded;
        const int8_t* qp = q;
        if (p.Kp != K) {
          padded.assign(static_cast<size_t>(M * p.Kp), 0);
          for (int64_t r = 0; r < M; ++r) std::memcpy(&padded[r * p.Kp], q + r * K, K);
          qp = padded.data();
        }
        GemmArgs a = make_args(p, packed, sw, colsum);
        a.qa = qp;
        a.lda = p.Kp;
        a.M = M;
        a.epi = Epilogue::Raw;
        a.raw_pair_F = swiglu ? N : 0;
        a.N = swiglu ? 0 : N;
        a.out_i32 = o;
        a.ldo = ncols;
        std::vector<float> ones(static_cast<size_t>(M), 1.f);
        a.sa = ones.data();
        run_gemm(a, isa, nthreads);
      },
      py::arg("qa"), py::arg("packed"), py::arg("scales"), py::arg("colsum"), py::arg("N"),
      py::arg("swiglu"), py::arg("out"), py::arg("nthreads") = 1, py::arg("isa") = "",
      "Raw int32 accumulators qa (M, K) @ qw^T (exact). For swiglu packs out is (M, 2N) = "
      "[gate | up].");

  m.def(
      "int8_linear",
      [](py::array x, py::array packed, py::array sw, py::array colsum, int64_t N, bool swiglu,
         py::object bias, py::array out, int nthreads, const std::string& isa_name) {
        const char* fn = "int8_linear";
        const float* xp = check_array<float>(x, fn, "x", {-1, -1});
        const int64_t M = x.shape(0), K = x.shape(1);
        const PackInfo p = check_pack(fn, packed, sw, colsum, K, N, swiglu);
        const float* bp = nullptr;
        if (!bias.is_none())
          bp = check_array<float>(bias.cast<py::array>(), fn, "bias", {swiglu ? 2 * N : N});
        float* o = check_array<float>(out, fn, "out", {M, N}, true);
        const Isa isa = resolve_isa(isa_name);
        py::gil_scoped_release nogil;
        if (M == 0) return;
        Scratch& s = scratch();
        if (static_cast<int64_t>(s.qa.size()) < M * p.Kp) s.qa.resize(static_cast<size_t>(M * p.Kp));
        if (static_cast<int64_t>(s.sa.size()) < M) s.sa.resize(static_cast<size_t>(M));
        // Quantize each row once; every output tile then reads the int8 rows.
        quantize_rows(isa, xp, K, M, K, p.Kp, s.qa.data(), p.Kp, s.sa.data(), nthreads);
        GemmArgs a = make_args(p, packed, sw, colsum);
        a.qa = s.qa.data();
        a.lda = p.Kp;
        a.sa = s.sa.data();
        a.M = M;
        a.bias = bp;
        a.out = o;
        a.ldo = N;
        run_gemm(a, isa, nthreads);
      },
      py::arg("x"), py::arg("packed"), py::arg("scales"), py::arg("colsum"), py::arg("N"),
      py::arg("swiglu"), py::arg("bias"), py::arg("out"), py::arg("nthreads") = 1,
      py::arg("isa") = "",
      "out (M, N) = dequant(quant_rows(x) @ qw^T) (+ bias); swiglu packs: silu(gate) * up.");
}

}  // namespace deploykit
