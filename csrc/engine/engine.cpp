// The native decode engine: the whole decoder step (prefill or decode) in one call.
//
// Engine  = the loaded model: pointers into the artifact's prepacked tensors (kept alive by
//           references to the numpy views the loader passed in; nothing is copied or
//           re-packed), the rotary table, and the thread count. Read-only once built, so any
//           number of sessions may run on it from any number of threads.
// Session = one sequence: a KV cache preallocated for max_seq_len positions (fp32 by default, or the
//           config's kv_cache "fp16" / "int8" (one scale per position and kv head); keys transposed
//           per tile of 64 positions, values position-major (csrc/engine/attention.h): the v GEMM
//           writes its rows straight into an fp32 cache) and scratch grown to the largest step
//           seen. A decode step allocates nothing.
//
// Step (T new tokens at positions len .. len+T-1), per layer:
//   h = norm1(x); quantize h once; q/k/v int8 GEMMs in one parallel call (k, v into the cache);
//   rotary on q, k; k (and v unless fp32) stored into the cache; causal GQA attention, blocked
//   (attention.h: key tiles, online softmax, tasks = kv heads x query blocks); o GEMM; x += .
//   h = norm2(x); SwiGLU (fused gate/up epilogue) | GELU MLP | fp32 router + moe_ffn_run; x += .
// then the final norm and lm_head (int8 or fp32) on the rows whose logits are wanted.
// int4 models (config weight_bits = 4) run the decoder linears on int4 packs (csrc/int4_kernels.h)
// from the same quantized activation rows (padded to a multiple of 32, with their group sums); the
// lm_head stays int8 or fp32.
// The int8 math is the Int8Linear / Int8SwiGLU / moe_ffn math of the torch-module path exactly
// (same kernels, same quantization); the fp32 parts (norms, rotary, softmax) differ from torch's
// only in summation order.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "array_check.h"
#include "engine/attention.h"
#include "engine/fp32_ops.h"
#include "int4_kernels.h"
#include "int8_kernels.h"
#include "moe.h"
#include "thread_pool.h"

namespace deploykit {
namespace {

int64_t round_up4(int64_t v) { return (v + 3) / 4 * 4; }
int64_t round_up32(int64_t v) { return (v + 31) / 32 * 32; }

enum class Variant { Dense, Legacy, Moe };
enum class KvCache { F32, F16, I8 };  // the session's K/V storage

struct Config {
  Variant variant = Variant::Dense;
  int64_t V = 0, D = 0, L = 0, H = 0, KV = 0, hd = 0, F = 0, cap = 0, E = 0, top_k = 0;
  float eps = 1e-5f;
  bool lm_head_int8 = true;
  int weight_bits = 8;  // the decoder linears: 8 (int8 packs) or 4 (int4 packs); the lm_head stays int8/fp32
  KvCache kv = KvCache::F32;
  int64_t qdim() const { return H * hd; }
  int64_t kvdim() const { return KV * hd; }
};

// A packed int8 or int4 linear: the GemmArgs / Int4Args fields that do not change per call.
struct Pack {
  GemmArgs g;
  Int4Args g4;
  bool int4 = false;
  int64_t K = 0;
  bool present = false;
};

struct Layer {
  const float *ln1_w = nullptr, *ln1_b = nullptr, *ln2_w = nullptr, *ln2_b = nullptr;
  Pack q, k, v, o;
  Pack gate_up, up, down;         // dense: gate_up (SwiGLU pack) + down; legacy: up + down
  const float* router = nullptr;  // moe: (E, D) fp32
  MoeWeights moe;
};

// Reads and checks the loader's arrays; every error names the tensor.
class Arrays {
 public:
  explicit Arrays(py::dict d) : d_(std::move(d)) {}

  template <typename T>
  const T* get(const std::string& name, std::vector<int64_t> dims, bool optional = false) {
    if (!d_.contains(name)) {
      if (optional) return nullptr;
      throw py::value_error("native engine: the artifact lacks tensor '" + name +
                            "'; convert again with this version of deploykit");
    }
    py::array a = d_[py::str(name)].cast<py::array>();
    const T* p = check_array<T>(a, "native engine: tensor", name.c_str(), std::move(dims));
    keep.push_back(a);
    return p;
  }

  Pack pack(const std::string& name, int64_t N, int64_t K, bool swiglu, bool bias) {
    Pack p;
    const int64_t Kp = round_up4(K);
    const int64_t np = swiglu ? 2 * ((N + kPanel - 1) / kPanel) : (N + kPanel - 1) / kPanel;
    p.g.w = get<int8_t>(name + ".packed", {np * Kp * kPanel});
    p.g.sw = get<float>(name + ".scales", {np * kPanel});
    p.g.colsum = get<int32_t>(name + ".colsum", {np * kPanel});
    p.g.bias = bias ? get<float>(name + ".bias", {swiglu ? 2 * N : N}, true) : nullptr;
    p.g.Kp = Kp;
    p.g.n_panels = np;
    p.g.N = N;
    p.g.epi = swiglu ? Epilogue::SwiGlu : Epilogue::Float;
    p.K = K;
    p.present = true;
    return p;
  }

