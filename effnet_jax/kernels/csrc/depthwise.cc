// Depthwise convolution (NHWC, float32) for XLA's CPU backend as XLA FFI handlers, optionally with the BatchNorm
// and activation that produce its input fused in front; built and loaded by effnet_jax/kernels/native.py. The
// numbers are those of the shifted sum in layers.py:
//
//   y[n, oy, ox, c] = sum_{i, j} x[n, s*oy + i - pad_h, s*ox + j - pad_w, c] * k[i, j, c]   (zero outside x)
//
// where x is the input itself (act = kNone), or x = act((z - mean) * scale + bias) of the pre-BatchNorm input z
// (act = kSilu, kRelu6), computed here row by row and never written out. Each output row reads its k input rows
// while they sit in cache, each output summed over its taps in a register; work is split over XLA's intra-op
// thread pool (`ParallelFor`).

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

// Runs body(task) for task in [0, tasks) on the caller and up to (pool threads) helpers of the FFI ThreadPool; the
// caller works too, so a handler finishes even when no pool thread is free.
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
    std::mutex mutex;
    std::condition_variable all_done;
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
      std::lock_guard<std::mutex> lock(state->mutex);
      state->all_done.notify_all();
    }
  };
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule(decltype(work)(work));
  work();
  std::unique_lock<std::mutex> lock(state->mutex);
  state->all_done.wait(lock, [&] { return state->done.load() == tasks; });
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
  typedef float Vec __attribute__((vector_size(W * sizeof(float))));
  typedef int32_t IntVec __attribute__((vector_size(W * sizeof(int32_t))));
  static Vec Load(const float* src) {
    Vec vec;
    std::memcpy(&vec, src, sizeof(Vec));
    return vec;
  }
  static void Store(float* dst, Vec vec) { std::memcpy(dst, &vec, sizeof(Vec)); }
  // (an initializer list of the value: Vec{} + value would add -0.0 + value, which the compiler must keep, an
  // extra operation in the expansion's inner loop)
  static Vec Splat(float value) { return SplatOf(value, std::make_index_sequence<W>()); }
  template <size_t... Index>
  static Vec SplatOf(float value, std::index_sequence<Index...>) {
    return Vec{((void)Index, value)...};
  }
  static Vec Select(IntVec mask, Vec a, Vec b) { return mask ? a : b; }
  // exp(x) to ~1 ulp for x in [-87, 88] (Cephes' expf: x = n ln2 + r, 2^n times a degree-6 polynomial in r; n
  // rounded to nearest by adding 1.5 * 2^23, whose float bits then hold it)
  static Vec Exp(Vec x) {
    x = Select(x > 88.3762626647949f, Splat(88.3762626647949f), x);
    x = Select(x < -87.3365447504019f, Splat(-87.3365447504019f), x);
    const Vec shifted = x * 1.44269504088896341f + 12582912.0f;
    const Vec n = shifted - 12582912.0f;
    const Vec r = x - n * 0.693359375f + n * 2.12194440e-4f;
    Vec poly = 1.9875691500E-4f * r + 1.3981999507E-3f;
    poly = poly * r + 8.3334519073E-3f;
    poly = poly * r + 4.1665795894E-2f;
    poly = poly * r + 1.6666665459E-1f;
    poly = poly * r + 5.0000001201E-1f;
    poly = poly * (r * r) + r + 1.0f;
    IntVec bits;
    std::memcpy(&bits, &shifted, sizeof(Vec));
    bits = (bits - 0x4B400000 + 127) << 23;
    Vec scale;
    std::memcpy(&scale, &bits, sizeof(Vec));
    return poly * scale;
  }
};
template <>
struct Lanes<1> {
  using Vec = float;
  using IntVec = bool;
  static Vec Load(const float* src) { return *src; }
  static void Store(float* dst, Vec vec) { *dst = vec; }
  static Vec Splat(float value) { return value; }
  static Vec Select(IntVec mask, Vec a, Vec b) { return mask ? a : b; }
  static Vec Exp(Vec x) { return std::exp(x); }
};

