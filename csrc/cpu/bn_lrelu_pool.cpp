// CPU kernels for the fused stage  batch_norm(training) -> leaky_relu -> max_pool2d(2, 2)  of the
// grouped meta-batch layout: x is [n, G, H, W], each of the G channels normalised with its own
// batch statistics over its M = n*H*W elements. Notation (per channel, <.> = mean over M):
//
//   forward   mu = <x>, v = <(x-mu)^2>, r = (v+eps)^-1/2, xh = (x-mu) r, z = g xh + b,
//             a = lrelu(z), y = maxpool2x2(a), idx = argmax position in the window (first max).
//   backward  u = D * P^T gy (scatter gy to the argmax, D = 1 if z > 0 else slope),
//             gb = sum u, gg = sum u xh, gx = g r (u - <u> - xh <u xh>).
//   double    (cotangents hx, hg, hb of gx, gg, gb)  A = <u>, Bu = <u xh>, C = <hx xh>,
//             gu    = g r (hx - <hx> - xh C) + hg xh + hb           -> d gy = P(D gu)
//             S     = sum hx (u - A - xh Bu)                        -> d g  = r S
//             q     = -g r (Bu hx + C u) + hg u,  rho = g S
//             d x   = r (q - <q> - xh <q xh>) - rho r^2 xh / M
//             (d b is zero: b only moves the piecewise-constant masks D and P.)
//
// u is non-zero only at the n*G*(H/2)*(W/2) argmax positions, so every "full" quantity above is
// affine in (x - mu) and hx, plus a sparse correction at the argmax positions. Each kernel is
// therefore one or two reduction passes and one output pass per channel. Channels are
// independent and run in parallel (at::parallel_for).
//
// Vectorisation: loops are flat, never per row (Omniglot's planes are 28, 14, 7 and 3 wide, so
// row loops would be mostly remainder). Window loops run over the Ho*Wo windows of a plane and
// gather their corners (forward) or argmax (backward passes) through a table of window offsets,
// keeping what they gathered (u, x and hx at the argmax) in per-thread scratch; the output passes
// then write the dense affine part over the H*W elements as a streaming loop and add the sparse
// part at the J argmax positions, so no element gathers its window's values. Every select is a
// blend and every sum a vector reduction, in one copy of each per-plane function per x86-64 ISA
// level (simd.h). Sums run in the input dtype within a block of 1024 elements and accumulate in
// double across blocks. A channel's planes lie G planes apart, one per image, so the first pass
// over them (the mean, or the argmax sums) asks for the next plane's cache lines before working on
// the current one; later passes find the channel in cache.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <tuple>
#include <vector>

#include "bn_lrelu_pool.h"
#include "bn_lrelu_pool_common.h"
#include "bn_lrelu_pool_nhwc.h"
#include "simd.h"

namespace mamlpp_fast {
namespace {

using acc_t = double;

// Minimum elements handled by one parallel task, so small problems stay on the calling thread.
constexpr int64_t kGrainElements = 32768;

int64_t channel_grain(int64_t elements_per_channel) {
  return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, elements_per_channel));
}

// Elements summed in the input dtype before the partial sum moves to double.
constexpr int64_t kBlock = 1024;

// ---------------------------------------------------------------------------------------------
// per-plane building blocks (one image, one channel: H x W, pooled Ho x Wo)

// sum p.
template <typename T>
MAMLPP_FAST_SIMD_CLONES acc_t plane_sum(const T* __restrict__ p, int64_t len) {
  acc_t total = 0;
  for (int64_t b = 0; b < len; b += kBlock) {
    const int64_t e = std::min(len, b + kBlock);
    T s = 0;
    MAMLPP_FAST_SIMD_REDUCE(s)
    for (int64_t i = b; i < e; ++i) s += p[i];
    total += s;
  }
  return total;
}

// sum (p - mean)^2.
template <typename T>
MAMLPP_FAST_SIMD_CLONES acc_t plane_sum_sq_dev(const T* __restrict__ p, int64_t len, T mean) {
  acc_t total = 0;
  for (int64_t b = 0; b < len; b += kBlock) {
    const int64_t e = std::min(len, b + kBlock);
    T s = 0;
    MAMLPP_FAST_SIMD_REDUCE(s)
    for (int64_t i = b; i < e; ++i) {
      const T d = p[i] - mean;
      s += d * d;
    }
    total += s;
  }
  return total;
}