  // An int4 pack (csrc/int4_kernels.h): {name}.packed (uint8 nibbles) and {name}.scales per group.
  Pack pack4(const std::string& name, int64_t N, int64_t K, bool swiglu, bool bias) {
    Pack p;
    const int64_t G = (K + kGroup - 1) / kGroup;
    const int64_t np = swiglu ? 2 * ((N + kPanel - 1) / kPanel) : (N + kPanel - 1) / kPanel;
    p.g4.w = get<uint8_t>(name + ".packed", {np * G * kGroupBytes});
    p.g4.sw = get<float>(name + ".scales", {np * G * kPanel});
    p.g4.bias = bias ? get<float>(name + ".bias", {swiglu ? 2 * N : N}, true) : nullptr;
    p.g4.G = G;
    p.g4.n_panels = np;
    p.g4.N = N;
    p.g4.epi = swiglu ? Epilogue::SwiGlu : Epilogue::Float;
    p.int4 = true;
    p.K = K;
    p.present = true;
    return p;
  }

  Pack linear(int bits, const std::string& name, int64_t N, int64_t K, bool swiglu, bool bias) {
    return bits == 4 ? pack4(name, N, K, swiglu, bias) : pack(name, N, K, swiglu, bias);
  }

  std::vector<py::array> keep;

 private:
  py::dict d_;
};

int64_t cfg_int(const py::dict& c, const char* key) {
  if (!c.contains(key)) throw py::value_error(std::string("native engine: config lacks '") + key + "'");
  return c[key].cast<int64_t>();
}

class Engine {
 public:
  Engine(py::dict config, py::dict arrays, int nthreads, const std::string& isa_name)
      : isa_(resolve_isa(isa_name)), nthreads_(std::max(1, nthreads)) {
    const std::string variant = config["variant"].cast<std::string>();
    if (variant == "dense") c_.variant = Variant::Dense;
    else if (variant == "legacy") c_.variant = Variant::Legacy;
    else if (variant == "moe") c_.variant = Variant::Moe;
    else throw py::value_error("native engine: variant must be dense, legacy or moe, got '" + variant + "'");
    c_.V = cfg_int(config, "vocab_size");
    c_.D = cfg_int(config, "d_model");
    c_.L = cfg_int(config, "n_layers");
    c_.H = cfg_int(config, "n_heads");
    c_.KV = cfg_int(config, "n_kv_heads");
    c_.hd = cfg_int(config, "head_dim");
    c_.F = cfg_int(config, "ffn_dim");
    c_.cap = cfg_int(config, "max_seq_len");
    c_.eps = config["norm_eps"].cast<float>();
    c_.lm_head_int8 = config["lm_head_int8"].cast<bool>();
    if (config.contains("weight_bits")) c_.weight_bits = config["weight_bits"].cast<int>();
    if (c_.weight_bits != 8 && c_.weight_bits != 4)
      throw py::value_error("native engine: weight_bits must be 8 or 4, got " + std::to_string(c_.weight_bits));
    const std::string kv = config.contains("kv_cache") ? config["kv_cache"].cast<std::string>() : "fp32";
    if (kv == "fp32") c_.kv = KvCache::F32;
    else if (kv == "fp16") c_.kv = KvCache::F16;
    else if (kv == "int8") c_.kv = KvCache::I8;
    else throw py::value_error("native engine: kv_cache must be fp32, fp16 or int8, got '" + kv + "'");
    if (c_.weight_bits == 4 && c_.variant == Variant::Moe)
      throw py::value_error("native engine: int4 weights are not supported for MoE models (moe_ffn's experts are int8)");
    if (c_.variant == Variant::Moe) {
      c_.E = cfg_int(config, "n_experts");
      c_.top_k = cfg_int(config, "top_k");
    }
    if (c_.H % c_.KV) throw py::value_error("native engine: n_kv_heads must divide n_heads");
    Arrays a(arrays);
    const int64_t D = c_.D, F = c_.F;
    const bool legacy = c_.variant == Variant::Legacy;
    embed_ = a.get<float>("embed", {c_.V, D});
    if (legacy) pos_embed_ = a.get<float>("pos_embed", {c_.cap, D});
    norm_w_ = a.get<float>("norm.w", {D});
    if (legacy) norm_b_ = a.get<float>("norm.b", {D});
    if (c_.lm_head_int8) lm_head_ = a.pack("lm_head", c_.V, D, false, true);
    else lm_head_w_ = a.get<float>("lm_head.w", {c_.V, D});
    if (!legacy) {  // rotary table (cap, hd/2), from the model's own inv_freq
      const float* inv = a.get<float>("rope.inv_freq", {c_.hd / 2});
      const int64_t half = c_.hd / 2;
      cos_.resize(static_cast<size_t>(c_.cap * half));
      sin_.resize(cos_.size());
      for (int64_t p = 0; p < c_.cap; ++p)
        for (int64_t i = 0; i < half; ++i) {
          const float f = static_cast<float>(p) * inv[i];  // as rotary_cos_sin: fp32 product
          cos_[p * half + i] = std::cos(f);
          sin_[p * half + i] = std::sin(f);
        }
    }
    layers_.resize(static_cast<size_t>(c_.L));
    for (int64_t l = 0; l < c_.L; ++l) {
      Layer& y = layers_[l];
      const std::string p = "layers." + std::to_string(l) + ".";
      y.ln1_w = a.get<float>(p + "ln1.w", {D});
      y.ln2_w = a.get<float>(p + "ln2.w", {D});
      if (legacy) {
        y.ln1_b = a.get<float>(p + "ln1.b", {D});
        y.ln2_b = a.get<float>(p + "ln2.b", {D});
      }
      const int bits = c_.weight_bits;
      y.q = a.linear(bits, p + "q", c_.qdim(), D, false, true);
      y.k = a.linear(bits, p + "k", c_.kvdim(), D, false, true);
      y.v = a.linear(bits, p + "v", c_.kvdim(), D, false, true);
      y.o = a.linear(bits, p + "o", D, c_.qdim(), false, true);
      if (c_.variant == Variant::Dense) {
        y.gate_up = a.linear(bits, p + "gate_up", F, D, true, false);
        y.down = a.linear(bits, p + "down", D, F, false, false);
      } else if (legacy) {
        y.up = a.linear(bits, p + "up", F, D, false, true);
        y.down = a.linear(bits, p + "down", D, F, false, true);
      } else {
        MoeWeights& m = y.moe;
        m.E = c_.E; m.D = D; m.F = F;
        y.router = a.get<float>(p + "router.w", {c_.E, D});
        m.w13 = a.get<int8_t>(p + "experts.w13", {c_.E, m.np13() * m.Dp() * kPanel});
        m.s13 = a.get<float>(p + "experts.s13", {c_.E, m.np13() * kPanel});
        m.c13 = a.get<int32_t>(p + "experts.c13", {c_.E, m.np13() * kPanel});
        m.w2 = a.get<int8_t>(p + "experts.w2", {c_.E, m.np2() * m.Fp() * kPanel});
        m.s2 = a.get<float>(p + "experts.s2", {c_.E, m.np2() * kPanel});
        m.c2 = a.get<int32_t>(p + "experts.c2", {c_.E, m.np2() * kPanel});
      }
    }
    keep_ = std::move(a.keep);
  }

