// Depthwise convolution (NHWC, float32) for XLA's CPU backend, as XLA FFI handlers, optionally with the
// BatchNorm and activation that produce its input fused in front.
//
// Built and loaded at run time by effnet_jax/kernels/native.py (the system's C++ compiler, jaxlib's FFI headers); layers.py
// uses it through `depthwise_impl='native'`. The numbers are those of the shifted sum in layers.py:
//
//   y[n, oy, ox, c] = sum_{i, j} x[n, s*oy + i - pad_h, s*ox + j - pad_w, c] * k[i, j, c]   (zero outside x)
//
// where x is the input itself (act = kNone), or x = act((z - mean) * scale + bias) of the pre-BatchNorm input z
// (act = kSilu, kRelu6), computed here row by row and never written out.
//
// Why: XLA writes the k*k shifted multiply-adds as fusions that re-read the padded input once per tap, and has to
// write out the activation the convolution reads (and, for its backward pass, the activation's derivative). Here
// each output row reads its k input rows while they sit in cache, each output summed over its taps in a register;
// the backward pass computes, per sample, the gradient of the BatchNorm output (through the activation) and the
// kernel gradient from one read of z and of the output gradient, with the sums the BatchNorm backward needs.
//
// Work is split over XLA's intra-op thread pool (the FFI ThreadPool); the calling thread works too, so a handler
// finishes even when no pool thread is free.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <utility>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Runs body(task) for task in [0, tasks) on the caller and up to (pool threads) helpers.
template <typename Body>
void ParallelFor(ffi::ThreadPool& pool, int64_t tasks, const Body& body) {
  if (tasks <= 0) return;
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), tasks - 1);
  if (helpers <= 0) {
    for (int64_t t = 0; t < tasks; ++t) body(t);
    return;
  }
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    std::mutex mu;
    std::condition_variable cv;
  };
  auto state = std::make_shared<State>();
  // body is only touched while a task is claimed; the caller returns after every task is done, so a helper that
  // starts late finds no work and touches only `state`, which it co-owns
  auto work = [state, tasks, body_ptr = &body]() {
    int64_t finished = 0;
    for (int64_t t; (t = state->next.fetch_add(1)) < tasks;) {
      (*body_ptr)(t);
      ++finished;
    }
    if (finished && state->done.fetch_add(finished) + finished == tasks) {
      std::lock_guard<std::mutex> lock(state->mu);
      state->cv.notify_all();
    }
  };
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule(decltype(work)(work));
  work();
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&] { return state->done.load() == tasks; });
}

// The build target's form: kLanes channels of float32 per vector register (16: AVX-512, 8: AVX2 with FMA, 4: SSE2,
// NEON and the rest), and the expansion's register tile, kPix pixels times kBlk vectors of channels (ExpandTile),
// sized to the target's vector registers: a tile whose sums do not fit in them spills to memory (a vector wider
// than the target's registers is split in several, each counting). -DEFFNET_LANES, -DEFFNET_TILE_PIX and
// -DEFFNET_TILE_VECS override them.
#if defined(__AVX512F__)
#define EFFNET_DEFAULT_LANES 16
#define EFFNET_DEFAULT_PIX 6
#define EFFNET_DEFAULT_VECS 4  // 24 sums, 4 weights, 1 broadcast of 32 registers
#elif (defined(__AVX2__) || defined(__AVX__)) && defined(__FMA__)
#define EFFNET_DEFAULT_LANES 8
#define EFFNET_DEFAULT_PIX 4
#define EFFNET_DEFAULT_VECS 3  // 12 sums, 3 weights, 1 broadcast: the 16 registers (as fast as 6 x 2, 3 x 4 or faster)
#elif defined(__aarch64__)
#define EFFNET_DEFAULT_LANES 4
#define EFFNET_DEFAULT_PIX 6
#define EFFNET_DEFAULT_VECS 4  // of 32 registers
#else
#define EFFNET_DEFAULT_LANES 4
#define EFFNET_DEFAULT_PIX 6
#define EFFNET_DEFAULT_VECS 2  // of 16 registers (x86's SSE: no FMA, a product's temporary too)
#endif
#ifndef EFFNET_LANES
#define EFFNET_LANES EFFNET_DEFAULT_LANES
#endif
#ifndef EFFNET_TILE_PIX
#define EFFNET_TILE_PIX EFFNET_DEFAULT_PIX
#endif
#ifndef EFFNET_TILE_VECS
#define EFFNET_TILE_VECS EFFNET_DEFAULT_VECS
#endif
constexpr int kLanes = EFFNET_LANES;
constexpr int64_t kPix = EFFNET_TILE_PIX, kBlk = EFFNET_TILE_VECS;
static_assert(kLanes >= 4 && (kLanes & (kLanes - 1)) == 0, "EFFNET_LANES: a power of two, at least 4");
static_assert(kPix >= 1 && kBlk >= 1, "EFFNET_TILE_PIX, EFFNET_TILE_VECS: at least 1");