// The widths below W that the channels left after W-wide blocks take: W / 2, ..., down to 4, then 1.
constexpr int Narrower(int width) { return width > 4 ? width / 2 : 1; }

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
inline typename L::Vec Activate(Act act, typename L::Vec a) {
  if (act == kSilu) return a / (1.0f + L::Exp(-a));
  if (act == kRelu6) return L::Select(a < 0.0f, L::Splat(0.0f), L::Select(a > 6.0f, L::Splat(6.0f), a));
  return a;
}
template <typename L>
inline typename L::Vec ActivationGrad(Act act, typename L::Vec a) {
  if (act == kSilu) {
    const typename L::Vec sigmoid = 1.0f / (1.0f + L::Exp(-a));
    return sigmoid * (1.0f + a * (1.0f - sigmoid));
  }
  return L::Select((a > 0.0f) & (a < 6.0f), L::Splat(1.0f), L::Splat(0.0f));
}

struct Problem {
  int64_t n, h, w, c, kh, kw, oh, ow, stride, pad_h, pad_w;
  Act act;
  const float *z, *mean, *scale, *bias, *k;  // z: the convolution's input x itself when act == kNone
  // inference only: a convolution in front (the 1x1 expansion, or an expand_k x expand_k one of stride expand_stride
  // and few input channels: the stem), x (N, in_h, in_w, in_c) in z and its (expand_k * expand_k * in_c, C) weights
  // here; the depthwise convolution's input is then act(conv(x) + bias) (the BatchNorm folded by the caller; mean,
  // scale unused), h x w its size
  const float* expand = nullptr;
  const float* expand_packed = nullptr;  // PackExpansion(expand)
  int64_t cin = 0;                       // expand_k * expand_k * in_c: the values per pixel the expansion multiplies
  int64_t expand_k = 1, expand_stride = 1, expand_pad_top = 0, expand_pad_left = 0, in_h = 0, in_w = 0, in_c = 0;
};

// act(x @ weights + bias) for the `pixels` pixels of one row: x (pixels, cin), weights (cin, c), out (pixels, c). A
// tile of kPix pixels times kBlk blocks of kLanes channels keeps its sums in registers; each weight vector is loaded
// once per tile, each input value broadcast once per block group.
// (ExpandTile: Pixels pixels times Vectors blocks; weights: those of channels c0.. for input channel i at
// weights + i * weights_stride)
template <typename L, int64_t Pixels, int64_t Vectors>
inline void ExpandTile(const float* x, const float* weights, int64_t weights_stride, const float* bias, Act act,
                       int64_t cin, int64_t c, float* out, int64_t c0) {
  constexpr int64_t kWidth = sizeof(typename L::Vec) / sizeof(float);
  typename L::Vec acc[Pixels][Vectors];
  for (int64_t q = 0; q < Vectors; ++q) {
    const auto bias_vec = L::Load(bias + c0 + q * kWidth);
    for (int64_t t = 0; t < Pixels; ++t) acc[t][q] = bias_vec;
  }
  for (int64_t i = 0; i < cin; ++i) {
    typename L::Vec weight_vecs[Vectors];
    for (int64_t q = 0; q < Vectors; ++q) weight_vecs[q] = L::Load(weights + i * weights_stride + q * kWidth);
    for (int64_t t = 0; t < Pixels; ++t) {
      const auto value = L::Splat(x[t * cin + i]);
      for (int64_t q = 0; q < Vectors; ++q) acc[t][q] += value * weight_vecs[q];
    }
  }
  for (int64_t t = 0; t < Pixels; ++t)
    for (int64_t q = 0; q < Vectors; ++q) L::Store(out + t * c + c0 + q * kWidth, Activate<L>(act, acc[t][q]));
}

// weights: the (cin, c) weights; packed: the same, kGroup channels at a time, as (c / kGroup, cin, kGroup), so that
// a tile's weights are read in order
constexpr int64_t kGroup = kLanes * kBlk;

// The channels [c0, c) left after the kGroup-wide tiles, fewer than kBlk kLanes-wide blocks and the rest: the
// blocks as one tile of Vectors < kBlk vectors (each input value then multiplies Vectors weight vectors), then the
// narrower widths of ForEachChannelBlock one vector at a time.
template <typename L, int64_t Pixels, int64_t Vectors>
inline void ExpandRest(const float* x, const float* weights, const float* bias, Act act, int64_t cin, int64_t c,
                       float* out, int64_t c0) {
  if constexpr (Vectors > 0) {
    if (c0 + Vectors * kLanes <= c) {
      ExpandTile<L, Pixels, Vectors>(x, weights + c0, c, bias, act, cin, c, out, c0);
      c0 += Vectors * kLanes;
    } else {
      return ExpandRest<L, Pixels, Vectors - 1>(x, weights, bias, act, cin, c, out, c0);
    }
  }
  ChannelBlocksFrom<Narrower(kLanes)>(c0, c, [&](auto lanes, int64_t c1) {
    ExpandTile<decltype(lanes), Pixels, 1>(x, weights + c1, c, bias, act, cin, c, out, c1);
  });
}

