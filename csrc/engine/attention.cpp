#include "engine/attention.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <utility>
#include <vector>

#include "thread_pool.h"

// Every vector helper below is always inlined into a target-specific entry point: no vector crosses an ABI.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace deploykit {
namespace engine {
namespace {

#define DK_INLINE inline __attribute__((always_inline))

// One key tile as the kernel reads it: fp32 keys kt[i * ldkt + p] (p < kKeyTile) and values v[p * ldv + i].
struct Tile {
  const float* kt;
  int64_t ldkt;
  const float* v;
  int64_t ldv;
  int64_t k0;  // position of the tile's first key
};

// The queries of one task (one kv head, rows r0..): query j is row j / heads, head j % heads.
struct Block {
  const float* q;
  float* out;
  int64_t ldq, heads, rows, pos0, hd;  // pos0: position of the block's first row
  float scale;
  float *acc, *m, *l, *p;  // scratch: acc (nq, hd), running max / sum (nq), weights (kMaxQb, kKeyTile)
};

constexpr int kMaxQb = 4;  // queries one micro-kernel call takes (the AVX-512 variant's)

struct Step {  // one attention_step call, shared by its chunks
  const KvView* kv;
  const float* q;
  float* out;
  int64_t T, H, pos0, group, rows_per_block, n_blocks, tasks;
  long long chunks;
  float scale;
  float* scratch;
  int64_t per_chunk;
};

int64_t rows_per_block(int64_t group) { return std::max<int64_t>(1, kBlockQueries / group); }

int64_t chunk_floats(int64_t group, int64_t hd) {
  const int64_t nq = rows_per_block(group) * group;
  return nq * hd + 2 * nq + kMaxQb * kKeyTile + 2 * kKeyTile * hd;
}

// W-lane vectors of floats, int32, fp16 bits and int8 (a vector_size cannot depend on a template argument).
template <int W>
struct Vec;
#define DK_VEC(W)                                                    \
  template <>                                                        \
  struct Vec<W> {                                                    \
    typedef float f __attribute__((vector_size(4 * W)));             \
    typedef int32_t i __attribute__((vector_size(4 * W)));           \
    typedef uint16_t h __attribute__((vector_size(2 * W)));          \
    typedef int8_t b __attribute__((vector_size(W)));                \
  };
DK_VEC(16)
DK_VEC(8)
DK_VEC(4)
#undef DK_VEC

// One source for every variant: GCC/Clang generic vectors of W lanes (16: one AVX-512 register, 8: one
// AVX2 register, 4: SSE2), lowered by the target of the entry point it is inlined into (at the bottom).
template <int W>
struct Kern {
  using vf = typename Vec<W>::f;
  using vi = typename Vec<W>::i;
  using vh = typename Vec<W>::h;
  using vb = typename Vec<W>::b;
  static constexpr int kW = W;
  static constexpr int kNV = static_cast<int>(kKeyTile / W);  // vectors per key tile

  DK_INLINE static vf load(const float* p) {
    vf x;
    std::memcpy(&x, p, sizeof x);
    return x;
  }
  DK_INLINE static void store(float* p, vf x) { std::memcpy(p, &x, sizeof x); }
  DK_INLINE static vf splat(float x) { return vf{} + x; }
  DK_INLINE static vi splat_i(int32_t x) { return vi{} + x; }
  DK_INLINE static vi iota() {
    vi r;
    for (int j = 0; j < W; ++j) r[j] = j;
    return r;
  }

  // exp(x) for x <= 0 (softmax after the max): Cephes' expf polynomial as in simd_math.h, ~2 ulp; below
  // -87.3: exp(-87.3).
  DK_INLINE static vf exp_v(vf x) {
    x = x < splat(-87.3365478515625f) ? splat(-87.3365478515625f) : x;
    const vf fx = x * 1.44269504088896341f + 0.5f;
    vf fl = __builtin_convertvector(__builtin_convertvector(fx, vi), vf);  // trunc ...
    fl = fl > fx ? fl - 1.f : fl;                                          // ... to floor
    x = x - fl * 0.693359375f;
    x = x - fl * -2.12194440e-4f;
    vf y = splat(1.9875691500E-4f);
    y = y * x + 1.3981999507E-3f;
    y = y * x + 8.3334519073E-3f;
    y = y * x + 4.1665795894E-2f;
    y = y * x + 1.6666665459E-1f;
    y = y * x + 5.0000001201E-1f;
    y = y * (x * x) + (x + 1.f);
    const vi e = (__builtin_convertvector(fl, vi) + 127) << 23;
    return y * (vf)e;  // the bits as floats (a vector cast reinterprets)
  }

