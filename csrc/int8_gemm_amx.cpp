// AMX-INT8 variant (Sapphire Rapids and later): tdpbssd multiplies a 16 x 64 int8 A tile by a
// 16 x 64 int8 B tile into a 16 x 16 int32 C tile, signed x signed, so no +128 compensation.
//
// The packed panel layout is already AMX's B layout: 16 consecutive k-groups of a panel
// (16 groups x 64 bytes = 16 channels x 4 k each) are one B tile with a row stride of 64 bytes.
// A tiles load straight from the quantized activation rows (stride lda). K is covered in chunks
// of 64; the last Kp % 64 values are added with plain integer loops, which is exact, so the
// result equals the scalar variant bit for bit on the int32 accumulators.
//
// Tiles: C0, C1 (two panels) | A (tile 4) | B0, B1 (tiles 6, 7). Each block loads its own tile
// configuration (ldtilecfg is per thread: every pool worker configures before its first tile
// instruction) and releases the tiles when done.
//
// Written on a machine without AMX: it is compiled everywhere, never selected by default, and
// tested bit for bit against scalar wherever the CPU and kernel allow it (tests/native).
#include <algorithm>
#include <cstring>

#include "int8_kernels.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define DK_AMX __attribute__((target("amx-tile,amx-int8,avx512f,avx512bw,avx512vl")))
#define DK_HAVE_AMX 1
#endif

namespace deploykit {

#ifdef DK_HAVE_AMX
namespace {

struct alignas(64) TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

DK_AMX void configure(int mr) {
  TileConfig cfg;
  std::memset(&cfg, 0, sizeof(cfg));
  cfg.palette_id = 1;
  for (int t : {0, 1}) { cfg.rows[t] = static_cast<uint8_t>(mr); cfg.colsb[t] = 64; }  // C: mr x 16 int32
  cfg.rows[4] = static_cast<uint8_t>(mr); cfg.colsb[4] = 64;                          // A: mr x 64 int8
  for (int t : {6, 7}) { cfg.rows[t] = 16; cfg.colsb[t] = 64; }                      // B: 16 groups x 64
  _tile_loadconfig(&cfg);
}

// c (mr x 32 int32, row stride 32) = rows [m, m + mr) x panels [p0, p0 + np) of the GEMM.
DK_AMX void block(const GemmArgs& a, int64_t m, int mr, int64_t p0, int np, int32_t* c) {
  const int64_t pstride = a.Kp * kPanel, kfull = a.Kp / 64 * 64;
  const int8_t* ar = a.qa + m * a.lda;
  const int8_t* w0 = a.w + p0 * pstride;
  const int8_t* w1 = w0 + pstride;
  _tile_zero(0);
  _tile_zero(1);
  for (int64_t k = 0; k < kfull; k += 64) {
    _tile_loadd(4, ar + k, a.lda);
    _tile_loadd(6, w0 + k * kPanel, 64);  // 16 k-groups of 4 = 64 k values = 1024 bytes
    _tile_dpbssd(0, 4, 6);
    if (np == 2) {
      _tile_loadd(7, w1 + k * kPanel, 64);
      _tile_dpbssd(1, 4, 7);
    }
  }
  _tile_stored(0, c, 32 * sizeof(int32_t));
  _tile_stored(1, c + kPanel, 32 * sizeof(int32_t));
  if (kfull == a.Kp) return;
  for (int r = 0; r < mr; ++r)  // the K tail (< 64 values): exact integer sums
    for (int p = 0; p < np; ++p) {
      const int8_t* wp = w0 + p * pstride;
      for (int j = 0; j < kPanel; ++j) {
        int32_t s = 0;
        for (int64_t k = kfull; k < a.Kp; ++k) s += static_cast<int32_t>(ar[r * a.lda + k]) * wp[(k / 4) * 64 + j * 4 + k % 4];
        c[r * 32 + p * kPanel + j] += s;
      }
    }
}

}  // namespace

DK_AMX void gemm_block_amx(const GemmArgs& a, int64_t m0, int64_t m1, int64_t u0, int64_t u1) {
  const bool swiglu = a.epi == Epilogue::SwiGlu;
  alignas(64) int32_t c[16 * 32];
  int configured = 0;
  for (int64_t m = m0; m < m1; m += 16) {
    const int mr = static_cast<int>(std::min<int64_t>(16, m1 - m));
    if (mr != configured) {
      configure(mr);
      configured = mr;
    }
    const int64_t ustep = swiglu ? 1 : 2;  // SwiGlu: one unit = its gate/up panel pair
    for (int64_t u = u0; u < u1; u += ustep) {
      const int np = swiglu ? 2 : static_cast<int>(std::min<int64_t>(2, u1 - u));
      const int64_t p0 = swiglu ? 2 * u : u;
      block(a, m, mr, p0, np, c);
      if (swiglu) {
        epilogue_scalar(a, c, 32, m, mr, u);
      } else {
        for (int p = 0; p < np; ++p) epilogue_scalar(a, c + p * kPanel, 32, m, mr, u + p);
      }
    }
  }
  _tile_release();
}

#else
void gemm_block_amx(const GemmArgs& a, int64_t m0, int64_t m1, int64_t u0, int64_t u1) {
  gemm_block_scalar(a, m0, m1, u0, u1);  // never selected: isa_supported(Amx) is false off x86-64
}
#endif

}  // namespace deploykit