template <int64_t Pixels>
inline void ExpandPixels(const float* x, const float* weights, const float* packed, const float* bias, Act act,
                         int64_t cin, int64_t c, float* out) {
  using L = Lanes<kLanes>;
  int64_t c0 = 0;
  for (; c0 + kGroup <= c; c0 += kGroup)
    ExpandTile<L, Pixels, kBlk>(x, packed + c0 * cin, kGroup, bias, act, cin, c, out, c0);
  ExpandRest<L, Pixels, kBlk - 1>(x, weights, bias, act, cin, c, out, c0);
}

std::vector<float> PackExpansion(const float* weights, int64_t cin, int64_t c) {
  std::vector<float> packed((c / kGroup) * kGroup * cin);
  for (int64_t g = 0; g < c / kGroup; ++g)
    for (int64_t i = 0; i < cin; ++i)
      std::memcpy(packed.data() + (g * cin + i) * kGroup, weights + i * c + g * kGroup, kGroup * sizeof(float));
  return packed;
}

// The last `pixels` (< Pixels) pixels of a row as one tile.
template <int64_t Pixels>
inline void ExpandLast(const float* x, const float* weights, const float* packed, const float* bias, Act act,
                       int64_t pixels, int64_t cin, int64_t c, float* out) {
  if constexpr (Pixels > 1) {
    if (pixels == Pixels - 1) return ExpandPixels<Pixels - 1>(x, weights, packed, bias, act, cin, c, out);
    ExpandLast<Pixels - 1>(x, weights, packed, bias, act, pixels, cin, c, out);
  }
}

void ExpandRow(const float* x, const float* weights, const float* packed, const float* bias, Act act, int64_t pixels,
               int64_t cin, int64_t c, float* out) {
  int64_t px = 0;
  for (; px + kPix <= pixels; px += kPix)
    ExpandPixels<kPix>(x + px * cin, weights, packed, bias, act, cin, c, out + px * c);
  // the last few, one tile
  ExpandLast<kPix>(x + px * cin, weights, packed, bias, act, pixels - px, cin, c, out + px * c);
}

// The taps [lo, hi) (of `taps` along one axis) whose input index stride * out_index + tap - pad lies in [0, size),
// for output index out_index.
inline void TapRange(int64_t out_index, int64_t stride, int64_t pad, int64_t taps, int64_t size, int64_t* lo,
                     int64_t* hi) {
  *lo = std::max<int64_t>(0, pad - out_index * stride);
  *hi = std::min<int64_t>(taps, size + pad - out_index * stride);
}

// output positions summed together in a forward row (ForwardRow)
constexpr int64_t kTile = 4;