  // Lane j of the result is lane j ^ S of v (__builtin_shufflevector: GCC >= 12 and Clang).
  template <int S, size_t... J>
  DK_INLINE static vf swap_lanes(vf v, std::index_sequence<J...>) {
    return __builtin_shufflevector(v, v, (static_cast<int>(J) ^ S)...);
  }
  // Horizontal max / sum by a fixed butterfly (the same order for every row).
  template <int S = W / 2>
  DK_INLINE static float hmax(vf v) {
    const vf u = swap_lanes<S>(v, std::make_index_sequence<W>{});
    v = v > u ? v : u;
    if constexpr (S > 1) return hmax<S / 2>(v);
    else return v[0];
  }
  template <int S = W / 2>
  DK_INLINE static float hsum(vf v) {
    v += swap_lanes<S>(v, std::make_index_sequence<W>{});
    if constexpr (S > 1) return hsum<S / 2>(v);
    else return v[0];
  }

  // fp16 bits -> fp32, exact for normal and subnormal halves (as fp32_ops.cpp's scalar one).
  DK_INLINE static vf f16_to_f32(const uint16_t* p) {
    vh h;
    std::memcpy(&h, p, sizeof h);
    const vi w = __builtin_convertvector(h, vi);
    const vf f = (vf)((w & 0x7fff) << 13) * 0x1p112f;
    return (vf)((vi)f | ((w & 0x8000) << 16));
  }
  DK_INLINE static float f16_to_f32_1(uint16_t h) {
    const uint32_t bits = static_cast<uint32_t>(h & 0x7fff) << 13;
    float f;
    std::memcpy(&f, &bits, 4);
    f *= 0x1p112f;
    uint32_t out;
    std::memcpy(&out, &f, 4);
    out |= static_cast<uint32_t>(h & 0x8000) << 16;
    std::memcpy(&f, &out, 4);
    return f;
  }
  DK_INLINE static vf i8_to_f32(const int8_t* p) {
    vb b;
    std::memcpy(&b, p, sizeof b);
    return __builtin_convertvector(b, vf);
  }


  // acc_j(NV vectors at c0) += sum_{p < n} w[m][p] * V[p] for NQ queries from j0.
  template <int NQ, int NV>
  DK_INLINE static void pv(const Tile& t, const Block& b, int64_t j0, int64_t n, int64_t c0) {
    vf a[NQ][NV];
    for (int m = 0; m < NQ; ++m)
      for (int v = 0; v < NV; ++v) a[m][v] = load(b.acc + (j0 + m) * b.hd + c0 + v * kW);
    for (int64_t p = 0; p < n; ++p) {
      const float* vr = t.v + p * t.ldv + c0;
      vf x[NV];
      for (int v = 0; v < NV; ++v) x[v] = load(vr + v * kW);
      for (int m = 0; m < NQ; ++m) {
        const vf w = splat(b.p[m * kKeyTile + p]);
        for (int v = 0; v < NV; ++v) a[m][v] += w * x[v];
      }
    }
    for (int m = 0; m < NQ; ++m)
      for (int v = 0; v < NV; ++v) store(b.acc + (j0 + m) * b.hd + c0 + v * kW, a[m][v]);
  }

