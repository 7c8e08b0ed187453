// CUDA kernels for mamlpp_fast::task_cross_entropy_{forward,backward,double_backward}: per-task
// mean cross-entropy and accuracy of logits z [B, n, N] with labels y [B, n] (int64), fused into
// one launch per op:
//
//   lse[b,i]  = m + log(sum_c exp(z[b,i,c] - m)),  m = max_c z[b,i,c]  (also when m is infinite:
//               a row holding +inf, or only -inf, gets NaN, as ATen's log_softmax/cross_entropy)
//   loss[b]   = (1/n) sum_i (lse[b,i] - z[b,i,y[b,i]])
//   acc[b]    = (1/n) #{i : argmax_c z[b,i,c] == y[b,i]}   (first maximal index; NaN is maximal)
//   grad[b,i,c] = grad_loss[b] / n * (exp(z[b,i,c] - lse[b,i]) - (c == y[b,i]))
//
// Double backward: the derivative of the backward, with p = exp(z - lse), s_b = grad_loss[b] / n
// and incoming h = grad_grad_logits [B, n, N]:
//   hp[b,i]              = sum_c h[b,i,c] p[b,i,c]
//   grad_grad_loss[b]    = (1/n) sum_{i,c} h[b,i,c] (p[b,i,c] - (c == y[b,i]))
//   grad_logits[b,i,c]   = s_b p[b,i,c] (h[b,i,c] - hp[b,i])
//
// A label outside [0, N) makes its row's loss term NaN and counts as wrong; the backward and the
// double backward then have no onehot (-1) term. No kernel reads z at such a label, uses it as an
// index, asserts, or synchronises with the host.
//
// Launch layout:
//   forward:  grid = B, one block per task; the block's threads stride over the task's n rows (one
//             thread per row, looping over the N classes). Each thread keeps a partial loss sum
//             (at::acc_type: float for float32, double for float64) and a correct count over its
//             rows i = tid, tid + kThreads, ...; a shared-memory tree reduction in a fixed order
//             then combines them, so the result is deterministic (no atomics).
//   backward: one grid-stride elementwise kernel over the B*n*N entries of grad_logits.
//   double backward: grid = B, one block per task, threads striding over the task's n rows like
//             the forward. Per row a thread first sums hp = sum_c h p, then writes grad_logits for
//             all c and adds sum_c h (p - onehot) to its partial grad_grad_loss sum (acc_type); the
//             same fixed-order shared-memory tree reduction gives grad_grad_loss[b] (no atomics).
//
// Headers: ATen core + c10 core only (no ATen/cuda/CUDAContext.h, no c10/cuda/CUDAGuard.h), like
// csrc/cuda/lslr_update.cu: the stream and device guard come through c10's device-generic guard
// interface, so this file compiles with `nvcc -c` against a CPU-only torch.
#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <torch/library.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <tuple>

#include "checks.h"