  const Config& config() const { return c_; }
  Isa isa() const { return isa_; }
  int nthreads() const { return nthreads_; }

  const float* embed_ = nullptr;
  const float* pos_embed_ = nullptr;
  const float *norm_w_ = nullptr, *norm_b_ = nullptr;
  Pack lm_head_;
  const float* lm_head_w_ = nullptr;
  std::vector<float> cos_, sin_;
  std::vector<Layer> layers_;

 private:
  Config c_;
  Isa isa_;
  int nthreads_;
  std::vector<py::array> keep_;  // the artifact's tensors every pointer above points into
};

// Where a step's time goes, when a session is asked to measure it (EngineSession.set_profiling): wall
// seconds per phase, summed over steps and layers. Off by default: a step then reads no clock.
enum Phase { kEmbed, kNorm, kQuantize, kQkv, kRotary, kKvStore, kAttention, kOProj, kMlp, kHead, kPhases };
const char* const kPhaseNames[kPhases] = {"embed", "norm", "quantize", "qkv_gemm", "rotary", "kv_store",
                                          "attention", "o_gemm", "mlp", "lm_head"};

// Buffers of one session, grown to the largest step (T rows) seen; never shrunk.
struct Scratch {
  int64_t rows = 0;
  std::vector<float> x, h, tmp, q, att, mid, router;
  std::vector<float> knew;  // this step's k rows (T, kv_heads * hd) before rotary and the transposed store
  std::vector<float> vnew;  // fp16/int8 caches: this step's v rows in fp32 before they are stored
  std::vector<float> attn;  // attention_step's scratch
  std::vector<uint16_t> k16;  // fp16 / int8 caches: this step's k rows converted, before the transposed store
  std::vector<int8_t> k8;
  std::vector<int8_t> qa;
  std::vector<float> sa;
  std::vector<int32_t> asum;  // int4 packs: activation group sums (T, lda / 32)
  int64_t lda = 0;            // row stride of the last quantize()
  std::vector<GemmPiece> pieces;
  MoeWorkspace moe;
};

class Session {
 public:
  explicit Session(std::shared_ptr<const Engine> e) : e_(std::move(e)) {
    const Config& c = e_->config();
    capp_ = engine::round_up_tile(c.cap);
    const size_t nk = static_cast<size_t>(c.L * c.KV * capp_ * c.hd), nv = static_cast<size_t>(c.L * c.cap * c.kvdim());
    // Not value-initialised: pages are touched only as positions are written (a key tile is one block).
    if (c.kv == KvCache::F32) {
      k_.reset(new float[nk]);
      v_.reset(new float[nv]);
    } else if (c.kv == KvCache::F16) {
      k16_.reset(new uint16_t[nk]);
      v16_.reset(new uint16_t[nv]);
    } else {
      k8_.reset(new int8_t[nk]);
      v8_.reset(new int8_t[nv]);
      const size_t ns = static_cast<size_t>(c.L * c.KV * capp_);  // one scale per (layer, kv head, position)
      ks_.reset(new float[ns]);
      vs_.reset(new float[ns]);
    }
  }

