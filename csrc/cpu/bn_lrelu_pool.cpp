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
// independent and run in parallel; sums accumulate in double.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>

#include "bn_lrelu_pool.h"

namespace mamlpp_fast {
namespace {

using acc_t = double;

// Minimum elements handled by one parallel task, so small problems stay on the calling thread.
constexpr int64_t kGrainElements = 32768;

int64_t channel_grain(int64_t elements_per_channel) {
  return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, elements_per_channel));
}

// Eight independent partial sums: the lanes let gcc vectorise the reduction without -ffast-math.
constexpr int kLanes = 8;

template <typename scalar_t>
acc_t sum_plane(const scalar_t* __restrict__ p, int64_t n) {
  acc_t acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) acc[l] += static_cast<acc_t>(p[i + l]);
  acc_t s = 0;
  for (; i < n; ++i) s += static_cast<acc_t>(p[i]);
  for (int l = 0; l < kLanes; ++l) s += acc[l];
  return s;
}

template <typename scalar_t>
acc_t sum_sq_dev_plane(const scalar_t* __restrict__ p, int64_t n, acc_t mean) {
  acc_t acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) {
      const acc_t d = static_cast<acc_t>(p[i + l]) - mean;
      acc[l] += d * d;
    }
  acc_t s = 0;
  for (; i < n; ++i) {
    const acc_t d = static_cast<acc_t>(p[i]) - mean;
    s += d * d;
  }
  for (int l = 0; l < kLanes; ++l) s += acc[l];
  return s;
}

// sum h and sum h * (x - mean).
template <typename scalar_t>
void sum_h_hxc_plane(const scalar_t* __restrict__ h, const scalar_t* __restrict__ x, int64_t n,
                     acc_t mean, acc_t& s_h, acc_t& s_hx) {
  acc_t a[kLanes] = {}, b[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) {
      const acc_t hv = static_cast<acc_t>(h[i + l]);
      a[l] += hv;
      b[l] += hv * (static_cast<acc_t>(x[i + l]) - mean);
    }
  acc_t sa = 0, sb = 0;
  for (; i < n; ++i) {
    const acc_t hv = static_cast<acc_t>(h[i]);
    sa += hv;
    sb += hv * (static_cast<acc_t>(x[i]) - mean);
  }
  for (int l = 0; l < kLanes; ++l) {
    sa += a[l];
    sb += b[l];
  }
  s_h += sa;
  s_hx += sb;
}

// Walks the 2x2 windows of one channel: f(image, flat pooled offset, flat offset of the argmax in
// x's plane). Dropped odd trailing rows/columns are never visited.
struct PooledGeometry {
  int64_t n, G, H, W, Ho, Wo;
  int64_t plane() const { return H * W; }
  int64_t pooled_plane() const { return Ho * Wo; }
  int64_t x_offset(int64_t i, int64_t g) const { return (i * G + g) * plane(); }
  int64_t y_offset(int64_t i, int64_t g) const { return (i * G + g) * pooled_plane(); }
  template <typename F>
  void for_each_argmax(int64_t g, const uint8_t* __restrict__ idx, F&& f) const {
    for (int64_t i = 0; i < n; ++i) {
      const int64_t yo = y_offset(i, g);
      const int64_t xo = x_offset(i, g);
      for (int64_t oh = 0; oh < Ho; ++oh)
        for (int64_t ow = 0; ow < Wo; ++ow) {
          const int64_t py = yo + oh * Wo + ow;
          const int k = idx[py];
          const int64_t px = xo + (2 * oh + (k >> 1)) * W + 2 * ow + (k & 1);
          f(py, px);
        }
    }
  }
};

PooledGeometry geometry(const at::Tensor& x) {
  return {x.size(0), x.size(1), x.size(2), x.size(3), x.size(2) / 2, x.size(3) / 2};
}

// ---------------------------------------------------------------------------------------------
// forward