// W channels of float32 in one register (GCC/Clang vector extension): W = kLanes, or narrower for the channels
// left after the kLanes-wide blocks; W = 1 is a plain float, for the last few channels.
template <int W>
struct Lanes {
  typedef float V __attribute__((vector_size(W * sizeof(float))));
  typedef int32_t I __attribute__((vector_size(W * sizeof(int32_t))));
  static V Load(const float* p) {
    V v;
    std::memcpy(&v, p, sizeof(V));
    return v;
  }
  static void Store(float* p, V v) { std::memcpy(p, &v, sizeof(V)); }
  // (an initializer list of f: V{} + f would add -0.0 + f, which the compiler must keep, an extra operation in
  // the expansion's inner loop)
  static V Splat(float f) { return SplatOf(f, std::make_index_sequence<W>()); }
  template <size_t... Index>
  static V SplatOf(float f, std::index_sequence<Index...>) {
    return V{((void)Index, f)...};
  }
  static V Select(I mask, V a, V b) { return mask ? a : b; }
  // exp(x) to ~1 ulp for x in [-87, 88] (Cephes' expf: x = n ln2 + r, 2^n times a degree-6 polynomial in r; n
  // rounded to nearest by adding 1.5 * 2^23, whose float bits then hold it)
  static V Exp(V x) {
    x = Select(x > 88.3762626647949f, Splat(88.3762626647949f), x);
    x = Select(x < -87.3365447504019f, Splat(-87.3365447504019f), x);
    const V t = x * 1.44269504088896341f + 12582912.0f;
    const V n = t - 12582912.0f;
    const V r = x - n * 0.693359375f + n * 2.12194440e-4f;
    V p = 1.9875691500E-4f * r + 1.3981999507E-3f;
    p = p * r + 8.3334519073E-3f;
    p = p * r + 4.1665795894E-2f;
    p = p * r + 1.6666665459E-1f;
    p = p * r + 5.0000001201E-1f;
    p = p * (r * r) + r + 1.0f;
    I bits;
    std::memcpy(&bits, &t, sizeof(V));
    bits = (bits - 0x4B400000 + 127) << 23;
    V scale;
    std::memcpy(&scale, &bits, sizeof(V));
    return p * scale;
  }
};
template <>
struct Lanes<1> {
  using V = float;
  using I = bool;
  static V Load(const float* p) { return *p; }
  static void Store(float* p, V v) { *p = v; }
  static V Splat(float f) { return f; }
  static V Select(I mask, V a, V b) { return mask ? a : b; }
  static V Exp(V x) { return std::exp(x); }
};

// The widths below W that the channels left after W-wide blocks take: W / 2, ..., down to 4, then 1.
constexpr int Narrower(int w) { return w > 4 ? w / 2 : 1; }

// block(Lanes<W>, c0) for the channel blocks of [c0, c) from W wide on: W-wide ones, then one block of each
// narrower width that fits, then one channel at a time.
template <int W, typename Block>
inline void ChannelBlocksFrom(int64_t c0, int64_t c, const Block& block) {
  if constexpr (W == 1) {
    for (; c0 < c; ++c0) block(Lanes<1>(), c0);
  } else {
    for (; c0 + W <= c; c0 += W) block(Lanes<W>(), c0);
    ChannelBlocksFrom<Narrower(W)>(c0, c, block);
  }
}

// block(Lanes<W>, c0) for consecutive channel blocks covering [0, c): kLanes wide, then narrower, then one at a
// time.
template <typename Block>
inline void ForEachChannelBlock(int64_t c, const Block& block) {
  ChannelBlocksFrom<kLanes>(0, c, block);
}

enum Act : int64_t { kNone = 0, kSilu = 1, kRelu6 = 2 };

// act(a) and act'(a), as torch computes them (relu6's derivative: 1 on (0, 6), else 0)
template <typename L>
inline typename L::V Activate(Act act, typename L::V a) {
  if (act == kSilu) return a / (1.0f + L::Exp(-a));
  if (act == kRelu6) return L::Select(a < 0.0f, L::Splat(0.0f), L::Select(a > 6.0f, L::Splat(6.0f), a));
  return a;
}
template <typename L>
inline typename L::V ActivationGrad(Act act, typename L::V a) {
  if (act == kSilu) {
    const typename L::V s = 1.0f / (1.0f + L::Exp(-a));
    return s * (1.0f + a * (1.0f - s));
  }
  return L::Select((a > 0.0f) & (a < 6.0f), L::Splat(1.0f), L::Splat(0.0f));
}

struct Problem {
  int64_t n, h, w, c, kh, kw, oh, ow, stride, pad_h, pad_w;
  Act act;
  const float *z, *mean, *scale, *bias, *k;  // z: the convolution's input x itself when act == kNone
  // inference only: a convolution in front (the 1x1 expansion, or an ek x ek stride-es one of few input channels:
  // the stem), x (N, in_h, in_w, in_c) in z and its (ek * ek * in_c, C) weights here; the depthwise convolution's
  // input is then act(conv(x) + bias) (the BatchNorm folded by the caller; mean, scale unused), h x w its size
  const float* expand = nullptr;
  const float* expand_packed = nullptr;  // PackExpansion(expand)
  int64_t cin = 0;                       // ek * ek * in_c: the values per pixel the expansion multiplies
  int64_t ek = 1, es = 1, ept = 0, epl = 0, in_h = 0, in_w = 0, in_c = 0;
};