  int64_t length() const { return len_; }
  int64_t capacity() const { return e_->config().cap; }
  int64_t vocab() const { return e_->config().V; }
  void reset() {
    std::lock_guard<std::mutex> lk(mu_);
    len_ = 0;
  }
  void set_profiling(bool on) {
    std::lock_guard<std::mutex> lk(mu_);
    profiling_ = on;
    std::fill(times_, times_ + kPhases, 0.0);
  }
  py::dict timings() {
    std::lock_guard<std::mutex> lk(mu_);
    py::dict d;
    for (int p = 0; p < kPhases; ++p) d[kPhaseNames[p]] = times_[p];
    return d;
  }

  // Runs T tokens; writes logits of every row (all_rows) or of the last row into out.
  void step(const int64_t* ids, int64_t T, bool all_rows, float* out) {
    std::lock_guard<std::mutex> lk(mu_);  // one step at a time per session
    const Config& c = e_->config();
    if (len_ + T > c.cap)
      throw py::value_error("native engine: the session holds " + std::to_string(len_) +
                            " positions and cannot take " + std::to_string(T) + " more: max_seq_len is " +
                            std::to_string(c.cap) + "; start a new session");
    for (int64_t t = 0; t < T; ++t)
      if (ids[t] < 0 || ids[t] >= c.V)
        throw py::value_error("native engine: token id " + std::to_string(ids[t]) + " is outside [0, " +
                              std::to_string(c.V) + ")");
    py::gil_scoped_release nogil;
    if (profiling_) mark_ = std::chrono::steady_clock::now();
    ensure(T);
    embed(ids, T);
    tick(kEmbed);
    for (int64_t l = 0; l < c.L; ++l) layer(l, T);
    head(T, all_rows, out);
    tick(kHead);
    len_ += T;
  }

 private:
  void ensure(int64_t T) {
    if (T <= s_.rows) return;
    const Config& c = e_->config();
    const int nt = e_->nthreads();
    auto grow = [](auto& v, int64_t n) { v.resize(static_cast<size_t>(n)); };
    grow(s_.x, T * c.D); grow(s_.h, T * c.D); grow(s_.tmp, T * c.D);
    grow(s_.q, T * c.qdim()); grow(s_.att, T * c.qdim());
    grow(s_.knew, T * c.kvdim());
    if (c.kv != KvCache::F32) grow(s_.vnew, T * c.kvdim());
    if (c.kv == KvCache::F16) grow(s_.k16, T * c.kvdim());
    if (c.kv == KvCache::I8) grow(s_.k8, T * c.kvdim());
    grow(s_.attn, engine::attention_scratch_floats(T, c.H, c.KV, c.hd, nt));
    grow(s_.mid, T * c.F);
    grow(s_.router, T * std::max<int64_t>(1, c.E));
    const int64_t kp = std::max({round_up32(c.D), round_up32(c.qdim()), round_up32(c.F)});
    grow(s_.qa, T * kp); grow(s_.sa, T); grow(s_.asum, T * kp / kGroup);
    s_.pieces.reserve(static_cast<size_t>(16 * nt + 8));
    if (c.variant == Variant::Moe) s_.moe.ensure(e_->layers_[0].moe, T, c.top_k);
    s_.rows = T;
  }

  void embed(const int64_t* ids, int64_t T) {
    const Config& c = e_->config();
    for (int64_t t = 0; t < T; ++t) {
      float* x = s_.x.data() + t * c.D;
      std::memcpy(x, e_->embed_ + ids[t] * c.D, sizeof(float) * c.D);
      if (e_->pos_embed_) engine::add(e_->pos_embed_ + (len_ + t) * c.D, x, c.D);
    }
  }

  void norm(const float* w, const float* b, const float* x, float* y, int64_t T) {
    const Config& c = e_->config();
    for (int64_t t = 0; t < T; ++t) {
      if (b) engine::layer_norm(x + t * c.D, w, b, c.eps, c.D, y + t * c.D);
      else engine::rms_norm(x + t * c.D, w, c.eps, c.D, y + t * c.D);
    }
  }

