// The channels-last CPU kernels of bn_lrelu_pool (bn_lrelu_pool_nhwc.cpp), called by the op's CPU
// entry points in bn_lrelu_pool.cpp after they have checked the arguments.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace mamlpp_fast {

// Whether x is 4-D channels-last and not also NCHW-contiguous (which the NCHW kernels take).
bool bn_lrelu_pool_is_channels_last(const at::Tensor& x);

// As bn_lrelu_pool_forward, for channels-last x; y and indices are channels-last.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_lrelu_pool_forward_cpu_nhwc(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, double eps,
    double negative_slope);

// As bn_lrelu_pool_backward, for channels-last x (grad_y and indices in any layout); grad_x is
// channels-last.
std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_lrelu_pool_backward_cpu_nhwc(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
    const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& indices, double negative_slope);

// As bn_lrelu_pool_double_backward, for channels-last x; the optional cotangents are checked
// already (hx of x's shape, any layout), and d grad_y and d x are channels-last.
std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_lrelu_pool_double_backward_cpu_nhwc(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
    const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& indices, const at::Tensor* hx,
    const at::Tensor* hw, const at::Tensor* hb, double negative_slope);

}  // namespace mamlpp_fast
