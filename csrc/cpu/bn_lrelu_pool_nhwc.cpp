// CPU kernels of bn_lrelu_pool for channels-last x: the same three ops and the same math as
// bn_lrelu_pool.cpp (see its header comment for the notation), for x stored [n, H, W, G] in memory
// (logical shape [n, G, H, W], torch.channels_last). The pooled tensors (y, grad_y, indices,
// d grad_y) are channels-last too, and grad_x / d x take x's layout.
//
// Why a second layout: on the CPU, oneDNN's grouped convolutions around this op are 10-14% faster
// in channels-last, and a 3-channel first layer's forward up to 2.8x (benchmarks/RESULTS.md);
// converting between the layouts costs more than that, so the op reads and writes channels-last.
//
// Layout of the work: each thread takes one contiguous range of channels (a "block", a whole
// number of cache lines where G allows) and every loop runs over the n*H*W rows (or n*Ho*Wo
// windows) with the block's channels innermost: each statement is a vector loop over contiguous
// channels, with no gathers (a window's four corners are four contiguous loads, its argmax a
// blend) and no short rows, and the passes stream through memory. Per-channel values (the
// affine constants, the sums) live in per-thread arrays of the block's width. Sums run in the
// input dtype over kRowBlock rows (or one row of windows) and accumulate in double across them,
// as in the NCHW kernels.
#include "bn_lrelu_pool_nhwc.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <type_traits>
#include <vector>

#include "../bn_lrelu_pool.h"
#include "simd.h"

