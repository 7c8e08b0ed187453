// CPU kernels of bn_lrelu_pool for channels-last x: the same three ops and the same math as
// bn_lrelu_pool.cpp (see its header comment for the notation), for x stored [n, H, W, G] in memory
// (logical shape [n, G, H, W], torch.channels_last). The pooled tensors (y, grad_y, indices,
// d grad_y) are channels-last too, and grad_x / d x take x's layout.
//
// Why a second layout: on the CPU, oneDNN's grouped convolutions around this op are 10-14% faster
// in channels-last, and a 3-channel first layer's forward up to 2.8x (benchmarks/RESULTS.md);
// converting between the layouts costs more than that, so the op reads and writes channels-last.
//
// Layout of the work: every loop runs over the n*H*W rows (or the n*Ho*Wo windows) with the G
// channels of a row innermost, so each statement is a vector loop over contiguous channels, with
// no gathers (a window's four corners are four contiguous loads, its argmax a blend). The rows
// split over the threads, so each streams through its own part of memory. (Splitting the channels
// instead, each thread striding over every row, was 2-7x slower at 96 channels.) Sums are taken
// per fixed chunk of rows (or window rows): in the arithmetic type T within the chunk, as the NCHW
// kernels sum within a block, into the chunk's own double partials, which are then added (the
// forward's mean and M2: merged) in chunk order, so the result does not depend on the thread
// count. Per-channel constants (the affine
// coefficients of each output) are arrays of G shared by the threads.
//
// Storage and arithmetic: the activations (x, y, grad_y, grad_grad_x and the outputs of their
// shapes) are stored as S and computed in T. S = T for float32 and float64; for bfloat16
// activations (MetaLearner under bfloat16 autocast) S is bfloat16's 16 bits and T float32, with
// float32 weight, bias, mean and invstd: every value is widened on load and rounded to nearest
// even on store, exactly as casting the bfloat16 inputs to float32, running the float32 kernels
// and casting the outputs back, but without the casts' passes over memory.
#include "bn_lrelu_pool_nhwc.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "../bn_lrelu_pool.h"
#include "bn_lrelu_pool_common.h"
#include "simd.h"

