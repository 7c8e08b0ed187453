// CUDA kernel for mamlpp_fast::lslr_update: one multi-tensor launch updates every fast weight of
// every task,
//
//   out[k][b] = theta_k[b] - lr[k] * grads[k][b]    (theta_k shared across b at step 0)
//
// Launch layout: grid.y = tensor index, grid.x = blocks striding over that tensor's elements.
// The tensor table travels by value in the kernel parameters (no host-to-device copy), and lr is
// read on the device, so a call never synchronises with the host.
//
// Headers: only ATen core + c10 core, never ATen/cuda/CUDAContext.h or c10/cuda/CUDAGuard.h. The
// current stream and the device guard come through torch's device-generic guard interface
// (c10::impl::VirtualGuardImpl, c10::DeviceGuard), which dispatches to the CUDA implementation at
// run time. This keeps the whole file compilable with `nvcc -c` against a CPU-only torch, which is
// how CI syntax-checks it on machines without a CUDA torch (see .ci/run).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <torch/library.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <vector>

#include "checks.h"

namespace mamlpp_fast {
namespace {

// 64 tensors x 40 bytes = 2.5 KB, inside the classic 4 KB kernel-parameter limit. Longer lists are
// split into several launches.
constexpr int kMaxTensors = 64;
constexpr int kThreads = 256;
constexpr int kMaxBlocksX = 1024;

struct LslrTable {
  void* out[kMaxTensors];
  const void* theta[kMaxTensors];
  const void* grad[kMaxTensors];
  int64_t numel[kMaxTensors];  // elements of out (B * inner)
  int64_t inner[kMaxTensors];  // elements of theta; == numel unless theta is shared
  int lr_index[kMaxTensors];   // position in lr of this table slot
};

template <typename scalar_t>
__global__ void lslr_update_kernel(LslrTable table, const scalar_t* __restrict__ lr) {
  const int t = blockIdx.y;
  const int64_t n = table.numel[t];
  const int64_t inner = table.inner[t];
  auto* __restrict__ out = static_cast<scalar_t*>(table.out[t]);
  const auto* __restrict__ theta = static_cast<const scalar_t*>(table.theta[t]);
  const auto* __restrict__ grad = static_cast<const scalar_t*>(table.grad[t]);
  const scalar_t rate = lr[table.lr_index[t]];
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  if (inner == n) {
    for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride)
      out[i] = theta[i] - rate * grad[i];
  } else {
    for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride)
      out[i] = theta[i % inner] - rate * grad[i];
  }
}

std::vector<at::Tensor> lslr_update_cuda(at::TensorList params, at::TensorList grads,
                                         const at::Tensor& lr) {
  check_lslr_update_args(params, grads, lr);
  TORCH_INTERNAL_ASSERT(lr.device().is_cuda());
  const c10::DeviceGuard guard(lr.device());
  const c10::impl::VirtualGuardImpl cuda_impl(c10::DeviceType::CUDA);
  const auto stream =
      static_cast<cudaStream_t>(cuda_impl.getStreamNativeHandle(cuda_impl.getStream(lr.device())));

  const int P = static_cast<int>(params.size());
  std::vector<at::Tensor> theta, g, out;
  for (int k = 0; k < P; ++k) {
    theta.push_back(params[k].contiguous());
    g.push_back(grads[k].contiguous());
    out.push_back(at::empty(grads[k].sizes(), grads[k].options()));
  }
  const at::Tensor lr_c = lr.contiguous();

  AT_DISPATCH_FLOATING_TYPES(lr.scalar_type(), "lslr_update_cuda", [&] {
    for (int first = 0; first < P; first += kMaxTensors) {
      LslrTable table;
      int slots = 0;
      int64_t max_numel = 0;
      for (int k = first; k < std::min(P, first + kMaxTensors); ++k) {
        if (out[k].numel() == 0) continue;
        table.out[slots] = out[k].data_ptr();
        table.theta[slots] = theta[k].data_ptr();
        table.grad[slots] = g[k].data_ptr();
        table.numel[slots] = out[k].numel();
        table.inner[slots] = theta[k].numel();
        table.lr_index[slots] = k;
        max_numel = std::max(max_numel, out[k].numel());
        ++slots;
      }
      if (slots == 0) continue;
      const int64_t blocks_x = std::min<int64_t>(kMaxBlocksX, (max_numel + kThreads - 1) / kThreads);
      const dim3 grid(static_cast<unsigned>(blocks_x), static_cast<unsigned>(slots));
      lslr_update_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(table, lr_c.data_ptr<scalar_t>());
      const cudaError_t err = cudaGetLastError();
      TORCH_CHECK(err == cudaSuccess, "lslr_update: CUDA kernel launch failed: ",
                  cudaGetErrorString(err));
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mamlpp_fast, CUDA, m) { m.impl("lslr_update", &lslr_update_cuda); }

}  // namespace mamlpp_fast