// act(x @ w + b) for the `pixels` pixels of one row: x (pixels, cin), w (cin, c), out (pixels, c). A tile of kPix
// pixels times kBlk blocks of kLanes channels keeps its sums in registers; each weight vector is loaded once per
// tile, each input value broadcast once per block group.
// (ExpandTile: P pixels times B blocks; w: the weights of channels c0.. at row i of the input channels at w + i * ws)
template <typename L, int64_t P, int64_t B>
inline void ExpandTile(const float* x, const float* w, int64_t ws, const float* b, Act act, int64_t cin, int64_t c,
                       float* out, int64_t c0) {
  constexpr int64_t kW = sizeof(typename L::V) / sizeof(float);
  typename L::V acc[P][B];
  for (int64_t q = 0; q < B; ++q) {
    const auto bias = L::Load(b + c0 + q * kW);
    for (int64_t t = 0; t < P; ++t) acc[t][q] = bias;
  }
  for (int64_t i = 0; i < cin; ++i) {
    typename L::V wv[B];
    for (int64_t q = 0; q < B; ++q) wv[q] = L::Load(w + i * ws + q * kW);
    for (int64_t t = 0; t < P; ++t) {
      const auto xv = L::Splat(x[t * cin + i]);
      for (int64_t q = 0; q < B; ++q) acc[t][q] += xv * wv[q];
    }
  }
  for (int64_t t = 0; t < P; ++t)
    for (int64_t q = 0; q < B; ++q) L::Store(out + t * c + c0 + q * kW, Activate<L>(act, acc[t][q]));
}

// w: the (cin, c) weights; packed: the same, kGroup channels at a time, as (c / kGroup, cin, kGroup), so that a
// tile's weights are read in order
constexpr int64_t kGroup = kLanes * kBlk;

// The channels [c0, c) left after the kGroup-wide tiles, fewer than kBlk kLanes-wide blocks and the rest: the
// blocks as one tile of B < kBlk vectors (each input value then multiplies B weight vectors), then the narrower
// widths of ForEachChannelBlock one vector at a time.
template <typename L, int64_t P, int64_t B>
inline void ExpandRest(const float* x, const float* w, const float* b, Act act, int64_t cin, int64_t c, float* out,
                       int64_t c0) {
  if constexpr (B > 0) {
    if (c0 + B * kLanes <= c) {
      ExpandTile<L, P, B>(x, w + c0, c, b, act, cin, c, out, c0);
      c0 += B * kLanes;
    } else {
      return ExpandRest<L, P, B - 1>(x, w, b, act, cin, c, out, c0);
    }
  }
  ChannelBlocksFrom<Narrower(kLanes)>(c0, c, [&](auto lanes, int64_t c1) {
    ExpandTile<decltype(lanes), P, 1>(x, w + c1, c, b, act, cin, c, out, c1);
  });
}

template <int64_t P>
inline void ExpandPixels(const float* x, const float* w, const float* packed, const float* b, Act act, int64_t cin,
                         int64_t c, float* out) {
  using L = Lanes<kLanes>;
  int64_t c0 = 0;
  for (; c0 + kGroup <= c; c0 += kGroup)
    ExpandTile<L, P, kBlk>(x, packed + c0 * cin, kGroup, b, act, cin, c, out, c0);
  ExpandRest<L, P, kBlk - 1>(x, w, b, act, cin, c, out, c0);
}

std::vector<float> PackExpansion(const float* w, int64_t cin, int64_t c) {
  std::vector<float> packed((c / kGroup) * kGroup * cin);
  for (int64_t g = 0; g < c / kGroup; ++g)
    for (int64_t i = 0; i < cin; ++i)
      std::memcpy(packed.data() + (g * cin + i) * kGroup, w + i * c + g * kGroup, kGroup * sizeof(float));
  return packed;
}

// The last `pixels` (< P) pixels of a row as one tile.
template <int64_t P>
inline void ExpandLast(const float* x, const float* w, const float* packed, const float* b, Act act, int64_t pixels,
                       int64_t cin, int64_t c, float* out) {
  if constexpr (P > 1) {
    if (pixels == P - 1) return ExpandPixels<P - 1>(x, w, packed, b, act, cin, c, out);
    ExpandLast<P - 1>(x, w, packed, b, act, pixels, cin, c, out);
  }
}

void ExpandRow(const float* x, const float* w, const float* packed, const float* b, Act act, int64_t pixels,
               int64_t cin, int64_t c, float* out) {
  int64_t px = 0;
  for (; px + kPix <= pixels; px += kPix) ExpandPixels<kPix>(x + px * cin, w, packed, b, act, cin, c, out + px * c);
  ExpandLast<kPix>(x + px * cin, w, packed, b, act, pixels - px, cin, c, out + px * c);  // the last few, one tile
}

