// Int4 linear: nibble packing, the threaded driver and the bindings.
#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "array_check.h"
#include "int4_kernels.h"
#include "thread_pool.h"

namespace deploykit {

int64_t int4_units(const Int4Args& a) { return a.epi == Epilogue::SwiGlu ? a.n_panels / 2 : a.n_panels; }

void int4_block(Isa isa, const Int4Args& a, int64_t m0, int64_t m1, int64_t u0, int64_t u1) {
  switch (isa) {
    case Isa::Amx:  // AMX has no 4-bit tiles: its machines run the VNNI variant
    case Isa::Avx512Vnni: int4_block_avx512vnni(a, m0, m1, u0, u1); break;
    case Isa::Avx2: int4_block_avx2(a, m0, m1, u0, u1); break;
    default: int4_block_scalar(a, m0, m1, u0, u1); break;
  }
}

void group_sums(Isa isa, const int8_t* qa, int64_t lda, int64_t M, int64_t G, int32_t* asum, int64_t ldasum) {
  if (isa != Isa::Scalar) {
    group_sums_avx2(qa, lda, M, G, asum, ldasum);
    return;
  }
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < G; ++g) {
      int32_t s = 0;
      for (int k = 0; k < kGroup; ++k) s += qa[m * lda + g * kGroup + k];
      asum[m * ldasum + g] = s;
    }
}

void run_int4_group(const Int4Args* args, int64_t n, Isa isa, int nthreads, std::vector<GemmPiece>& pieces) {
  double total = 0, kmax = 0;
  for (int64_t i = 0; i < n; ++i)
    if (args[i].M) {
      total += static_cast<double>(args[i].M + 2) * int4_units(args[i]);  // +2: weight streaming cost
      kmax = std::max(kmax, static_cast<double>(args[i].G * kGroup));
    }
  if (total == 0) return;
  nthreads = std::max(1, nthreads);
  if (total * kmax * kPanel < 65536.0) nthreads = 1;  // below that a hand-off costs more than it saves
  const double target = total / (4.0 * nthreads);
  pieces.clear();
  for (int64_t i = 0; i < n; ++i) {
    if (!args[i].M) continue;
    const int64_t units = int4_units(args[i]);
    const double cost = static_cast<double>(args[i].M + 2) * units;
    const int64_t parts = nthreads == 1 ? 1 : std::min<int64_t>(
        units, std::max<int64_t>(1, static_cast<int64_t>(cost / target + 0.5)));
    for (int64_t j = 0; j < parts; ++j) {
      long long b, e;
      split_range(units, j, parts, b, e);
      pieces.push_back({i, b, e});
    }
  }
  parallel_chunks(nthreads, static_cast<long long>(pieces.size()), [&](long long c) {
    const GemmPiece& p = pieces[c];
    int4_block(isa, args[p.g], 0, args[p.g].M, p.u0, p.u1);
  });
}