namespace mamlpp_fast {
namespace {

constexpr int kThreads = 128;  // power of two (the tree reduction halves it)
constexpr int kMaxBlocks = 1024;

__device__ __forceinline__ float dev_exp(float v) { return expf(v); }
__device__ __forceinline__ double dev_exp(double v) { return exp(v); }
__device__ __forceinline__ float dev_log(float v) { return logf(v); }
__device__ __forceinline__ double dev_log(double v) { return log(v); }

template <typename scalar_t>
__global__ void task_cross_entropy_forward_kernel(const scalar_t* __restrict__ logits,
                                                  const int64_t* __restrict__ labels, int64_t n,
                                                  int64_t N, scalar_t* __restrict__ loss,
                                                  scalar_t* __restrict__ accuracy,
                                                  scalar_t* __restrict__ lse) {
  using acc_t = at::acc_type<scalar_t, true>;
  __shared__ acc_t s_sum[kThreads];
  __shared__ int s_count[kThreads];
  const int64_t b = blockIdx.x;
  const int tid = threadIdx.x;

  acc_t sum = 0;
  int count = 0;
  for (int64_t i = tid; i < n; i += kThreads) {
    const int64_t row = b * n + i;
    const scalar_t* __restrict__ z = logits + row * N;
    // Max and first argmax (NaN wins, and the first NaN stays).
    scalar_t best = z[0];
    int64_t arg = 0;
    for (int64_t c = 1; c < N; ++c) {
      const scalar_t v = z[c];
      if (v > best || (isnan(v) && !isnan(best))) {
        best = v;
        arg = c;
      }
    }
    const acc_t shift = static_cast<acc_t>(best);
    acc_t se = 0;
    for (int64_t c = 0; c < N; ++c) se += dev_exp(static_cast<acc_t>(z[c]) - shift);
    const acc_t row_lse = shift + dev_log(se);
    lse[row] = static_cast<scalar_t>(row_lse);

    const int64_t y = labels[row];
    if (y >= 0 && y < N) {
      sum += row_lse - static_cast<acc_t>(z[y]);
      count += (arg == y) ? 1 : 0;
    } else {
      sum += static_cast<acc_t>(NAN);
    }
  }

  s_sum[tid] = sum;
  s_count[tid] = count;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (tid < s) {
      s_sum[tid] += s_sum[tid + s];
      s_count[tid] += s_count[tid + s];
    }
    __syncthreads();
  }
  if (tid == 0) {
    const acc_t rows = static_cast<acc_t>(n);
    loss[b] = static_cast<scalar_t>(s_sum[0] / rows);
    accuracy[b] = static_cast<scalar_t>(static_cast<acc_t>(s_count[0]) / rows);
  }
}

template <typename scalar_t>
__global__ void task_cross_entropy_backward_kernel(const scalar_t* __restrict__ grad_loss,
                                                   const scalar_t* __restrict__ logits,
                                                   const int64_t* __restrict__ labels,
                                                   const scalar_t* __restrict__ lse, int64_t n,
                                                   int64_t N, int64_t total,
                                                   scalar_t* __restrict__ grad) {
  using acc_t = at::acc_type<scalar_t, true>;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += stride) {
    const int64_t row = e / N;  // b * n + i
    const int64_t c = e - row * N;
    const int64_t b = row / n;
    const acc_t scale = static_cast<acc_t>(grad_loss[b]) / static_cast<acc_t>(n);
    const acc_t p = dev_exp(static_cast<acc_t>(logits[e]) - static_cast<acc_t>(lse[row]));
    const acc_t onehot = (c == labels[row]) ? acc_t(1) : acc_t(0);  // never true out of range
    grad[e] = static_cast<scalar_t>(scale * (p - onehot));
  }
}

template <typename scalar_t>
__global__ void task_cross_entropy_double_backward_kernel(
    const scalar_t* __restrict__ grad_grad_logits, const scalar_t* __restrict__ grad_loss,
    const scalar_t* __restrict__ logits, const int64_t* __restrict__ labels,
    const scalar_t* __restrict__ lse, int64_t n, int64_t N, scalar_t* __restrict__ grad_grad_loss,
    scalar_t* __restrict__ grad_logits) {
  using acc_t = at::acc_type<scalar_t, true>;
  __shared__ acc_t s_sum[kThreads];
  const int64_t b = blockIdx.x;
  const int tid = threadIdx.x;
  const acc_t rows = static_cast<acc_t>(n);
  const acc_t scale = static_cast<acc_t>(grad_loss[b]) / rows;

  acc_t sum = 0;
  for (int64_t i = tid; i < n; i += kThreads) {
    const int64_t row = b * n + i;
    const scalar_t* __restrict__ z = logits + row * N;
    const scalar_t* __restrict__ h = grad_grad_logits + row * N;
    scalar_t* __restrict__ g = grad_logits + row * N;
    const acc_t row_lse = static_cast<acc_t>(lse[row]);

    acc_t hp = 0;  // sum_c h p over this row
    for (int64_t c = 0; c < N; ++c) {
      hp += static_cast<acc_t>(h[c]) * dev_exp(static_cast<acc_t>(z[c]) - row_lse);
    }
    for (int64_t c = 0; c < N; ++c) {
      const acc_t hc = static_cast<acc_t>(h[c]);
      const acc_t p = dev_exp(static_cast<acc_t>(z[c]) - row_lse);
      g[c] = static_cast<scalar_t>(scale * p * (hc - hp));
    }
    // sum_c h (p - onehot) = hp - h[y]; out-of-range y: no onehot term, y never used as an index.
    const int64_t y = labels[row];
    sum += (y >= 0 && y < N) ? hp - static_cast<acc_t>(h[y]) : hp;
  }

  s_sum[tid] = sum;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (tid < s) s_sum[tid] += s_sum[tid + s];
    __syncthreads();
  }
  if (tid == 0) grad_grad_loss[b] = static_cast<scalar_t>(s_sum[0] / rows);
}

cudaStream_t current_stream(const at::Tensor& t) {
  const c10::impl::VirtualGuardImpl impl(c10::DeviceType::CUDA);
  return static_cast<cudaStream_t>(impl.getStreamNativeHandle(impl.getStream(t.device())));
}