// The taps [lo, hi) (of `taps` along one axis) whose input index s*o + tap - pad lies in [0, size), for output
// index o.
inline void TapRange(int64_t o, int64_t stride, int64_t pad, int64_t taps, int64_t size, int64_t* lo, int64_t* hi) {
  *lo = std::max<int64_t>(0, pad - o * stride);
  *hi = std::min<int64_t>(taps, size + pad - o * stride);
}

// output positions summed together in a forward row (ForwardRow)
constexpr int64_t kTile = 4;

// Rows of the convolution's input x of one sample, computed from z when an activation is fused, kept for the
// last kh rows asked for (a ring: consecutive output rows share kh - stride input rows).
class InputRows {
 public:
  // Computed rows are kept with the convolution's zero padding around them: pad_w columns on the left, on the
  // right as many as the last tile of ForwardRow reaches, so that every output position sums all its taps.
  InputRows(const Problem& p) : p_(p) {
    if (p.act != kNone || p.expand) {
      const int64_t last = ((p.ow + kTile - 1) / kTile * kTile - 1) * p.stride - p.pad_w + p.kw - 1;
      left_ = p.pad_w, width_ = left_ + std::max(p.w, last + 1);
      ring_.assign(p.kh * width_ * p.c, 0.0f), tags_.assign(p.kh, -1);
    }
    if (p.expand && p.ek > 1) patches_.resize(p.w * p.cin);
  }
  // whether rows carry the padding (else they are the input itself)
  bool padded() const { return !ring_.empty(); }
  const float* Row(int64_t n, int64_t iy) {
    // (z: the row of the convolution's input, or of the BatchNorm's; unused with an expansion)
    const float* z = p_.expand ? nullptr : p_.z + ((n * p_.h + iy) * p_.w) * p_.c;
    if (p_.act == kNone && !p_.expand) return z;
    const int64_t slot = iy % p_.kh, tag = n * p_.h + iy;
    float* row = ring_.data() + (slot * width_ + left_) * p_.c;
    if (tags_[slot] != tag && p_.expand) {
      const float* x = p_.ek == 1 && p_.es == 1 ? p_.z + ((n * p_.in_h + iy) * p_.in_w) * p_.in_c : Patches(n, iy);
      ExpandRow(x, p_.expand, p_.expand_packed, p_.bias, p_.act, p_.w, p_.cin, p_.c, row);
      tags_[slot] = tag;
    } else if (tags_[slot] != tag) {
      for (int64_t ix = 0; ix < p_.w; ++ix)
        ForEachChannelBlock(p_.c, [&](auto lanes, int64_t c0) {
          using L = decltype(lanes);
          const int64_t o = ix * p_.c + c0;
          const auto a = (L::Load(z + o) - L::Load(p_.mean + c0)) * L::Load(p_.scale + c0) + L::Load(p_.bias + c0);
          L::Store(row + o, Activate<L>(p_.act, a));
        });
      tags_[slot] = tag;
    }
    return row;
  }

 private:
  // the (w, ek * ek * in_c) patches of x that the expansion's output row iy multiplies, zero outside x
  const float* Patches(int64_t n, int64_t iy) {
    const int64_t k = p_.ek, ci = p_.in_c;
    for (int64_t ox = 0; ox < p_.w; ++ox)
      for (int64_t i = 0; i < k; ++i) {
        const int64_t yy = iy * p_.es + i - p_.ept, x0 = ox * p_.es - p_.epl;
        float* dst = patches_.data() + ox * p_.cin + i * k * ci;
        if (yy < 0 || yy >= p_.in_h) {
          std::fill_n(dst, k * ci, 0.0f);
          continue;
        }
        const float* src = p_.z + ((n * p_.in_h + yy) * p_.in_w) * ci;
        if (x0 >= 0 && x0 + k <= p_.in_w) {  // the k taps of this row: k * ci consecutive values
          for (int64_t v = 0; v < k * ci; ++v) dst[v] = src[x0 * ci + v];
          continue;
        }
        for (int64_t j = 0; j < k; ++j) {
          const int64_t xx = x0 + j;
          for (int64_t v = 0; v < ci; ++v) dst[j * ci + v] = xx >= 0 && xx < p_.in_w ? src[xx * ci + v] : 0.0f;
        }
      }
    return patches_.data();
  }

  const Problem& p_;
  std::vector<float> ring_, patches_;
  std::vector<int64_t> tags_;
  int64_t left_ = 0, width_ = 0;
};