namespace mamlpp_fast {
namespace {

using acc_t = double;

constexpr int64_t kRowBlock = 1024;
// Minimum elements handled by one parallel task, so small problems stay on the calling thread.
constexpr int64_t kGrainElements = 32768;

struct Geometry {
  int64_t n, G, H, W, Ho, Wo;
  int64_t rows() const { return n * H * W; }
  // The row of element (i, h, w), the top-left corner of window (i, oh, ow) at h = 2 oh, w = 2 ow.
  int64_t row(int64_t i, int64_t h, int64_t w) const { return (i * H + h) * W + w; }
};

Geometry geometry(const at::Tensor& x) {
  return {x.size(0), x.size(1), x.size(2), x.size(3), x.size(2) / 2, x.size(3) / 2};
}

// bfloat16 activations as their raw bits: integer shifts and adds, which vectorise (a struct with
// conversion operators, inside these loops, did not).
using bf16_bits = uint16_t;

// An activation value in the arithmetic type T.
template <typename T, typename S>
MAMLPP_FAST_ALWAYS_INLINE T load_value(S v) {
  if constexpr (std::is_same<S, bf16_bits>::value) {
    return __builtin_bit_cast(float, static_cast<uint32_t>(v) << 16);
  } else {
    return v;
  }
}

// T to the activation storage S: for bfloat16, round to nearest even (NaN -> the quiet NaN
// 0x7fc0), as c10::BFloat16 and ATen's casts do.
template <typename S, typename T>
MAMLPP_FAST_ALWAYS_INLINE S store_value(T v) {
  if constexpr (std::is_same<S, bf16_bits>::value) {
    static_assert(std::is_same<T, float>::value, "bfloat16 activations compute in float32");
    const uint32_t bits = __builtin_bit_cast(uint32_t, v);
    const uint32_t rounded = (bits + (0x7fffu + ((bits >> 16) & 1u))) >> 16;
    return v != v ? static_cast<bf16_bits>(0x7fc0) : static_cast<bf16_bits>(rounded);
  } else {
    return v;
  }
}

template <typename S>
const S* activations(const at::Tensor& t) {
  if constexpr (std::is_same<S, bf16_bits>::value) {
    return reinterpret_cast<const bf16_bits*>(t.const_data_ptr<at::BFloat16>());
  } else {
    return t.const_data_ptr<S>();
  }
}

template <typename S>
S* activations_out(at::Tensor& t) {
  if constexpr (std::is_same<S, bf16_bits>::value) {
    return reinterpret_cast<bf16_bits*>(t.mutable_data_ptr<at::BFloat16>());
  } else {
    return t.mutable_data_ptr<S>();
  }
}


// The value at window position k (0..3, row-major) of four values already loaded: selects
// between values, which vectorise as blends (a select between loads would be a branch).
template <typename T>
MAMLPP_FAST_ALWAYS_INLINE T at_position(int32_t k, T v0, T v1, T v2, T v3) {
  const T top = (k & 1) ? v1 : v0;
  const T bottom = (k & 1) ? v3 : v2;
  return (k & 2) ? bottom : top;
}

// ---------------------------------------------------------------------------------------------
// statistics: per channel, the mean and M2 (the sum of squared deviations from the mean) of
// `rows` rows of x, G channels a row, in one read of x from memory. The rows go in sub-blocks of
// kMomentBytes, small enough to stay in L2 between two sweeps: the first sums the sub-block for a
// center, the second sums the deviations from it and their squares (a corrected two-pass within
// the sub-block, in T, as the NCHW kernels sum within a block). Each sub-block then merges into
// the double (mean, M2) of the whole range by the pairwise update of Chan, Golub and LeVeque:
//   delta = mean_b - mean,  mean += delta n_b / n,  M2 += M2_b + delta^2 n_a n_b / n.
// (A global two-pass, the mean first and then the deviations, read the 32 MB of an Omniglot
// first-layer activation twice.)
constexpr int64_t kMomentBytes = 1 << 17;
// Channels whose sums one sweep keeps in registers: four 512-bit vectors of float.
constexpr int64_t kMomentSlice = 64;

// Merges a block of n_b rows with mean mean_b and M2 m2_b into the running (mean, m2) of n_a rows.
MAMLPP_FAST_ALWAYS_INLINE void merge_moments(acc_t& mean, acc_t& m2, acc_t n_a, acc_t mean_b, acc_t m2_b,
                                             acc_t n_b) {
  const acc_t n = n_a + n_b, delta = mean_b - mean;
  mean += delta * (n_b / n);
  m2 += m2_b + delta * delta * (n_a * n_b / n);
}

// Per channel c0 + j, j < width, of rows [0, nb) of x: without a center, sum[j] = sum of x;
// with center[j], sum[j] = sum of d and sq[j] = sum of d^2 for d = x - center. kWidth > 0: a
// compile-time width, whose accumulators stay in registers across the rows (accumulating into
// arrays of G instead stores every vector once per row, and ran at a third of the memory
// bandwidth); 0: `width` at run time.
template <typename S, typename T, int64_t kWidth, bool kCentered>
MAMLPP_FAST_ALWAYS_INLINE void slice_sums(const S* __restrict__ x, int64_t nb, int64_t G, int64_t width,
                                          const T* __restrict__ center, T* __restrict__ sum,
                                          T* __restrict__ sq) {
  constexpr int64_t kMax = kWidth > 0 ? kWidth : kMomentSlice;
  const int64_t w = kWidth > 0 ? kWidth : width;
  T s1[kMax] = {}, s2[kMax] = {};
  for (int64_t r = 0; r < nb; ++r) {
    const S* __restrict__ xr = x + r * G;
    MAMLPP_FAST_SIMD
    for (int64_t j = 0; j < w; ++j) {
      if constexpr (kCentered) {
        const T d = load_value<T>(xr[j]) - center[j];
        s1[j] += d;
        s2[j] += d * d;
      } else {
        s1[j] += load_value<T>(xr[j]);
      }
    }
  }
  for (int64_t j = 0; j < w; ++j) {
    sum[j] = s1[j];
    if constexpr (kCentered) sq[j] = s2[j];
  }
}

// Moments of rows [0, rows) of x into mean[G] and m2[G] (overwritten); scratch holds 3 G of T.
// Per sub-block: its float sum gives a center, and the sums of d = x - center and of d^2 give
// mean = center + sum d / n and M2 = sum d^2 - (sum d)^2 / n (the corrected two-pass): sums of
// small deviations, so the float rounding of the first sum does not reach the merged moments.
template <typename S, typename T>
MAMLPP_FAST_SIMD_CLONES void block_moments(const S* __restrict__ x, int64_t rows, int64_t G,
                                           T* __restrict__ scratch, acc_t* __restrict__ mean,
                                           acc_t* __restrict__ m2) {
  const int64_t block_rows = std::max<int64_t>(1, kMomentBytes / static_cast<int64_t>(G * sizeof(T)));
  // (Sized by T, not S, so that bfloat16 activations group their sums exactly as float32 ones:
  // the statistics of bfloat16 x equal those of x cast to float32, bit for bit.)
  T* __restrict__ center = scratch;
  T* __restrict__ dev = scratch + G;
  T* __restrict__ dev2 = scratch + 2 * G;
  std::fill(mean, mean + G, acc_t(0));
  std::fill(m2, m2 + G, acc_t(0));
  for (int64_t rb = 0; rb < rows; rb += block_rows) {
    const int64_t nb = std::min(rows, rb + block_rows) - rb;
    const S* __restrict__ xb = x + rb * G;
    int64_t c0 = 0;
    for (; c0 + kMomentSlice <= G; c0 += kMomentSlice) {
      slice_sums<S, T, kMomentSlice, false>(xb + c0, nb, G, kMomentSlice, nullptr, center + c0, nullptr);
    }
    if (c0 < G) slice_sums<S, T, 0, false>(xb + c0, nb, G, G - c0, nullptr, center + c0, nullptr);
    const T inv_nb = T(1) / static_cast<T>(nb);
    for (int64_t c = 0; c < G; ++c) center[c] *= inv_nb;
    for (c0 = 0; c0 + kMomentSlice <= G; c0 += kMomentSlice) {
      slice_sums<S, T, kMomentSlice, true>(xb + c0, nb, G, kMomentSlice, center + c0, dev + c0, dev2 + c0);
    }
    if (c0 < G) slice_sums<S, T, 0, true>(xb + c0, nb, G, G - c0, center + c0, dev + c0, dev2 + c0);
    const acc_t n_a = static_cast<acc_t>(rb), n_b = static_cast<acc_t>(nb);
    for (int64_t c = 0; c < G; ++c) {
      const acc_t d1 = static_cast<acc_t>(dev[c]);
      const acc_t mean_b = static_cast<acc_t>(center[c]) + d1 / n_b;
      merge_moments(mean[c], m2[c], n_a, mean_b, static_cast<acc_t>(dev2[c]) - d1 * d1 / n_b, n_b);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Window loops. They touch the uint8 indices beside float data, and gcc sizes such loops' vectors
// by the byte type (64 lanes of a 512-bit vector; with simdlen(16), 128-bit vectors), which left
// rows of fewer than 64 channels to the scalar remainder. So each window's channels run in chunks
// of kChunk, a compile-time trip count (kWidth = kChunk), and a last partial chunk with a run-time
// one (kWidth = 0); within a chunk the indices are widened to int32 first (or narrowed after), so
// that the float loop holds no byte type. The chunk functions take pointers already offset to the
// chunk's first channel; `G` is the row stride (x0[G] is the window's top-right element).
constexpr int64_t kChunk = 16;

#define MAMLPP_FAST_FOR_CHUNKS(nc, CALL)                                           \
  do {                                                                             \
    int64_t c0 = 0;                                                                \
    for (; c0 + kChunk <= (nc); c0 += kChunk) CALL(kChunk, c0, kChunk);            \
    if (c0 < (nc)) CALL(0, c0, (nc) - c0);                                         \
  } while (0)

// forward: y = max of leaky_relu(alpha x + shift) over the window, idx its first argmax, with the
// same selects as forward_plane in bn_lrelu_pool.cpp (NaN: the last position).
template <typename S, typename T, int64_t kWidth>
MAMLPP_FAST_ALWAYS_INLINE void forward_chunk(const S* __restrict__ x0, const S* __restrict__ x2,
                                             S* __restrict__ y, uint8_t* __restrict__ idx,
                                             const T* __restrict__ alpha, const T* __restrict__ shift,
                                             T slope, int64_t G, int64_t width) {
  const int64_t nw = kWidth ? kWidth : width;
  alignas(64) int32_t args[kChunk];
  MAMLPP_FAST_SIMD
  for (int64_t c = 0; c < nw; ++c) {
    T best = leaky_relu(load_value<T>(x0[c]) * alpha[c] + shift[c], slope);
    int32_t arg = 0;
    T a = leaky_relu(load_value<T>(x0[c + G]) * alpha[c] + shift[c], slope);
    arg = !(a <= best) ? 1 : arg;
    best = std::max(best, a);
    a = leaky_relu(load_value<T>(x2[c]) * alpha[c] + shift[c], slope);
    arg = !(a <= best) ? 2 : arg;
    best = std::max(best, a);
    a = leaky_relu(load_value<T>(x2[c + G]) * alpha[c] + shift[c], slope);
    arg = !(a <= best) ? 3 : arg;
    best = std::max(best, a);
    y[c] = store_value<S>(best);
    args[c] = arg;
  }
  for (int64_t c = 0; c < nw; ++c) idx[c] = static_cast<uint8_t>(args[c]);
}

// The windows of window rows [io0, io1) (window row io = i * Ho + oh).
template <typename S, typename T>
MAMLPP_FAST_SIMD_CLONES void forward_windows(const S* __restrict__ x, S* __restrict__ y,
                                             uint8_t* __restrict__ idx, const Geometry& geo, int64_t io0,
                                             int64_t io1, const T* __restrict__ alpha,
                                             const T* __restrict__ shift, T slope) {
  const int64_t G = geo.G, W = geo.W;
  for (int64_t io = io0; io < io1; ++io) {
    const int64_t i = io / geo.Ho, oh = io - i * geo.Ho;
    for (int64_t ow = 0; ow < geo.Wo; ++ow) {
      const S* x0 = x + geo.row(i, 2 * oh, 2 * ow) * G;
      const S* x2 = x0 + W * G;
      const int64_t j = io * geo.Wo + ow;
#define MAMLPP_FAST_CALL(K, c, w) \
  forward_chunk<S, T, K>(x0 + (c), x2 + (c), y + j * G + (c), idx + j * G + (c), alpha + (c), shift + (c), slope, G, w)
      MAMLPP_FAST_FOR_CHUNKS(G, MAMLPP_FAST_CALL);
#undef MAMLPP_FAST_CALL
    }
  }
}

// ---------------------------------------------------------------------------------------------
// backward passes. Over the windows: xv (and hv) = x (and hx) at the argmax, selected from the four
// corners; u = gy D(xv). Elements no window covers (the last row/column of odd H/W) get only the
// dense part of their output.

// One window's chunk of the argmax sums: pa += u, pb += u (xv - mean), and with h pd += u hv and
// the dense sums of the window's four elements, pe += h, pf += h (x - mean).
// Returns the number of indices above 3 (k >> 2 summed; zero for the forward's indices).
template <typename S, typename T, bool kWithH, int64_t kWidth>
MAMLPP_FAST_ALWAYS_INLINE int32_t argmax_sums_chunk(const S* __restrict__ x0, const S* __restrict__ x2,
                                                    const S* __restrict__ h0, const S* __restrict__ h2,
                                                    const S* __restrict__ gy, const uint8_t* __restrict__ idx,
                                                    const T* __restrict__ alpha, const T* __restrict__ shift,
                                                    const T* __restrict__ mean, T slope, T* __restrict__ pa,
                                                    T* __restrict__ pb, T* __restrict__ pd, T* __restrict__ pe,
                                                    T* __restrict__ pf, int64_t G, int64_t width) {
  const int64_t nw = kWidth ? kWidth : width;
  alignas(64) int32_t ks[kChunk];
  for (int64_t c = 0; c < nw; ++c) ks[c] = idx[c];
  int32_t out_of_range = 0;
  MAMLPP_FAST_SIMD_REDUCE(out_of_range)
  for (int64_t c = 0; c < nw; ++c) {
    const int32_t k = ks[c];
    out_of_range += k >> 2;
    const T v0 = load_value<T>(x0[c]), v1 = load_value<T>(x0[c + G]);
    const T v2 = load_value<T>(x2[c]), v3 = load_value<T>(x2[c + G]);
    const T xv = at_position(k, v0, v1, v2, v3);
    const T u = load_value<T>(gy[c]) * leaky_relu_slope(xv * alpha[c] + shift[c], slope);
    pa[c] += u;
    pb[c] += u * (xv - mean[c]);
    if constexpr (kWithH) {
      const T g0 = load_value<T>(h0[c]), g1 = load_value<T>(h0[c + G]);
      const T g2 = load_value<T>(h2[c]), g3 = load_value<T>(h2[c + G]);
      pd[c] += u * at_position(k, g0, g1, g2, g3);
      pe[c] += (g0 + g1) + (g2 + g3);
      pf[c] += (g0 * (v0 - mean[c]) + g1 * (v1 - mean[c])) + (g2 * (v2 - mean[c]) + g3 * (v3 - mean[c]));
    }
  }
  return out_of_range;
}

// s_u += sum u, s_ux += sum u (x - mean), with h s_uh += sum u h. Returns false if some index is
// not 0..3 (the sums are then meaningless and must not be used).
template <typename S, typename T, bool kWithH>
MAMLPP_FAST_SIMD_CLONES bool argmax_sums(const S* __restrict__ x, const S* __restrict__ h,
                                         const S* __restrict__ gy, const uint8_t* __restrict__ idx,
                                         const Geometry& geo, int64_t io0, int64_t io1,
                                         const T* __restrict__ alpha, const T* __restrict__ shift,
                                         const T* __restrict__ mean, T slope, T* __restrict__ scratch,
                                         acc_t* __restrict__ sums) {
  const int64_t G = geo.G, W = geo.W;
  T* __restrict__ pa = scratch;
  T* __restrict__ pb = scratch + G;
  T* __restrict__ pd = scratch + 2 * G;
  T* __restrict__ pe = scratch + 3 * G;
  T* __restrict__ pf = scratch + 4 * G;
  acc_t* __restrict__ s_u = sums;
  acc_t* __restrict__ s_ux = sums + G;
  int32_t out_of_range = 0;
  // Sums run in T over one row of windows, then move to double.
  for (int64_t io = io0; io < io1; ++io) {
    const int64_t i = io / geo.Ho, oh = io - i * geo.Ho;
    std::fill(pa, pa + (kWithH ? 5 : 2) * G, T(0));
    for (int64_t ow = 0; ow < geo.Wo; ++ow) {
      const int64_t r = geo.row(i, 2 * oh, 2 * ow), j = io * geo.Wo + ow;
      const S* x0 = x + r * G;
      const S* x2 = x0 + W * G;
      const S* h0 = kWithH ? h + r * G : nullptr;
      const S* h2 = kWithH ? h0 + W * G : nullptr;
#define MAMLPP_FAST_CALL(K, c, w)                                                                          \
  out_of_range += argmax_sums_chunk<S, T, kWithH, K>(                                                         \
      x0 + (c), x2 + (c), kWithH ? h0 + (c) : nullptr, kWithH ? h2 + (c) : nullptr, gy + j * G + (c),      \
      idx + j * G + (c), alpha + (c), shift + (c), mean + (c), slope, pa + (c), pb + (c),                  \
      kWithH ? pd + (c) : nullptr, kWithH ? pe + (c) : nullptr, kWithH ? pf + (c) : nullptr, G, w)
      MAMLPP_FAST_FOR_CHUNKS(G, MAMLPP_FAST_CALL);
#undef MAMLPP_FAST_CALL
    }
    for (int64_t c = 0; c < G; ++c) {
      s_u[c] += pa[c];
      s_ux[c] += pb[c];
    }
    if constexpr (kWithH) {
      acc_t* __restrict__ s_uh = sums + 2 * G;
      acc_t* __restrict__ s_h = sums + 3 * G;
      acc_t* __restrict__ s_hx = sums + 4 * G;
      for (int64_t c = 0; c < G; ++c) {
        s_uh[c] += pd[c];
        s_h[c] += pe[c];
        s_hx[c] += pf[c];
      }
      // The dense sums also cover the elements of no window: the last column of odd W (rows 2 oh
      // and 2 oh + 1) and, after the last window row, the last row of odd H.
      auto add_dense = [&](int64_t hh, int64_t ww) {
        const S* xr = x + geo.row(i, hh, ww) * G;
        const S* hr = h + geo.row(i, hh, ww) * G;
        for (int64_t c = 0; c < G; ++c) {
          const T hv = load_value<T>(hr[c]);
          s_h[c] += hv;
          s_hx[c] += hv * (load_value<T>(xr[c]) - mean[c]);
        }
      };
      if (W % 2) {
        add_dense(2 * oh, W - 1);
        add_dense(2 * oh + 1, W - 1);
      }
      if (geo.H % 2 && oh == geo.Ho - 1) {
        for (int64_t ww = 0; ww < W; ++ww) add_dense(geo.H - 1, ww);
      }
    }
  }
  return out_of_range == 0;
}

// Per-channel coefficients of the output pass (arrays of G):
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

template <typename S, typename T, bool kWithH>
MAMLPP_FAST_ALWAYS_INLINE void dense_element(S* __restrict__ out, const S* __restrict__ x,
                                             const S* __restrict__ h, int64_t nc, const T* __restrict__ mean,
                                             const OutputCoefficients<T>& q) {
  for (int64_t c = 0; c < nc; ++c) {
    T v = q.e1[c] * (load_value<T>(x[c]) - mean[c]) + q.e0[c];
    if constexpr (kWithH) v += q.e_h[c] * load_value<T>(h[c]);
    out[c] = store_value<S>(v);
  }
}

// One window's chunk of the output pass: its four elements of `out`, and with kDgy its d gy.
template <typename S, typename T, bool kWithH, bool kDgy, int64_t kWidth>
MAMLPP_FAST_ALWAYS_INLINE void outputs_chunk(S* __restrict__ o0, S* __restrict__ o2, S* __restrict__ dgy,
                                             const S* __restrict__ x0, const S* __restrict__ x2,
                                             const S* __restrict__ h0, const S* __restrict__ h2,
                                             const S* __restrict__ gy, const uint8_t* __restrict__ idx,
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
    const T v0 = load_value<T>(x0[c]), v1 = load_value<T>(x0[c + G]);
    const T v2 = load_value<T>(x2[c]), v3 = load_value<T>(x2[c + G]);
    const T xv = at_position(k, v0, v1, v2, v3);
    const T d = leaky_relu_slope(xv * alpha[c] + shift[c], slope);
    const T s = su_coef[c] * (load_value<T>(gy[c]) * d);  // su_coef u
    T w0 = e1[c] * (v0 - mean[c]) + e0[c];
    T w1 = e1[c] * (v1 - mean[c]) + e0[c];
    T w2 = e1[c] * (v2 - mean[c]) + e0[c];
    T w3 = e1[c] * (v3 - mean[c]) + e0[c];
    T hv = 0;
    if constexpr (kWithH) {
      const T g0 = load_value<T>(h0[c]), g1 = load_value<T>(h0[c + G]);
      const T g2 = load_value<T>(h2[c]), g3 = load_value<T>(h2[c + G]);
      w0 += e_h[c] * g0;
      w1 += e_h[c] * g1;
      w2 += e_h[c] * g2;
      w3 += e_h[c] * g3;
      hv = at_position(k, g0, g1, g2, g3);
    }
    o0[c] = store_value<S>(w0 + (k == 0 ? s : T(0)));
    o0[c + G] = store_value<S>(w1 + (k == 1 ? s : T(0)));
    o2[c] = store_value<S>(w2 + (k == 2 ? s : T(0)));
    o2[c + G] = store_value<S>(w3 + (k == 3 ? s : T(0)));
    if constexpr (kDgy) {
      dgy[c] = store_value<S>(d * (q.wr[c] * (hv - q.hm[c]) + (q.hw_r[c] - q.cr[c]) * (xv - mean[c]) + q.hb[c]));
    }
  }
}

// The output rows of window rows [io0, io1): rows 2 oh and 2 oh + 1 of image i, and with odd H,
// for oh = Ho - 1, the last row too.
template <typename S, typename T, bool kWithH, bool kDgy>
MAMLPP_FAST_SIMD_CLONES void outputs(S* __restrict__ out, S* __restrict__ dgy, const S* __restrict__ x,
                                     const S* __restrict__ h, const S* __restrict__ gy,
                                     const uint8_t* __restrict__ idx, const Geometry& geo, int64_t io0,
                                     int64_t io1, const T* __restrict__ alpha, const T* __restrict__ shift,
                                     const T* __restrict__ mean, T slope, const OutputCoefficients<T>& q) {
  const int64_t G = geo.G, W = geo.W;
  for (int64_t io = io0; io < io1; ++io) {
    const int64_t i = io / geo.Ho, oh = io - i * geo.Ho;
    for (int64_t ow = 0; ow < geo.Wo; ++ow) {
      const int64_t r = geo.row(i, 2 * oh, 2 * ow), j = io * geo.Wo + ow;
      const int64_t o = r * G, o2 = (r + W) * G;
#define MAMLPP_FAST_CALL(K, c, w)                                                                       \
  outputs_chunk<S, T, kWithH, kDgy, K>(out + o + (c), out + o2 + (c), kDgy ? dgy + j * G + (c) : nullptr,    \
                                    x + o + (c), x + o2 + (c), kWithH ? h + o + (c) : nullptr,            \
                                    kWithH ? h + o2 + (c) : nullptr, gy + j * G + (c), idx + j * G + (c), \
                                    alpha + (c), shift + (c), mean + (c), slope, q.offset(c), G, w)
      MAMLPP_FAST_FOR_CHUNKS(G, MAMLPP_FAST_CALL);
#undef MAMLPP_FAST_CALL
    }
    // The last column and row of odd W / H belong to no window: dense part only.
    if (geo.W % 2) {
      for (int64_t hh = 2 * oh; hh < 2 * oh + 2; ++hh) {
        const int64_t rr = geo.row(i, hh, geo.W - 1) * G;
        dense_element<S, T, kWithH>(out + rr, x + rr, kWithH ? h + rr : nullptr, G, mean, q);
      }
    }
    if (geo.H % 2 && oh == geo.Ho - 1) {
      for (int64_t ww = 0; ww < geo.W; ++ww) {
        const int64_t rr = geo.row(i, geo.H - 1, ww) * G;
        dense_element<S, T, kWithH>(out + rr, x + rr, kWithH ? h + rr : nullptr, G, mean, q);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// drivers. The work splits over rows, every thread taking all G channels of its rows, so that each
// streams through its own contiguous part of memory. Sums are taken per fixed chunk of rows (or
// window rows) into their own double partials, which are then added in chunk order: the result
// does not depend on the thread count.

// Window rows per chunk of a sum: about kRowBlock windows.
int64_t window_rows_per_chunk(const Geometry& geo) {
  return std::max<int64_t>(1, kRowBlock / std::max<int64_t>(1, geo.Wo));
}

int64_t parallel_grain(int64_t elements_per_unit) {
  return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, elements_per_unit));
}

// Per channel, the mean and invstd = (M2 / rows + eps)^-1/2 of x: block_moments over fixed
// chunks of kRowBlock rows in parallel, merged in chunk order (independent of the thread count).
template <typename S, typename T>
void moments_over_row_chunks(const Geometry& geo, const S* x, double eps, T* mean_out, T* invstd_out) {
  const int64_t G = geo.G, rows = geo.rows();
  const int64_t chunks = (rows + kRowBlock - 1) / kRowBlock;
  std::vector<acc_t> partial(chunks * 2 * G);  // per chunk: mean[G], then m2[G]
  at::parallel_for(0, chunks, parallel_grain(kRowBlock * G), [&](int64_t k0, int64_t k1) {
    std::vector<T> scratch(3 * G);
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t r0 = k * kRowBlock;
      block_moments<S, T>(x + r0 * G, std::min(kRowBlock, rows - r0), G, scratch.data(),
                       partial.data() + k * 2 * G, partial.data() + k * 2 * G + G);
    }
  });
  std::vector<acc_t> mean(G, acc_t(0)), m2(G, acc_t(0));
  for (int64_t k = 0; k < chunks; ++k) {
    const acc_t n_a = static_cast<acc_t>(k * kRowBlock);
    const acc_t n_b = static_cast<acc_t>(std::min(kRowBlock, rows - k * kRowBlock));
    const acc_t* p = partial.data() + k * 2 * G;
    for (int64_t c = 0; c < G; ++c) merge_moments(mean[c], m2[c], n_a, p[c], p[G + c], n_b);
  }
  for (int64_t c = 0; c < G; ++c) {
    mean_out[c] = static_cast<T>(mean[c]);
    invstd_out[c] = static_cast<T>(1.0 / std::sqrt(m2[c] / static_cast<acc_t>(rows) + eps));
  }
}

// The per-channel batch-norm constants: z = x alpha + shift.
template <typename T>
void affine_constants(const T* w, const T* b, const T* m, const T* r, int64_t G, T* alpha, T* shift) {
  for (int64_t c = 0; c < G; ++c) {
    const BnAffine<T> a = bn_affine(w[c], b[c], m[c], r[c]);
    alpha[c] = a.alpha;
    shift[c] = a.shift;
  }
}

// The sums of argmax_sums per chunk: s_u, s_ux, and with h s_uh, s_h, s_hx.
template <bool kWithH>
constexpr int64_t kArgmaxSums = kWithH ? 5 : 2;

// The argmax sums over window-row chunks, in parallel: per chunk, kArgmaxSums partials of G.
// Returns false if some index is not 0..3.
template <typename S, typename T, bool kWithH>
bool argmax_sums_over_chunks(const Geometry& geo, const S* xp, const S* hxp, const S* gyp, const uint8_t* ip,
                             const T* alpha, const T* shift, const T* mean, T slope,
                             std::vector<acc_t>& partial, int64_t& chunks) {
  const int64_t G = geo.G, per = window_rows_per_chunk(geo), arrays = kArgmaxSums<kWithH>;
  chunks = (geo.n * geo.Ho + per - 1) / per;
  partial.assign(chunks * G * arrays, acc_t(0));
  std::atomic<bool> bad{false};
  at::parallel_for(0, chunks, parallel_grain(per * geo.Wo * 4 * G), [&](int64_t k0, int64_t k1) {
    std::vector<T> scratch(5 * G);
    for (int64_t k = k0; k < k1; ++k) {
      const bool valid = argmax_sums<S, T, kWithH>(xp, hxp, gyp, ip, geo, k * per, std::min(geo.n * geo.Ho, (k + 1) * per),
                                                alpha, shift, mean, slope, scratch.data(),
                                                partial.data() + k * G * arrays);
      if (!valid) bad.store(true, std::memory_order_relaxed);
    }
  });
  return !bad.load();
}

// Per channel, the sum over chunks of array `which` of `arrays` per chunk.
void add_chunk_array(const std::vector<acc_t>& partial, int64_t chunks, int64_t G, int64_t arrays,
                     int64_t which, acc_t* total) {
  std::fill(total, total + G, acc_t(0));
  for (int64_t k = 0; k < chunks; ++k) {
    const acc_t* p = partial.data() + (k * arrays + which) * G;
    for (int64_t c = 0; c < G; ++c) total[c] += p[c];
  }
}

template <typename S, typename T, bool kWithH, bool kDgy>
void outputs_in_parallel(const Geometry& geo, S* out, S* dgy, const S* x, const S* h, const S* gy,
                         const uint8_t* idx, const T* alpha, const T* shift, const T* mean, T slope,
                         const OutputCoefficients<T>& q) {
  at::parallel_for(0, geo.n * geo.Ho, parallel_grain(2 * geo.W * geo.G), [&](int64_t io0, int64_t io1) {
    outputs<S, T, kWithH, kDgy>(out, dgy, x, h, gy, idx, geo, io0, io1, alpha, shift, mean, slope, q);
  });
}

template <typename S, typename T>
void forward_nhwc(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, double eps,
                  double slope_d, at::Tensor& y, at::Tensor& mean_out, at::Tensor& invstd_out,
                  at::Tensor& indices) {
  const Geometry geo = geometry(x);
  const int64_t G = geo.G;
  const S* xp = activations<S>(x);
  const T *wp = weight.data_ptr<T>(), *bp = bias.data_ptr<T>();
  S* yp = activations_out<S>(y);
  T *mp = mean_out.data_ptr<T>(), *rp = invstd_out.data_ptr<T>();
  uint8_t* ip = indices.data_ptr<uint8_t>();
  const T slope = static_cast<T>(slope_d);
  moments_over_row_chunks<S, T>(geo, xp, eps, mp, rp);

  std::vector<T> alpha(G), shift(G);
  affine_constants(wp, bp, mp, rp, G, alpha.data(), shift.data());
  at::parallel_for(0, geo.n * geo.Ho, parallel_grain(2 * geo.W * G), [&](int64_t io0, int64_t io1) {
    forward_windows<S, T>(xp, yp, ip, geo, io0, io1, alpha.data(), shift.data(), slope);
  });
}

template <typename S, typename T>
void backward_nhwc(const at::Tensor& gy, const at::Tensor& x, const at::Tensor& weight,
                   const at::Tensor& bias, const at::Tensor& mean, const at::Tensor& invstd,
                   const at::Tensor& indices, double slope_d, at::Tensor& gx, at::Tensor& gw,
                   at::Tensor& gb) {
  const Geometry geo = geometry(x);
  const int64_t G = geo.G;
  const S *gyp = activations<S>(gy), *xp = activations<S>(x);
  const T *wp = weight.data_ptr<T>();
  const T *bp = bias.data_ptr<T>(), *mp = mean.data_ptr<T>(), *rp = invstd.data_ptr<T>();
  const uint8_t* ip = indices.data_ptr<uint8_t>();
  S* gxp = activations_out<S>(gx);
  T *gwp = gw.data_ptr<T>(), *gbp = gb.data_ptr<T>();
  const T slope = static_cast<T>(slope_d);
  const acc_t M = static_cast<acc_t>(geo.rows());

  std::vector<T> alpha(G), shift(G);
  affine_constants(wp, bp, mp, rp, G, alpha.data(), shift.data());
  std::vector<acc_t> partial, su(G), sux(G);
  int64_t chunks = 0;
  if (!argmax_sums_over_chunks<S, T, false>(geo, xp, nullptr, gyp, ip, alpha.data(), shift.data(), mp, slope,
                                         partial, chunks)) {
    bn_lrelu_pool_invalid_indices("bn_lrelu_pool_backward");
  }
  add_chunk_array(partial, chunks, G, 2, 0, su.data());
  add_chunk_array(partial, chunks, G, 2, 1, sux.data());
  std::vector<T> e1(G), e0(G), wr_t(G);
  for (int64_t c = 0; c < G; ++c) {
    const BackwardCoefficients q = backward_coefficients(su[c], sux[c], wp[c], rp[c], M);
    gbp[c] = static_cast<T>(q.grad_bias);
    gwp[c] = static_cast<T>(q.grad_weight);
    e1[c] = static_cast<T>(q.e1);
    e0[c] = static_cast<T>(q.e0);
    wr_t[c] = static_cast<T>(q.wr);
  }
  const OutputCoefficients<T> q{e1.data(), e0.data(), nullptr, wr_t.data(), nullptr, nullptr, nullptr, nullptr, nullptr};
  outputs_in_parallel<S, T, false, false>(geo, gxp, nullptr, xp, nullptr, gyp, ip, alpha.data(), shift.data(), mp,
                                       slope, q);
}

template <typename S, typename T, bool kWithH>
void double_backward_with(const Geometry& geo, const S* gyp, const S* xp, const T* wp, const T* bp, const T* mp,
                          const T* rp, const uint8_t* ip, const S* hxp, const T* hwp, const T* hbp, T slope,
                          S* dgyp, S* dxp, T* dwp) {
  const int64_t G = geo.G;
  const acc_t M = static_cast<acc_t>(geo.rows());
  std::vector<T> alpha(G), shift(G);
  affine_constants(wp, bp, mp, rp, G, alpha.data(), shift.data());
  std::vector<acc_t> partial, su(G), sux(G), shu(G), sh(G, 0), shx(G, 0);
  int64_t chunks = 0;
  if (!argmax_sums_over_chunks<S, T, kWithH>(geo, xp, hxp, gyp, ip, alpha.data(), shift.data(), mp, slope, partial,
                                          chunks)) {
    bn_lrelu_pool_invalid_indices("bn_lrelu_pool_double_backward");
  }
  const int64_t arrays = kArgmaxSums<kWithH>;
  add_chunk_array(partial, chunks, G, arrays, 0, su.data());
  add_chunk_array(partial, chunks, G, arrays, 1, sux.data());
  if constexpr (kWithH) {
    add_chunk_array(partial, chunks, G, arrays, 2, shu.data());
    add_chunk_array(partial, chunks, G, arrays, 3, sh.data());
    add_chunk_array(partial, chunks, G, arrays, 4, shx.data());
  }
  std::vector<T> e1(G), e0(G), e_h(G), su_coef(G), wr(G), hm(G), cr(G), hw_r(G), hb_t(G);
  for (int64_t c = 0; c < G; ++c) {
    const DoubleBackwardCoefficients q = double_backward_coefficients(
        su[c], sux[c], shu[c], sh[c], shx[c], wp[c], rp[c], hwp ? hwp[c] : 0.0, hbp ? hbp[c] : 0.0, M);
    dwp[c] = static_cast<T>(q.d_weight);
    e_h[c] = static_cast<T>(q.e_h);
    e0[c] = static_cast<T>(q.e0);
    e1[c] = static_cast<T>(q.e1);
    su_coef[c] = static_cast<T>(q.su_coef);
    wr[c] = static_cast<T>(q.wr);
    hm[c] = static_cast<T>(q.hm);
    cr[c] = static_cast<T>(q.cr);
    hw_r[c] = static_cast<T>(q.hw_r);
    hb_t[c] = static_cast<T>(q.hb);
  }
  const OutputCoefficients<T> q{e1.data(), e0.data(), e_h.data(), su_coef.data(), wr.data(),
                                hm.data(), cr.data(), hw_r.data(), hb_t.data()};
  outputs_in_parallel<S, T, kWithH, true>(geo, dxp, dgyp, xp, kWithH ? hxp : nullptr, gyp, ip, alpha.data(),
                                       shift.data(), mp, slope, q);
}

template <typename S, typename T>
void double_backward_nhwc(const at::Tensor& gy, const at::Tensor& x, const at::Tensor& weight,
                          const at::Tensor& bias, const at::Tensor& mean, const at::Tensor& invstd,
                          const at::Tensor& indices, const at::Tensor* hx, const at::Tensor* hw,
                          const at::Tensor* hb, double slope, at::Tensor& d_gy, at::Tensor& d_x,
                          at::Tensor& d_w) {
  const Geometry geo = geometry(x);
  const S *gyp = activations<S>(gy), *xp = activations<S>(x);
  const T *wp = weight.data_ptr<T>();
  const T *bp = bias.data_ptr<T>(), *mp = mean.data_ptr<T>(), *rp = invstd.data_ptr<T>();
  const uint8_t* ip = indices.data_ptr<uint8_t>();
  const T* hwp = hw ? hw->data_ptr<T>() : nullptr;
  const T* hbp = hb ? hb->data_ptr<T>() : nullptr;
  S *dgyp = activations_out<S>(d_gy), *dxp = activations_out<S>(d_x);
  T* dwp = d_w.data_ptr<T>();
  const T s = static_cast<T>(slope);
  if (hx) {
    double_backward_with<S, T, true>(geo, gyp, xp, wp, bp, mp, rp, ip, activations<S>(*hx), hwp, hbp, s, dgyp,
                                     dxp, dwp);
  } else {
    double_backward_with<S, T, false>(geo, gyp, xp, wp, bp, mp, rp, ip, nullptr, hwp, hbp, s, dgyp, dxp, dwp);
  }
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
  at::Tensor mean = at::empty({geo.G}, weight.options());  // the statistics in the parameters' dtype
  at::Tensor invstd = at::empty({geo.G}, weight.options());
  at::Tensor indices =
      at::empty({geo.n, geo.G, geo.Ho, geo.Wo}, x.options().dtype(at::kByte).memory_format(kChannelsLast));
  const at::Tensor w = weight.contiguous(), b = bias.contiguous();
  // bfloat16 x: bfloat16 storage, float32 arithmetic and parameters (see the header comment).
  if (x.scalar_type() == at::kBFloat16) {
    forward_nhwc<bf16_bits, float>(x, w, b, eps, negative_slope, y, mean, invstd, indices);
  } else {
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bn_lrelu_pool_forward_cpu_nhwc", [&] {
      forward_nhwc<scalar_t, scalar_t>(x, w, b, eps, negative_slope, y, mean, invstd, indices);
    });
  }
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
  if (x.scalar_type() == at::kBFloat16) {
    backward_nhwc<bf16_bits, float>(gy, x, w, b, m, r, idx, negative_slope, gx, gw, gb);
  } else {
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bn_lrelu_pool_backward_cpu_nhwc", [&] {
      backward_nhwc<scalar_t, scalar_t>(gy, x, w, b, m, r, idx, negative_slope, gx, gw, gb);
    });
  }
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
  const at::Tensor* hx_arg = hx ? &hx_cl : nullptr;
  if (x.scalar_type() == at::kBFloat16) {
    double_backward_nhwc<bf16_bits, float>(gy, x, w, b, m, r, idx, hx_arg, hw, hb, negative_slope, d_gy, d_x, d_w);
  } else {
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bn_lrelu_pool_double_backward_cpu_nhwc", [&] {
      double_backward_nhwc<scalar_t, scalar_t>(gy, x, w, b, m, r, idx, hx_arg, hw, hb, negative_slope, d_gy, d_x,
                                               d_w);
    });
  }
  return {d_gy, d_x, d_w};
}

}  // namespace mamlpp_fast