// Rows of the convolution's input x of one sample, computed from z when an activation is fused, kept for the
// last kh rows asked for (a ring: consecutive output rows share kh - stride input rows).
class InputRows {
 public:
  // Computed rows are kept with the convolution's zero padding around them: pad_w columns on the left, on the
  // right as many as the last tile of ForwardRow reaches, so that every output position sums all its taps.
  InputRows(const Problem& problem) : problem_(problem) {
    if (problem.act != kNone || problem.expand) {
      const int64_t last =
          ((problem.ow + kTile - 1) / kTile * kTile - 1) * problem.stride - problem.pad_w + problem.kw - 1;
      left_ = problem.pad_w, width_ = left_ + std::max(problem.w, last + 1);
      ring_.assign(problem.kh * width_ * problem.c, 0.0f), tags_.assign(problem.kh, -1);
    }
    if (problem.expand && problem.expand_k > 1) patches_.resize(problem.w * problem.cin);
  }
  // whether rows carry the padding (else they are the input itself)
  bool padded() const { return !ring_.empty(); }
  const float* Row(int64_t n, int64_t iy) {
    // (z: the row of the convolution's input, or of the BatchNorm's; unused with an expansion)
    const float* z = problem_.expand ? nullptr : problem_.z + ((n * problem_.h + iy) * problem_.w) * problem_.c;
    if (problem_.act == kNone && !problem_.expand) return z;
    const int64_t slot = iy % problem_.kh, tag = n * problem_.h + iy;
    float* row = ring_.data() + (slot * width_ + left_) * problem_.c;
    if (tags_[slot] != tag && problem_.expand) {
      const float* x = problem_.expand_k == 1 && problem_.expand_stride == 1
                           ? problem_.z + ((n * problem_.in_h + iy) * problem_.in_w) * problem_.in_c
                           : Patches(n, iy);
      ExpandRow(x, problem_.expand, problem_.expand_packed, problem_.bias, problem_.act, problem_.w, problem_.cin,
                problem_.c, row);
      tags_[slot] = tag;
    } else if (tags_[slot] != tag) {
      for (int64_t ix = 0; ix < problem_.w; ++ix)
        ForEachChannelBlock(problem_.c, [&](auto lanes, int64_t c0) {
          using L = decltype(lanes);
          const int64_t offset = ix * problem_.c + c0;
          const auto a = (L::Load(z + offset) - L::Load(problem_.mean + c0)) * L::Load(problem_.scale + c0) +
                         L::Load(problem_.bias + c0);
          L::Store(row + offset, Activate<L>(problem_.act, a));
        });
      tags_[slot] = tag;
    }
    return row;
  }

 private:
  // the (w, expand_k * expand_k * in_c) patches of x that the expansion's output row iy multiplies, zero outside x
  const float* Patches(int64_t n, int64_t iy) {
    const int64_t taps = problem_.expand_k, in_c = problem_.in_c;
    for (int64_t ox = 0; ox < problem_.w; ++ox)
      for (int64_t i = 0; i < taps; ++i) {
        const int64_t in_y = iy * problem_.expand_stride + i - problem_.expand_pad_top;
        const int64_t in_x0 = ox * problem_.expand_stride - problem_.expand_pad_left;
        float* dst = patches_.data() + ox * problem_.cin + i * taps * in_c;
        if (in_y < 0 || in_y >= problem_.in_h) {
          std::fill_n(dst, taps * in_c, 0.0f);
          continue;
        }
        const float* src = problem_.z + ((n * problem_.in_h + in_y) * problem_.in_w) * in_c;
        if (in_x0 >= 0 && in_x0 + taps <= problem_.in_w) {  // this row's taps: taps * in_c consecutive values
          for (int64_t v = 0; v < taps * in_c; ++v) dst[v] = src[in_x0 * in_c + v];
          continue;
        }
        for (int64_t j = 0; j < taps; ++j) {
          const int64_t in_x = in_x0 + j;
          for (int64_t v = 0; v < in_c; ++v)
            dst[j * in_c + v] = in_x >= 0 && in_x < problem_.in_w ? src[in_x * in_c + v] : 0.0f;
        }
      }
    return patches_.data();
  }