  // Quantize x (T, K) into s_.qa / s_.sa (row stride s_.lda, zero-padded to a multiple of 32 so int8
  // and int4 packs read the same rows); int4 models also get the group sums.
  void quantize(const float* x, int64_t T, int64_t K, bool int4) {
    s_.lda = round_up32(K);
    quantize_rows(e_->isa(), x, K, T, K, s_.lda, s_.qa.data(), s_.lda, s_.sa.data(), e_->nthreads());
    if (int4) group_sums(e_->isa(), s_.qa.data(), s_.lda, T, s_.lda / kGroup, s_.asum.data(), s_.lda / kGroup);
  }
  void quantize(const float* x, int64_t T, int64_t K) { quantize(x, T, K, e_->config().weight_bits == 4); }

  GemmArgs bind(const Pack& p, int64_t T, float* out, int64_t ldo) {
    GemmArgs g = p.g;
    g.qa = s_.qa.data();
    g.lda = s_.lda;
    g.sa = s_.sa.data();
    g.M = T;
    g.out = out;
    g.ldo = ldo;
    return g;
  }

  Int4Args bind4(const Pack& p, int64_t T, float* out, int64_t ldo) {
    Int4Args g = p.g4;
    g.qa = s_.qa.data();
    g.lda = s_.lda;
    g.sa = s_.sa.data();
    g.asum = s_.asum.data();
    g.ldasum = s_.lda / kGroup;
    g.M = T;
    g.out = out;
    g.ldo = ldo;
    return g;
  }

  void gemm(const Pack& p, int64_t T, float* out, int64_t ldo) {
    if (p.int4) {
      const Int4Args g = bind4(p, T, out, ldo);
      run_int4_group(&g, 1, e_->isa(), e_->nthreads(), s_.pieces);
      return;
    }
    const GemmArgs g = bind(p, T, out, ldo);
    run_gemm_group(&g, 1, e_->isa(), e_->nthreads(), s_.pieces);
  }

  // Llama's rotate-half rotary on `heads` heads of row x (head_dim hd) at position pos.
  void rotary(float* x, int64_t heads, int64_t pos) {
    const int64_t hd = e_->config().hd, half = hd / 2;
    const float* cs = e_->cos_.data() + pos * half;
    const float* sn = e_->sin_.data() + pos * half;
    for (int64_t h = 0; h < heads; ++h) {
      float* v = x + h * hd;
      for (int64_t i = 0; i < half; ++i) {
        const float a = v[i], b = v[i + half];
        v[i] = a * cs[i] - b * sn[i];
        v[i + half] = b * cs[i] + a * sn[i];
      }
    }
  }

  // Stores this step's k rows (s_.knew, rotary applied) transposed into the cache at positions len_..,
  // and for fp16/int8 caches the v rows (s_.vnew); an fp32 cache already holds them (the v GEMM's output).
  void store_kv(int64_t l, int64_t T) {
    const Config& c = e_->config();
    const int64_t hd = c.hd, kvd = c.kvdim(), kbase = l * c.KV * capp_ * hd, sbase = l * c.KV * capp_;
    if (c.kv == KvCache::F32) {
      scatter_keys(s_.knew.data(), k_.get() + kbase, T);
      return;
    }
    const int64_t voff = (l * c.cap + len_) * kvd;
    if (c.kv == KvCache::F16) {
      engine::to_f16(s_.knew.data(), s_.k16.data(), T * kvd);
      scatter_keys(s_.k16.data(), k16_.get() + kbase, T);
      engine::to_f16(s_.vnew.data(), v16_.get() + voff, T * kvd);
      return;
    }
    for (int64_t p = (len_ + engine::kKeyTile - 1) / engine::kKeyTile * engine::kKeyTile; p < len_ + T; p += engine::kKeyTile)
      for (int64_t g = 0; g < c.KV; ++g)  // a tile's first position: its key scales start at 0 (see scatter_keys)
        std::fill(ks_.get() + sbase + g * capp_ + p, ks_.get() + sbase + g * capp_ + p + engine::kKeyTile, 0.f);
    for (int64_t t = 0; t < T; ++t)
      for (int64_t g = 0; g < c.KV; ++g) {
        const int64_t r = t * kvd + g * hd, si = sbase + g * capp_ + len_ + t;
        engine::to_i8(s_.knew.data() + r, s_.k8.data() + r, ks_.get() + si, hd);
        engine::to_i8(s_.vnew.data() + r, v8_.get() + voff + r, vs_.get() + si, hd);
      }
    scatter_keys(s_.k8.data(), k8_.get() + kbase, T);
  }