// One output row y[n, oy, :, :]. Output positions whose taps all lie inside the image (with padded rows: all of
// them) go kTile at a time: each block of channels keeps kTile sums in registers, and each kernel tap is loaded once
// for all of them (independent sums, fewer loads than one position at a time, whose single chain of multiply-adds
// waits on each add). For the common kernel widths and strides (KW, S known at compile time) the tap loops unroll and
// positions that share an input column load it once. Positions near the left and right edges of unpadded rows go
// one at a time, over the taps that lie inside.
template <int64_t KW, int64_t S, typename L>
inline void TileSums(const float* const* in, int64_t ilo, int64_t ihi, const float* k, int64_t kw, int64_t s,
                     int64_t c, int64_t c0, int64_t x0, float* out, int64_t valid) {
  const int64_t taps = KW ? KW : kw, stride = S ? S : s;
  typename L::V acc[kTile] = {};
  for (int64_t i = ilo; i < ihi; ++i) {
    const float* row = in[i] + x0 * c + c0;
    const float* ki = k + i * taps * c + c0;
    for (int64_t j = 0; j < taps; ++j) {
      const auto kv = L::Load(ki + j * c);
      for (int64_t t = 0; t < kTile; ++t) acc[t] += L::Load(row + (t * stride + j) * c) * kv;
    }
  }
  for (int64_t t = 0; t < valid; ++t) L::Store(out + t * c, acc[t]);
}

void ForwardRow(const Problem& p, InputRows& rows, float* y, int64_t n, int64_t oy) {
  const int64_t c = p.c, s = p.stride;
  int64_t ilo, ihi;
  TapRange(oy, s, p.pad_h, p.kh, p.h, &ilo, &ihi);
  const float* in[64];
  for (int64_t i = ilo; i < ihi; ++i) in[i] = rows.Row(n, oy * s + i - p.pad_h);
  float* out = y + ((n * p.oh + oy) * p.ow) * c;
  const bool padded = rows.padded();
  for (int64_t ox = 0; ox < p.ow;) {
    const int64_t x0 = ox * s - p.pad_w;
    if (padded || (x0 >= 0 && (ox + kTile - 1) * s - p.pad_w + p.kw <= p.w)) {
      const int64_t valid = std::min(kTile, p.ow - ox);  // (padded rows: the last tile may reach past the row)
      float* o = out + ox * c;
      ForEachChannelBlock(c, [&](auto lanes, int64_t c0) {
        using L = decltype(lanes);
        const int64_t kw = p.kw;
        if (kw == 3 && s == 1) return TileSums<3, 1, L>(in, ilo, ihi, p.k, kw, s, c, c0, x0, o + c0, valid);
        if (kw == 3 && s == 2) return TileSums<3, 2, L>(in, ilo, ihi, p.k, kw, s, c, c0, x0, o + c0, valid);
        if (kw == 5 && s == 1) return TileSums<5, 1, L>(in, ilo, ihi, p.k, kw, s, c, c0, x0, o + c0, valid);
        if (kw == 5 && s == 2) return TileSums<5, 2, L>(in, ilo, ihi, p.k, kw, s, c, c0, x0, o + c0, valid);
        TileSums<0, 0, L>(in, ilo, ihi, p.k, kw, s, c, c0, x0, o + c0, valid);
      });
      ox += kTile;
      continue;
    }
    int64_t jlo, jhi;
    TapRange(ox, s, p.pad_w, p.kw, p.w, &jlo, &jhi);
    ForEachChannelBlock(c, [&](auto lanes, int64_t c0) {
      using L = decltype(lanes);
      typename L::V acc[2] = {};  // two chains of multiply-adds, for the rows of taps in turn
      for (int64_t i = ilo; i < ihi; ++i)
        for (int64_t j = jlo; j < jhi; ++j)
          acc[i & 1] += L::Load(in[i] + (x0 + j) * c + c0) * L::Load(p.k + (i * p.kw + j) * c + c0);
      L::Store(out + ox * c + c0, acc[0] + acc[1]);
    });
    ++ox;
  }
}

// Inference: one output row of act_out(conv(x, k) + out_bias) (k already carrying the BatchNorm multiplier that
// follows the convolution), its channel sums added to row_sum (squeeze-excitation's pooling) when row_sum is set.
void InferenceRow(const Problem& p, InputRows& rows, Act out_act, const float* out_bias, float* y, float* row_sum,
                  int64_t n, int64_t oy) {
  ForwardRow(p, rows, y, n, oy);
  const int64_t c = p.c;
  float* out = y + ((n * p.oh + oy) * p.ow) * c;
  ForEachChannelBlock(c, [&](auto lanes, int64_t c0) {
    using L = decltype(lanes);
    const auto b = L::Load(out_bias + c0);
    typename L::V sum = {};
    for (int64_t ox = 0; ox < p.ow; ++ox) {
      const auto v = Activate<L>(out_act, L::Load(out + ox * c + c0) + b);
      L::Store(out + ox * c + c0, v);
      sum += v;
    }
    if (row_sum) L::Store(row_sum + c0, sum);
  });
}