  // Scores, online-softmax update and P.V of NQ consecutive queries (j0..) against one tile.
  template <int NQ>
  DK_INLINE static void micro(const Tile& t, const Block& b, int64_t j0) {
    const int64_t hd = b.hd;
    const float* qp[NQ];
    int64_t pos[NQ];
    for (int m = 0; m < NQ; ++m) {
      const int64_t r = (j0 + m) / b.heads, h = (j0 + m) % b.heads;
      qp[m] = b.q + r * b.ldq + h * hd;
      pos[m] = b.pos0 + r;
    }
    vf s[NQ][kNV];
    for (int m = 0; m < NQ; ++m)
      for (int c = 0; c < kNV; ++c) s[m][c] = vf{};
    for (int64_t i = 0; i < hd; ++i) {  // s[m][p] = q_m . k_p, one FMA chain over i per (m, p)
      const float* kr = t.kt + i * t.ldkt;
      vf k[kNV];
      for (int c = 0; c < kNV; ++c) k[c] = load(kr + c * kW);
      for (int m = 0; m < NQ; ++m) {
        const vf qb = splat(qp[m][i]);
        for (int c = 0; c < kNV; ++c) s[m][c] += qb * k[c];
      }
    }
    int64_t nmax = 0;
    for (int m = 0; m < NQ; ++m) {
      const int64_t n = std::min<int64_t>(kKeyTile, pos[m] + 1 - t.k0), j = j0 + m;  // n >= 1: keys this query sees
      nmax = std::max(nmax, n);
      const vi nv = splat_i(static_cast<int32_t>(n));
      vf x[kNV], mx = splat(-INFINITY);
      for (int c = 0; c < kNV; ++c) {
        x[c] = iota() + c * kW < nv ? s[m][c] * b.scale : splat(-INFINITY);  // later keys (or unwritten ones) masked
        mx = mx > x[c] ? mx : x[c];
      }
      const float mold = b.m[j], mnew = std::max(mold, hmax(mx));
      // exp_v, not std::exp: a call would spill every live vector register (the other queries' scores)
      const float corr = mold == -INFINITY ? 0.f : exp_v(splat(mold - mnew))[0];
      vf sum = vf{};
      float* w = b.p + m * kKeyTile;
      for (int c = 0; c < kNV; ++c) {
        vf e = exp_v(x[c] - mnew);
        e = iota() + c * kW < nv ? e : vf{};
        store(w + c * kW, e);
        sum += e;
      }
      b.l[j] = b.l[j] * corr + hsum(sum);
      b.m[j] = mnew;
      if (corr != 1.f) {
        float* a = b.acc + j * hd;
        for (int64_t i = 0; i < hd; ++i) a[i] *= corr;
      }
    }
    // Weights of keys a query does not see are 0 and its V rows are written (rows of this step or earlier):
    // adding 0 * V changes no bit, so the queries of the block share one pass up to the furthest-seeing one.
    const int64_t hv = hd / kW * kW;
    for (int64_t c0 = 0; c0 < hv; c0 += 4 * kW) {
      const int64_t nvec = std::min<int64_t>(4, (hv - c0) / kW);
      if (nvec == 4) pv<NQ, 4>(t, b, j0, nmax, c0);
      else if (nvec == 3) pv<NQ, 3>(t, b, j0, nmax, c0);
      else if (nvec == 2) pv<NQ, 2>(t, b, j0, nmax, c0);
      else pv<NQ, 1>(t, b, j0, nmax, c0);
    }
    for (int64_t i = hv; i < hd; ++i)
      for (int m = 0; m < NQ; ++m) {
        float a = b.acc[(j0 + m) * hd + i];
        for (int64_t p = 0; p < nmax; ++p) a += b.p[m * kKeyTile + p] * t.v[p * t.ldv + i];
        b.acc[(j0 + m) * hd + i] = a;
      }
  }

  template <int N>
  DK_INLINE static void micro_n(int64_t n, const Tile& t, const Block& b, int64_t j0) {
    if (n == N) micro<N>(t, b, j0);
    else if constexpr (N > 1) micro_n<N - 1>(n, t, b, j0);
  }

