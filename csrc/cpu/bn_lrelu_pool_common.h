// What the NCHW (bn_lrelu_pool.cpp) and channels-last (bn_lrelu_pool_nhwc.cpp) CPU kernels of
// bn_lrelu_pool share, as they differ only in how they walk memory: the leaky ReLU, the per-channel
// coefficients of the backward and double backward output passes from a channel's sums (notation
// as in bn_lrelu_pool.cpp's header comment; in double), and the error for bad indices.
#pragma once

#include <c10/util/Exception.h>

#include "simd.h"

namespace mamlpp_fast {

template <typename T>
MAMLPP_FAST_ALWAYS_INLINE T leaky_relu(T z, T slope) {
  return z > 0 ? z : z * slope;
}

// d leaky_relu / dz: a select, not a branch (the sign of z is unpredictable on real data).
template <typename T>
MAMLPP_FAST_ALWAYS_INLINE T leaky_relu_slope(T z, T slope) {
  return z > 0 ? T(1) : slope;
}

// Backward: grad_bias = sum u, grad_weight = sum u xh, and
//   grad_x = e1 (x - mean) + e0, plus wr u at each window's argmax.
struct BackwardCoefficients {
  double grad_bias, grad_weight, e1, e0, wr;
};

// su = sum u, sux = sum u (x - mean) over the channel's M elements; w, r = weight, invstd.
inline BackwardCoefficients backward_coefficients(double su, double sux, double w, double r, double M) {
  const double s_ux = sux * r;  // sum u xh
  const double wr = w * r;
  return {su, s_ux, -wr * r * (s_ux / M), -wr * (su / M), wr};
}

// Double backward, for cotangents hx (sums sh, shx, shu; zero without it), hw and hb of grad_x,
// grad_weight and grad_bias:
//   d weight = r S,
//   d x  = e1 (x - mean) + e0 + e_h hx,  plus su_coef u at each window's argmax,
//   d gy = D (wr (hx - hm) + (hw_r - cr) (x - mean) + hb) at the argmax.
struct DoubleBackwardCoefficients {
  double d_weight, e1, e0, e_h, su_coef, wr, hm, cr, hw_r, hb;
};

// su = sum u, sux = sum u (x - mean), shu = sum hx u, sh = sum hx, shx = sum hx (x - mean).
inline DoubleBackwardCoefficients double_backward_coefficients(double su, double sux, double shu, double sh,
                                                               double shx, double w, double r, double hw,
                                                               double hb, double M) {
  const double s_ux = sux * r, s_hx = shx * r;  // sum u xh, sum hx xh
  const double A = su / M, Bu = s_ux / M, Hm = sh / M, C = s_hx / M;
  const double S = shu - A * sh - Bu * s_hx;  // sum hx (u - A - xh Bu)
  // d x = r (q - <q> - xh <q xh>) - rho r^2 xh / M with q = -w r (Bu hx + C u) + hw u.
  const double rho = w * S;
  const double q_mean = -w * r * (Bu * Hm + C * A) + hw * A;
  const double qx_mean = -2 * w * r * Bu * C + hw * Bu;
  DoubleBackwardCoefficients q;
  q.d_weight = r * S;
  q.e_h = -w * r * r * Bu;
  q.e0 = -r * q_mean;
  q.e1 = -r * r * (qx_mean + rho * r / M);  // per (x - mean)
  q.su_coef = r * (hw - w * r * C);
  q.wr = w * r;
  q.hm = Hm;
  q.cr = w * r * C * r;  // w r xh C = cr (x - mean)
  q.hw_r = hw * r;       // hw xh = hw_r (x - mean)
  q.hb = hb;
  return q;
}

// The error for an index that is not a window position 0..3 (not the forward's indices for x).
[[noreturn]] inline void bn_lrelu_pool_invalid_indices(const char* op) {
  TORCH_CHECK(false, op, ": indices must hold argmax positions 0..3 within each 2x2 window (the "
              "forward's output for x), got a larger value");
}

}  // namespace mamlpp_fast