namespace mamlpp_fast {
namespace {

using acc_t = double;

constexpr int64_t kRowBlock = 1024;
// Minimum elements handled by one parallel task, so small problems stay on the calling thread.
constexpr int64_t kGrainElements = 32768;

template <typename T>
constexpr int64_t kLineChannels = 64 / static_cast<int64_t>(sizeof(T));  // one cache line

struct Geometry {
  int64_t n, G, H, W, Ho, Wo;
  int64_t rows() const { return n * H * W; }
  // The row of element (i, h, w), the top-left corner of window (i, oh, ow) at h = 2 oh, w = 2 ow.
  int64_t row(int64_t i, int64_t h, int64_t w) const { return (i * H + h) * W + w; }
};

Geometry geometry(const at::Tensor& x) {
  return {x.size(0), x.size(1), x.size(2), x.size(3), x.size(2) / 2, x.size(3) / 2};
}

template <typename T>
MAMLPP_FAST_ALWAYS_INLINE T lrelu_slope(T z, T slope) {
  return z > 0 ? T(1) : slope;
}

// The value at window position k (0..3, row-major) of four values already loaded: selects
// between values, which vectorise as blends (a select between loads would be a branch).
template <typename T>
MAMLPP_FAST_ALWAYS_INLINE T at_position(int32_t k, T v0, T v1, T v2, T v3) {
  const T top = (k & 1) ? v1 : v0;
  const T bottom = (k & 1) ? v3 : v2;
  return (k & 2) ? bottom : top;
}

// Per-thread arrays of one value per channel of the block.
template <typename T>
struct PerChannel {
  std::vector<T> data;
  PerChannel(int64_t count, int64_t width) : data(count * width) {}
  T* operator()(int64_t which, int64_t width) { return data.data() + which * width; }
};

// ---------------------------------------------------------------------------------------------
// statistics: per channel, sum over rows of x, then of (x - mean)^2, or of h and h (x - mean)

template <typename T>
MAMLPP_FAST_SIMD_CLONES void block_sum(const T* __restrict__ x, int64_t rows, int64_t G, int64_t nc,
                                       T* __restrict__ part, acc_t* __restrict__ total) {
  for (int64_t rb = 0; rb < rows; rb += kRowBlock) {
    const int64_t re = std::min(rows, rb + kRowBlock);
    std::fill(part, part + nc, T(0));
    for (int64_t r = rb; r < re; ++r) {
      const T* __restrict__ xr = x + r * G;
      MAMLPP_FAST_SIMD
      for (int64_t c = 0; c < nc; ++c) part[c] += xr[c];
    }
    for (int64_t c = 0; c < nc; ++c) total[c] += part[c];
  }
}

template <typename T>
MAMLPP_FAST_SIMD_CLONES void block_sum_sq_dev(const T* __restrict__ x, int64_t rows, int64_t G, int64_t nc,
                                              const T* __restrict__ mean, T* __restrict__ part,
                                              acc_t* __restrict__ total) {
  for (int64_t rb = 0; rb < rows; rb += kRowBlock) {
    const int64_t re = std::min(rows, rb + kRowBlock);
    std::fill(part, part + nc, T(0));
    for (int64_t r = rb; r < re; ++r) {
      const T* __restrict__ xr = x + r * G;
      MAMLPP_FAST_SIMD
      for (int64_t c = 0; c < nc; ++c) {
        const T d = xr[c] - mean[c];
        part[c] += d * d;
      }
    }
    for (int64_t c = 0; c < nc; ++c) total[c] += part[c];
  }
}

template <typename T>
MAMLPP_FAST_SIMD_CLONES void block_sum_h(const T* __restrict__ h, const T* __restrict__ x, int64_t rows,
                                         int64_t G, int64_t nc, const T* __restrict__ mean,
                                         T* __restrict__ part_h, T* __restrict__ part_hx,
                                         acc_t* __restrict__ s_h, acc_t* __restrict__ s_hx) {
  for (int64_t rb = 0; rb < rows; rb += kRowBlock) {
    const int64_t re = std::min(rows, rb + kRowBlock);
    std::fill(part_h, part_h + nc, T(0));
    std::fill(part_hx, part_hx + nc, T(0));
    for (int64_t r = rb; r < re; ++r) {
      const T* __restrict__ hr = h + r * G;
      const T* __restrict__ xr = x + r * G;
      MAMLPP_FAST_SIMD
      for (int64_t c = 0; c < nc; ++c) {
        part_h[c] += hr[c];
        part_hx[c] += hr[c] * (xr[c] - mean[c]);
      }
    }
    for (int64_t c = 0; c < nc; ++c) {
      s_h[c] += part_h[c];
      s_hx[c] += part_hx[c];
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Window loops. They touch the uint8 indices beside float data, and with a run-time trip count gcc
// sizes such loops' vectors by the byte type (64 lanes of a 512-bit vector), which would leave a
// block of 48 channels (mini-ImageNet's 96 over two threads) to the scalar remainder. So each
// window's channels run in chunks of kChunk, a compile-time trip count (kWidth = kChunk), and a
// last partial chunk with a run-time one (kWidth = 0); within a chunk the indices are widened to
// int32 first (or narrowed after), so that the float loop holds no byte type. The chunk functions take pointers already
// offset to the chunk's first channel; `G` is the row stride (x0[G] is the window's top-right).
constexpr int64_t kChunk = 16;

#define MAMLPP_FAST_FOR_CHUNKS(nc, CALL)                                           \
  do {                                                                             \
    int64_t c0 = 0;                                                                \
    for (; c0 + kChunk <= (nc); c0 += kChunk) CALL(kChunk, c0, kChunk);            \
    if (c0 < (nc)) CALL(0, c0, (nc) - c0);                                         \
  } while (0)

// forward: y = max of leaky_relu(alpha x + shift) over the window, idx its first argmax, with the
// same selects as forward_plane in bn_lrelu_pool.cpp (NaN: the last position).
template <typename T, int64_t kWidth>
MAMLPP_FAST_ALWAYS_INLINE void forward_chunk(const T* __restrict__ x0, const T* __restrict__ x2,
                                             T* __restrict__ y, uint8_t* __restrict__ idx,
                                             const T* __restrict__ alpha, const T* __restrict__ shift,
                                             T slope, int64_t G, int64_t width) {
  const int64_t nw = kWidth ? kWidth : width;
  alignas(64) int32_t args[kChunk];
  MAMLPP_FAST_SIMD
  for (int64_t c = 0; c < nw; ++c) {
    T z = x0[c] * alpha[c] + shift[c];
    T best = z > 0 ? z : z * slope;
    int32_t arg = 0;
    z = x0[c + G] * alpha[c] + shift[c];
    T a = z > 0 ? z : z * slope;
    arg = !(a <= best) ? 1 : arg;
    best = std::max(best, a);
    z = x2[c] * alpha[c] + shift[c];
    a = z > 0 ? z : z * slope;
    arg = !(a <= best) ? 2 : arg;
    best = std::max(best, a);
    z = x2[c + G] * alpha[c] + shift[c];
    a = z > 0 ? z : z * slope;
    arg = !(a <= best) ? 3 : arg;
    best = std::max(best, a);
    y[c] = best;
    args[c] = arg;
  }
  for (int64_t c = 0; c < nw; ++c) idx[c] = static_cast<uint8_t>(args[c]);
}

template <typename T>
MAMLPP_FAST_SIMD_CLONES void block_forward_windows(const T* __restrict__ x, T* __restrict__ y,
                                                   uint8_t* __restrict__ idx, const Geometry& geo,
                                                   int64_t nc, const T* __restrict__ alpha,
                                                   const T* __restrict__ shift, T slope) {
  const int64_t G = geo.G, W = geo.W;
  for (int64_t i = 0; i < geo.n; ++i) {
    for (int64_t oh = 0; oh < geo.Ho; ++oh) {
      for (int64_t ow = 0; ow < geo.Wo; ++ow) {
        const T* x0 = x + geo.row(i, 2 * oh, 2 * ow) * G;
        const T* x2 = x0 + W * G;
        const int64_t j = (i * geo.Ho + oh) * geo.Wo + ow;
#define MAMLPP_FAST_CALL(K, c, w) \
  forward_chunk<T, K>(x0 + (c), x2 + (c), y + j * G + (c), idx + j * G + (c), alpha + (c), shift + (c), slope, G, w)
        MAMLPP_FAST_FOR_CHUNKS(nc, MAMLPP_FAST_CALL);
#undef MAMLPP_FAST_CALL
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// backward passes. Over the windows: xv (and hv) = x (and hx) at the argmax, selected from the four
// corners; u = gy D(xv). Elements no window covers (the last row/column of odd H/W) get only the
// dense part of their output.

// One window's chunk of the argmax sums: pa += u, pb += u (xv - mean), with h pd += u hv.
// Returns the number of indices above 3 (k >> 2 summed; zero for the forward's indices).
template <typename T, bool kWithH, int64_t kWidth>
MAMLPP_FAST_ALWAYS_INLINE int32_t argmax_sums_chunk(const T* __restrict__ x0, const T* __restrict__ x2,
                                                    const T* __restrict__ h0, const T* __restrict__ h2,
                                                    const T* __restrict__ gy, const uint8_t* __restrict__ idx,
                                                    const T* __restrict__ alpha, const T* __restrict__ shift,
                                                    const T* __restrict__ mean, T slope, T* __restrict__ pa,
                                                    T* __restrict__ pb, T* __restrict__ pd, int64_t G,
                                                    int64_t width) {
  const int64_t nw = kWidth ? kWidth : width;
  alignas(64) int32_t ks[kChunk];
  for (int64_t c = 0; c < nw; ++c) ks[c] = idx[c];
  int32_t out_of_range = 0;
  MAMLPP_FAST_SIMD_REDUCE(out_of_range)
  for (int64_t c = 0; c < nw; ++c) {
    const int32_t k = ks[c];
    out_of_range += k >> 2;
    const T xv = at_position(k, x0[c], x0[c + G], x2[c], x2[c + G]);
    const T u = gy[c] * lrelu_slope(xv * alpha[c] + shift[c], slope);
    pa[c] += u;
    pb[c] += u * (xv - mean[c]);
    if constexpr (kWithH) pd[c] += u * at_position(k, h0[c], h0[c + G], h2[c], h2[c + G]);
  }
  return out_of_range;
}

// s_u += sum u, s_ux += sum u (x - mean), with h s_uh += sum u h. Returns false if some index is
// not 0..3 (the sums are then meaningless and must not be used).
template <typename T, bool kWithH>
MAMLPP_FAST_SIMD_CLONES bool block_argmax_sums(const T* __restrict__ x, const T* __restrict__ h,
                                               const T* __restrict__ gy, const uint8_t* __restrict__ idx,
                                               const Geometry& geo, int64_t nc, const T* __restrict__ alpha,
                                               const T* __restrict__ shift, const T* __restrict__ mean,
                                               T slope, T* __restrict__ pa, T* __restrict__ pb,
                                               T* __restrict__ pd, acc_t* __restrict__ s_u,
                                               acc_t* __restrict__ s_ux, acc_t* __restrict__ s_uh) {
  const int64_t G = geo.G, W = geo.W;
  int32_t out_of_range = 0;
  // Sums run in T over one row of windows, then move to double.
  for (int64_t io = 0; io < geo.n * geo.Ho; ++io) {
    const int64_t i = io / geo.Ho, oh = io - i * geo.Ho;
    std::fill(pa, pa + nc, T(0));
    std::fill(pb, pb + nc, T(0));
    if constexpr (kWithH) std::fill(pd, pd + nc, T(0));
    for (int64_t ow = 0; ow < geo.Wo; ++ow) {
      const int64_t r = geo.row(i, 2 * oh, 2 * ow), j = io * geo.Wo + ow;
      const T* x0 = x + r * G;
      const T* x2 = x0 + W * G;
      const T* h0 = kWithH ? h + r * G : nullptr;
      const T* h2 = kWithH ? h0 + W * G : nullptr;
#define MAMLPP_FAST_CALL(K, c, w)                                                                          \
  out_of_range += argmax_sums_chunk<T, kWithH, K>(                                                         \
      x0 + (c), x2 + (c), kWithH ? h0 + (c) : nullptr, kWithH ? h2 + (c) : nullptr, gy + j * G + (c),      \
      idx + j * G + (c), alpha + (c), shift + (c), mean + (c), slope, pa + (c), pb + (c),                  \
      kWithH ? pd + (c) : nullptr, G, w)
      MAMLPP_FAST_FOR_CHUNKS(nc, MAMLPP_FAST_CALL);
#undef MAMLPP_FAST_CALL
    }
    for (int64_t c = 0; c < nc; ++c) {
      s_u[c] += pa[c];
      s_ux[c] += pb[c];
      if constexpr (kWithH) s_uh[c] += pd[c];
    }
  }
  return out_of_range == 0;
}

// Per-channel coefficients of the output pass (arrays of the block's width):
//   out = e1 (x - mean) + e0 (+ e_h h),   + su_coef u at each window's argmax,
//   d gy = D(xv) (wr (hv - hm) + (hw_r - cr) (xv - mean) + hb) per window (double backward).
template <typename T>
struct OutputCoefficients {
  const T *e1, *e0, *e_h, *su_coef;
  const T *wr, *hm, *cr, *hw_r, *hb;

  OutputCoefficients offset(int64_t c) const {
    auto at = [c](const T* p) { return p ? p + c : nullptr; };
    return {at(e1), at(e0), at(e_h), at(su_coef), at(wr), at(hm), at(cr), at(hw_r), at(hb)};
  }
};

template <typename T, bool kWithH>
MAMLPP_FAST_ALWAYS_INLINE void dense_element(T* __restrict__ out, const T* __restrict__ x,
                                             const T* __restrict__ h, int64_t nc, const T* __restrict__ mean,
                                             const OutputCoefficients<T>& q) {
  for (int64_t c = 0; c < nc; ++c) {
    T v = q.e1[c] * (x[c] - mean[c]) + q.e0[c];
    if constexpr (kWithH) v += q.e_h[c] * h[c];
    out[c] = v;
  }
}

// One window's chunk of the output pass: its four elements of `out`, and with kDgy its d gy.
template <typename T, bool kWithH, bool kDgy, int64_t kWidth>
MAMLPP_FAST_ALWAYS_INLINE void outputs_chunk(T* __restrict__ o0, T* __restrict__ o2, T* __restrict__ dgy,
                                             const T* __restrict__ x0, const T* __restrict__ x2,
                                             const T* __restrict__ h0, const T* __restrict__ h2,
                                             const T* __restrict__ gy, const uint8_t* __restrict__ idx,
                                             const T* __restrict__ alpha, const T* __restrict__ shift,
                                             const T* __restrict__ mean, T slope, const OutputCoefficients<T> q,
                                             int64_t G, int64_t width) {
  const int64_t nw = kWidth ? kWidth : width;
  const T* __restrict__ e1 = q.e1;
  const T* __restrict__ e0 = q.e0;
  const T* __restrict__ e_h = q.e_h;
  const T* __restrict__ su_coef = q.su_coef;
  alignas(64) int32_t ks[kChunk];
  for (int64_t c = 0; c < nw; ++c) ks[c] = idx[c];
  MAMLPP_FAST_SIMD
  for (int64_t c = 0; c < nw; ++c) {
    const int32_t k = ks[c];
    const T v0 = x0[c], v1 = x0[c + G], v2 = x2[c], v3 = x2[c + G];
    const T xv = at_position(k, v0, v1, v2, v3);
    const T d = lrelu_slope(xv * alpha[c] + shift[c], slope);
    const T s = su_coef[c] * (gy[c] * d);  // su_coef u
    T w0 = e1[c] * (v0 - mean[c]) + e0[c];
    T w1 = e1[c] * (v1 - mean[c]) + e0[c];
    T w2 = e1[c] * (v2 - mean[c]) + e0[c];
    T w3 = e1[c] * (v3 - mean[c]) + e0[c];
    T hv = 0;
    if constexpr (kWithH) {
      const T g0 = h0[c], g1 = h0[c + G], g2 = h2[c], g3 = h2[c + G];
      w0 += e_h[c] * g0;
      w1 += e_h[c] * g1;
      w2 += e_h[c] * g2;
      w3 += e_h[c] * g3;
      hv = at_position(k, g0, g1, g2, g3);
    }
    o0[c] = w0 + (k == 0 ? s : T(0));
    o0[c + G] = w1 + (k == 1 ? s : T(0));
    o2[c] = w2 + (k == 2 ? s : T(0));
    o2[c + G] = w3 + (k == 3 ? s : T(0));
    if constexpr (kDgy) {
      dgy[c] = d * (q.wr[c] * (hv - q.hm[c]) + (q.hw_r[c] - q.cr[c]) * (xv - mean[c]) + q.hb[c]);
    }
  }
}

template <typename T, bool kWithH, bool kDgy>
MAMLPP_FAST_SIMD_CLONES void block_outputs(T* __restrict__ out, T* __restrict__ dgy, const T* __restrict__ x,
                                           const T* __restrict__ h, const T* __restrict__ gy,
                                           const uint8_t* __restrict__ idx, const Geometry& geo, int64_t nc,
                                           const T* __restrict__ alpha, const T* __restrict__ shift,
                                           const T* __restrict__ mean, T slope, const OutputCoefficients<T>& q) {
  const int64_t G = geo.G, W = geo.W;
  for (int64_t i = 0; i < geo.n; ++i) {
    for (int64_t oh = 0; oh < geo.Ho; ++oh) {
      for (int64_t ow = 0; ow < geo.Wo; ++ow) {
        const int64_t r = geo.row(i, 2 * oh, 2 * ow), j = (i * geo.Ho + oh) * geo.Wo + ow;
        const int64_t o = r * G, o2 = (r + W) * G;
#define MAMLPP_FAST_CALL(K, c, w)                                                                         \
  outputs_chunk<T, kWithH, kDgy, K>(out + o + (c), out + o2 + (c), kDgy ? dgy + j * G + (c) : nullptr,      \
                                    x + o + (c), x + o2 + (c), kWithH ? h + o + (c) : nullptr,              \
                                    kWithH ? h + o2 + (c) : nullptr, gy + j * G + (c), idx + j * G + (c),   \
                                    alpha + (c), shift + (c), mean + (c), slope, q.offset(c), G, w)
        MAMLPP_FAST_FOR_CHUNKS(nc, MAMLPP_FAST_CALL);
#undef MAMLPP_FAST_CALL
      }
    }
    // The last column and row of odd W / H belong to no window: dense part only.
    if (geo.W % 2) {
      for (int64_t hh = 0; hh < 2 * geo.Ho; ++hh) {
        const int64_t rr = geo.row(i, hh, geo.W - 1) * G;
        dense_element<T, kWithH>(out + rr, x + rr, kWithH ? h + rr : nullptr, nc, mean, q);
      }
    }
    if (geo.H % 2) {
      for (int64_t ww = 0; ww < geo.W; ++ww) {
        const int64_t rr = geo.row(i, geo.H - 1, ww) * G;
        dense_element<T, kWithH>(out + rr, x + rr, kWithH ? h + rr : nullptr, nc, mean, q);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// drivers

// Calls body(c0, nc) for the channel range of each parallel task: whole cache lines of channels,
// split over the threads, at least kGrainElements elements a task.
template <typename T, typename F>
void for_each_block(const Geometry& geo, F&& body) {
  constexpr int64_t L = kLineChannels<T>;
  const int64_t lines = (geo.G + L - 1) / L;
  const int64_t grain = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, geo.rows() * L));
  at::parallel_for(0, lines, grain, [&](int64_t l0, int64_t l1) {
    const int64_t c0 = l0 * L;
    body(c0, std::min(geo.G, l1 * L) - c0);
  });
}

// The per-channel batch-norm constants of a block: z = x alpha + shift, and the mean.
template <typename T>
void block_affine(const T* w, const T* b, const T* m, const T* r, int64_t c0, int64_t nc, T* alpha,
                  T* shift, T* mean) {
  for (int64_t c = 0; c < nc; ++c) {
    const BnAffine<T> a = bn_affine(w[c0 + c], b[c0 + c], m[c0 + c], r[c0 + c]);
    alpha[c] = a.alpha;
    shift[c] = a.shift;
    mean[c] = m[c0 + c];
  }
}

[[noreturn]] void invalid_indices(const char* op) {
  TORCH_CHECK(false, op, ": indices must hold argmax positions 0..3 within each 2x2 window (the "
              "forward's output for x), got a larger value");
}

template <typename T>
void forward_nhwc(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, double eps,
                  double slope_d, at::Tensor& y, at::Tensor& mean_out, at::Tensor& invstd_out,
                  at::Tensor& indices) {
  const Geometry geo = geometry(x);
  const T *xp = x.data_ptr<T>(), *wp = weight.data_ptr<T>(), *bp = bias.data_ptr<T>();
  T *yp = y.data_ptr<T>(), *mp = mean_out.data_ptr<T>(), *rp = invstd_out.data_ptr<T>();
  uint8_t* ip = indices.data_ptr<uint8_t>();
  const T slope = static_cast<T>(slope_d);
  const acc_t M = static_cast<acc_t>(geo.rows());

  for_each_block<T>(geo, [&](int64_t c0, int64_t nc) {
    PerChannel<T> v(4, nc);  // partial sums, alpha, shift, mean
    std::vector<acc_t> sum(nc, 0), sq(nc, 0);
    T *part = v(0, nc), *alpha = v(1, nc), *shift = v(2, nc), *mean = v(3, nc);
    block_sum(xp + c0, geo.rows(), geo.G, nc, part, sum.data());
    for (int64_t c = 0; c < nc; ++c) mean[c] = static_cast<T>(sum[c] / M);
    block_sum_sq_dev(xp + c0, geo.rows(), geo.G, nc, mean, part, sq.data());
    for (int64_t c = 0; c < nc; ++c) {
      const T invstd = static_cast<T>(1.0 / std::sqrt(sq[c] / M + eps));
      mp[c0 + c] = mean[c];
      rp[c0 + c] = invstd;
      const BnAffine<T> a = bn_affine(wp[c0 + c], bp[c0 + c], mean[c], invstd);
      alpha[c] = a.alpha;
      shift[c] = a.shift;
    }
    block_forward_windows(xp + c0, yp + c0, ip + c0, geo, nc, alpha, shift, slope);
  });
}

template <typename T>
void backward_nhwc(const at::Tensor& gy, const at::Tensor& x, const at::Tensor& weight,
                   const at::Tensor& bias, const at::Tensor& mean, const at::Tensor& invstd,
                   const at::Tensor& indices, double slope_d, at::Tensor& gx, at::Tensor& gw,
                   at::Tensor& gb) {
  const Geometry geo = geometry(x);
  const T *gyp = gy.data_ptr<T>(), *xp = x.data_ptr<T>(), *wp = weight.data_ptr<T>();
  const T *bp = bias.data_ptr<T>(), *mp = mean.data_ptr<T>(), *rp = invstd.data_ptr<T>();
  const uint8_t* ip = indices.data_ptr<uint8_t>();
  T *gxp = gx.data_ptr<T>(), *gwp = gw.data_ptr<T>(), *gbp = gb.data_ptr<T>();
  const T slope = static_cast<T>(slope_d);
  const acc_t M = static_cast<acc_t>(geo.rows());
  std::atomic<bool> bad_indices{false};

  for_each_block<T>(geo, [&](int64_t c0, int64_t nc) {
    PerChannel<T> v(8, nc);
    T *alpha = v(0, nc), *shift = v(1, nc), *mu = v(2, nc), *pa = v(3, nc), *pb = v(4, nc);
    T *e1 = v(5, nc), *e0 = v(6, nc), *wr_t = v(7, nc);
    block_affine(wp, bp, mp, rp, c0, nc, alpha, shift, mu);
    std::vector<acc_t> su(nc, 0), sux(nc, 0);
    if (!block_argmax_sums<T, false>(xp + c0, nullptr, gyp + c0, ip + c0, geo, nc, alpha, shift, mu, slope,
                                     pa, pb, nullptr, su.data(), sux.data(), nullptr)) {
      bad_indices.store(true, std::memory_order_relaxed);
      return;
    }
    // gx = w r (u - A - xh Bu) = e1 (x - mu) + e0, plus w r u at the argmax positions.
    for (int64_t c = 0; c < nc; ++c) {
      const acc_t r = rp[c0 + c];
      const acc_t s_ux = sux[c] * r;  // sum u xh
      gbp[c0 + c] = static_cast<T>(su[c]);
      gwp[c0 + c] = static_cast<T>(s_ux);
      const acc_t wr = static_cast<acc_t>(wp[c0 + c]) * r;
      e1[c] = static_cast<T>(-wr * r * (s_ux / M));
      e0[c] = static_cast<T>(-wr * (su[c] / M));
      wr_t[c] = static_cast<T>(wr);
    }
    const OutputCoefficients<T> q{e1, e0, nullptr, wr_t, nullptr, nullptr, nullptr, nullptr, nullptr};
    block_outputs<T, false, false>(gxp + c0, nullptr, xp + c0, nullptr, gyp + c0, ip + c0, geo, nc, alpha,
                                   shift, mu, slope, q);
  });
  if (bad_indices.load()) invalid_indices("bn_lrelu_pool_backward");
}

template <typename T, bool kWithH>
bool double_backward_block(const Geometry& geo, int64_t c0, int64_t nc, const T* gyp, const T* xp,
                           const T* wp, const T* bp, const T* mp, const T* rp, const uint8_t* ip,
                           const T* hxp, const T* hwp, const T* hbp, T slope, T* dgyp, T* dxp, T* dwp) {
  const acc_t M = static_cast<acc_t>(geo.rows());
  PerChannel<T> v(15, nc);
  T *alpha = v(0, nc), *shift = v(1, nc), *mu = v(2, nc), *pa = v(3, nc), *pb = v(4, nc), *pd = v(5, nc);
  block_affine(wp, bp, mp, rp, c0, nc, alpha, shift, mu);
  std::vector<acc_t> su(nc, 0), sux(nc, 0), shu(nc, 0), sh(nc, 0), shx(nc, 0);
  if (!block_argmax_sums<T, kWithH>(xp + c0, kWithH ? hxp + c0 : nullptr, gyp + c0, ip + c0, geo, nc, alpha,
                                    shift, mu, slope, pa, pb, pd, su.data(), sux.data(), shu.data())) {
    return false;
  }
  if constexpr (kWithH) {
    block_sum_h(hxp + c0, xp + c0, geo.rows(), geo.G, nc, mu, pa, pb, sh.data(), shx.data());
  }
  T *e1 = v(6, nc), *e0 = v(7, nc), *e_h = v(8, nc), *su_coef = v(9, nc), *wr = v(10, nc);
  T *hm = v(11, nc), *cr = v(12, nc), *hw_r = v(13, nc), *hb_t = v(14, nc);
  for (int64_t c = 0; c < nc; ++c) {
    const int64_t g = c0 + c;
    const acc_t r = rp[g], w = wp[g];
    const acc_t hw = hwp ? static_cast<acc_t>(hwp[g]) : 0;
    const acc_t hb = hbp ? static_cast<acc_t>(hbp[g]) : 0;
    const acc_t s_ux = sux[c] * r, s_hx = shx[c] * r;
    const acc_t A = su[c] / M, Bu = s_ux / M, Hm = sh[c] / M, C = s_hx / M;
    const acc_t S = shu[c] - A * sh[c] - Bu * s_hx;  // sum hx (u - A - xh Bu)
    dwp[g] = static_cast<T>(r * S);
    // As double_backward_channel in bn_lrelu_pool.cpp.
    const acc_t rho = w * S;
    const acc_t q_mean = -w * r * (Bu * Hm + C * A) + hw * A;
    const acc_t qx_mean = -2 * w * r * Bu * C + hw * Bu;
    e_h[c] = static_cast<T>(-w * r * r * Bu);
    e0[c] = static_cast<T>(-r * q_mean);
    e1[c] = static_cast<T>(-r * r * (qx_mean + rho * r / M));
    su_coef[c] = static_cast<T>(r * (hw - w * r * C));
    wr[c] = static_cast<T>(w * r);
    hm[c] = static_cast<T>(Hm);
    cr[c] = static_cast<T>(w * r * C * r);
    hw_r[c] = static_cast<T>(hw * r);
    hb_t[c] = static_cast<T>(hb);
  }
  const OutputCoefficients<T> q{e1, e0, e_h, su_coef, wr, hm, cr, hw_r, hb_t};
  block_outputs<T, kWithH, true>(dxp + c0, dgyp + c0, xp + c0, kWithH ? hxp + c0 : nullptr, gyp + c0, ip + c0,
                                 geo, nc, alpha, shift, mu, slope, q);
  return true;
}

template <typename T>
void double_backward_nhwc(const at::Tensor& gy, const at::Tensor& x, const at::Tensor& weight,
                          const at::Tensor& bias, const at::Tensor& mean, const at::Tensor& invstd,
                          const at::Tensor& indices, const at::Tensor* hx, const at::Tensor* hw,
                          const at::Tensor* hb, double slope, at::Tensor& d_gy, at::Tensor& d_x,
                          at::Tensor& d_w) {
  const Geometry geo = geometry(x);
  const T *gyp = gy.data_ptr<T>(), *xp = x.data_ptr<T>(), *wp = weight.data_ptr<T>();
  const T *bp = bias.data_ptr<T>(), *mp = mean.data_ptr<T>(), *rp = invstd.data_ptr<T>();
  const uint8_t* ip = indices.data_ptr<uint8_t>();
  const T* hxp = hx ? hx->data_ptr<T>() : nullptr;
  const T* hwp = hw ? hw->data_ptr<T>() : nullptr;
  const T* hbp = hb ? hb->data_ptr<T>() : nullptr;
  T *dgyp = d_gy.data_ptr<T>(), *dxp = d_x.data_ptr<T>(), *dwp = d_w.data_ptr<T>();
  const T s = static_cast<T>(slope);
  std::atomic<bool> bad_indices{false};

  for_each_block<T>(geo, [&](int64_t c0, int64_t nc) {
    const bool valid =
        hxp ? double_backward_block<T, true>(geo, c0, nc, gyp, xp, wp, bp, mp, rp, ip, hxp, hwp, hbp, s, dgyp,
                                             dxp, dwp)
            : double_backward_block<T, false>(geo, c0, nc, gyp, xp, wp, bp, mp, rp, ip, hxp, hwp, hbp, s, dgyp,
                                              dxp, dwp);
    if (!valid) bad_indices.store(true, std::memory_order_relaxed);
  });
  if (bad_indices.load()) invalid_indices("bn_lrelu_pool_double_backward");
}

constexpr auto kChannelsLast = at::MemoryFormat::ChannelsLast;

}  // namespace

bool bn_lrelu_pool_is_channels_last(const at::Tensor& x) {
  return x.dim() == 4 && !x.is_contiguous() && x.is_contiguous(kChannelsLast);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_lrelu_pool_forward_cpu_nhwc(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, double eps,
    double negative_slope) {
  const Geometry geo = geometry(x);
  at::Tensor y = at::empty({geo.n, geo.G, geo.Ho, geo.Wo}, x.options().memory_format(kChannelsLast));
  at::Tensor mean = at::empty({geo.G}, x.options());
  at::Tensor invstd = at::empty({geo.G}, x.options());
  at::Tensor indices =
      at::empty({geo.n, geo.G, geo.Ho, geo.Wo}, x.options().dtype(at::kByte).memory_format(kChannelsLast));
  const at::Tensor w = weight.contiguous(), b = bias.contiguous();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bn_lrelu_pool_forward_cpu_nhwc", [&] {
    forward_nhwc<scalar_t>(x, w, b, eps, negative_slope, y, mean, invstd, indices);
  });
  return {y, mean, invstd, indices};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_lrelu_pool_backward_cpu_nhwc(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
    const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& indices, double negative_slope) {
  // Incoming gradients may be in either layout, or strided views: the kernels read channels-last.
  const at::Tensor gy = grad_y.contiguous(kChannelsLast), idx = indices.contiguous(kChannelsLast);
  const at::Tensor w = weight.contiguous(), b = bias.contiguous();
  const at::Tensor m = mean.contiguous(), r = invstd.contiguous();
  at::Tensor gx = at::empty_like(x, kChannelsLast);
  at::Tensor gw = at::empty_like(w);
  at::Tensor gb = at::empty_like(b);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bn_lrelu_pool_backward_cpu_nhwc", [&] {
    backward_nhwc<scalar_t>(gy, x, w, b, m, r, idx, negative_slope, gx, gw, gb);
  });
  return {gx, gw, gb};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_lrelu_pool_double_backward_cpu_nhwc(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
    const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& indices, const at::Tensor* hx,
    const at::Tensor* hw, const at::Tensor* hb, double negative_slope) {
  const at::Tensor gy = grad_y.contiguous(kChannelsLast), idx = indices.contiguous(kChannelsLast);
  const at::Tensor hx_cl = hx ? hx->contiguous(kChannelsLast) : at::Tensor();
  const at::Tensor w = weight.contiguous(), b = bias.contiguous();
  const at::Tensor m = mean.contiguous(), r = invstd.contiguous();
  at::Tensor d_gy = at::empty(gy.sizes(), x.options().memory_format(kChannelsLast));
  at::Tensor d_x = at::empty_like(x, kChannelsLast);
  at::Tensor d_w = at::empty_like(w);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bn_lrelu_pool_double_backward_cpu_nhwc", [&] {
    double_backward_nhwc<scalar_t>(gy, x, w, b, m, r, idx, hx ? &hx_cl : nullptr, hw, hb, negative_slope,
                                   d_gy, d_x, d_w);
  });
  return {d_gy, d_x, d_w};
}

}  // namespace mamlpp_fast