  // rows (T, kv_heads * hd) -> the layer's transposed key tiles kt at positions len_..; one tile's
  // positions at a time, so the writes run along a tile row and the reads stay in L1. A tile is zeroed
  // when its first position is written: the kernel computes scores over whole tiles and masks the
  // positions not yet written, which then hold zeros, not whatever the allocation held (no NaN or
  // denormal garbage reaches an FMA).
  template <typename E>
  void scatter_keys(const E* rows, E* kt, int64_t T) {
    const Config& c = e_->config();
    const int64_t hd = c.hd, kvd = c.kvdim();
    for (int64_t t0 = 0; t0 < T;) {
      const int64_t p0 = len_ + t0, t1 = std::min(T, t0 + engine::kKeyTile - p0 % engine::kKeyTile);
      for (int64_t g = 0; g < c.KV; ++g) {
        E* dst = kt + engine::kt_index(capp_, hd, g, p0, 0);  // dim i, position p0 + j at dst[i * kKeyTile + j]
        if (p0 % engine::kKeyTile == 0) std::fill(dst, dst + hd * engine::kKeyTile, E(0));
        const E* src = rows + g * hd;
        for (int64_t i = 0; i < hd; ++i)
          for (int64_t t = t0; t < t1; ++t) dst[i * engine::kKeyTile + (t - t0)] = src[t * kvd + i];
      }
      t0 = t1;
    }
  }

  void attention(int64_t l, int64_t T) {
    const Config& c = e_->config();
    engine::KvView kv;
    kv.kv_heads = c.KV;
    kv.hd = c.hd;
    kv.capp = capp_;
    const int64_t ko = l * c.KV * capp_ * c.hd, vo = l * c.cap * c.kvdim(), so = l * c.KV * capp_;
    if (c.kv == KvCache::F32) {
      kv.type = engine::KvType::F32;
      kv.kt = k_.get() + ko;
      kv.v = v_.get() + vo;
    } else if (c.kv == KvCache::F16) {
      kv.type = engine::KvType::F16;
      kv.kt = k16_.get() + ko;
      kv.v = v16_.get() + vo;
    } else {
      kv.type = engine::KvType::I8;
      kv.kt = k8_.get() + ko;
      kv.v = v8_.get() + vo;
      kv.ks = ks_.get() + so;
      kv.vs = vs_.get() + so;
    }
    const float scale = 1.f / std::sqrt(static_cast<float>(c.hd));
    engine::attention_step(e_->isa(), kv, s_.q.data(), s_.att.data(), T, c.H, len_, scale, e_->nthreads(),
                           s_.attn.data());
  }

  void tick(Phase p) {
    if (!profiling_) return;
    const auto now = std::chrono::steady_clock::now();
    times_[p] += std::chrono::duration<double>(now - mark_).count();
    mark_ = now;
  }

  void layer(int64_t l, int64_t T) {
    const Config& c = e_->config();
    const Layer& y = e_->layers_[l];
    const int64_t D = c.D, qd = c.qdim(), kvd = c.kvdim();
    float *x = s_.x.data(), *h = s_.h.data(), *tmp = s_.tmp.data();
    // k rows go to scratch (rotary, then the transposed store); v rows straight into an fp32 cache
    const bool f32 = c.kv == KvCache::F32;
    float* kc = s_.knew.data();
    float* vc = f32 ? v_.get() + (l * c.cap + len_) * kvd : s_.vnew.data();
    // attention
    norm(y.ln1_w, y.ln1_b, x, h, T);
    tick(kNorm);
    quantize(h, T, D);
    tick(kQuantize);
    if (y.q.int4) {
      const Int4Args qkv[3] = {bind4(y.q, T, s_.q.data(), qd), bind4(y.k, T, kc, kvd), bind4(y.v, T, vc, kvd)};
      run_int4_group(qkv, 3, e_->isa(), e_->nthreads(), s_.pieces);
    } else {
      const GemmArgs qkv[3] = {bind(y.q, T, s_.q.data(), qd), bind(y.k, T, kc, kvd), bind(y.v, T, vc, kvd)};
      run_gemm_group(qkv, 3, e_->isa(), e_->nthreads(), s_.pieces);
    }
    tick(kQkv);
    if (c.variant != Variant::Legacy)
      for (int64_t t = 0; t < T; ++t) {
        rotary(s_.q.data() + t * qd, c.H, len_ + t);
        rotary(kc + t * kvd, c.KV, len_ + t);
      }
    tick(kRotary);
    store_kv(l, T);
    tick(kKvStore);
    attention(l, T);
    tick(kAttention);
    quantize(s_.att.data(), T, qd);
    tick(kQuantize);
    gemm(y.o, T, tmp, D);
    engine::add(tmp, x, T * D);
    tick(kOProj);
    // MLP / MoE
    norm(y.ln2_w, y.ln2_b, x, h, T);
    tick(kNorm);
    if (c.variant == Variant::Dense) {
      quantize(h, T, D);
      gemm(y.gate_up, T, s_.mid.data(), c.F);  // silu(gate) * up in the epilogue
      quantize(s_.mid.data(), T, c.F);
      gemm(y.down, T, tmp, D);
    } else if (c.variant == Variant::Legacy) {
      quantize(h, T, D);
      gemm(y.up, T, s_.mid.data(), c.F);
      engine::gelu(s_.mid.data(), T * c.F);
      quantize(s_.mid.data(), T, c.F);
      gemm(y.down, T, tmp, D);
    } else {
      engine::linear_f32(h, T, D, y.router, nullptr, 0, c.E, s_.router.data(), c.E);
      moe_ffn_run(y.moe, h, s_.router.data(), T, c.top_k, false, tmp, s_.moe, e_->isa(), e_->nthreads());
    }
    engine::add(tmp, x, T * D);
    tick(kMlp);
  }