  // Tile k0 of kv head g in fp32: read in place (fp32 cache) or converted into kbuf (hd, kKeyTile) and
  // vbuf (kKeyTile, hd); nv: value rows needed (the rows the block's queries see).
  DK_INLINE static Tile load_tile(const KvView& kv, int64_t g, int64_t k0, int64_t nv, float* kbuf, float* vbuf) {
    const int64_t hd = kv.hd, capp = kv.capp, ldv = kv.kv_heads * hd, vo = k0 * ldv + g * hd;
    const int64_t ko = (g * (capp / kKeyTile) + k0 / kKeyTile) * hd * kKeyTile;  // the tile's (hd, kKeyTile) block
    if (kv.type == KvType::F32)
      return Tile{static_cast<const float*>(kv.kt) + ko, kKeyTile, static_cast<const float*>(kv.v) + vo, ldv, k0};
    const int64_t hv = hd / kW * kW;
    if (kv.type == KvType::F16) {
      const uint16_t* kt = static_cast<const uint16_t*>(kv.kt) + ko;
      const uint16_t* v = static_cast<const uint16_t*>(kv.v) + vo;
      for (int64_t i = 0; i < hd; ++i)
        for (int c = 0; c < kNV; ++c) store(kbuf + i * kKeyTile + c * kW, f16_to_f32(kt + i * kKeyTile + c * kW));
      for (int64_t p = 0; p < nv; ++p) {
        int64_t i = 0;
        for (; i < hv; i += kW) store(vbuf + p * hd + i, f16_to_f32(v + p * ldv + i));
        for (; i < hd; ++i) vbuf[p * hd + i] = f16_to_f32_1(v[p * ldv + i]);
      }
    } else {  // int8: value * its position's scale
      const int8_t* kt = static_cast<const int8_t*>(kv.kt) + ko;
      const int8_t* v = static_cast<const int8_t*>(kv.v) + vo;
      const float* ks = kv.ks + g * capp + k0;
      const float* vs = kv.vs + g * capp + k0;
      vf sc[kNV];
      for (int c = 0; c < kNV; ++c) sc[c] = load(ks + c * kW);
      for (int64_t i = 0; i < hd; ++i)
        for (int c = 0; c < kNV; ++c) store(kbuf + i * kKeyTile + c * kW, i8_to_f32(kt + i * kKeyTile + c * kW) * sc[c]);
      for (int64_t p = 0; p < nv; ++p) {
        int64_t i = 0;
        for (; i < hv; i += kW) store(vbuf + p * hd + i, i8_to_f32(v + p * ldv + i) * vs[p]);
        for (; i < hd; ++i) vbuf[p * hd + i] = static_cast<float>(v[p * ldv + i]) * vs[p];
      }
    }
    return Tile{kbuf, kKeyTile, vbuf, hd, k0};
  }


  // One task: rows [r0, r1) of the step against kv head g, every tile from 0 to the last row's position.
  template <int QB>
  DK_INLINE static void run_task(const Step& s, int64_t g, int64_t r0, int64_t r1, float* scr) {
    const KvView& kv = *s.kv;
    const int64_t hd = kv.hd, qd = s.H * hd, heads = s.group, nq = (r1 - r0) * heads;
    Block b{s.q + r0 * qd + g * heads * hd, s.out + r0 * qd + g * heads * hd, qd, heads, r1 - r0, s.pos0 + r0, hd,
            s.scale, scr, nullptr, nullptr, nullptr};
    b.m = b.acc + nq * hd;
    b.l = b.m + nq;
    b.p = b.l + nq;
    float* kbuf = b.p + kMaxQb * kKeyTile;
    float* vbuf = kbuf + kKeyTile * hd;
    std::fill(b.acc, b.acc + nq * hd, 0.f);
    std::fill(b.m, b.m + nq, -INFINITY);
    std::fill(b.l, b.l + nq, 0.f);
    const int64_t last = b.pos0 + b.rows - 1;
    for (int64_t k0 = 0; k0 <= last; k0 += kKeyTile) {
      const Tile t = load_tile(kv, g, k0, std::min(kKeyTile, last + 1 - k0), kbuf, vbuf);
      for (int64_t j = std::max<int64_t>(0, k0 - b.pos0) * heads; j < nq; j += QB)  // queries that see this tile
        micro_n<QB>(std::min<int64_t>(QB, nq - j), t, b, j);
    }
    for (int64_t j = 0; j < nq; ++j) {
      const float inv = 1.f / b.l[j];
      const float* a = b.acc + j * hd;
      float* o = b.out + (j / heads) * qd + (j % heads) * hd;
      for (int64_t i = 0; i < hd; ++i) o[i] = a[i] * inv;
    }
  }