  const Problem& problem_;
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
inline void TileSums(const float* const* x_rows, int64_t ilo, int64_t ihi, const float* k, int64_t kw, int64_t s,
                     int64_t c, int64_t c0, int64_t x0, float* out, int64_t valid) {
  const int64_t taps = KW ? KW : kw, stride = S ? S : s;
  typename L::Vec acc[kTile] = {};
  for (int64_t i = ilo; i < ihi; ++i) {
    const float* row = x_rows[i] + x0 * c + c0;
    const float* k_row = k + i * taps * c + c0;
    for (int64_t j = 0; j < taps; ++j) {
      const auto tap = L::Load(k_row + j * c);
      for (int64_t t = 0; t < kTile; ++t) acc[t] += L::Load(row + (t * stride + j) * c) * tap;
    }
  }
  for (int64_t t = 0; t < valid; ++t) L::Store(out + t * c, acc[t]);
}

void ForwardRow(const Problem& problem, InputRows& rows, float* y, int64_t n, int64_t oy) {
  const int64_t c = problem.c, s = problem.stride;
  int64_t ilo, ihi;
  TapRange(oy, s, problem.pad_h, problem.kh, problem.h, &ilo, &ihi);
  const float* x_rows[64];
  for (int64_t i = ilo; i < ihi; ++i) x_rows[i] = rows.Row(n, oy * s + i - problem.pad_h);
  float* out = y + ((n * problem.oh + oy) * problem.ow) * c;
  const bool padded = rows.padded();
  for (int64_t ox = 0; ox < problem.ow;) {
    const int64_t x0 = ox * s - problem.pad_w;
    if (padded || (x0 >= 0 && (ox + kTile - 1) * s - problem.pad_w + problem.kw <= problem.w)) {
      const int64_t valid = std::min(kTile, problem.ow - ox);  // (padded rows: the last tile may reach past the row)
      float* out_tile = out + ox * c;
      ForEachChannelBlock(c, [&](auto lanes, int64_t c0) {
        using L = decltype(lanes);
        const int64_t kw = problem.kw;
        if (kw == 3 && s == 1)
          return TileSums<3, 1, L>(x_rows, ilo, ihi, problem.k, kw, s, c, c0, x0, out_tile + c0, valid);
        if (kw == 3 && s == 2)
          return TileSums<3, 2, L>(x_rows, ilo, ihi, problem.k, kw, s, c, c0, x0, out_tile + c0, valid);
        if (kw == 5 && s == 1)
          return TileSums<5, 1, L>(x_rows, ilo, ihi, problem.k, kw, s, c, c0, x0, out_tile + c0, valid);
        if (kw == 5 && s == 2)
          return TileSums<5, 2, L>(x_rows, ilo, ihi, problem.k, kw, s, c, c0, x0, out_tile + c0, valid);
        TileSums<0, 0, L>(x_rows, ilo, ihi, problem.k, kw, s, c, c0, x0, out_tile + c0, valid);
      });
      ox += kTile;
      continue;
    }
    int64_t jlo, jhi;
    TapRange(ox, s, problem.pad_w, problem.kw, problem.w, &jlo, &jhi);
    ForEachChannelBlock(c, [&](auto lanes, int64_t c0) {
      using L = decltype(lanes);
      typename L::Vec acc[2] = {};  // two chains of multiply-adds, for the rows of taps in turn
      for (int64_t i = ilo; i < ihi; ++i)
        for (int64_t j = jlo; j < jhi; ++j)
          acc[i & 1] += L::Load(x_rows[i] + (x0 + j) * c + c0) * L::Load(problem.k + (i * problem.kw + j) * c + c0);
      L::Store(out + ox * c + c0, acc[0] + acc[1]);
    });
    ++ox;
  }
}

// Inference: one output row of act_out(conv(x, k) + out_bias) (k already carrying the BatchNorm multiplier that
// follows the convolution), its channel sums added to row_sum (squeeze-excitation's pooling) when row_sum is set.
void InferenceRow(const Problem& problem, InputRows& rows, Act out_act, const float* out_bias, float* y, float* row_sum,
                  int64_t n, int64_t oy) {
  ForwardRow(problem, rows, y, n, oy);
  const int64_t c = problem.c;
  float* out = y + ((n * problem.oh + oy) * problem.ow) * c;
  ForEachChannelBlock(c, [&](auto lanes, int64_t c0) {
    using L = decltype(lanes);
    const auto bias = L::Load(out_bias + c0);
    typename L::Vec sum = {};
    for (int64_t ox = 0; ox < problem.ow; ++ox) {
      const auto value = Activate<L>(out_act, L::Load(out + ox * c + c0) + bias);
      L::Store(out + ox * c + c0, value);
      sum += value;
    }
    if (row_sum) L::Store(row_sum + c0, sum);
  });
}

// The gradient of row iy of x (sample n): the sum over the taps (i, j) and output positions with
// s*oy + i - pad_h = iy, s*ox + j - pad_w = ix of dy[n, oy, ox] * k[i, j], gathered per position in a register.
void InputGradRow(const Problem& problem, const float* dy, float* out, int64_t n, int64_t iy) {
  const int64_t c = problem.c;
  const float* dy_sample = dy + n * problem.oh * problem.ow * c;
  int64_t rows_i[64], rows_o[64], row_count = 0;
  for (int64_t i = 0; i < problem.kh; ++i) {
    const int64_t out_offset = iy + problem.pad_h - i;
    if (out_offset >= 0 && out_offset % problem.stride == 0 && out_offset / problem.stride < problem.oh)
      rows_i[row_count] = i, rows_o[row_count++] = out_offset / problem.stride;
  }
  for (int64_t ix = 0; ix < problem.w; ++ix) {
    int64_t cols_j[64], cols_o[64], col_count = 0;
    for (int64_t j = 0; j < problem.kw; ++j) {
      const int64_t out_offset = ix + problem.pad_w - j;
      if (out_offset >= 0 && out_offset % problem.stride == 0 && out_offset / problem.stride < problem.ow)
        cols_j[col_count] = j, cols_o[col_count++] = out_offset / problem.stride;
    }
    ForEachChannelBlock(c, [&](auto lanes, int64_t c0) {
      using L = decltype(lanes);
      typename L::Vec acc = {};
      for (int64_t r = 0; r < row_count; ++r)
        for (int64_t q = 0; q < col_count; ++q)
          acc += L::Load(dy_sample + (rows_o[r] * problem.ow + cols_o[q]) * c + c0) *
                 L::Load(problem.k + (rows_i[r] * problem.kw + cols_j[q]) * c + c0);
      L::Store(out + ix * c + c0, acc);
    });
  }
}

// The kernel gradient's terms of output row oy of sample n, added to row_sum (kh, kw, C): for each tap and block
// of channels, the sum over output columns in a register.
void KernelGradRow(const Problem& problem, InputRows& rows, const float* dy, float* row_sum, int64_t n, int64_t oy) {
  const int64_t c = problem.c;
  int64_t ilo, ihi;
  TapRange(oy, problem.stride, problem.pad_h, problem.kh, problem.h, &ilo, &ihi);
  const float* dy_row = dy + ((n * problem.oh + oy) * problem.ow) * c;
  for (int64_t i = ilo; i < ihi; ++i) {
    const float* x_row = rows.Row(n, oy * problem.stride + i - problem.pad_h);
    for (int64_t j = 0; j < problem.kw; ++j) {
      // output columns whose input column s*ox + j - pad_w lies inside the image
      const int64_t lo = std::max<int64_t>(0, (problem.pad_w - j + problem.stride - 1) / problem.stride);
      const int64_t hi = std::min<int64_t>(problem.ow, (problem.w - 1 + problem.pad_w - j) / problem.stride + 1);
      float* sum = row_sum + (i * problem.kw + j) * c;
      ForEachChannelBlock(c, [&](auto lanes, int64_t c0) {
        using L = decltype(lanes);
        typename L::Vec acc = {};
        for (int64_t ox = lo; ox < hi; ++ox)
          acc += L::Load(dy_row + ox * c + c0) * L::Load(x_row + (ox * problem.stride + j - problem.pad_w) * c + c0);
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
void BackwardSample(const Problem& problem, const float* dy, float* dx, float* dk, float* sum_da, float* sum_da_zc,
                    int64_t n) {
  const int64_t c = problem.c, taps = problem.kh * problem.kw;
  Totals da_sum(c), da_zc_sum(c);
  for (int64_t iy = 0; iy < problem.h; ++iy) {
    float* row = dx + ((n * problem.h + iy) * problem.w) * c;
    InputGradRow(problem, dy, row, n, iy);
    if (problem.act == kNone) continue;
    const float* z = problem.z + ((n * problem.h + iy) * problem.w) * c;
    for (int64_t ix = 0; ix < problem.w; ++ix)
      ForEachChannelBlock(c, [&](auto lanes, int64_t c0) {
        using L = decltype(lanes);
        const int64_t offset = ix * c + c0;
        const auto zc = L::Load(z + offset) - L::Load(problem.mean + c0);
        const auto da = L::Load(row + offset) *
                        ActivationGrad<L>(problem.act, zc * L::Load(problem.scale + c0) + L::Load(problem.bias + c0));
        L::Store(row + offset, da);
        L::Store(da_sum.row.data() + c0, L::Load(da_sum.row.data() + c0) + da);
        L::Store(da_zc_sum.row.data() + c0, L::Load(da_zc_sum.row.data() + c0) + da * zc);
      });
    da_sum.EndRow();
    da_zc_sum.EndRow();
  }
  if (problem.act != kNone) {
    da_sum.Write(sum_da + n * c);
    da_zc_sum.Write(sum_da_zc + n * c);
  }
  InputRows rows(problem);
  Totals dk_sum(taps * c);
  for (int64_t oy = 0; oy < problem.oh; ++oy) {
    KernelGradRow(problem, rows, dy, dk_sum.row.data(), n, oy);
    dk_sum.EndRow();
  }
  dk_sum.Write(dk + n * taps * c);
}

using F32 = ffi::Buffer<ffi::F32>;

ffi::Error MakeProblem(F32& z, F32& mean, F32& scale, F32& bias, F32& k, int64_t oh, int64_t ow, int64_t stride,
                       int64_t pad_h, int64_t pad_w, int64_t act, Problem* problem, F32* expand = nullptr,
                       const int64_t* geometry = nullptr) {
  auto z_dims = z.dimensions(), k_dims = k.dimensions();
  if (z_dims.size() != 4) return ffi::Error::InvalidArgument("depthwise: the input must be NHWC");
  const bool expands = expand && expand->element_count() > 0;
  const int64_t c = expands ? expand->dimensions().back() : z_dims[3];
  // the expansion's kernel size, stride and padding (top, bottom, left, right)
  const int64_t expand_k = expands ? geometry[0] : 1, expand_stride = expands ? geometry[1] : 1;
  if (expands && (expand->dimensions().size() != 2 || expand->dimensions()[0] != expand_k * expand_k * z_dims[3] ||
                  expand_k < 1 || expand_stride < 1))
    return ffi::Error::InvalidArgument("depthwise: the expansion must be (k * k * Cin, C)");
  const int64_t h = expands ? (z_dims[1] + geometry[2] + geometry[3] - expand_k) / expand_stride + 1 : z_dims[1];
  const int64_t w = expands ? (z_dims[2] + geometry[4] + geometry[5] - expand_k) / expand_stride + 1 : z_dims[2];
  if (k_dims.size() != 4 || k_dims[2] != 1 || k_dims[3] != c)
    return ffi::Error::InvalidArgument("depthwise: the kernel must be (kh, kw, 1, C)");
  if (k_dims[0] > 64 || k_dims[1] > 64) return ffi::Error::InvalidArgument("depthwise: kernels up to 64 x 64");
  if (act < kNone || act > kRelu6) return ffi::Error::InvalidArgument("depthwise: unknown activation");
  for (F32* buffer : {&mean, &scale, &bias})
    if (buffer->element_count() != c) return ffi::Error::InvalidArgument("depthwise: mean, scale, bias must be (C,)");
  *problem = Problem{z_dims[0], h, w, c, k_dims[0], k_dims[1], oh, ow, stride, pad_h, pad_w, static_cast<Act>(act),
               z.typed_data(), mean.typed_data(), scale.typed_data(), bias.typed_data(), k.typed_data()};
  if (expands) {
    problem->expand = expand->typed_data(), problem->cin = expand_k * expand_k * z_dims[3];
    problem->expand_k = expand_k, problem->expand_stride = expand_stride;
    problem->expand_pad_top = geometry[2], problem->expand_pad_left = geometry[4];
    problem->in_h = z_dims[1], problem->in_w = z_dims[2], problem->in_c = z_dims[3];
  }
  return ffi::Error::Success();
}

ffi::Error Forward(ffi::ThreadPool pool, F32 z, F32 mean, F32 scale, F32 bias, F32 k, ffi::ResultBuffer<ffi::F32> y,
                   int64_t stride, int64_t pad_h, int64_t pad_w, int64_t act) {
  Problem problem;
  auto y_dims = y->dimensions();
  if (auto error = MakeProblem(z, mean, scale, bias, k, y_dims[1], y_dims[2], stride, pad_h, pad_w, act, &problem);
      error.failure())
    return error;
  float* out = y->typed_data();
  // output rows in chunks: enough tasks to balance the threads, each long enough to reuse its input rows
  const int64_t rows = problem.n * problem.oh, chunk = std::max<int64_t>(1, rows / 32);
  ParallelFor(pool, (rows + chunk - 1) / chunk, [&](int64_t t) {
    InputRows input_rows(problem);
    for (int64_t r = t * chunk; r < std::min(rows, (t + 1) * chunk); ++r)
      ForwardRow(problem, input_rows, out, r / problem.oh, r % problem.oh);
  });
  return ffi::Error::Success();
}

// y = act_out(conv(act((z - mean) * scale + bias), k) + out_bias), and each sample's sums of y over positions.
ffi::Error Inference(ffi::ThreadPool pool, F32 z, F32 mean, F32 scale, F32 bias, F32 k, F32 out_bias, F32 expand,
                     ffi::ResultBuffer<ffi::F32> y, ffi::ResultBuffer<ffi::F32> sums, int64_t stride, int64_t pad_h,
                     int64_t pad_w, int64_t act, int64_t out_act, int64_t expand_k, int64_t expand_stride,
                     int64_t expand_pad_top, int64_t expand_pad_bottom, int64_t expand_pad_left,
                     int64_t expand_pad_right) {
  Problem problem;
  auto y_dims = y->dimensions();
  const int64_t geometry[] = {expand_k, expand_stride, expand_pad_top, expand_pad_bottom, expand_pad_left,
                              expand_pad_right};
  if (auto error = MakeProblem(z, mean, scale, bias, k, y_dims[1], y_dims[2], stride, pad_h, pad_w, act, &problem,
                               &expand, geometry);
      error.failure())
    return error;
  if (out_act < kNone || out_act > kRelu6) return ffi::Error::InvalidArgument("depthwise: unknown activation");
  if (out_bias.element_count() != problem.c) return ffi::Error::InvalidArgument("depthwise: out_bias must be (C,)");
  std::vector<float> packed;
  if (problem.expand)
    packed = PackExpansion(problem.expand, problem.cin, problem.c), problem.expand_packed = packed.data();
  // each sample's rows in `parts` chunks: enough tasks to keep every thread busy, each at least 2 kh rows long (a
  // chunk computes the kh - stride input rows it shares with the one before again). Each chunk's sums are kept
  // apart and added in order afterwards, so the result does not depend on the threads' timing.
  const int64_t tasks = 4 * (pool.num_threads() + 1);
  const int64_t parts =
      std::max<int64_t>(1, std::min((tasks + problem.n - 1) / problem.n, problem.oh / (2 * problem.kh)));
  std::vector<double> partial(problem.n * parts * problem.c, 0.0);
  ParallelFor(pool, problem.n * parts, [&](int64_t t) {
    const int64_t n = t / parts, part = t % parts;
    InputRows input_rows(problem);
    std::vector<float> row_sum(problem.c);
    double* total = partial.data() + t * problem.c;
    for (int64_t oy = part * problem.oh / parts; oy < (part + 1) * problem.oh / parts; ++oy) {
      InferenceRow(problem, input_rows, static_cast<Act>(out_act), out_bias.typed_data(), y->typed_data(),
                   row_sum.data(), n, oy);
      for (int64_t ch = 0; ch < problem.c; ++ch) total[ch] += row_sum[ch];
    }
  });
  float* sums_out = sums->typed_data();
  for (int64_t n = 0; n < problem.n; ++n)
    for (int64_t ch = 0; ch < problem.c; ++ch) {
      double sum = 0.0;
      for (int64_t part = 0; part < parts; ++part) sum += partial[(n * parts + part) * problem.c + ch];
      sums_out[n * problem.c + ch] = static_cast<float>(sum);
    }
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::ThreadPool pool, F32 z, F32 mean, F32 scale, F32 bias, F32 k, F32 dy,
                    ffi::ResultBuffer<ffi::F32> dx, ffi::ResultBuffer<ffi::F32> dk,
                    ffi::ResultBuffer<ffi::F32> sum_da, ffi::ResultBuffer<ffi::F32> sum_da_zc, int64_t stride,
                    int64_t pad_h, int64_t pad_w, int64_t act) {
  Problem problem;
  auto dy_dims = dy.dimensions();
  if (auto error = MakeProblem(z, mean, scale, bias, k, dy_dims[1], dy_dims[2], stride, pad_h, pad_w, act, &problem);
      error.failure())
    return error;
  if (act == kNone) {  // no sums to report
    std::fill_n(sum_da->typed_data(), sum_da->element_count(), 0.0f);
    std::fill_n(sum_da_zc->typed_data(), sum_da_zc->element_count(), 0.0f);
  }
  ParallelFor(pool, problem.n, [&](int64_t n) {
    BackwardSample(problem, dy.typed_data(), dx->typed_data(), dk->typed_data(), sum_da->typed_data(),
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