void check_launch(const char* op) {
  const cudaError_t err = cudaGetLastError();
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> task_cross_entropy_forward_cuda(
    const at::Tensor& logits, const at::Tensor& labels) {
  constexpr const char* op = "task_cross_entropy_forward";
  check_task_cross_entropy_args(logits, labels);
  TORCH_INTERNAL_ASSERT(logits.device().is_cuda());
  const c10::DeviceGuard guard(logits.device());
  const at::Tensor z = logits.contiguous(), y = labels.contiguous();
  const int64_t B = z.size(0), n = z.size(1), N = z.size(2);
  at::Tensor loss = at::empty({B}, logits.options());
  at::Tensor accuracy = at::empty({B}, logits.options());
  at::Tensor lse = at::empty({B, n}, logits.options());
  if (B == 0) return {loss, accuracy, lse};
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "task_cross_entropy_forward_cuda", [&] {
    task_cross_entropy_forward_kernel<scalar_t>
        <<<static_cast<unsigned>(B), kThreads, 0, current_stream(z)>>>(
            z.data_ptr<scalar_t>(), y.data_ptr<int64_t>(), n, N, loss.data_ptr<scalar_t>(),
            accuracy.data_ptr<scalar_t>(), lse.data_ptr<scalar_t>());
  });
  check_launch(op);
  return {loss, accuracy, lse};
}

at::Tensor task_cross_entropy_backward_cuda(const at::Tensor& grad_loss, const at::Tensor& logits,
                                            const at::Tensor& labels, const at::Tensor& lse) {
  constexpr const char* op = "task_cross_entropy_backward";
  check_task_cross_entropy_backward_args(grad_loss, logits, labels, lse);
  TORCH_INTERNAL_ASSERT(logits.device().is_cuda());
  const c10::DeviceGuard guard(logits.device());
  const at::Tensor gl = grad_loss.contiguous(), z = logits.contiguous();
  const at::Tensor y = labels.contiguous(), l = lse.contiguous();
  const int64_t n = z.size(1), N = z.size(2), total = z.numel();
  at::Tensor grad = at::empty(z.sizes(), logits.options());
  if (total == 0) return grad;
  const int64_t blocks = std::min<int64_t>(kMaxBlocks, (total + kThreads - 1) / kThreads);
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "task_cross_entropy_backward_cuda", [&] {
    task_cross_entropy_backward_kernel<scalar_t>
        <<<static_cast<unsigned>(blocks), kThreads, 0, current_stream(z)>>>(
            gl.data_ptr<scalar_t>(), z.data_ptr<scalar_t>(), y.data_ptr<int64_t>(),
            l.data_ptr<scalar_t>(), n, N, total, grad.data_ptr<scalar_t>());
  });
  check_launch(op);
  return grad;
}

std::tuple<at::Tensor, at::Tensor> task_cross_entropy_double_backward_cuda(
    const at::Tensor& grad_grad_logits, const at::Tensor& grad_loss, const at::Tensor& logits,
    const at::Tensor& labels, const at::Tensor& lse) {
  constexpr const char* op = "task_cross_entropy_double_backward";
  check_task_cross_entropy_double_backward_args(grad_grad_logits, grad_loss, logits, labels, lse);
  TORCH_INTERNAL_ASSERT(logits.device().is_cuda());
  const c10::DeviceGuard guard(logits.device());
  const at::Tensor h = grad_grad_logits.contiguous(), gl = grad_loss.contiguous();
  const at::Tensor z = logits.contiguous(), y = labels.contiguous(), l = lse.contiguous();
  const int64_t B = z.size(0), n = z.size(1), N = z.size(2);
  at::Tensor grad_grad_loss = at::empty({B}, logits.options());
  at::Tensor grad_logits = at::empty(z.sizes(), logits.options());
  if (B == 0) return {grad_grad_loss, grad_logits};
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "task_cross_entropy_double_backward_cuda", [&] {
    task_cross_entropy_double_backward_kernel<scalar_t>
        <<<static_cast<unsigned>(B), kThreads, 0, current_stream(z)>>>(
            h.data_ptr<scalar_t>(), gl.data_ptr<scalar_t>(), z.data_ptr<scalar_t>(),
            y.data_ptr<int64_t>(), l.data_ptr<scalar_t>(), n, N,
            grad_grad_loss.data_ptr<scalar_t>(), grad_logits.data_ptr<scalar_t>());
  });
  check_launch(op);
  return {grad_grad_loss, grad_logits};
}

}  // namespace

TORCH_LIBRARY_IMPL(mamlpp_fast, CUDA, m) {
  m.impl("task_cross_entropy_forward", &task_cross_entropy_forward_cuda);
  m.impl("task_cross_entropy_backward", &task_cross_entropy_backward_cuda);
  m.impl("task_cross_entropy_double_backward", &task_cross_entropy_double_backward_cuda);
}

}  // namespace mamlpp_fast
