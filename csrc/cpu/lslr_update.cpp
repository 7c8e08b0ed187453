// CPU kernel for mamlpp_fast::lslr_update, the MAML++ LSLR inner-loop step for all fast weights
// of all tasks in one call:
//
//   out[k][b] = theta_k[b] - lr[k] * grads[k][b]    theta_k = params[k] (task-batched [B, *s_k])
//                                                   or params[k][None] (shared [*s_k], step 0)
//
// All tensors are flattened into one work list of fixed-size chunks so that at::parallel_for can
// balance a few large conv weights against many tiny biases. The inner loop is a plain
// restrict-qualified axpy over contiguous memory, which gcc -O3 vectorises.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "checks.h"

namespace mamlpp_fast {
namespace {

// Elements per work item: large enough to amortise scheduling, small enough to split a 64x64x3x3
// conv weight of 8 tasks (295k elements) across cores.
constexpr int64_t kChunk = 16384;

struct Segment {
  int k;          // tensor index
  int64_t begin;  // flat range [begin, end) within out[k]
  int64_t end;
};

template <typename scalar_t>
inline void axpy_row(scalar_t* __restrict__ out, const scalar_t* __restrict__ theta,
                     const scalar_t* __restrict__ grad, scalar_t lr, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = theta[i] - lr * grad[i];
}

template <typename scalar_t>
void lslr_update_kernel(const std::vector<at::Tensor>& theta, const std::vector<at::Tensor>& grads,
                        const at::Tensor& lr, std::vector<at::Tensor>& out) {
  const int P = static_cast<int>(out.size());
  std::vector<Segment> work;
  int64_t total = 0;
  for (int k = 0; k < P; ++k) {
    const int64_t n = out[k].numel();
    total += n;
    for (int64_t b = 0; b < n; b += kChunk) work.push_back({k, b, std::min(n, b + kChunk)});
  }
  const scalar_t* lr_ptr = lr.data_ptr<scalar_t>();
  // One work item per task below the grain, so tiny updates stay on the calling thread.
  const int64_t grain = total < 4 * kChunk ? static_cast<int64_t>(work.size()) : 1;
  at::parallel_for(0, static_cast<int64_t>(work.size()), grain, [&](int64_t w0, int64_t w1) {
    for (int64_t w = w0; w < w1; ++w) {
      const Segment& s = work[w];
      const at::Tensor& t = theta[s.k];
      scalar_t* o = out[s.k].data_ptr<scalar_t>();
      const scalar_t* th = t.data_ptr<scalar_t>();
      const scalar_t* g = grads[s.k].data_ptr<scalar_t>();
      const scalar_t rate = lr_ptr[s.k];
      // A shared theta is [*s_k]: it repeats every `inner` elements of the [B, *s_k] output.
      const bool shared = t.numel() != out[s.k].numel();
      const int64_t inner = t.numel();
      int64_t i = s.begin;
      while (i < s.end) {
        const int64_t j = shared ? i % inner : i;
        const int64_t n = shared ? std::min(s.end - i, inner - j) : s.end - i;
        axpy_row<scalar_t>(o + i, th + j, g + i, rate, n);
        i += n;
      }
    }
  });
}

std::vector<at::Tensor> lslr_update_cpu(at::TensorList params, at::TensorList grads,
                                        const at::Tensor& lr) {
  check_lslr_update_args(params, grads, lr);
  TORCH_INTERNAL_ASSERT(lr.device().is_cpu());
  std::vector<at::Tensor> theta, g, out;
  theta.reserve(params.size());
  g.reserve(params.size());
  out.reserve(params.size());
  for (size_t k = 0; k < params.size(); ++k) {
    theta.push_back(params[k].contiguous());
    g.push_back(grads[k].contiguous());
    out.push_back(at::empty(grads[k].sizes(), grads[k].options()));
  }
  const at::Tensor lr_c = lr.contiguous();
  if (!out.empty()) {
    AT_DISPATCH_FLOATING_TYPES(lr.scalar_type(), "lslr_update_cpu", [&] {
      lslr_update_kernel<scalar_t>(theta, g, lr_c, out);
    });
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mamlpp_fast, CPU, m) { m.impl("lslr_update", &lslr_update_cpu); }

}  // namespace mamlpp_fast