// sum h and sum h * (x - mean), accumulated into s_h and s_hx.
template <typename T>
MAMLPP_FAST_SIMD_CLONES void plane_sum_h(const T* __restrict__ h, const T* __restrict__ x,
                                         int64_t len, T mean, acc_t& s_h, acc_t& s_hx) {
  for (int64_t b = 0; b < len; b += kBlock) {
    const int64_t e = std::min(len, b + kBlock);
    T a = 0, c = 0;
    MAMLPP_FAST_SIMD_REDUCE(a, c)
    for (int64_t i = b; i < e; ++i) {
      a += h[i];
      c += h[i] * (x[i] - mean);
    }
    s_h += a;
    s_hx += c;
  }
}

// The window table of one plane geometry (H x W, windows Ho x Wo), shared by every plane of a
// call: it turns the 2x2 windows into flat loops over the J = Ho*Wo windows (gathering the four
// corners). Flat loops vectorise whatever the plane width; row loops would be mostly remainder at
// Omniglot's 14, 7 and 3.
struct WindowTables {
  int64_t J;
  std::vector<int32_t> corner;  // [J] flat offset of each window's top-left element

  WindowTables(int64_t h, int64_t w) : J((h / 2) * (w / 2)), corner(J) {
    TORCH_CHECK(h * w < (int64_t{1} << 31), "bn_lrelu_pool: planes of 2^31 or more elements are not supported");
    const int64_t wo = w / 2;
    for (int64_t j = 0; j < J; ++j) corner[j] = static_cast<int32_t>(2 * (j / wo) * w + 2 * (j % wo));
  }
};

// Ask for the next plane's cache lines while the current one is worked on. The argmax passes
// read a plane in window order, a pattern the hardware prefetcher does not follow, and a channel's
// planes are far apart (one per image, G planes apart).
template <typename T>
MAMLPP_FAST_ALWAYS_INLINE void prefetch_plane(const T* p, int64_t len) {
  const char* c = reinterpret_cast<const char*>(p);
  const int64_t bytes = len * static_cast<int64_t>(sizeof(T));
  for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(c + o);
}

// Flat offset of each window's argmax: corner + (k & 1) + (k >> 1) W for the stored index k.
// Returns false if some k is not 0..3 (indices that are not the forward's): the caller must then
// not use the offsets, which would point outside the window, or the plane.
MAMLPP_FAST_SIMD_CLONES bool argmax_offsets(int32_t* __restrict__ out, const int32_t* __restrict__ corner,
                                            const uint8_t* __restrict__ idx, int64_t J, int64_t W) {
  const int32_t w = static_cast<int32_t>(W);
  int32_t out_of_range = 0;
  MAMLPP_FAST_SIMD_REDUCE(out_of_range)
  for (int64_t j = 0; j < J; ++j) {
    const int32_t k = idx[j];
    out[j] = corner[j] + (k & 1) + (k >> 1) * w;
    out_of_range += k >> 2;
  }
  return out_of_range == 0;
}