// The gradient of row iy of x (sample n): the sum over the taps (i, j) and output positions with
// s*oy + i - pad_h = iy, s*ox + j - pad_w = ix of dy[n, oy, ox] * k[i, j], gathered per position in a register.
void InputGradRow(const Problem& p, const float* dy, float* out, int64_t n, int64_t iy) {
  const int64_t c = p.c;
  const float* gn = dy + n * p.oh * p.ow * c;
  int64_t rows_i[64], rows_o[64], nr = 0;
  for (int64_t i = 0; i < p.kh; ++i) {
    const int64_t t = iy + p.pad_h - i;
    if (t >= 0 && t % p.stride == 0 && t / p.stride < p.oh) rows_i[nr] = i, rows_o[nr++] = t / p.stride;
  }
  for (int64_t ix = 0; ix < p.w; ++ix) {
    int64_t cols_j[64], cols_o[64], nc = 0;
    for (int64_t j = 0; j < p.kw; ++j) {
      const int64_t t = ix + p.pad_w - j;
      if (t >= 0 && t % p.stride == 0 && t / p.stride < p.ow) cols_j[nc] = j, cols_o[nc++] = t / p.stride;
    }
    ForEachChannelBlock(c, [&](auto lanes, int64_t c0) {
      using L = decltype(lanes);
      typename L::V acc = {};
      for (int64_t r = 0; r < nr; ++r)
        for (int64_t q = 0; q < nc; ++q)
          acc += L::Load(gn + (rows_o[r] * p.ow + cols_o[q]) * c + c0) *
                 L::Load(p.k + (rows_i[r] * p.kw + cols_j[q]) * c + c0);
      L::Store(out + ix * c + c0, acc);
    });
  }
}

// The kernel gradient's terms of output row oy of sample n, added to row_sum (kh, kw, C): for each tap and block
// of channels, the sum over output columns in a register.
void KernelGradRow(const Problem& p, InputRows& rows, const float* dy, float* row_sum, int64_t n, int64_t oy) {
  const int64_t c = p.c;
  int64_t ilo, ihi;
  TapRange(oy, p.stride, p.pad_h, p.kh, p.h, &ilo, &ihi);
  const float* grow = dy + ((n * p.oh + oy) * p.ow) * c;
  for (int64_t i = ilo; i < ihi; ++i) {
    const float* xrow = rows.Row(n, oy * p.stride + i - p.pad_h);
    for (int64_t j = 0; j < p.kw; ++j) {
      // output columns whose input column s*ox + j - pad_w lies inside the image
      const int64_t lo = std::max<int64_t>(0, (p.pad_w - j + p.stride - 1) / p.stride);
      const int64_t hi = std::min<int64_t>(p.ow, (p.w - 1 + p.pad_w - j) / p.stride + 1);
      float* sum = row_sum + (i * p.kw + j) * c;
      ForEachChannelBlock(c, [&](auto lanes, int64_t c0) {
        using L = decltype(lanes);
        typename L::V acc = {};
        for (int64_t ox = lo; ox < hi; ++ox)
          acc += L::Load(grow + ox * c + c0) * L::Load(xrow + (ox * p.stride + j - p.pad_w) * c + c0);
        L::Store(sum + c0, L::Load(sum + c0) + acc);
      });
    }
  }
}

// Row sums in float32 (one row's terms each), added into per-sample totals in float64.
struct Totals {
  std::vector<double> total;
  std::vector<float> row;
  explicit Totals(int64_t size) : total(size, 0.0), row(size, 0.0f) {}
  void EndRow() {
    for (size_t t = 0; t < row.size(); ++t) total[t] += row[t], row[t] = 0.0f;
  }
  void Write(float* out) const {
    for (size_t t = 0; t < total.size(); ++t) out[t] = static_cast<float>(total[t]);
  }
};

// Sample n of the backward pass. dx: the gradient of the convolution's input x (act == kNone), or of the BatchNorm
// output a = (z - mean) * scale + bias (x = act(a)); dk: this sample's kernel gradient; with an activation,
// sum_da[n] and sum_da_zc[n]: this sample's sums over positions of that gradient and of it times (z - mean).
void BackwardSample(const Problem& p, const float* dy, float* dx, float* dk, float* sum_da, float* sum_da_zc,
                    int64_t n) {
  const int64_t c = p.c, taps = p.kh * p.kw;
  Totals da_sum(c), da_zc_sum(c);
  for (int64_t iy = 0; iy < p.h; ++iy) {
    float* row = dx + ((n * p.h + iy) * p.w) * c;
    InputGradRow(p, dy, row, n, iy);
    if (p.act == kNone) continue;
    const float* z = p.z + ((n * p.h + iy) * p.w) * c;
    for (int64_t ix = 0; ix < p.w; ++ix)
      ForEachChannelBlock(c, [&](auto lanes, int64_t c0) {
        using L = decltype(lanes);
        const int64_t o = ix * c + c0;
        const auto zc = L::Load(z + o) - L::Load(p.mean + c0);
        const auto da = L::Load(row + o) * ActivationGrad<L>(p.act, zc * L::Load(p.scale + c0) + L::Load(p.bias + c0));
        L::Store(row + o, da);
        L::Store(da_sum.row.data() + c0, L::Load(da_sum.row.data() + c0) + da);
        L::Store(da_zc_sum.row.data() + c0, L::Load(da_zc_sum.row.data() + c0) + da * zc);
      });
    da_sum.EndRow();
    da_zc_sum.EndRow();
  }
  if (p.act != kNone) {
    da_sum.Write(sum_da + n * c);
    da_zc_sum.Write(sum_da_zc + n * c);
  }
  InputRows rows(p);
  Totals dk_sum(taps * c);
  for (int64_t oy = 0; oy < p.oh; ++oy) {
    KernelGradRow(p, rows, dy, dk_sum.row.data(), n, oy);
    dk_sum.EndRow();
  }
  dk_sum.Write(dk + n * taps * c);
}