namespace {

int64_t panels_for(int64_t rows, bool swiglu) {
  return swiglu ? 2 * ((rows / 2 + kPanel - 1) / kPanel) : (rows + kPanel - 1) / kPanel;
}

struct Pack4 {
  int64_t N, K, G, n_panels;
  bool swiglu;
};

Pack4 check_pack4(const char* fn, const py::array& packed, const py::array& sw, int64_t K, int64_t N, bool swiglu) {
  if (K < 0 || N < 0) throw py::value_error(std::string(fn) + ": K and N must be >= 0");
  Pack4 p{N, K, (K + kGroup - 1) / kGroup, panels_for(swiglu ? 2 * N : N, swiglu), swiglu};
  check_array<uint8_t>(packed, fn, "packed", {p.n_panels * p.G * kGroupBytes});
  check_array<float>(sw, fn, "scales", {p.n_panels * p.G * kPanel});
  return p;
}

// Quantized, zero-padded activations and their group sums (thread-local, grown, never shrunk).
struct Act4 {
  std::vector<int8_t> qa;
  std::vector<float> sa;
  std::vector<int32_t> asum;
};
Act4& act4() {
  thread_local Act4 s;
  return s;
}

Int4Args make_args4(const Pack4& p, const py::array& packed, const py::array& sw) {
  Int4Args a;
  a.w = static_cast<const uint8_t*>(packed.data());
  a.sw = static_cast<const float*>(sw.data());
  a.G = p.G;
  a.n_panels = p.n_panels;
  a.N = p.N;
  a.epi = p.swiglu ? Epilogue::SwiGlu : Epilogue::Float;
  return a;
}

void pack_rows(const int8_t* q, const float* s, int64_t rows, int64_t K, bool swiglu, uint8_t* dst, float* sdst) {
  const int64_t G = (K + kGroup - 1) / kGroup, np = panels_for(rows, swiglu), F = rows / 2;
  std::memset(dst, 0x88, static_cast<size_t>(np * G * kGroupBytes));  // u = 8: q = 0 in padding
  std::fill(sdst, sdst + np * G * kPanel, 0.f);
  for (int64_t p = 0; p < np; ++p)
    for (int j = 0; j < kPanel; ++j) {
      int64_t row;  // source row of internal channel (p, j), -1 for padding (as the int8 packs)
      if (swiglu) {
        const int64_t n = (p / 2) * kPanel + j;
        row = n < F ? (p % 2) * F + n : -1;
      } else {
        const int64_t n = p * kPanel + j;
        row = n < rows ? n : -1;
      }
      if (row < 0) continue;
      for (int64_t k = 0; k < K; ++k) {
        const int64_t g = k / kGroup, kk = k % kGroup, quad = kk / 4;
        uint8_t& b = dst[p * G * kGroupBytes + g * kGroupBytes + (quad / 2) * 64 + j * 4 + kk % 4];
        const uint8_t u = static_cast<uint8_t>(q[row * K + k] + 8);
        b = (quad % 2) ? static_cast<uint8_t>((b & 0x0F) | (u << 4)) : static_cast<uint8_t>((b & 0xF0) | u);
      }
      for (int64_t g = 0; g < G; ++g) sdst[(p * G + g) * kPanel + j] = s[row * G + g];
    }
}

}  // namespace