// forward: y = max over each window of leaky_relu(alpha x + shift), idx = the first argmax.
//
// Written so that the scalar code gcc emits for small planes (no vector iteration at Omniglot's
// 3x3 and 1x1 windows grids) has no branches either: the leaky ReLU is max(z, slope z) (exact for
// 0 < slope <= 1; kMaxForm), the running max a maxss and the argmax a cmov. NaN: in this op a
// channel is NaN everywhere or nowhere (any non-finite x makes the mean, and hence every z,
// NaN), and for an all-NaN window !(a <= best) picks the last position, as ATen's max_pool2d.
//
// The window loop writes the argmax as int32 into `arg` (J entries of scratch), and a second loop
// narrows it to the uint8 `idx`: a uint8 store in the window loop would set its vectorisation
// factor to 64 windows (one byte lane each of a 512-bit vector), so Omniglot's 14x14 planes
// (49 windows) would run entirely in the scalar remainder; with int32 it is 16 (float32, AVX-512).
template <typename T, bool kMaxForm>
MAMLPP_FAST_SIMD_CLONES void forward_plane(const T* __restrict__ x, T* __restrict__ y,
                                           uint8_t* __restrict__ idx, int32_t* __restrict__ arg_out,
                                           const int32_t* __restrict__ corner, int64_t J, int64_t W,
                                           T alpha, T shift, T slope) {
  auto activate = [slope](T z) -> T {
    if constexpr (kMaxForm) {
      return std::max(z, z * slope);
    } else {
      return leaky_relu(z, slope);
    }
  };
  MAMLPP_FAST_SIMD
  for (int64_t j = 0; j < J; ++j) {
    const int64_t o = corner[j];
    const T a0 = activate(x[o] * alpha + shift);
    const T a1 = activate(x[o + 1] * alpha + shift);
    const T a2 = activate(x[o + W] * alpha + shift);
    const T a3 = activate(x[o + W + 1] * alpha + shift);
    int32_t arg = 0;
    T best = a0;
    arg = !(a1 <= best) ? 1 : arg;
    best = std::max(best, a1);
    arg = !(a2 <= best) ? 2 : arg;
    best = std::max(best, a2);
    arg = !(a3 <= best) ? 3 : arg;
    best = std::max(best, a3);
    y[j] = best;
    arg_out[j] = arg;
  }
  for (int64_t j = 0; j < J; ++j) idx[j] = static_cast<uint8_t>(arg_out[j]);
}

// Sums over the argmax positions am[j] of u = D gy (D: the leaky-relu slope there):
// s_u += sum u, s_ux += sum u (x - mean), and, with h, s_uh += sum u h. The gathered values are
// kept for the output pass (u_out[j] = u, with kKeepX x_out[j] = x, with h h_out[j] = h at am[j]),
// which then needs no gather: the argmax positions are the only places its sparse terms touch.
template <typename T, bool kWithH, bool kKeepX>
MAMLPP_FAST_SIMD_CLONES void argmax_sums_plane(const T* __restrict__ x, const T* __restrict__ h,
                                               const T* __restrict__ gy, const int32_t* __restrict__ am,
                                               int64_t J, T alpha, T shift, T slope, T mean,
                                               acc_t& s_u, acc_t& s_ux, acc_t& s_uh, T* __restrict__ u_out,
                                               T* __restrict__ x_out, T* __restrict__ h_out) {
  for (int64_t b = 0; b < J; b += kBlock) {
    const int64_t e = std::min(J, b + kBlock);
    T a = 0, c = 0, d = 0;
    MAMLPP_FAST_SIMD_REDUCE(a, c, d)
    for (int64_t j = b; j < e; ++j) {
      const T xv = x[am[j]];
      const T u = gy[j] * leaky_relu_slope(xv * alpha + shift, slope);
      a += u;
      c += u * (xv - mean);
      u_out[j] = u;
      if constexpr (kKeepX) x_out[j] = xv;
      if constexpr (kWithH) {
        const T hv = h[am[j]];
        d += u * hv;
        h_out[j] = hv;
      }
    }
    s_u += a;
    s_ux += c;
    s_uh += d;
  }
}

// The dense part of an output plane, out = e1 (x - mean) + e0 (+ e_h h): a streaming loop.
template <typename T, bool kWithH>
MAMLPP_FAST_SIMD_CLONES void affine_plane(T* __restrict__ out, const T* __restrict__ x,
                                          const T* __restrict__ h, int64_t HW, T mean, T e1, T e0,
                                          T e_h) {
  MAMLPP_FAST_SIMD
  for (int64_t p = 0; p < HW; ++p) {
    T v = e1 * (x[p] - mean) + e0;
    if constexpr (kWithH) v += e_h * h[p];
    out[p] = v;
  }
}

// The sparse part: out[am[j]] += coef u[j] at each window's argmax. Windows do not overlap, so
// the J positions are distinct; this touches a quarter of the plane, where a dense pass would
// gather every element's window value.
template <typename T>
MAMLPP_FAST_ALWAYS_INLINE void add_at_argmax(T* __restrict__ out, const int32_t* __restrict__ am,
                                             const T* __restrict__ u, int64_t J, T coef) {
  for (int64_t j = 0; j < J; ++j) out[am[j]] += coef * u[j];
}