using F32 = ffi::Buffer<ffi::F32>;

ffi::Error MakeProblem(F32& z, F32& mean, F32& scale, F32& bias, F32& k, int64_t oh, int64_t ow, int64_t stride,
                       int64_t pad_h, int64_t pad_w, int64_t act, Problem* p, F32* expand = nullptr,
                       const int64_t* geometry = nullptr) {
  auto zd = z.dimensions(), kd = k.dimensions();
  if (zd.size() != 4) return ffi::Error::InvalidArgument("depthwise: the input must be NHWC");
  const bool expands = expand && expand->element_count() > 0;
  const int64_t c = expands ? expand->dimensions().back() : zd[3];
  // the expansion's kernel size, stride and padding (top, bottom, left, right)
  const int64_t ek = expands ? geometry[0] : 1, es = expands ? geometry[1] : 1;
  if (expands && (expand->dimensions().size() != 2 || expand->dimensions()[0] != ek * ek * zd[3] || ek < 1 ||
                  es < 1))
    return ffi::Error::InvalidArgument("depthwise: the expansion must be (k * k * Cin, C)");
  const int64_t h = expands ? (zd[1] + geometry[2] + geometry[3] - ek) / es + 1 : zd[1];
  const int64_t w = expands ? (zd[2] + geometry[4] + geometry[5] - ek) / es + 1 : zd[2];
  if (kd.size() != 4 || kd[2] != 1 || kd[3] != c)
    return ffi::Error::InvalidArgument("depthwise: the kernel must be (kh, kw, 1, C)");
  if (kd[0] > 64 || kd[1] > 64) return ffi::Error::InvalidArgument("depthwise: kernels up to 64 x 64");
  if (act < kNone || act > kRelu6) return ffi::Error::InvalidArgument("depthwise: unknown activation");
  for (F32* v : {&mean, &scale, &bias})
    if (v->element_count() != c) return ffi::Error::InvalidArgument("depthwise: mean, scale, bias must be (C,)");
  *p = Problem{zd[0], h, w, c, kd[0], kd[1], oh, ow, stride, pad_h, pad_w, static_cast<Act>(act),
               z.typed_data(), mean.typed_data(), scale.typed_data(), bias.typed_data(), k.typed_data()};
  if (expands) {
    p->expand = expand->typed_data(), p->cin = ek * ek * zd[3], p->ek = ek, p->es = es;
    p->ept = geometry[2], p->epl = geometry[4], p->in_h = zd[1], p->in_w = zd[2], p->in_c = zd[3];
  }
  return ffi::Error::Success();
}

ffi::Error Forward(ffi::ThreadPool pool, F32 z, F32 mean, F32 scale, F32 bias, F32 k, ffi::ResultBuffer<ffi::F32> y,
                   int64_t stride, int64_t pad_h, int64_t pad_w, int64_t act) {
  Problem p;
  auto yd = y->dimensions();
  if (auto e = MakeProblem(z, mean, scale, bias, k, yd[1], yd[2], stride, pad_h, pad_w, act, &p); e.failure())
    return e;
  float* out = y->typed_data();
  // output rows in chunks: enough tasks to balance the threads, each long enough to reuse its input rows
  const int64_t rows = p.n * p.oh, chunk = std::max<int64_t>(1, rows / 32);
  ParallelFor(pool, (rows + chunk - 1) / chunk, [&](int64_t t) {
    InputRows in(p);
    for (int64_t r = t * chunk; r < std::min(rows, (t + 1) * chunk); ++r) ForwardRow(p, in, out, r / p.oh, r % p.oh);
  });
  return ffi::Error::Success();
}

