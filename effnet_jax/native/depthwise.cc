// Depthwise convolution (NHWC, float32) for XLA's CPU backend, as XLA FFI handlers.
//
// Built and loaded at run time by effnet_jax/native.py (g++ or clang++ with jaxlib's FFI headers); layers.py
// uses it through `depthwise_impl='native'` ('auto' on CPU when it builds). Same numbers as the shifted sum in
// layers.py: y[n, oy, ox, c] = sum_{i, j} x[n, s*oy + i - pad_h, s*ox + j - pad_w, c] * k[i, j, c], zero outside x.
//
// Why: XLA writes the k*k shifted multiply-adds as fusions that re-read the padded input once per tap and, in the
// backward pass, once per tap again for the kernel gradient. Here each pass walks the image row by row: an
// output row reads its k input rows while they sit in cache, and the backward pass computes dx and the kernel
// gradient from one read of g and x.
//
// Work is split over XLA's intra-op thread pool (the FFI ThreadPool); the calling thread works too, so the
// handler finishes even when no pool thread is free.

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Runs body(task) for task in [0, tasks) on the caller and up to (pool threads) helpers.
template <typename Body>
void ParallelFor(ffi::ThreadPool& pool, int64_t tasks, const Body& body) {
  if (tasks <= 0) return;
  int64_t helpers = std::min<int64_t>(pool.num_threads(), tasks - 1);
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
  // starts late sees no work and touches only `state`, which it co-owns
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

struct Geometry {
  int64_t n, h, w, c, kh, kw, oh, ow, stride, pad_h, pad_w;
};

// W channels of float32 in one register (GCC/Clang vector extension): 16 is one AVX-512 vector, 8 one AVX
// vector; W = 1 is a plain float, for channel counts that are not multiples of 8.
template <int W>
struct Lanes {
  typedef float V __attribute__((vector_size(W * sizeof(float))));
  static V Load(const float* p) {
    V v;
    std::memcpy(&v, p, sizeof(V));
    return v;
  }
  static void Store(float* p, V v) { std::memcpy(p, &v, sizeof(V)); }
};
template <>
struct Lanes<1> {
  using V = float;
  static V Load(const float* p) { return *p; }
  static void Store(float* p, V v) { *p = v; }
};

// block(Lanes<W>, c0) for consecutive channel blocks covering [0, c): 16 wide, then 8, then one at a time.
template <typename Block>
inline void ForEachChannelBlock(int64_t c, const Block& block) {
  int64_t c0 = 0;
  for (; c0 + 16 <= c; c0 += 16) block(Lanes<16>(), c0);
  for (; c0 + 8 <= c; c0 += 8) block(Lanes<8>(), c0);
  for (; c0 < c; ++c0) block(Lanes<1>(), c0);
}

// The taps [lo, hi) (of `taps` along one axis) whose input index s*o + tap - pad lies in [0, size), for output
// index o.
inline void TapRange(int64_t o, int64_t stride, int64_t pad, int64_t taps, int64_t size, int64_t* lo, int64_t* hi) {
  *lo = std::max<int64_t>(0, pad - o * stride);
  *hi = std::min<int64_t>(taps, size + pad - o * stride);
}

// One output row y[n, oy, :, :]: each output position and block of channels summed over its taps in a register.
void ForwardRow(const Geometry& g, const float* x, const float* k, float* y, int64_t n, int64_t oy) {
  const int64_t c = g.c;
  int64_t ilo, ihi;
  TapRange(oy, g.stride, g.pad_h, g.kh, g.h, &ilo, &ihi);
  const float* xn = x + n * g.h * g.w * c;
  float* out = y + ((n * g.oh + oy) * g.ow) * c;
  for (int64_t ox = 0; ox < g.ow; ++ox) {
    int64_t jlo, jhi;
    TapRange(ox, g.stride, g.pad_w, g.kw, g.w, &jlo, &jhi);
    const float* corner = xn + ((oy * g.stride - g.pad_h) * g.w + ox * g.stride - g.pad_w) * c;
    ForEachChannelBlock(c, [&](auto lanes, int64_t c0) {
      using L = decltype(lanes);
      typename L::V acc = {};
      for (int64_t i = ilo; i < ihi; ++i)
        for (int64_t j = jlo; j < jhi; ++j)
          acc += L::Load(corner + (i * g.w + j) * c + c0) * L::Load(k + (i * g.kw + j) * c + c0);
      L::Store(out + ox * c + c0, acc);
    });
  }
}

// dx[n, iy, :, :]: the sum over the taps (i, j) and output positions with s*oy + i - pad_h = iy,
// s*ox + j - pad_w = ix of dy[n, oy, ox] * k[i, j], gathered per input position in a register.
void InputGradRow(const Geometry& g, const float* k, const float* dy, float* dx, int64_t n, int64_t iy) {
  const int64_t c = g.c;
  const float* gn = dy + n * g.oh * g.ow * c;
  float* out = dx + ((n * g.h + iy) * g.w) * c;
  std::vector<int64_t> rows_i, rows_o, cols_j, cols_o;
  for (int64_t i = 0; i < g.kh; ++i) {
    const int64_t t = iy + g.pad_h - i;
    if (t >= 0 && t % g.stride == 0 && t / g.stride < g.oh) rows_i.push_back(i), rows_o.push_back(t / g.stride);
  }
  for (int64_t ix = 0; ix < g.w; ++ix) {
    cols_j.clear(), cols_o.clear();
    for (int64_t j = 0; j < g.kw; ++j) {
      const int64_t t = ix + g.pad_w - j;
      if (t >= 0 && t % g.stride == 0 && t / g.stride < g.ow) cols_j.push_back(j), cols_o.push_back(t / g.stride);
    }
    ForEachChannelBlock(c, [&](auto lanes, int64_t c0) {
      using L = decltype(lanes);
      typename L::V acc = {};
      for (size_t r = 0; r < rows_i.size(); ++r)
        for (size_t q = 0; q < cols_j.size(); ++q)
          acc += L::Load(gn + (rows_o[r] * g.ow + cols_o[q]) * c + c0) *
                 L::Load(k + (rows_i[r] * g.kw + cols_j[q]) * c + c0);
      L::Store(out + ix * c + c0, acc);
    });
  }
}

// The kernel gradient's terms of output row oy of sample n, added to row_sum (kh, kw, C): for each tap and block
// of channels, the sum over output columns in a register.
void KernelGradRow(const Geometry& g, const float* x, const float* dy, float* row_sum, int64_t n, int64_t oy) {
  const int64_t c = g.c;
  int64_t ilo, ihi;
  TapRange(oy, g.stride, g.pad_h, g.kh, g.h, &ilo, &ihi);
  const float* grow = dy + ((n * g.oh + oy) * g.ow) * c;
  for (int64_t i = ilo; i < ihi; ++i) {
    const float* xrow = x + ((n * g.h + oy * g.stride + i - g.pad_h) * g.w) * c;
    for (int64_t j = 0; j < g.kw; ++j) {
      // output columns whose input column s*ox + j - pad_w lies inside the image
      const int64_t lo = std::max<int64_t>(0, (g.pad_w - j + g.stride - 1) / g.stride);
      const int64_t hi = std::min<int64_t>(g.ow, (g.w - 1 + g.pad_w - j) / g.stride + 1);
      float* sum = row_sum + (i * g.kw + j) * c;
      ForEachChannelBlock(c, [&](auto lanes, int64_t c0) {
        using L = decltype(lanes);
        typename L::V acc = {};
        for (int64_t ox = lo; ox < hi; ++ox)
          acc += L::Load(grow + ox * c + c0) * L::Load(xrow + (ox * g.stride + j - g.pad_w) * c + c0);
        L::Store(sum + c0, L::Load(sum + c0) + acc);
      });
    }
  }
}

// dx[n] and the kernel gradient of sample n (dk[n], summed over the batch by the caller).
void BackwardSample(const Geometry& g, const float* x, const float* k, const float* dy, float* dx, float* dk,
                    int64_t n) {
  const int64_t c = g.c, taps = g.kh * g.kw;
  for (int64_t iy = 0; iy < g.h; ++iy) InputGradRow(g, k, dy, dx, n, iy);
  // row sums in float32 (ow terms each), their total over rows in float64
  std::vector<double> total(taps * c, 0.0);
  std::vector<float> row_sum(taps * c);
  for (int64_t oy = 0; oy < g.oh; ++oy) {
    std::fill(row_sum.begin(), row_sum.end(), 0.0f);
    KernelGradRow(g, x, dy, row_sum.data(), n, oy);
    for (int64_t t = 0; t < taps * c; ++t) total[t] += row_sum[t];
  }
  float* dkn = dk + n * taps * c;
  for (int64_t t = 0; t < taps * c; ++t) dkn[t] = static_cast<float>(total[t]);
}

Geometry MakeGeometry(ffi::Buffer<ffi::F32>& x, ffi::Buffer<ffi::F32>& k, int64_t oh, int64_t ow, int64_t stride,
                      int64_t pad_h, int64_t pad_w) {
  auto xd = x.dimensions();
  auto kd = k.dimensions();
  return Geometry{xd[0], xd[1], xd[2], xd[3], kd[0], kd[1], oh, ow, stride, pad_h, pad_w};
}

ffi::Error CheckShapes(ffi::Buffer<ffi::F32>& x, ffi::Buffer<ffi::F32>& k) {
  if (x.dimensions().size() != 4) return ffi::Error::InvalidArgument("depthwise: x must be NHWC");
  if (k.dimensions().size() != 4 || k.dimensions()[2] != 1 || k.dimensions()[3] != x.dimensions()[3])
    return ffi::Error::InvalidArgument("depthwise: kernel must be (kh, kw, 1, C)");
  return ffi::Error::Success();
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> k,
                   ffi::ResultBuffer<ffi::F32> y, int64_t stride, int64_t pad_h, int64_t pad_w) {
  if (auto e = CheckShapes(x, k); e.failure()) return e;
  auto yd = y->dimensions();
  const Geometry g = MakeGeometry(x, k, yd[1], yd[2], stride, pad_h, pad_w);
  const float* xp = x.typed_data();
  const float* kp = k.typed_data();
  float* yp = y->typed_data();
  // rows in chunks: enough tasks to balance, few enough that claiming one costs nothing
  const int64_t rows = g.n * g.oh;
  const int64_t chunk = std::max<int64_t>(1, rows / 64);
  ParallelFor(pool, (rows + chunk - 1) / chunk, [&](int64_t t) {
    for (int64_t r = t * chunk; r < std::min(rows, (t + 1) * chunk); ++r) ForwardRow(g, xp, kp, yp, r / g.oh, r % g.oh);
  });
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> k,
                    ffi::Buffer<ffi::F32> dy, ffi::ResultBuffer<ffi::F32> dx, ffi::ResultBuffer<ffi::F32> dk,
                    int64_t stride, int64_t pad_h, int64_t pad_w) {
  if (auto e = CheckShapes(x, k); e.failure()) return e;
  auto gd = dy.dimensions();
  const Geometry g = MakeGeometry(x, k, gd[1], gd[2], stride, pad_h, pad_w);
  const float* xp = x.typed_data();
  const float* kp = k.typed_data();
  const float* gp = dy.typed_data();
  float* dxp = dx->typed_data();
  float* dkp = dk->typed_data();
  ParallelFor(pool, g.n, [&](int64_t n) { BackwardSample(g, xp, kp, gp, dxp, dkp, n); });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(EffnetDepthwiseForward, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("stride")
                                  .Attr<int64_t>("pad_h")
                                  .Attr<int64_t>("pad_w"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(EffnetDepthwiseBackward, Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("stride")
                                  .Attr<int64_t>("pad_h")
                                  .Attr<int64_t>("pad_w"));