// The d gy coefficients of DoubleBackwardCoefficients, in the input dtype:
// d gy = D (wr (hx - hm) + (hw_r - cr) (x - mean) + hb) at the argmax.
template <typename T>
struct DgyCoefficients {
  T wr, hm, cr, hw_r, hb;
  explicit DgyCoefficients(const DoubleBackwardCoefficients& q)
      : wr(static_cast<T>(q.wr)), hm(static_cast<T>(q.hm)), cr(static_cast<T>(q.cr)),
        hw_r(static_cast<T>(q.hw_r)), hb(static_cast<T>(q.hb)) {}
};

// d gy, one per window, from x and hx at its argmax (kept by argmax_sums_plane).
template <typename T, bool kWithH>
MAMLPP_FAST_SIMD_CLONES void double_backward_dgy_plane(T* __restrict__ dgy, const T* __restrict__ xv,
                                                       const T* __restrict__ hv, int64_t J, T alpha,
                                                       T shift, T slope, T mean, DgyCoefficients<T> q) {
  MAMLPP_FAST_SIMD
  for (int64_t j = 0; j < J; ++j) {
    const T h = kWithH ? hv[j] : T(0);
    const T d = leaky_relu_slope(xv[j] * alpha + shift, slope);
    dgy[j] = d * (q.wr * (h - q.hm) + (q.hw_r - q.cr) * (xv[j] - mean) + q.hb);
  }
}

struct Geometry {
  int64_t n, G, H, W, Ho, Wo;
  int64_t plane() const { return H * W; }
  int64_t pooled_plane() const { return Ho * Wo; }
  int64_t x_offset(int64_t i, int64_t g) const { return (i * G + g) * plane(); }
  int64_t y_offset(int64_t i, int64_t g) const { return (i * G + g) * pooled_plane(); }
};

Geometry geometry(const at::Tensor& x) {
  return {x.size(0), x.size(1), x.size(2), x.size(3), x.size(2) / 2, x.size(3) / 2};
}

// ---------------------------------------------------------------------------------------------
// forward