  // Chunk ch runs tasks ch, ch + chunks, ...: tasks go from the last (longest) block to the first, so
  // every chunk gets a like share of the causal triangle.
  template <int QB>
  DK_INLINE static void run_chunk(const Step& s, long long ch) {
    float* scr = s.scratch + ch * s.per_chunk;
    for (int64_t task = ch; task < s.tasks; task += s.chunks) {
      const int64_t blk = s.n_blocks - 1 - task / s.kv->kv_heads, g = task % s.kv->kv_heads;
      const int64_t r0 = blk * s.rows_per_block, r1 = std::min(s.T, r0 + s.rows_per_block);
      run_task<QB>(s, g, r0, r1, scr);
    }
  }
};

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma"))) void chunk_avx512(const void* s, long long ch) {
  Kern<16>::run_chunk<4>(*static_cast<const Step*>(s), ch);
}
__attribute__((target("avx2,fma"))) void chunk_avx2(const void* s, long long ch) {
  Kern<8>::run_chunk<1>(*static_cast<const Step*>(s), ch);
}
#define DK_ATTN_X86 1
#endif
void chunk_baseline(const void* s, long long ch) { Kern<4>::run_chunk<1>(*static_cast<const Step*>(s), ch); }

}  // namespace

int64_t attention_scratch_floats(int64_t T, int64_t H, int64_t kv_heads, int64_t hd, int nthreads) {
  return 4LL * std::max(1, nthreads) * chunk_floats(H / kv_heads, hd);
}

void attention_step(Isa isa, const KvView& kv, const float* q, float* out, int64_t T, int64_t H, int64_t pos0,
                    float scale, int nthreads, float* scratch) {
  Step s{&kv, q, out, T, H, pos0, H / kv.kv_heads, 0, 0, 0, 1, scale, scratch, 0};
  s.rows_per_block = rows_per_block(s.group);
  s.n_blocks = (T + s.rows_per_block - 1) / s.rows_per_block;
  s.tasks = s.n_blocks * kv.kv_heads;
  s.per_chunk = chunk_floats(s.group, kv.hd);
  const double work = static_cast<double>(T) * H * (pos0 + T) * kv.hd;
  const int nt = work < 32768.0 ? 1 : std::max(1, nthreads);
  s.chunks = nt == 1 ? 1 : std::min<long long>(s.tasks, 4LL * nt);
  ChunkCall call = chunk_baseline;
#ifdef DK_ATTN_X86
  if (isa == Isa::Avx512Vnni || isa == Isa::Amx) call = chunk_avx512;
  else if (isa == Isa::Avx2) call = chunk_avx2;
#endif
  parallel_chunks_raw(nt, s.chunks, call, &s);
}

void attention_reference(const float* q, const float* k, const float* v, float* out, int64_t T, int64_t H,
                         int64_t kv_heads, int64_t hd, int64_t pos0, float scale) {
  const int64_t group = H / kv_heads;
  std::vector<double> sc(static_cast<size_t>(pos0 + T)), acc(static_cast<size_t>(hd));
  for (int64_t t = 0; t < T; ++t)
    for (int64_t h = 0; h < H; ++h) {
      const int64_t n = pos0 + t + 1, g = h / group;
      const float* qr = q + (t * H + h) * hd;
      double mx = -INFINITY, sum = 0;
      for (int64_t p = 0; p < n; ++p) {
        double d = 0;
        for (int64_t i = 0; i < hd; ++i) d += static_cast<double>(qr[i]) * k[(p * kv_heads + g) * hd + i];
        sc[p] = d * scale;
        mx = std::max(mx, sc[p]);
      }
      std::fill(acc.begin(), acc.end(), 0.0);
      for (int64_t p = 0; p < n; ++p) {
        const double w = std::exp(sc[p] - mx);
        sum += w;
        for (int64_t i = 0; i < hd; ++i) acc[i] += w * v[(p * kv_heads + g) * hd + i];
      }
      for (int64_t i = 0; i < hd; ++i) out[(t * H + h) * hd + i] = static_cast<float>(acc[i] / sum);
    }
}

}  // namespace engine
}  // namespace deploykit