void register_int4(py::module_& m) {
  m.attr("INT4_GROUP") = kGroup;

  m.def(
      "pack_int4_weight",
      [](py::array qw, py::array scales, bool swiglu, py::array packed, py::array sw_out) {
        const char* fn = "pack_int4_weight";
        const int8_t* q = check_array<int8_t>(qw, fn, "qw", {-1, -1});
        const int64_t rows = qw.shape(0), K = qw.shape(1), G = (K + kGroup - 1) / kGroup;
        const float* s = check_array<float>(scales, fn, "scales", {rows, G});
        if (swiglu && rows % 2)
          throw py::value_error("pack_int4_weight: swiglu packs need qw = [gate; up] with an even number of rows, got " +
                                std::to_string(rows));
        const int64_t np = panels_for(rows, swiglu);
        uint8_t* dst = check_array<uint8_t>(packed, fn, "packed", {np * G * kGroupBytes}, true);
        float* sdst = check_array<float>(sw_out, fn, "sw_out", {np * G * kPanel}, true);
        for (int64_t i = 0; i < rows * K; ++i)
          if (q[i] < -8 || q[i] > 7)
            throw py::value_error("pack_int4_weight: qw must be in [-8, 7]; found " + std::to_string(q[i]) +
                                  " at flat index " + std::to_string(i));
        py::gil_scoped_release nogil;
        pack_rows(q, s, rows, K, swiglu, dst, sdst);
      },
      py::arg("qw"), py::arg("scales"), py::arg("swiglu"), py::arg("packed"), py::arg("sw_out"),
      "Pack int4 weights qw (N, K) in [-8, 7] with group scales (N, ceil(K/32)) into the kernel layout "
      "(csrc/int4_kernels.h). swiglu=True: qw = [gate; up] (2F, K), panels interleaved.");

  m.def("int4_packed_sizes",
        [](int64_t rows, int64_t K, bool swiglu) {
          const int64_t G = (K + kGroup - 1) / kGroup, np = panels_for(rows, swiglu);
          return py::make_tuple(np * G * kGroupBytes, np * G * kPanel);
        },
        py::arg("rows"), py::arg("K"), py::arg("swiglu"), "(packed bytes, scale count) of an int4 pack of `rows` rows.");

  m.def(
      "int4_gemm_s32",
      [](py::array qa, py::array packed, py::array sw, int64_t N, bool swiglu, py::array out, int nthreads,
         const std::string& isa_name) {
        const char* fn = "int4_gemm_s32";
        const int8_t* q = check_array<int8_t>(qa, fn, "qa", {-1, -1});
        const int64_t M = qa.shape(0), K = qa.shape(1);
        const Pack4 p = check_pack4(fn, packed, sw, K, N, swiglu);
        int32_t* o = check_array<int32_t>(out, fn, "out", {M, p.n_panels * kPanel, p.G}, true);
        for (int64_t i = 0; i < M * K; ++i)
          if (q[i] == -128) throw py::value_error("int4_gemm_s32: qa must be in [-127, 127]");
        const Isa isa = resolve_isa(isa_name);
        py::gil_scoped_release nogil;
        const int64_t Kp = p.G * kGroup;
        std::vector<int8_t> padded(static_cast<size_t>(M * Kp), 0);
        for (int64_t r = 0; r < M; ++r) std::memcpy(&padded[r * Kp], q + r * K, K);
        std::vector<int32_t> asum(static_cast<size_t>(std::max<int64_t>(1, M * p.G)));
        group_sums(isa, padded.data(), Kp, M, p.G, asum.data(), p.G);
        Int4Args a = make_args4(p, packed, sw);
        a.qa = padded.data(); a.lda = Kp; a.asum = asum.data(); a.ldasum = p.G; a.M = M;
        a.epi = Epilogue::Raw; a.out_i32 = o;
        std::vector<GemmPiece> pieces;
        run_int4_group(&a, 1, isa, nthreads, pieces);
      },
      py::arg("qa"), py::arg("packed"), py::arg("scales"), py::arg("N"), py::arg("swiglu"), py::arg("out"),
      py::arg("nthreads") = 1, py::arg("isa") = "",
      "Raw exact group accumulators: out (M, n_panels*16, G) int32 per internal channel and group.");

  m.def(
      "int4_linear",
      [](py::array x, py::array packed, py::array sw, int64_t N, bool swiglu, py::object bias, py::array out,
         int nthreads, const std::string& isa_name) {
        const char* fn = "int4_linear";
        const float* xp = check_array<float>(x, fn, "x", {-1, -1});
        const int64_t M = x.shape(0), K = x.shape(1);
        const Pack4 p = check_pack4(fn, packed, sw, K, N, swiglu);
        const float* bp = nullptr;
        if (!bias.is_none()) bp = check_array<float>(bias.cast<py::array>(), fn, "bias", {swiglu ? 2 * N : N});
        float* o = check_array<float>(out, fn, "out", {M, N}, true);
        const Isa isa = resolve_isa(isa_name);
        py::gil_scoped_release nogil;
        if (M == 0) return;
        const int64_t Kp = p.G * kGroup;
        Act4& s = act4();
        if (static_cast<int64_t>(s.qa.size()) < M * Kp) s.qa.resize(static_cast<size_t>(M * Kp));
        if (static_cast<int64_t>(s.sa.size()) < M) s.sa.resize(static_cast<size_t>(M));
        if (static_cast<int64_t>(s.asum.size()) < M * p.G) s.asum.resize(static_cast<size_t>(M * p.G));
        quantize_rows(isa, xp, K, M, K, Kp, s.qa.data(), Kp, s.sa.data(), nthreads);
        group_sums(isa, s.qa.data(), Kp, M, p.G, s.asum.data(), p.G);
        Int4Args a = make_args4(p, packed, sw);
        a.qa = s.qa.data(); a.lda = Kp; a.sa = s.sa.data(); a.asum = s.asum.data(); a.ldasum = p.G;
        a.M = M; a.bias = bp; a.out = o; a.ldo = N;
        std::vector<GemmPiece> pieces;
        run_int4_group(&a, 1, isa, nthreads, pieces);
      },
      py::arg("x"), py::arg("packed"), py::arg("scales"), py::arg("N"), py::arg("swiglu"), py::arg("bias"),
      py::arg("out"), py::arg("nthreads") = 1, py::arg("isa") = "",
      "out (M, N) = int4 GEMM of quant_rows(x) (+ bias); swiglu packs: silu(gate) * up.");
}

}  // namespace deploykit