// y = act_out(conv(act((z - mean) * scale + bias), k) + out_bias), and each sample's sums of y over positions.
ffi::Error Inference(ffi::ThreadPool pool, F32 z, F32 mean, F32 scale, F32 bias, F32 k, F32 out_bias, F32 expand,
                     ffi::ResultBuffer<ffi::F32> y, ffi::ResultBuffer<ffi::F32> sums, int64_t stride, int64_t pad_h,
                     int64_t pad_w, int64_t act, int64_t out_act, int64_t ek, int64_t es, int64_t ept, int64_t epb,
                     int64_t epl, int64_t epr) {
  Problem p;
  auto yd = y->dimensions();
  const int64_t geometry[] = {ek, es, ept, epb, epl, epr};
  if (auto e = MakeProblem(z, mean, scale, bias, k, yd[1], yd[2], stride, pad_h, pad_w, act, &p, &expand, geometry);
      e.failure())
    return e;
  if (out_act < kNone || out_act > kRelu6) return ffi::Error::InvalidArgument("depthwise: unknown activation");
  if (out_bias.element_count() != p.c) return ffi::Error::InvalidArgument("depthwise: out_bias must be (C,)");
  std::vector<float> packed;
  if (p.expand) packed = PackExpansion(p.expand, p.cin, p.c), p.expand_packed = packed.data();
  // each sample's rows in `parts` chunks: enough tasks to keep every thread busy, each at least 2 kh rows long (a
  // chunk computes the kh - stride input rows it shares with the one before again). Each chunk's sums are kept
  // apart and added in order afterwards, so the result does not depend on the threads' timing.
  const int64_t tasks = 4 * (pool.num_threads() + 1);
  const int64_t parts = std::max<int64_t>(1, std::min((tasks + p.n - 1) / p.n, p.oh / (2 * p.kh)));
  std::vector<double> partial(p.n * parts * p.c, 0.0);
  ParallelFor(pool, p.n * parts, [&](int64_t t) {
    const int64_t n = t / parts, part = t % parts;
    InputRows in(p);
    std::vector<float> row_sum(p.c);
    double* total = partial.data() + t * p.c;
    for (int64_t oy = part * p.oh / parts; oy < (part + 1) * p.oh / parts; ++oy) {
      InferenceRow(p, in, static_cast<Act>(out_act), out_bias.typed_data(), y->typed_data(), row_sum.data(), n, oy);
      for (int64_t ch = 0; ch < p.c; ++ch) total[ch] += row_sum[ch];
    }
  });
  float* s = sums->typed_data();
  for (int64_t n = 0; n < p.n; ++n)
    for (int64_t ch = 0; ch < p.c; ++ch) {
      double v = 0.0;
      for (int64_t part = 0; part < parts; ++part) v += partial[(n * parts + part) * p.c + ch];
      s[n * p.c + ch] = static_cast<float>(v);
    }
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::ThreadPool pool, F32 z, F32 mean, F32 scale, F32 bias, F32 k, F32 dy,
                    ffi::ResultBuffer<ffi::F32> dx, ffi::ResultBuffer<ffi::F32> dk,
                    ffi::ResultBuffer<ffi::F32> sum_da, ffi::ResultBuffer<ffi::F32> sum_da_zc, int64_t stride,
                    int64_t pad_h, int64_t pad_w, int64_t act) {
  Problem p;
  auto gd = dy.dimensions();
  if (auto e = MakeProblem(z, mean, scale, bias, k, gd[1], gd[2], stride, pad_h, pad_w, act, &p); e.failure())
    return e;
  if (act == kNone) {  // no sums to report
    std::fill_n(sum_da->typed_data(), sum_da->element_count(), 0.0f);
    std::fill_n(sum_da_zc->typed_data(), sum_da_zc->element_count(), 0.0f);
  }
  ParallelFor(pool, p.n, [&](int64_t n) {
    BackwardSample(p, dy.typed_data(), dx->typed_data(), dk->typed_data(), sum_da->typed_data(),
                   sum_da_zc->typed_data(), n);
  });
  return ffi::Error::Success();
}

}  // namespace

namespace {

// The handlers' bindings: the thread pool, then z (or x), mean, scale, bias, kernel; each handler adds its own
// buffers, then the attributes.
auto BindInputs() {
  return ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<F32>().Arg<F32>().Arg<F32>().Arg<F32>().Arg<F32>();
}

template <typename Binding>
auto BindAttrs(Binding binding) {
  return std::move(binding)
      .template Attr<int64_t>("stride")
      .template Attr<int64_t>("pad_h")
      .template Attr<int64_t>("pad_w")
      .template Attr<int64_t>("act");
}

}  // namespace

// The form this library was compiled in: out3 = (lanes, the expansion tile's pixels, its vectors); returns 3, the
// values written.
extern "C" int EffnetKernelForm(int* out3) {
  out3[0] = kLanes, out3[1] = static_cast<int>(kPix), out3[2] = static_cast<int>(kBlk);
  return 3;
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(EffnetDepthwiseForward, Forward, BindAttrs(BindInputs().Ret<F32>()));  // y

// out_bias, the expansion's weights (k * k * Cin, C) or an empty array; y, each sample's sums of y (N, C); and the
// output activation's and the expansion's geometry's attributes
XLA_FFI_DEFINE_HANDLER_SYMBOL(EffnetDepthwiseInference, Inference,
                              BindAttrs(BindInputs().Arg<F32>().Arg<F32>().Ret<F32>().Ret<F32>())
                                  .Attr<int64_t>("out_act")
                                  .Attr<int64_t>("expand_k")
                                  .Attr<int64_t>("expand_stride")
                                  .Attr<int64_t>("expand_pad_top")
                                  .Attr<int64_t>("expand_pad_bottom")
                                  .Attr<int64_t>("expand_pad_left")
                                  .Attr<int64_t>("expand_pad_right"));

// dy; dx (or the gradient of the BatchNorm output), each sample's kernel gradient (N, kh, kw, C), sum_da (N, C),
// sum_da_zc (N, C)
XLA_FFI_DEFINE_HANDLER_SYMBOL(EffnetDepthwiseBackward, Backward,
                              BindAttrs(BindInputs().Arg<F32>().Ret<F32>().Ret<F32>().Ret<F32>().Ret<F32>()));
