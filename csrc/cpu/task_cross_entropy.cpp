// CPU kernels for mamlpp_fast::task_cross_entropy_{forward,backward,double_backward}: the mean
// cross-entropy and the accuracy of each task of a meta-batch in one call, the loss gradient, and
// that gradient's derivative (second-order MAML).
//
//   lse[b, i]      = log sum_c exp(z[b, i, c])                       (max-shifted)
//   loss[b]        = 1/n sum_i (lse[b, i] - z[b, i, y[b, i]])
//   accuracy[b]    = 1/n #{i : argmax_c z[b, i, c] == y[b, i]}      (first maximum; NaN is maximal)
//   grad[b, i, c]  = grad_loss[b] / n (exp(z[b, i, c] - lse[b, i]) - [c == y[b, i]])
//
// Work is split over tasks (forward) and rows (backward); each task's n rows are summed in order,
// in double, so the result does not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>

#include "checks.h"

namespace mamlpp_fast {
namespace {

// Rows (of N logits each) per parallel work item: tiny meta-batches stay on the calling thread.
constexpr int64_t kRowsPerItem = 256;

// Labels are checked before any work: an out-of-range label would otherwise read past the row.
void check_labels_in_range(const at::Tensor& labels, int64_t classes) {
  const int64_t* y = labels.data_ptr<int64_t>();
  for (int64_t r = 0; r < labels.numel(); ++r) {
    TORCH_CHECK(y[r] >= 0 && y[r] < classes, "task_cross_entropy: labels must lie in [0, ", classes,
                ") (the number of classes, logits.shape[2]), got ", y[r], " at flat position ", r);
  }
}

template <typename scalar_t>
void forward_kernel(const at::Tensor& logits, const at::Tensor& labels, at::Tensor& loss,
                    at::Tensor& accuracy, at::Tensor& lse) {
  const int64_t B = logits.size(0), n = logits.size(1), N = logits.size(2);
  const scalar_t* z_all = logits.data_ptr<scalar_t>();
  const int64_t* y_all = labels.data_ptr<int64_t>();
  scalar_t* loss_out = loss.data_ptr<scalar_t>();
  scalar_t* acc_out = accuracy.data_ptr<scalar_t>();
  scalar_t* lse_out = lse.data_ptr<scalar_t>();
  const int64_t grain = std::max<int64_t>(1, kRowsPerItem / n);
  at::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      double loss_sum = 0.0;
      int64_t correct = 0;
      for (int64_t i = 0; i < n; ++i) {
        const scalar_t* z = z_all + (b * n + i) * N;
        // First maximum, NaN counted as larger than any number (torch.argmax's rule).
        int64_t best = 0;
        for (int64_t c = 1; c < N; ++c) {
          if (z[c] > z[best] || (std::isnan(z[c]) && !std::isnan(z[best]))) best = c;
        }
        // Shifted by the maximum even when it is infinite, as ATen's log_softmax: a row holding
        // +inf, or only -inf, gets a NaN loss, as F.cross_entropy gives the official code.
        const scalar_t shift = z[best];
        // exp in the logits' precision (float's is twice as fast), summed in double.
        double sum = 0.0;
        for (int64_t c = 0; c < N; ++c) sum += static_cast<double>(std::exp(z[c] - shift));
        const double row_lse = static_cast<double>(shift) + std::log(sum);
        const int64_t y = y_all[b * n + i];
        lse_out[b * n + i] = static_cast<scalar_t>(row_lse);
        loss_sum += row_lse - static_cast<double>(z[y]);
        correct += best == y;
      }
      loss_out[b] = static_cast<scalar_t>(loss_sum / static_cast<double>(n));
      acc_out[b] = static_cast<scalar_t>(static_cast<double>(correct) / static_cast<double>(n));
    }
  });
}

template <typename scalar_t>
void backward_kernel(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& labels,
                     const at::Tensor& lse, at::Tensor& grad) {
  const int64_t B = logits.size(0), n = logits.size(1), N = logits.size(2);
  const scalar_t* g_all = grad_loss.data_ptr<scalar_t>();
  const scalar_t* z_all = logits.data_ptr<scalar_t>();
  const int64_t* y_all = labels.data_ptr<int64_t>();
  const scalar_t* lse_all = lse.data_ptr<scalar_t>();
  scalar_t* out_all = grad.data_ptr<scalar_t>();
  const scalar_t inv_n = static_cast<scalar_t>(1) / static_cast<scalar_t>(n);
  at::parallel_for(0, B * n, kRowsPerItem, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const scalar_t scale = g_all[r / n] * inv_n;
      const scalar_t row_lse = lse_all[r];
      const scalar_t* z = z_all + r * N;
      scalar_t* out = out_all + r * N;
      for (int64_t c = 0; c < N; ++c) out[c] = scale * std::exp(z[c] - row_lse);
      out[y_all[r]] -= scale;
    }
  });
}

