// Shared by csrc/cpu/bn_lrelu_pool.cpp and csrc/cuda/bn_lrelu_pool.cu: argument checks and the
// per-channel affine coefficients, so that every kernel recomputes exactly the same z (and hence
// the same leaky-relu branch) as the forward did.
//
// Layout: x is [n, G, H, W] contiguous (the CPU kernels also take it channels-last), one batch-norm channel per g (G = tasks * channels in the
// grouped meta-batch layout). The pooled tensors (y, grad_y, indices) are [n, G, H/2, W/2].
// indices holds the position of the max inside each 2x2 window in row-major order (0..3, uint8).
// Keep mamlpp_fast/ops/bn_lrelu_pool.py (_check_*) in sync with these checks.
#pragma once

#include <ATen/ATen.h>

#include "checks.h"

namespace mamlpp_fast {

// allow_channels_last: the CPU kernels also take channels-last x (csrc/cpu/bn_lrelu_pool_nhwc.cpp).
// bfloat16 x is taken by the CPU's channels-last kernels only (bfloat16 storage, float32 arithmetic
// and float32 weight, bias, mean and invstd).
inline void check_bn_lrelu_pool_x(const char* op, const at::Tensor& x, bool allow_channels_last = false) {
  TORCH_CHECK(x.dim() == 4, op, ": x must be 4-D [n, G, H, W], got shape ", x.sizes());
  const bool bfloat16_ok = allow_channels_last && x.scalar_type() == at::kBFloat16 && !x.is_contiguous() &&
                           x.is_contiguous(at::MemoryFormat::ChannelsLast);
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble || bfloat16_ok, op,
              allow_channels_last ? ": x must be float32 or float64 (or bfloat16 in channels-last layout), got "
                                  : ": x must be float32 or float64, got ",
              x.scalar_type(), x.scalar_type() == at::kBFloat16 ? " (not channels-last)" : "");
  TORCH_CHECK(x.is_contiguous() || (allow_channels_last && x.is_contiguous(at::MemoryFormat::ChannelsLast)),
              op, allow_channels_last ? ": x must be contiguous (NCHW) or channels-last, got strides "
                                      : ": x must be contiguous (NCHW), got strides ",
              x.strides());
  TORCH_CHECK(x.size(0) >= 1, op, ": x must hold at least one image, got shape ", x.sizes());
  TORCH_CHECK(x.size(2) >= 2 && x.size(3) >= 2, op,
              ": x must have H >= 2 and W >= 2 for 2x2 max pooling, got shape ", x.sizes());
}

// The dtype of the per-channel vectors: x's, or float32 for bfloat16 x.
inline at::ScalarType bn_lrelu_pool_param_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kBFloat16 ? at::kFloat : x.scalar_type();
}

// A per-channel vector ([G], bn_lrelu_pool_param_dtype(x), x's device), e.g. weight, bias, mean, invstd.
inline void check_bn_lrelu_pool_channel_vec(const char* op, const char* name, const at::Tensor& t,
                                            const at::Tensor& x) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == x.size(1), op, ": ", name, " must have shape [G] = [",
              x.size(1), "] (one entry per channel of x), got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == bn_lrelu_pool_param_dtype(x), op, ": ", name,
              " must have x's dtype (float32 for bfloat16 x): expected ", bn_lrelu_pool_param_dtype(x),
              ", got ", t.scalar_type());
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " must be on x's device ", x.device(),
              ", got ", t.device());
}

// A pooled-shape tensor ([n, G, H/2, W/2]) such as grad_y or indices.
inline void check_bn_lrelu_pool_pooled(const char* op, const char* name, const at::Tensor& t,
                                       const at::Tensor& x) {
  const std::vector<int64_t> want = {x.size(0), x.size(1), x.size(2) / 2, x.size(3) / 2};
  TORCH_CHECK(t.sizes() == at::IntArrayRef(want), op, ": ", name, " must have shape ",
              at::IntArrayRef(want), " (x pooled 2x2), got ", t.sizes());
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " must be on x's device ", x.device(),
              ", got ", t.device());
}

inline void check_bn_lrelu_pool_backward_args(const char* op, const at::Tensor& grad_y,
                                              const at::Tensor& x, const at::Tensor& weight,
                                              const at::Tensor& bias, const at::Tensor& mean,
                                              const at::Tensor& invstd,
                                              const at::Tensor& indices,
                                              bool allow_channels_last = false) {
  check_bn_lrelu_pool_x(op, x, allow_channels_last);
  check_bn_lrelu_pool_channel_vec(op, "weight", weight, x);
  check_bn_lrelu_pool_channel_vec(op, "bias", bias, x);
  check_bn_lrelu_pool_channel_vec(op, "mean", mean, x);
  check_bn_lrelu_pool_channel_vec(op, "invstd", invstd, x);
  check_bn_lrelu_pool_pooled(op, "grad_y", grad_y, x);
  TORCH_CHECK(grad_y.scalar_type() == x.scalar_type(), op, ": grad_y must have x's dtype ",
              x.scalar_type(), ", got ", grad_y.scalar_type());
  check_bn_lrelu_pool_pooled(op, "indices", indices, x);
  TORCH_CHECK(indices.scalar_type() == at::kByte, op, ": indices must be uint8, got ",
              indices.scalar_type());
}

// z = weight * (x - mean) * invstd + bias, evaluated as z = x * alpha + shift. Every kernel calls
// this (in the stored dtype of mean/invstd) so the sign of z, and therefore the leaky-relu branch,
// is bit-identical between the forward and the backward passes.
template <typename scalar_t>
struct BnAffine {
  scalar_t alpha;
  scalar_t shift;
};

template <typename scalar_t>
#ifdef __CUDACC__
__host__ __device__
#endif
inline BnAffine<scalar_t> bn_affine(scalar_t weight, scalar_t bias, scalar_t mean,
                                    scalar_t invstd) {
  const scalar_t alpha = weight * invstd;
  return {alpha, bias - mean * alpha};
}

}  // namespace mamlpp_fast