template <typename scalar_t>
void forward_kernel(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                    double eps, double slope_d, at::Tensor& y, at::Tensor& mean_out,
                    at::Tensor& invstd_out, at::Tensor& indices) {
  const Geometry geo = geometry(x);
  const int64_t HW = geo.plane();
  const acc_t M = static_cast<acc_t>(geo.n * HW);
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const scalar_t* wp = weight.data_ptr<scalar_t>();
  const scalar_t* bp = bias.data_ptr<scalar_t>();
  scalar_t* yp = y.data_ptr<scalar_t>();
  scalar_t* mp = mean_out.data_ptr<scalar_t>();
  scalar_t* rp = invstd_out.data_ptr<scalar_t>();
  uint8_t* ip = indices.data_ptr<uint8_t>();
  const scalar_t slope = static_cast<scalar_t>(slope_d);
  const bool max_form = slope_d > 0 && slope_d <= 1;  // leaky_relu(z) == max(z, slope z)
  const WindowTables tables(geo.H, geo.W);

  at::parallel_for(0, geo.G, channel_grain(geo.n * HW), [&](int64_t g0, int64_t g1) {
    std::vector<int32_t> arg(tables.J);  // one plane's argmax, before narrowing to uint8
    for (int64_t g = g0; g < g1; ++g) {
      // Two-pass statistics (mean, then squared deviations): exact enough for float64 too.
      acc_t s = 0;
      for (int64_t i = 0; i < geo.n; ++i) {
        if (i + 1 < geo.n) prefetch_plane(xp + geo.x_offset(i + 1, g), HW);
        s += plane_sum(xp + geo.x_offset(i, g), HW);
      }
      const scalar_t mean = static_cast<scalar_t>(s / M);
      acc_t ss = 0;
      for (int64_t i = 0; i < geo.n; ++i) ss += plane_sum_sq_dev(xp + geo.x_offset(i, g), HW, mean);
      const scalar_t invstd = static_cast<scalar_t>(1.0 / std::sqrt(ss / M + eps));
      mp[g] = mean;
      rp[g] = invstd;
      const BnAffine<scalar_t> c = bn_affine(wp[g], bp[g], mean, invstd);
      for (int64_t i = 0; i < geo.n; ++i) {
        const scalar_t* xi = xp + geo.x_offset(i, g);
        scalar_t* yi = yp + geo.y_offset(i, g);
        uint8_t* ii = ip + geo.y_offset(i, g);
        if (max_form) {
          forward_plane<scalar_t, true>(xi, yi, ii, arg.data(), tables.corner.data(), tables.J, geo.W,
                                        c.alpha, c.shift, slope);
        } else {
          forward_plane<scalar_t, false>(xi, yi, ii, arg.data(), tables.corner.data(), tables.J, geo.W,
                                         c.alpha, c.shift, slope);
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_lrelu_pool_forward_cpu(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, double eps,
    double negative_slope) {
  constexpr const char* op = "bn_lrelu_pool_forward";
  check_bn_lrelu_pool_x(op, x, /*allow_channels_last=*/true);
  check_bn_lrelu_pool_channel_vec(op, "weight", weight, x);
  check_bn_lrelu_pool_channel_vec(op, "bias", bias, x);
  TORCH_CHECK(eps > 0, op, ": eps must be positive, got ", eps);
  TORCH_INTERNAL_ASSERT(x.device().is_cpu());
  if (bn_lrelu_pool_is_channels_last(x)) return bn_lrelu_pool_forward_cpu_nhwc(x, weight, bias, eps, negative_slope);
  const auto geo = geometry(x);
  at::Tensor y = at::empty({geo.n, geo.G, geo.Ho, geo.Wo}, x.options());
  at::Tensor mean = at::empty({geo.G}, x.options());
  at::Tensor invstd = at::empty({geo.G}, x.options());
  at::Tensor indices = at::empty({geo.n, geo.G, geo.Ho, geo.Wo}, x.options().dtype(at::kByte));
  const at::Tensor w = weight.contiguous(), b = bias.contiguous();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bn_lrelu_pool_forward_cpu", [&] {
    forward_kernel<scalar_t>(x, w, b, eps, negative_slope, y, mean, invstd, indices);
  });
  return {y, mean, invstd, indices};
}

// ---------------------------------------------------------------------------------------------
// backward

template <typename scalar_t>
void backward_kernel(const at::Tensor& gy, const at::Tensor& x, const at::Tensor& weight,
                     const at::Tensor& bias, const at::Tensor& mean, const at::Tensor& invstd,
                     const at::Tensor& indices, double slope_d, at::Tensor& gx, at::Tensor& gw,
                     at::Tensor& gb) {
  const Geometry geo = geometry(x);
  const int64_t HW = geo.plane();
  const acc_t M = static_cast<acc_t>(geo.n * HW);
  const scalar_t* gyp = gy.data_ptr<scalar_t>();
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const scalar_t* wp = weight.data_ptr<scalar_t>();
  const scalar_t* bp = bias.data_ptr<scalar_t>();
  const scalar_t* mp = mean.data_ptr<scalar_t>();
  const scalar_t* rp = invstd.data_ptr<scalar_t>();
  const uint8_t* ip = indices.data_ptr<uint8_t>();
  scalar_t* gxp = gx.data_ptr<scalar_t>();
  scalar_t* gwp = gw.data_ptr<scalar_t>();
  scalar_t* gbp = gb.data_ptr<scalar_t>();
  const scalar_t slope = static_cast<scalar_t>(slope_d);
  const WindowTables tables(geo.H, geo.W);
  const int64_t J = tables.J;

  std::atomic<bool> bad_indices{false};
  at::parallel_for(0, geo.G, channel_grain(geo.n * HW), [&](int64_t g0, int64_t g1) {
    // Per image and window: the flat offset of the argmax, and u there.
    std::vector<int32_t> argmax(geo.n * J);
    std::vector<scalar_t> u(geo.n * J);
    for (int64_t g = g0; g < g1; ++g) {
      const BnAffine<scalar_t> c = bn_affine(wp[g], bp[g], mp[g], rp[g]);
      const acc_t r = rp[g];
      acc_t su = 0, sux = 0, unused = 0;
      bool valid = true;
      for (int64_t i = 0; i < geo.n && valid; ++i) {
        int32_t* am = argmax.data() + i * J;
        if (i + 1 < geo.n) prefetch_plane(xp + geo.x_offset(i + 1, g), HW);
        valid = argmax_offsets(am, tables.corner.data(), ip + geo.y_offset(i, g), J, geo.W);
        if (valid) {
          argmax_sums_plane<scalar_t, false, false>(xp + geo.x_offset(i, g), nullptr, gyp + geo.y_offset(i, g),
                                                    am, J, c.alpha, c.shift, slope, mp[g], su, sux, unused,
                                                    u.data() + i * J, nullptr, nullptr);
        }
      }
      if (!valid) {
        bad_indices.store(true, std::memory_order_relaxed);
        continue;
      }
      const BackwardCoefficients q = backward_coefficients(su, sux, wp[g], r, M);
      gbp[g] = static_cast<scalar_t>(q.grad_bias);
      gwp[g] = static_cast<scalar_t>(q.grad_weight);
      const auto e1 = static_cast<scalar_t>(q.e1), e0 = static_cast<scalar_t>(q.e0);
      for (int64_t i = 0; i < geo.n; ++i) {
        scalar_t* gxi = gxp + geo.x_offset(i, g);
        affine_plane<scalar_t, false>(gxi, xp + geo.x_offset(i, g), nullptr, HW, mp[g], e1, e0, 0);
        add_at_argmax(gxi, argmax.data() + i * J, u.data() + i * J, J, static_cast<scalar_t>(q.wr));
      }
    }
  });
  if (bad_indices.load()) bn_lrelu_pool_invalid_indices("bn_lrelu_pool_backward");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_lrelu_pool_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& bias, const at::Tensor& mean, const at::Tensor& invstd,
    const at::Tensor& indices, double negative_slope) {
  constexpr const char* op = "bn_lrelu_pool_backward";
  check_bn_lrelu_pool_backward_args(op, grad_y, x, weight, bias, mean, invstd, indices, /*allow_channels_last=*/true);
  TORCH_INTERNAL_ASSERT(x.device().is_cpu());
  if (bn_lrelu_pool_is_channels_last(x)) {
    return bn_lrelu_pool_backward_cpu_nhwc(grad_y, x, weight, bias, mean, invstd, indices, negative_slope);
  }
  // Incoming gradients are often expanded or strided views; the kernels read dense planes.
  const at::Tensor gy = grad_y.contiguous(), idx = indices.contiguous();
  const at::Tensor w = weight.contiguous(), b = bias.contiguous();
  const at::Tensor m = mean.contiguous(), r = invstd.contiguous();
  at::Tensor gx = at::empty_like(x);
  at::Tensor gw = at::empty_like(w);
  at::Tensor gb = at::empty_like(b);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bn_lrelu_pool_backward_cpu", [&] {
    backward_kernel<scalar_t>(gy, x, w, b, m, r, idx, negative_slope, gx, gw, gb);
  });
  return {gx, gw, gb};
}

// ---------------------------------------------------------------------------------------------
// double backward

// Scratch of one thread for double_backward_channel: per image and window, the flat offset of the
// argmax and u, x and (with a cotangent hx) hx there.
template <typename scalar_t>
struct ArgmaxScratch {
  std::vector<int32_t> offset;
  std::vector<scalar_t> u, x, h;
  ArgmaxScratch(int64_t size, bool with_h) : offset(size), u(size), x(size), h(with_h ? size : 0) {}
};

// One channel of the double backward; false (and nothing written) if `indices` holds a value
// outside 0..3.

template <typename scalar_t, bool kWithH>
bool double_backward_channel(const Geometry& geo, const WindowTables& tables, ArgmaxScratch<scalar_t>& at,
                             int64_t g, const scalar_t* gyp,
                             const scalar_t* xp, const scalar_t* wp, const scalar_t* bp,
                             const scalar_t* mp, const scalar_t* rp, const uint8_t* ip,
                             const scalar_t* hxp, const scalar_t* hwp, const scalar_t* hbp,
                             scalar_t slope, scalar_t* dgyp, scalar_t* dxp, scalar_t* dwp) {
  const int64_t HW = geo.plane();
  const acc_t M = static_cast<acc_t>(geo.n * HW);
  const BnAffine<scalar_t> c = bn_affine(wp[g], bp[g], mp[g], rp[g]);
  const acc_t r = rp[g], w = wp[g];
  const acc_t hw = hwp ? static_cast<acc_t>(hwp[g]) : 0;
  const acc_t hb = hbp ? static_cast<acc_t>(hbp[g]) : 0;
  auto plane = [&](const scalar_t* p, int64_t i) { return p + geo.x_offset(i, g); };

  // Sparse reductions over the argmax positions: sum u, sum u xh, sum hx u.
  acc_t su = 0, sux = 0, shu = 0;
  const int64_t J = tables.J;
  for (int64_t i = 0; i < geo.n; ++i) {
    int32_t* am = at.offset.data() + i * J;
    if (i + 1 < geo.n) {
      prefetch_plane(plane(xp, i + 1), HW);
      if constexpr (kWithH) prefetch_plane(plane(hxp, i + 1), HW);
    }
    if (!argmax_offsets(am, tables.corner.data(), ip + geo.y_offset(i, g), J, geo.W)) return false;
    argmax_sums_plane<scalar_t, kWithH, true>(plane(xp, i), kWithH ? plane(hxp, i) : nullptr,
                                        gyp + geo.y_offset(i, g), am, J, c.alpha, c.shift, slope,
                                        mp[g], su, sux, shu, at.u.data() + i * J, at.x.data() + i * J,
                                        kWithH ? at.h.data() + i * J : nullptr);
  }
  // Dense reductions over hx: sum hx, sum hx (x - mean).
  acc_t sh = 0, shx = 0;
  if constexpr (kWithH) {
    for (int64_t i = 0; i < geo.n; ++i) plane_sum_h(plane(hxp, i), plane(xp, i), HW, mp[g], sh, shx);
  }
  const DoubleBackwardCoefficients q = double_backward_coefficients(su, sux, shu, sh, shx, w, r, hw, hb, M);
  dwp[g] = static_cast<scalar_t>(q.d_weight);
  const auto e1 = static_cast<scalar_t>(q.e1), e0 = static_cast<scalar_t>(q.e0);
  const auto e_h = static_cast<scalar_t>(q.e_h), su_coef = static_cast<scalar_t>(q.su_coef);
  const DgyCoefficients<scalar_t> dgy_q(q);
  for (int64_t i = 0; i < geo.n; ++i) {
    scalar_t* dxi = dxp + geo.x_offset(i, g);
    affine_plane<scalar_t, kWithH>(dxi, plane(xp, i), kWithH ? plane(hxp, i) : nullptr, HW, mp[g], e1, e0, e_h);
    add_at_argmax(dxi, at.offset.data() + i * J, at.u.data() + i * J, J, su_coef);
    double_backward_dgy_plane<scalar_t, kWithH>(dgyp + geo.y_offset(i, g), at.x.data() + i * J,
                                                kWithH ? at.h.data() + i * J : nullptr, J, c.alpha,
                                                c.shift, slope, mp[g], dgy_q);
  }
  return true;
}

template <typename scalar_t>
void double_backward_kernel(const at::Tensor& gy, const at::Tensor& x, const at::Tensor& weight,
                            const at::Tensor& bias, const at::Tensor& mean,
                            const at::Tensor& invstd, const at::Tensor& indices,
                            const at::Tensor* hx_t, const at::Tensor* hw_t,
                            const at::Tensor* hb_t, double slope, at::Tensor& d_gy,
                            at::Tensor& d_x, at::Tensor& d_w) {
  const Geometry geo = geometry(x);
  const scalar_t* gyp = gy.data_ptr<scalar_t>();
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const scalar_t* wp = weight.data_ptr<scalar_t>();
  const scalar_t* bp = bias.data_ptr<scalar_t>();
  const scalar_t* mp = mean.data_ptr<scalar_t>();
  const scalar_t* rp = invstd.data_ptr<scalar_t>();
  const uint8_t* ip = indices.data_ptr<uint8_t>();
  const scalar_t* hxp = hx_t ? hx_t->data_ptr<scalar_t>() : nullptr;
  const scalar_t* hwp = hw_t ? hw_t->data_ptr<scalar_t>() : nullptr;
  const scalar_t* hbp = hb_t ? hb_t->data_ptr<scalar_t>() : nullptr;
  scalar_t* dgyp = d_gy.data_ptr<scalar_t>();
  scalar_t* dxp = d_x.data_ptr<scalar_t>();
  scalar_t* dwp = d_w.data_ptr<scalar_t>();
  const scalar_t s = static_cast<scalar_t>(slope);
  const WindowTables tables(geo.H, geo.W);

  std::atomic<bool> bad_indices{false};
  at::parallel_for(0, geo.G, channel_grain(geo.n * geo.plane()), [&](int64_t g0, int64_t g1) {
    ArgmaxScratch<scalar_t> scratch(geo.n * tables.J, hxp != nullptr);
    for (int64_t g = g0; g < g1; ++g) {
      const bool valid =
          hxp ? double_backward_channel<scalar_t, true>(geo, tables, scratch, g, gyp, xp, wp, bp, mp,
                                                        rp, ip, hxp, hwp, hbp, s, dgyp, dxp, dwp)
              : double_backward_channel<scalar_t, false>(geo, tables, scratch, g, gyp, xp, wp, bp,
                                                         mp, rp, ip, hxp, hwp, hbp, s, dgyp, dxp, dwp);
      if (!valid) bad_indices.store(true, std::memory_order_relaxed);
    }
  });
  if (bad_indices.load()) bn_lrelu_pool_invalid_indices("bn_lrelu_pool_double_backward");
}

const at::Tensor* optional_cotangent(const char* op, const char* name,
                                     const std::optional<at::Tensor>& t, const at::Tensor& like,
                                     at::Tensor& storage) {
  if (!t.has_value() || !t->defined()) return nullptr;
  TORCH_CHECK(t->sizes() == like.sizes(), op, ": ", name, " must have shape ", like.sizes(),
              ", got ", t->sizes());
  TORCH_CHECK(t->scalar_type() == like.scalar_type(), op, ": ", name, " must have dtype ",
              like.scalar_type(), ", got ", t->scalar_type());
  TORCH_CHECK(t->device() == like.device(), op, ": ", name, " must be on device ", like.device(),
              ", got ", t->device());
  storage = t->contiguous(like.suggest_memory_format());  // x's layout, NCHW or channels-last
  return &storage;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_lrelu_pool_double_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& bias, const at::Tensor& mean, const at::Tensor& invstd,
    const at::Tensor& indices, const std::optional<at::Tensor>& grad_grad_x,
    const std::optional<at::Tensor>& grad_grad_weight,
    const std::optional<at::Tensor>& grad_grad_bias, double negative_slope) {
  constexpr const char* op = "bn_lrelu_pool_double_backward";
  check_bn_lrelu_pool_backward_args(op, grad_y, x, weight, bias, mean, invstd, indices, /*allow_channels_last=*/true);
  TORCH_INTERNAL_ASSERT(x.device().is_cpu());
  at::Tensor hx_s, hw_s, hb_s;
  const at::Tensor* hx = optional_cotangent(op, "grad_grad_x", grad_grad_x, x, hx_s);
  const at::Tensor* hw = optional_cotangent(op, "grad_grad_weight", grad_grad_weight, weight, hw_s);
  const at::Tensor* hb = optional_cotangent(op, "grad_grad_bias", grad_grad_bias, bias, hb_s);
  if (bn_lrelu_pool_is_channels_last(x)) {
    return bn_lrelu_pool_double_backward_cpu_nhwc(grad_y, x, weight, bias, mean, invstd, indices, hx, hw,
                                                  hb, negative_slope);
  }
  const at::Tensor gy = grad_y.contiguous(), idx = indices.contiguous();
  const at::Tensor w = weight.contiguous(), b = bias.contiguous();
  const at::Tensor m = mean.contiguous(), r = invstd.contiguous();
  at::Tensor d_gy = at::empty(gy.sizes(), x.options());
  at::Tensor d_x = at::empty_like(x);
  at::Tensor d_w = at::empty_like(w);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bn_lrelu_pool_double_backward_cpu", [&] {
    double_backward_kernel<scalar_t>(gy, x, w, b, m, r, idx, hx, hw, hb, negative_slope, d_gy, d_x,
                                     d_w);
  });
  return {d_gy, d_x, d_w};
}

}  // namespace

TORCH_LIBRARY_IMPL(mamlpp_fast, CPU, m) {
  m.impl("bn_lrelu_pool_forward", &bn_lrelu_pool_forward_cpu);
  m.impl("bn_lrelu_pool_backward", &bn_lrelu_pool_backward_cpu);
  m.impl("bn_lrelu_pool_double_backward", &bn_lrelu_pool_double_backward_cpu);
}

}  // namespace mamlpp_fast