// The backward's backward (see ops/task_cross_entropy.py), p = exp(z - lse), s = grad_loss[b] / n:
//   grad_grad_loss[b] = 1/n sum_{i,c} h (p - [c == y]),   grad_logits = s p (h - sum_c h p).
template <typename scalar_t>
void double_backward_kernel(const at::Tensor& grad_grad_logits, const at::Tensor& grad_loss,
                            const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& lse,
                            at::Tensor& grad_grad_loss, at::Tensor& grad_logits) {
  const int64_t B = logits.size(0), n = logits.size(1), N = logits.size(2);
  const scalar_t* h_all = grad_grad_logits.data_ptr<scalar_t>();
  const scalar_t* g_all = grad_loss.data_ptr<scalar_t>();
  const scalar_t* z_all = logits.data_ptr<scalar_t>();
  const int64_t* y_all = labels.data_ptr<int64_t>();
  const scalar_t* lse_all = lse.data_ptr<scalar_t>();
  scalar_t* ggl_out = grad_grad_loss.data_ptr<scalar_t>();
  scalar_t* out_all = grad_logits.data_ptr<scalar_t>();
  const int64_t grain = std::max<int64_t>(1, kRowsPerItem / n);
  at::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const scalar_t scale = g_all[b] / static_cast<scalar_t>(n);
      double task_sum = 0.0;
      for (int64_t i = 0; i < n; ++i) {
        const int64_t r = b * n + i;
        const scalar_t* z = z_all + r * N;
        const scalar_t* h = h_all + r * N;
        scalar_t* out = out_all + r * N;
        const scalar_t row_lse = lse_all[r];
        // out holds p until the second pass overwrites it.
        double hp = 0.0;
        for (int64_t c = 0; c < N; ++c) {
          out[c] = std::exp(z[c] - row_lse);
          hp += static_cast<double>(h[c]) * static_cast<double>(out[c]);
        }
        task_sum += hp - static_cast<double>(h[y_all[r]]);
        const scalar_t row_hp = static_cast<scalar_t>(hp);
        for (int64_t c = 0; c < N; ++c) out[c] = scale * out[c] * (h[c] - row_hp);
      }
      ggl_out[b] = static_cast<scalar_t>(task_sum / static_cast<double>(n));
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> task_cross_entropy_forward_cpu(const at::Tensor& logits_in,
                                                                              const at::Tensor& labels_in) {
  check_task_cross_entropy_args(logits_in, labels_in);
  TORCH_INTERNAL_ASSERT(logits_in.device().is_cpu());
  const at::Tensor logits = logits_in.contiguous();
  const at::Tensor labels = labels_in.contiguous();
  check_labels_in_range(labels, logits.size(2));
  at::Tensor loss = at::empty({logits.size(0)}, logits.options());
  at::Tensor accuracy = at::empty({logits.size(0)}, logits.options());
  at::Tensor lse = at::empty({logits.size(0), logits.size(1)}, logits.options());
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "task_cross_entropy_forward_cpu", [&] {
    forward_kernel<scalar_t>(logits, labels, loss, accuracy, lse);
  });
  return {loss, accuracy, lse};
}

at::Tensor task_cross_entropy_backward_cpu(const at::Tensor& grad_loss_in, const at::Tensor& logits_in,
                                           const at::Tensor& labels_in, const at::Tensor& lse_in) {
  check_task_cross_entropy_backward_args(grad_loss_in, logits_in, labels_in, lse_in);
  TORCH_INTERNAL_ASSERT(logits_in.device().is_cpu());
  const at::Tensor grad_loss = grad_loss_in.contiguous();
  const at::Tensor logits = logits_in.contiguous();
  const at::Tensor labels = labels_in.contiguous();
  const at::Tensor lse = lse_in.contiguous();
  check_labels_in_range(labels, logits.size(2));
  at::Tensor grad = at::empty(logits.sizes(), logits.options());
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "task_cross_entropy_backward_cpu", [&] {
    backward_kernel<scalar_t>(grad_loss, logits, labels, lse, grad);
  });
  return grad;
}

std::tuple<at::Tensor, at::Tensor> task_cross_entropy_double_backward_cpu(
    const at::Tensor& grad_grad_logits_in, const at::Tensor& grad_loss_in, const at::Tensor& logits_in,
    const at::Tensor& labels_in, const at::Tensor& lse_in) {
  check_task_cross_entropy_double_backward_args(grad_grad_logits_in, grad_loss_in, logits_in, labels_in, lse_in);
  TORCH_INTERNAL_ASSERT(logits_in.device().is_cpu());
  const at::Tensor grad_grad_logits = grad_grad_logits_in.contiguous();
  const at::Tensor grad_loss = grad_loss_in.contiguous();
  const at::Tensor logits = logits_in.contiguous();
  const at::Tensor labels = labels_in.contiguous();
  const at::Tensor lse = lse_in.contiguous();
  check_labels_in_range(labels, logits.size(2));
  at::Tensor grad_grad_loss = at::empty({logits.size(0)}, logits.options());
  at::Tensor grad_logits = at::empty(logits.sizes(), logits.options());
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "task_cross_entropy_double_backward_cpu", [&] {
    double_backward_kernel<scalar_t>(grad_grad_logits, grad_loss, logits, labels, lse, grad_grad_loss, grad_logits);
  });
  return {grad_grad_loss, grad_logits};
}

}  // namespace

TORCH_LIBRARY_IMPL(mamlpp_fast, CPU, m) {
  m.impl("task_cross_entropy_forward", &task_cross_entropy_forward_cpu);
  m.impl("task_cross_entropy_backward", &task_cross_entropy_backward_cpu);
  m.impl("task_cross_entropy_double_backward", &task_cross_entropy_double_backward_cpu);
}

}  // namespace mamlpp_fast
