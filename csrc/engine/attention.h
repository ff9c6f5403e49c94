// Causal grouped-query attention of the decode engine over its KV cache, blocked like flash
// attention: keys in tiles of kKeyTile positions, an online softmax per query, and each K/V tile
// read once for a block of queries (the query heads of one kv head over up to kBlockQueries queries).
//
// Cache layout (one layer): keys transposed per tile, kt (kv_heads, capp / kKeyTile, hd, kKeyTile)
// with capp = the capacity rounded up to kKeyTile, so a tile's scores are broadcast-FMAs over 16 keys
// at a time (no horizontal sums) and a tile is one contiguous block (pages are touched as positions
// are written); values position-major, v (capacity, kv_heads * hd). fp16 caches hold IEEE half
// bits, int8 ones one symmetric scale per (kv head, position): ks / vs (kv_heads, capp).
//
// Tiles start at multiples of kKeyTile and a query's arithmetic never depends on the other queries
// of its block, so a row computed in a decode step is bit-equal to the same row of a prefill
// (tests/native/test_engine.py). The three variants (AVX-512, AVX2+FMA, baseline) are one generic
// source compiled per target; they differ from each other only in summation order and FMA use.
#pragma once
#include <cstdint>

#include "cpu_features.h"

namespace deploykit {
namespace engine {

constexpr int64_t kKeyTile = 64;       // keys per tile (4 vectors of 16 lanes)
constexpr int64_t kBlockQueries = 32;  // queries per task: one K/V tile pass serves all of them

enum class KvType { F32, F16, I8 };

struct KvView {  // one layer of a session's cache
  KvType type = KvType::F32;
  int64_t kv_heads = 0, hd = 0, capp = 0;
  const void* kt = nullptr;  // (kv_heads, capp / kKeyTile, hd, kKeyTile): float, uint16 (fp16 bits) or int8
  const void* v = nullptr;   // (capacity, kv_heads * hd), same element type
  const float* ks = nullptr;  // int8 only: (kv_heads, capp)
  const float* vs = nullptr;
};

inline int64_t round_up_tile(int64_t n) { return (n + kKeyTile - 1) / kKeyTile * kKeyTile; }
// Offset of key (kv head g, position p, dim i) in a layer's kt.
inline int64_t kt_index(int64_t capp, int64_t hd, int64_t g, int64_t p, int64_t i) {
  return ((g * (capp / kKeyTile) + p / kKeyTile) * hd + i) * kKeyTile + p % kKeyTile;
}

// Floats of scratch attention_step needs for T rows of H query heads on nthreads threads.
int64_t attention_scratch_floats(int64_t T, int64_t H, int64_t kv_heads, int64_t hd, int nthreads);

// out[t, h*hd ..] = softmax(scale * q[t, h] . K[0..pos0+t]) V for T rows at positions pos0..pos0+T-1,
// q and out (T, H * hd); the cache must hold positions [0, pos0 + T). isa picks the variant
// (Scalar: baseline, Avx2: AVX2+FMA, Avx512Vnni/Amx: AVX-512). scratch: attention_scratch_floats.
void attention_step(Isa isa, const KvView& kv, const float* q, float* out, int64_t T, int64_t H, int64_t pos0,
                    float scale, int nthreads, float* scratch);

// The plain reference: two-pass softmax in double over fp32 K/V (n, kv_heads, hd) position-major, for tests.
void attention_reference(const float* q, const float* k, const float* v, float* out, int64_t T, int64_t H,
                         int64_t kv_heads, int64_t hd, int64_t pos0, float scale);

}  // namespace engine
}  // namespace deploykit