template <typename scalar_t>
void forward_kernel(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                    double eps, double slope_d, at::Tensor& y, at::Tensor& mean_out,
                    at::Tensor& invstd_out, at::Tensor& indices) {
  const PooledGeometry geo = geometry(x);
  const int64_t HW = geo.plane(), W = geo.W, Wo = geo.Wo, Ho = geo.Ho;
  const acc_t M = static_cast<acc_t>(geo.n * HW);
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const scalar_t* wp = weight.data_ptr<scalar_t>();
  const scalar_t* bp = bias.data_ptr<scalar_t>();
  scalar_t* yp = y.data_ptr<scalar_t>();
  scalar_t* mp = mean_out.data_ptr<scalar_t>();
  scalar_t* rp = invstd_out.data_ptr<scalar_t>();
  uint8_t* ip = indices.data_ptr<uint8_t>();
  const scalar_t slope = static_cast<scalar_t>(slope_d);
  const bool max_form = slope_d > 0 && slope_d <= 1;
  const scalar_t factor[2] = {slope, scalar_t(1)};

  at::parallel_for(0, geo.G, channel_grain(geo.n * HW), [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      // Two-pass statistics (mean, then squared deviations): exact enough for float64 too.
      acc_t s = 0;
      for (int64_t i = 0; i < geo.n; ++i) s += sum_plane(xp + geo.x_offset(i, g), HW);
      const acc_t mu = s / M;
      acc_t ss = 0;
      for (int64_t i = 0; i < geo.n; ++i) ss += sum_sq_dev_plane(xp + geo.x_offset(i, g), HW, mu);
      const scalar_t mean = static_cast<scalar_t>(mu);
      const scalar_t invstd = static_cast<scalar_t>(1.0 / std::sqrt(ss / M + eps));
      mp[g] = mean;
      rp[g] = invstd;
      const BnAffine<scalar_t> c = bn_affine(wp[g], bp[g], mean, invstd);

      // Instantiated once per leaky-ReLU form, so the choice is made per channel, not per element.
      auto pool_channel = [&](auto leaky_relu) {
        for (int64_t i = 0; i < geo.n; ++i) {
          const scalar_t* xc = xp + geo.x_offset(i, g);
          scalar_t* yc = yp + geo.y_offset(i, g);
          uint8_t* ic = ip + geo.y_offset(i, g);
          for (int64_t oh = 0; oh < Ho; ++oh) {
            const scalar_t* r0 = xc + 2 * oh * W;
            const scalar_t* r1 = r0 + W;
            for (int64_t ow = 0; ow < Wo; ++ow) {
              scalar_t a[4] = {r0[2 * ow], r0[2 * ow + 1], r1[2 * ow], r1[2 * ow + 1]};
              for (int k = 0; k < 4; ++k) a[k] = leaky_relu(a[k] * c.alpha + c.shift);
              // First max in row-major order; NaN wins (as ATen's max_pool2d). Selects, not
              // branches: on real data the comparisons are unpredictable (3-4x slower branchy).
              scalar_t best = a[0];
              uint8_t arg = 0;
              for (int k = 1; k < 4; ++k) {
                const bool take = (a[k] > best) | (a[k] != a[k]);
                best = take ? a[k] : best;
                arg = take ? static_cast<uint8_t>(k) : arg;
              }
              yc[oh * Wo + ow] = best;
              ic[oh * Wo + ow] = arg;
            }
          }
        }
      };
      // Branch-free leaky ReLU, bit-identical to z > 0 ? z : z * slope: for 0 < slope <= 1 it is
      // max(z, slope * z) (one instruction); otherwise a multiply by a {slope, 1} table entry.
      if (max_form) {
        pool_channel([slope](scalar_t z) { return std::max(z, z * slope); });
      } else {
        pool_channel([&factor](scalar_t z) { return z * factor[z > 0]; });
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_lrelu_pool_forward_cpu(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, double eps,
    double negative_slope) {
  constexpr const char* op = "bn_lrelu_pool_forward";
  check_bn_lrelu_pool_x(op, x);
  check_bn_lrelu_pool_channel_vec(op, "weight", weight, x);
  check_bn_lrelu_pool_channel_vec(op, "bias", bias, x);
  TORCH_CHECK(eps > 0, op, ": eps must be positive, got ", eps);
  TORCH_INTERNAL_ASSERT(x.device().is_cpu());
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

// Per-channel constants shared by the backward and double-backward kernels.
template <typename scalar_t>
struct ChannelState {
  BnAffine<scalar_t> c;
  scalar_t slope;
  acc_t mean, invstd, weight;
  // D * gy at an argmax position px (flat in x) holding gy value g.
  // A table lookup instead of a branch on the sign of z: the sign is unpredictable on real data.
  acc_t u(scalar_t xv, scalar_t gy) const { return static_cast<acc_t>(gy) * d(xv); }
  acc_t d(scalar_t xv) const {
    const scalar_t z = xv * c.alpha + c.shift;
    const acc_t factor[2] = {static_cast<acc_t>(slope), acc_t(1)};
    return factor[z > 0];
  }
  acc_t xhat(scalar_t xv) const { return (static_cast<acc_t>(xv) - mean) * invstd; }
};

template <typename scalar_t>
ChannelState<scalar_t> channel_state(int64_t g, const scalar_t* wp, const scalar_t* bp,
                                     const scalar_t* mp, const scalar_t* rp, double slope) {
  return {bn_affine(wp[g], bp[g], mp[g], rp[g]), static_cast<scalar_t>(slope),
          static_cast<acc_t>(mp[g]), static_cast<acc_t>(rp[g]), static_cast<acc_t>(wp[g])};
}

// out = c1 * (x - mean) + c0 over one plane (+= hcoef * h when h is given).
template <typename scalar_t>
void affine_plane(scalar_t* __restrict__ out, const scalar_t* __restrict__ x,
                  const scalar_t* __restrict__ h, int64_t n, scalar_t mean, scalar_t c1,
                  scalar_t c0, scalar_t hcoef) {
  if (h == nullptr) {
    for (int64_t i = 0; i < n; ++i) out[i] = c1 * (x[i] - mean) + c0;
  } else {
    for (int64_t i = 0; i < n; ++i) out[i] = c1 * (x[i] - mean) + c0 + hcoef * h[i];
  }
}

template <typename scalar_t>
void backward_kernel(const at::Tensor& gy, const at::Tensor& x, const at::Tensor& weight,
                     const at::Tensor& bias, const at::Tensor& mean, const at::Tensor& invstd,
                     const at::Tensor& indices, double slope, at::Tensor& gx, at::Tensor& gw,
                     at::Tensor& gb) {
  const PooledGeometry geo = geometry(x);
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

  at::parallel_for(0, geo.G, channel_grain(geo.n * HW), [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      const auto st = channel_state(g, wp, bp, mp, rp, slope);
      acc_t su = 0, sux = 0;
      geo.for_each_argmax(g, ip, [&](int64_t py, int64_t px) {
        const acc_t u = st.u(xp[px], gyp[py]);
        su += u;
        sux += u * st.xhat(xp[px]);
      });
      gbp[g] = static_cast<scalar_t>(su);
      gwp[g] = static_cast<scalar_t>(sux);
      // gx = w r (u - A - xh Bu) = c1 (x - mu) + c0, plus w r u at the argmax positions.
      const acc_t wr = st.weight * st.invstd;
      const scalar_t c1 = static_cast<scalar_t>(-wr * st.invstd * (sux / M));
      const scalar_t c0 = static_cast<scalar_t>(-wr * (su / M));
      for (int64_t i = 0; i < geo.n; ++i) {
        const int64_t o = geo.x_offset(i, g);
        affine_plane<scalar_t>(gxp + o, xp + o, nullptr, HW, mp[g], c1, c0, 0);
      }
      geo.for_each_argmax(g, ip, [&](int64_t py, int64_t px) {
        gxp[px] += static_cast<scalar_t>(wr * st.u(xp[px], gyp[py]));
      });
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_lrelu_pool_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& bias, const at::Tensor& mean, const at::Tensor& invstd,
    const at::Tensor& indices, double negative_slope) {
  constexpr const char* op = "bn_lrelu_pool_backward";
  check_bn_lrelu_pool_backward_args(op, grad_y, x, weight, bias, mean, invstd, indices);
  TORCH_INTERNAL_ASSERT(x.device().is_cpu());
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

template <typename scalar_t>
void double_backward_kernel(const at::Tensor& gy, const at::Tensor& x, const at::Tensor& weight,
                            const at::Tensor& bias, const at::Tensor& mean,
                            const at::Tensor& invstd, const at::Tensor& indices,
                            const at::Tensor* hx_t, const at::Tensor* hw_t,
                            const at::Tensor* hb_t, double slope, at::Tensor& d_gy,
                            at::Tensor& d_x, at::Tensor& d_w) {
  const PooledGeometry geo = geometry(x);
  const int64_t HW = geo.plane();
  const acc_t M = static_cast<acc_t>(geo.n * HW);
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

  at::parallel_for(0, geo.G, channel_grain(geo.n * HW), [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      const auto st = channel_state(g, wp, bp, mp, rp, slope);
      const acc_t r = st.invstd, w = st.weight;
      const acc_t hw = hwp ? static_cast<acc_t>(hwp[g]) : 0;
      const acc_t hb = hbp ? static_cast<acc_t>(hbp[g]) : 0;

      // Sparse reductions over the argmax positions: sum u, sum u xh, sum hx u.
      acc_t su = 0, sux = 0, shu = 0;
      geo.for_each_argmax(g, ip, [&](int64_t py, int64_t px) {
        const acc_t u = st.u(xp[px], gyp[py]);
        su += u;
        sux += u * st.xhat(xp[px]);
        if (hxp) shu += u * static_cast<acc_t>(hxp[px]);
      });
      // Dense reductions over hx: sum hx, sum hx xh.
      acc_t sh = 0, shx = 0;
      if (hxp) {
        for (int64_t i = 0; i < geo.n; ++i) {
          const int64_t o = geo.x_offset(i, g);
          sum_h_hxc_plane(hxp + o, xp + o, HW, st.mean, sh, shx);
        }
        shx *= r;
      }
      const acc_t A = su / M, Bu = sux / M, Hm = sh / M, C = shx / M;
      const acc_t S = shu - A * sh - Bu * shx;  // sum hx (u - A - xh Bu)
      dwp[g] = static_cast<scalar_t>(r * S);

      // d x = r (q - <q> - xh <q xh>) - rho r^2 xh / M with q = -w r (Bu hx + C u) + hw u.
      const acc_t rho = w * S;
      const acc_t q_mean = -w * r * (Bu * Hm + C * A) + hw * A;
      const acc_t qx_mean = -2 * w * r * Bu * C + hw * Bu;
      const scalar_t e_h = static_cast<scalar_t>(-w * r * r * Bu);
      const scalar_t e0 = static_cast<scalar_t>(-r * q_mean);
      const scalar_t e1 = static_cast<scalar_t>(-r * r * (qx_mean + rho * r / M));  // per (x-mu)
      for (int64_t i = 0; i < geo.n; ++i) {
        const int64_t o = geo.x_offset(i, g);
        affine_plane<scalar_t>(dxp + o, xp + o, hxp ? hxp + o : nullptr, HW, mp[g], e1, e0, e_h);
      }
      // Sparse parts: d x += r (hw - w r C) u;  d gy = D (w r (hx - Hm - xh C) + hw xh + hb).
      const acc_t su_coef = r * (hw - w * r * C);
      geo.for_each_argmax(g, ip, [&](int64_t py, int64_t px) {
        const scalar_t xv = xp[px];
        const acc_t xh = st.xhat(xv);
        dxp[px] += static_cast<scalar_t>(su_coef * st.u(xv, gyp[py]));
        const acc_t hxv = hxp ? static_cast<acc_t>(hxp[px]) : 0;
        const acc_t gu = w * r * (hxv - Hm - xh * C) + hw * xh + hb;
        dgyp[py] = static_cast<scalar_t>(st.d(xv) * gu);
      });
    }
  });
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
  storage = t->contiguous();
  return &storage;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_lrelu_pool_double_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& bias, const at::Tensor& mean, const at::Tensor& invstd,
    const at::Tensor& indices, const std::optional<at::Tensor>& grad_grad_x,
    const std::optional<at::Tensor>& grad_grad_weight,
    const std::optional<at::Tensor>& grad_grad_bias, double negative_slope) {
  constexpr const char* op = "bn_lrelu_pool_double_backward";
  check_bn_lrelu_pool_backward_args(op, grad_y, x, weight, bias, mean, invstd, indices);
  TORCH_INTERNAL_ASSERT(x.device().is_cpu());
  at::Tensor hx_s, hw_s, hb_s;
  const at::Tensor* hx = optional_cotangent(op, "grad_grad_x", grad_grad_x, x, hx_s);
  const at::Tensor* hw = optional_cotangent(op, "grad_grad_weight", grad_grad_weight, weight, hw_s);
  const at::Tensor* hb = optional_cotangent(op, "grad_grad_bias", grad_grad_bias, bias, hb_s);
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
