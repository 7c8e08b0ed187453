// Argument checks shared by the CPU and CUDA implementations of every op.
//
// The macros stringify the argument, so a failed check names it: "lslr_update: lr must be 1-D".
// User errors go through TORCH_CHECK (-> RuntimeError in Python); broken internal invariants use
// TORCH_INTERNAL_ASSERT. Keep each op's Python register_fake in sync with its checks here.
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <vector>

#define MAMLPP_CHECK_DIM(op, t, d) \
  TORCH_CHECK((t).dim() == (d), op ": " #t " must be " #d "-D, got shape ", (t).sizes())
#define MAMLPP_CHECK_FLOATING(op, t)                                                        \
  TORCH_CHECK((t).scalar_type() == at::kFloat || (t).scalar_type() == at::kDouble,       \
              op ": " #t " must be float32 or float64, got ", (t).scalar_type())
#define MAMLPP_CHECK_SAME_DEVICE(op, a, b)                                                   \
  TORCH_CHECK((a).device() == (b).device(), op ": " #a " and " #b " must be on one device, got ", \
              (a).device(), " and ", (b).device())
#define MAMLPP_CHECK_CONTIGUOUS(op, t) \
  TORCH_CHECK((t).is_contiguous(), op ": " #t " must be contiguous")

namespace mamlpp_fast {

// lslr_update(params, grads, lr): params[k] is [B, *s_k] or [*s_k] (shared), grads[k] is [B, *s_k],
// lr is [P] with P = len(params). All tensors share one device and one float dtype.
// Returns B, the task count.
inline int64_t check_lslr_update_args(at::TensorList params, at::TensorList grads,
                                      const at::Tensor& lr) {
  constexpr const char* op = "lslr_update";
  TORCH_CHECK(params.size() == grads.size(), op, ": params and grads must have the same length, got ",
              params.size(), " and ", grads.size());
  MAMLPP_CHECK_DIM("lslr_update", lr, 1);
  MAMLPP_CHECK_FLOATING("lslr_update", lr);
  TORCH_CHECK(lr.size(0) == static_cast<int64_t>(params.size()), op,
              ": lr must hold one rate per parameter tensor: expected ", params.size(),
              " entries, got ", lr.size(0));
  int64_t B = -1;
  for (size_t k = 0; k < params.size(); ++k) {
    const at::Tensor& p = params[k];
    const at::Tensor& g = grads[k];
    TORCH_CHECK(g.dim() >= 1, op, ": grads[", k, "] must have a leading task dimension, got shape ",
                g.sizes());
    if (B < 0) B = g.size(0);
    TORCH_CHECK(g.size(0) == B, op, ": grads[", k, "] has ", g.size(0),
                " tasks in dim 0, but grads[0] has ", B);
    TORCH_CHECK(p.scalar_type() == lr.scalar_type() && g.scalar_type() == lr.scalar_type(), op,
                ": params[", k, "], grads[", k, "] and lr must share one dtype, got ",
                p.scalar_type(), ", ", g.scalar_type(), " and ", lr.scalar_type());
    TORCH_CHECK(p.device() == lr.device() && g.device() == lr.device(), op, ": params[", k,
                "], grads[", k, "] and lr must be on one device, got ", p.device(), ", ",
                g.device(), " and ", lr.device());
    const bool batched = p.sizes() == g.sizes();
    const bool shared = p.dim() + 1 == g.dim() && p.sizes() == g.sizes().slice(1);
    TORCH_CHECK(batched || shared, op, ": params[", k, "] must have shape [B, *s] or [*s] where grads[",
                k, "] is [B, *s] = ", g.sizes(), ", got ", p.sizes());
  }
  return B;
}

// task_cross_entropy_forward(logits, labels): logits [B, n, N] float32/float64 with n, N >= 1,
// labels [B, n] int64 on the same device.
inline void check_task_cross_entropy_args(const at::Tensor& logits, const at::Tensor& labels) {
  constexpr const char* op = "task_cross_entropy";
  MAMLPP_CHECK_DIM("task_cross_entropy", logits, 3);
  MAMLPP_CHECK_FLOATING("task_cross_entropy", logits);
  TORCH_CHECK(logits.size(1) >= 1 && logits.size(2) >= 1, op,
              ": logits must hold at least one sample and one class per task, got shape ", logits.sizes());
  TORCH_CHECK(labels.scalar_type() == at::kLong, op, ": labels must be int64, got ", labels.scalar_type());
  TORCH_CHECK(labels.dim() == 2 && labels.size(0) == logits.size(0) && labels.size(1) == logits.size(1), op,
              ": labels must have shape [B, n] = [", logits.size(0), ", ", logits.size(1),
              "] to match logits [B, n, N], got ", labels.sizes());
  MAMLPP_CHECK_SAME_DEVICE("task_cross_entropy", logits, labels);
}

// task_cross_entropy_backward(grad_loss, logits, labels, lse): grad_loss [B] and lse [B, n] in the
// dtype and on the device of logits.
inline void check_task_cross_entropy_backward_args(const at::Tensor& grad_loss, const at::Tensor& logits,
                                                   const at::Tensor& labels, const at::Tensor& lse) {
  constexpr const char* op = "task_cross_entropy_backward";
  check_task_cross_entropy_args(logits, labels);
  TORCH_CHECK(grad_loss.dim() == 1 && grad_loss.size(0) == logits.size(0), op,
              ": grad_loss must have shape [B] = [", logits.size(0), "], got ", grad_loss.sizes());
  TORCH_CHECK(lse.dim() == 2 && lse.size(0) == logits.size(0) && lse.size(1) == logits.size(1), op,
              ": lse must have shape [B, n] = [", logits.size(0), ", ", logits.size(1), "], got ", lse.sizes());
  TORCH_CHECK(grad_loss.scalar_type() == logits.scalar_type() && lse.scalar_type() == logits.scalar_type(), op,
              ": grad_loss, logits and lse must share one dtype, got ", grad_loss.scalar_type(), ", ",
              logits.scalar_type(), " and ", lse.scalar_type());
  MAMLPP_CHECK_SAME_DEVICE("task_cross_entropy_backward", grad_loss, logits);
  MAMLPP_CHECK_SAME_DEVICE("task_cross_entropy_backward", lse, logits);
}

// task_cross_entropy_double_backward(grad_grad_logits, grad_loss, logits, labels, lse): as the
// backward, plus grad_grad_logits [B, n, N] in the dtype and on the device of logits.
inline void check_task_cross_entropy_double_backward_args(const at::Tensor& grad_grad_logits,
                                                          const at::Tensor& grad_loss, const at::Tensor& logits,
                                                          const at::Tensor& labels, const at::Tensor& lse) {
  constexpr const char* op = "task_cross_entropy_double_backward";
  check_task_cross_entropy_backward_args(grad_loss, logits, labels, lse);
  TORCH_CHECK(grad_grad_logits.sizes() == logits.sizes(), op, ": grad_grad_logits must have the shape of logits ",
              logits.sizes(), ", got ", grad_grad_logits.sizes());
  TORCH_CHECK(grad_grad_logits.scalar_type() == logits.scalar_type(), op,
              ": grad_grad_logits and logits must share one dtype, got ", grad_grad_logits.scalar_type(), " and ",
              logits.scalar_type());
  MAMLPP_CHECK_SAME_DEVICE("task_cross_entropy_double_backward", grad_grad_logits, logits);
}

}  // namespace mamlpp_fast