  void head(int64_t T, bool all_rows, float* out) {
    const Config& c = e_->config();
    const int64_t r0 = all_rows ? 0 : T - 1, R = T - r0;
    float* h = s_.h.data();
    norm(e_->norm_w_, e_->norm_b_, s_.x.data() + r0 * c.D, h, R);
    if (c.lm_head_int8) {
      quantize(h, R, c.D, false);  // the lm_head pack is int8 in every scheme
      gemm(e_->lm_head_, R, out, c.V);
      return;
    }
    const int nt = static_cast<double>(R) * c.V * c.D < 65536.0 ? 1 : e_->nthreads();
    const long long chunks = nt == 1 ? 1 : 4LL * nt;
    parallel_chunks(nt, chunks, [&](long long ch) {
      long long b, e;
      split_range(c.V, ch, chunks, b, e);
      engine::linear_f32(h, R, c.D, e_->lm_head_w_, nullptr, b, e, out, c.V);
    });
  }

  std::shared_ptr<const Engine> e_;
  // keys (L, kv_heads, capp / 64, hd, 64), values (L, cap, kv_heads * hd): attention.h's layout
  std::unique_ptr<float[]> k_, v_;         // the fp32 cache
  std::unique_ptr<uint16_t[]> k16_, v16_;  // the fp16 cache (IEEE half bits)
  std::unique_ptr<int8_t[]> k8_, v8_;      // the int8 cache ...
  std::unique_ptr<float[]> ks_, vs_;       // ... with one scale per (layer, kv head, position): (L, kv_heads, capp)
  int64_t capp_ = 0;                       // max_seq_len rounded up to the key tile
  int64_t len_ = 0;
  bool profiling_ = false;
  double times_[kPhases] = {};
  std::chrono::steady_clock::time_point mark_;
  Scratch s_;
  std::mutex mu_;
};

}  // namespace

// attention_step on caller-given K/V (n = pos0 + T positions, (n, kv_heads, hd) fp32), stored into a cache
// of the given type first: the kernel tests compare it with attention_reference.
py::array_t<float> attention_for_tests(py::array q, py::array k, py::array v, int64_t pos0, const std::string& isa,
                                       const std::string& cache, int nthreads) {
  const float* qp = check_array<float>(q, "engine_attention", "q", {-1, -1, -1});
  const int64_t T = q.shape(0), H = q.shape(1), hd = q.shape(2), n = pos0 + T;
  const float* kp = check_array<float>(k, "engine_attention", "k", {n, -1, hd});
  const int64_t KV = k.shape(1);
  const float* vp = check_array<float>(v, "engine_attention", "v", {n, KV, hd});
  if (KV < 1 || H % KV) throw py::value_error("engine_attention: kv heads must divide the query heads");
  engine::KvView kv;
  kv.kv_heads = KV;
  kv.hd = hd;
  kv.capp = engine::round_up_tile(n);
  const int64_t nk = KV * kv.capp * hd;
  std::vector<float> kt(static_cast<size_t>(nk)), ks(static_cast<size_t>(KV * kv.capp)), vs(ks.size());
  std::vector<uint16_t> kt16(kt.size()), v16(static_cast<size_t>(n * KV * hd));
  std::vector<int8_t> kt8(kt.size()), v8(v16.size());
  for (int64_t p = 0; p < n; ++p)
    for (int64_t g = 0; g < KV; ++g) {
      const float* src = kp + (p * KV + g) * hd;
      const int64_t at = engine::kt_index(kv.capp, hd, g, p, 0), vo = (p * KV + g) * hd;
      uint16_t h16[512];
      int8_t h8[512];
      if (hd > 512) throw py::value_error("engine_attention: head_dim must be <= 512");
      engine::to_f16(src, h16, hd);
      engine::to_i8(src, h8, &ks[g * kv.capp + p], hd);
      for (int64_t i = 0; i < hd; ++i) {
        kt[at + i * engine::kKeyTile] = src[i];
        kt16[at + i * engine::kKeyTile] = h16[i];
        kt8[at + i * engine::kKeyTile] = h8[i];
      }
      engine::to_f16(vp + vo, v16.data() + vo, hd);
      engine::to_i8(vp + vo, v8.data() + vo, &vs[g * kv.capp + p], hd);
    }
  if (cache == "fp32") { kv.type = engine::KvType::F32; kv.kt = kt.data(); kv.v = vp; }
  else if (cache == "fp16") { kv.type = engine::KvType::F16; kv.kt = kt16.data(); kv.v = v16.data(); }
  else if (cache == "int8") {
    kv.type = engine::KvType::I8; kv.kt = kt8.data(); kv.v = v8.data(); kv.ks = ks.data(); kv.vs = vs.data();
  } else throw py::value_error("engine_attention: kv_cache must be fp32, fp16 or int8, got '" + cache + "'");
  py::array_t<float> out({T, H, hd});
  std::vector<float> scratch(static_cast<size_t>(engine::attention_scratch_floats(T, H, KV, hd, nthreads)));
  const Isa variant = resolve_isa(isa);
  {
    py::gil_scoped_release nogil;
    engine::attention_step(variant, kv, qp, out.mutable_data(), T, H, pos0, 1.f / std::sqrt(static_cast<float>(hd)),
                           nthreads, scratch.data());
  }
  return out;
}

void register_engine(py::module_& m) {
  py::class_<Engine, std::shared_ptr<Engine>>(
      m, "Engine",
      "A loaded model for the native decode engine: pointers into the artifact's prepacked "
      "tensors (not copied). Read-only: sessions on several threads may share it.")
      .def(py::init<py::dict, py::dict, int, const std::string&>(), py::arg("config"),
           py::arg("arrays"), py::arg("nthreads") = 1, py::arg("isa") = "")
      .def_property_readonly("isa", [](const Engine& e) { return std::string(isa_name(e.isa())); })
      .def_property_readonly("nthreads", &Engine::nthreads)
      .def_property_readonly("max_seq_len", [](const Engine& e) { return e.config().cap; })
      .def_property_readonly("vocab_size", [](const Engine& e) { return e.config().V; })
      .def_property_readonly("kv_cache", [](const Engine& e) {
        return std::string(e.config().kv == KvCache::F32 ? "fp32" : e.config().kv == KvCache::F16 ? "fp16" : "int8");
      });

  py::class_<Session>(m, "EngineSession",
                      "One sequence on an Engine: its own KV cache (capacity max_seq_len).")
      .def(py::init([](std::shared_ptr<Engine> e) { return new Session(std::move(e)); }),
           py::arg("engine"))
      .def_property_readonly("length", &Session::length)
      .def_property_readonly("capacity", &Session::capacity)
      .def("reset", &Session::reset, "Forget every position (the cache is reused).")
      .def("set_profiling", &Session::set_profiling, py::arg("on"),
           "Measure where each step's time goes (wall seconds per phase), from zero; off by default.")
      .def_property_readonly("timings", &Session::timings,
                             "Seconds per phase summed over the steps since set_profiling(True).")
      .def(
          "step",
          [](Session& s, py::array ids, py::array out, bool all_rows) {
            const int64_t* p = check_array<int64_t>(ids, "EngineSession.step", "ids", {-1});
            const int64_t T = ids.shape(0);
            if (T < 1) throw py::value_error("EngineSession.step: ids must hold at least one token");
            float* o = check_array<float>(out, "EngineSession.step", "out", {all_rows ? T : 1, s.vocab()}, true);
            s.step(p, T, all_rows, o);
          },
          py::arg("ids"), py::arg("out"), py::arg("all_rows"),
          "Append ids (T,) int64; out (T, V) float32 (all_rows) or (1, V) gets the logits.");

  m.def("engine_attention", &attention_for_tests, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("pos0"),
        py::arg("isa") = "", py::arg("kv_cache") = "fp32", py::arg("nthreads") = 1,
        "The engine's blocked causal attention (for tests): q (T, H, hd) at positions pos0.., k, v "
        "(pos0 + T, kv_heads, hd) fp32, stored into a kv_cache-type cache first; returns (T, H, hd).");
  m.def(
      "engine_attention_reference",
      [](py::array q, py::array k, py::array v, int64_t pos0) {
        const float* qp = check_array<float>(q, "engine_attention_reference", "q", {-1, -1, -1});
        const int64_t T = q.shape(0), H = q.shape(1), hd = q.shape(2);
        const float* kp = check_array<float>(k, "engine_attention_reference", "k", {pos0 + T, -1, hd});
        const float* vp = check_array<float>(v, "engine_attention_reference", "v", {pos0 + T, k.shape(1), hd});
        if (k.shape(1) < 1 || H % k.shape(1)) throw py::value_error("engine_attention_reference: kv heads must divide the query heads");
        py::array_t<float> out({T, H, hd});
        engine::attention_reference(qp, kp, vp, out.mutable_data(), T, H, k.shape(1), hd, pos0,
                                    1.f / std::sqrt(static_cast<float>(hd)));
        return out;
      },
      py::arg("q"), py::arg("k"), py::arg("v"), py::arg("pos0"),
      "The plain two-pass softmax attention in double precision that engine_attention is tested against.");
}

}  // namespace deploykit
