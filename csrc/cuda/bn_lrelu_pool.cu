// CUDA kernels for the mamlpp_fast::bn_lrelu_pool_* family (batch_norm with batch statistics ->
// leaky_relu -> max_pool2d(2, 2) on the grouped [n, G, H, W] layout, its backward and double
// backward). The math and notation are those of csrc/cpu/bn_lrelu_pool.cpp; see the comment there.
//
// Launch layout: one thread block per channel g (G = tasks * channels, typically 64..2048). A block
// makes the same passes as the CPU kernel: block-wide reductions (in double) over the channel's
// n*H*W elements or over its n*(H/2)*(W/2) argmax positions, then the output passes. The sparse
// "+= at the argmax" pass follows the dense write after a __syncthreads(); windows are disjoint,
// so no two threads touch the same element. Very small G with huge n*H*W underuses the GPU.
//
// Index arithmetic: every element of every pass maps its flat position e to (image, pixel) with a
// division by H*W (or by the pooled size). In 64 bits that division is a long software routine;
// when all offsets of x fit in 31 bits (always, at MAML++ sizes) the kernels are instantiated with
// 32-bit unsigned indices instead (no 64-bit multiplies, no runtime width check before each
// division). The element loops are unrolled 4x so that each thread has several independent loads
// in flight: with one block per channel a launch has few threads for the bytes it moves, and
// their loads, not arithmetic, bound it. Same arithmetic and summation order either way.
//
// Headers: ATen core + c10 core only (no ATen/cuda/CUDAContext.h, no c10/cuda/CUDAGuard.h), like
// csrc/cuda/lslr_update.cu: the stream and device guard come through c10's device-generic guard
// interface, so this file compiles with `nvcc -c` against a CPU-only torch.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <torch/library.h>
#include <cuda_runtime.h>

#include <tuple>

#include "bn_lrelu_pool.h"

namespace mamlpp_fast {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

// Sum of N doubles over the block; every thread gets the totals. `smem` holds kWarps * N doubles.
template <int N>
__device__ __forceinline__ void block_sum(double (&v)[N], double* smem) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int k = 0; k < N; ++k)
    for (int off = 16; off > 0; off >>= 1) v[k] += __shfl_xor_sync(0xffffffffu, v[k], off);
  __syncthreads();  // smem may still be read by a previous call
  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < N; ++k) smem[warp * N + k] = v[k];
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < N; ++k) {
    double s = 0;
    for (int w = 0; w < kWarps; ++w) s += smem[w * N + k];
    v[k] = s;
  }
}

template <typename index_t>
struct Geo {
  using index_type = index_t;
  index_t n, G, H, W, Ho, Wo;
  // Flat offset in x of channel g's element e (e over n*H*W, image-major).
  __device__ __forceinline__ index_t x_at(index_t g, index_t e) const {
    const index_t HW = H * W, i = e / HW;
    return (i * G + g) * HW + (e - i * HW);
  }
  // Flat offset in pooled tensors of channel g's window e (e over n*Ho*Wo).
  __device__ __forceinline__ index_t y_at(index_t g, index_t e) const {
    const index_t P = Ho * Wo, i = e / P;
    return (i * G + g) * P + (e - i * P);
  }
  // Flat offset in x of position k (0..3, row-major) of channel g's window e.
  // k is the window position 0..3. Only its two low bits are read, so indices that are not the
  // forward's (the CPU kernels reject them; a device-side check would need a synchronisation)
  // still address an element of the window, never memory outside x or gx.
  __device__ __forceinline__ index_t window_at(index_t g, index_t e, int k) const {
    const index_t P = Ho * Wo, i = e / P, rem = e - i * P, oh = rem / Wo, ow = rem - oh * Wo;
    return (i * G + g) * H * W + (2 * oh + ((k >> 1) & 1)) * W + 2 * ow + (k & 1);
  }
  __host__ __device__ index_t elements() const { return n * H * W; }
  __host__ __device__ index_t windows() const { return n * Ho * Wo; }
};

Geo<int64_t> geometry(const at::Tensor& x) {
  return {x.size(0), x.size(1), x.size(2), x.size(3), x.size(2) / 2, x.size(3) / 2};
}

// Calls launch(geo) with a Geo<uint32_t> when every offset into x (the largest tensor a kernel
// indexes, with e + blockDim still below 2^32) fits in 31 bits, else with a Geo<int64_t>.
template <typename Launch>
void with_index_type(const Geo<int64_t>& geo, Launch&& launch) {
  if (geo.n * geo.G * geo.H * geo.W <= static_cast<int64_t>(INT32_MAX)) {
    const auto narrow = [](int64_t v) { return static_cast<uint32_t>(v); };
    launch(Geo<uint32_t>{narrow(geo.n), narrow(geo.G), narrow(geo.H), narrow(geo.W),
                         narrow(geo.Ho), narrow(geo.Wo)});
  } else {
    launch(geo);
  }
}

template <typename scalar_t>
__device__ __forceinline__ scalar_t lrelu(scalar_t z, scalar_t slope) {
  return z > scalar_t(0) ? z : z * slope;
}

template <typename scalar_t, typename index_t>
__global__ void forward_kernel(Geo<index_t> geo, const scalar_t* __restrict__ x,
                               const scalar_t* __restrict__ weight,
                               const scalar_t* __restrict__ bias, double eps, scalar_t slope,
                               scalar_t* __restrict__ y, scalar_t* __restrict__ mean_out,
                               scalar_t* __restrict__ invstd_out, uint8_t* __restrict__ indices) {
  __shared__ double smem[kWarps * 2];
  const index_t g = blockIdx.x, M = geo.elements(), P = geo.windows();
  double s[1] = {0};
  #pragma unroll 4
  for (index_t e = threadIdx.x; e < M; e += blockDim.x) s[0] += static_cast<double>(x[geo.x_at(g, e)]);
  block_sum<1>(s, smem);
  const double mu = s[0] / static_cast<double>(M);
  double ss[1] = {0};
  #pragma unroll 4
  for (index_t e = threadIdx.x; e < M; e += blockDim.x) {
    const double d = static_cast<double>(x[geo.x_at(g, e)]) - mu;
    ss[0] += d * d;
  }
  block_sum<1>(ss, smem);
  const scalar_t mean = static_cast<scalar_t>(mu);
  const scalar_t invstd = static_cast<scalar_t>(rsqrt(ss[0] / static_cast<double>(M) + eps));
  if (threadIdx.x == 0) {
    mean_out[g] = mean;
    invstd_out[g] = invstd;
  }
  const BnAffine<scalar_t> c = bn_affine(weight[g], bias[g], mean, invstd);
  #pragma unroll 4
  for (index_t e = threadIdx.x; e < P; e += blockDim.x) {
    scalar_t best = lrelu(x[geo.window_at(g, e, 0)] * c.alpha + c.shift, slope);
    uint8_t arg = 0;
#pragma unroll
    for (int k = 1; k < 4; ++k) {
      const scalar_t a = lrelu(x[geo.window_at(g, e, k)] * c.alpha + c.shift, slope);
      if (a > best || isnan(a)) {  // first max in row-major order; NaN wins (as ATen)
        best = a;
        arg = static_cast<uint8_t>(k);
      }
    }
    const index_t o = geo.y_at(g, e);
    y[o] = best;
    indices[o] = arg;
  }
}

// Per-channel constants of the backward kernels (mirrors ChannelState in the CPU file).
template <typename scalar_t>
struct State {
  BnAffine<scalar_t> c;
  scalar_t slope;
  double mean, invstd, weight;
  __device__ __forceinline__ double d(scalar_t xv) const {
    return xv * c.alpha + c.shift > scalar_t(0) ? 1.0 : static_cast<double>(slope);
  }
  __device__ __forceinline__ double xhat(scalar_t xv) const {
    return (static_cast<double>(xv) - mean) * invstd;
  }
};

template <typename scalar_t, typename index_t>
__device__ __forceinline__ State<scalar_t> load_state(index_t g, const scalar_t* w,
                                                      const scalar_t* b, const scalar_t* m,
                                                      const scalar_t* r, scalar_t slope) {
  return {bn_affine(w[g], b[g], m[g], r[g]), slope, static_cast<double>(m[g]),
          static_cast<double>(r[g]), static_cast<double>(w[g])};
}

template <typename scalar_t, typename index_t>
__global__ void backward_kernel(Geo<index_t> geo, const scalar_t* __restrict__ gy,
                                const scalar_t* __restrict__ x,
                                const scalar_t* __restrict__ weight,
                                const scalar_t* __restrict__ bias,
                                const scalar_t* __restrict__ mean,
                                const scalar_t* __restrict__ invstd,
                                const uint8_t* __restrict__ indices, scalar_t slope,
                                scalar_t* __restrict__ gx, scalar_t* __restrict__ gw,
                                scalar_t* __restrict__ gb) {
  __shared__ double smem[kWarps * 2];
  const index_t g = blockIdx.x, M = geo.elements(), P = geo.windows();
  const State<scalar_t> st = load_state(g, weight, bias, mean, invstd, slope);
  double s[2] = {0, 0};  // sum u, sum u xh
  #pragma unroll 4
  for (index_t e = threadIdx.x; e < P; e += blockDim.x) {
    const index_t py = geo.y_at(g, e);
    const scalar_t xv = x[geo.window_at(g, e, indices[py])];
    const double u = st.d(xv) * static_cast<double>(gy[py]);
    s[0] += u;
    s[1] += u * st.xhat(xv);
  }
  block_sum<2>(s, smem);
  if (threadIdx.x == 0) {
    gb[g] = static_cast<scalar_t>(s[0]);
    gw[g] = static_cast<scalar_t>(s[1]);
  }
  const double wr = st.weight * st.invstd;
  const scalar_t c1 = static_cast<scalar_t>(-wr * st.invstd * s[1] / static_cast<double>(M));
  const scalar_t c0 = static_cast<scalar_t>(-wr * s[0] / static_cast<double>(M));
  const scalar_t mu = mean[g];
  #pragma unroll 4
  for (index_t e = threadIdx.x; e < M; e += blockDim.x) {
    const index_t o = geo.x_at(g, e);
    gx[o] = c1 * (x[o] - mu) + c0;
  }
  __syncthreads();
  #pragma unroll 4
  for (index_t e = threadIdx.x; e < P; e += blockDim.x) {
    const index_t py = geo.y_at(g, e);
    const index_t px = geo.window_at(g, e, indices[py]);
    gx[px] += static_cast<scalar_t>(wr * st.d(x[px]) * static_cast<double>(gy[py]));
  }
}

template <typename scalar_t, typename index_t>
__global__ void double_backward_kernel(
    Geo<index_t> geo, const scalar_t* __restrict__ gy, const scalar_t* __restrict__ x,
    const scalar_t* __restrict__ weight, const scalar_t* __restrict__ bias,
    const scalar_t* __restrict__ mean, const scalar_t* __restrict__ invstd,
    const uint8_t* __restrict__ indices, const scalar_t* __restrict__ hx,
    const scalar_t* __restrict__ hw_p, const scalar_t* __restrict__ hb_p, scalar_t slope,
    scalar_t* __restrict__ d_gy, scalar_t* __restrict__ d_x, scalar_t* __restrict__ d_w) {
  __shared__ double smem[kWarps * 3];
  const index_t g = blockIdx.x, P = geo.windows();
  const double M = static_cast<double>(geo.elements());
  const State<scalar_t> st = load_state(g, weight, bias, mean, invstd, slope);
  const double r = st.invstd, w = st.weight;
  const double hw = hw_p ? static_cast<double>(hw_p[g]) : 0.0;
  const double hb = hb_p ? static_cast<double>(hb_p[g]) : 0.0;

  double sp[3] = {0, 0, 0};  // sum u, sum u xh, sum hx u (sparse)
  #pragma unroll 4
  for (index_t e = threadIdx.x; e < P; e += blockDim.x) {
    const index_t py = geo.y_at(g, e);
    const index_t px = geo.window_at(g, e, indices[py]);
    const double u = st.d(x[px]) * static_cast<double>(gy[py]);
    sp[0] += u;
    sp[1] += u * st.xhat(x[px]);
    if (hx) sp[2] += u * static_cast<double>(hx[px]);
  }
  block_sum<3>(sp, smem);
  double dn[2] = {0, 0};  // sum hx, sum hx xh (dense)
  if (hx) {
    #pragma unroll 4
    for (index_t e = threadIdx.x; e < geo.elements(); e += blockDim.x) {
      const index_t o = geo.x_at(g, e);
      const double h = static_cast<double>(hx[o]);
      dn[0] += h;
      dn[1] += h * st.xhat(x[o]);
    }
    block_sum<2>(dn, smem);
  }
  const double A = sp[0] / M, Bu = sp[1] / M, Hm = dn[0] / M, C = dn[1] / M;
  const double S = sp[2] - A * dn[0] - Bu * dn[1];
  if (threadIdx.x == 0) d_w[g] = static_cast<scalar_t>(r * S);
  const double rho = w * S;
  const double q_mean = -w * r * (Bu * Hm + C * A) + hw * A;
  const double qx_mean = -2 * w * r * Bu * C + hw * Bu;
  const scalar_t e_h = static_cast<scalar_t>(-w * r * r * Bu);
  const scalar_t e0 = static_cast<scalar_t>(-r * q_mean);
  const scalar_t e1 = static_cast<scalar_t>(-r * r * (qx_mean + rho * r / M));
  const scalar_t mu = mean[g];
  #pragma unroll 4
  for (index_t e = threadIdx.x; e < geo.elements(); e += blockDim.x) {
    const index_t o = geo.x_at(g, e);
    scalar_t v = e1 * (x[o] - mu) + e0;
    if (hx) v += e_h * hx[o];
    d_x[o] = v;
  }
  __syncthreads();
  const double su_coef = r * (hw - w * r * C);
  #pragma unroll 4
  for (index_t e = threadIdx.x; e < P; e += blockDim.x) {
    const index_t py = geo.y_at(g, e);
    const index_t px = geo.window_at(g, e, indices[py]);
    const scalar_t xv = x[px];
    const double D = st.d(xv), xh = st.xhat(xv);
    d_x[px] += static_cast<scalar_t>(su_coef * D * static_cast<double>(gy[py]));
    const double h = hx ? static_cast<double>(hx[px]) : 0.0;
    d_gy[py] = static_cast<scalar_t>(D * (w * r * (h - Hm - xh * C) + hw * xh + hb));
  }
}

cudaStream_t current_stream(const at::Tensor& t) {
  const c10::impl::VirtualGuardImpl impl(c10::DeviceType::CUDA);
  return static_cast<cudaStream_t>(impl.getStreamNativeHandle(impl.getStream(t.device())));
}

void check_launch(const char* op) {
  const cudaError_t err = cudaGetLastError();
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_lrelu_pool_forward_cuda(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, double eps,
    double negative_slope) {
  constexpr const char* op = "bn_lrelu_pool_forward";
  check_bn_lrelu_pool_x(op, x);
  check_bn_lrelu_pool_channel_vec(op, "weight", weight, x);
  check_bn_lrelu_pool_channel_vec(op, "bias", bias, x);
  TORCH_CHECK(eps > 0, op, ": eps must be positive, got ", eps);
  TORCH_INTERNAL_ASSERT(x.device().is_cuda());
  const c10::DeviceGuard guard(x.device());
  const Geo<int64_t> geo = geometry(x);
  at::Tensor y = at::empty({geo.n, geo.G, geo.Ho, geo.Wo}, x.options());
  at::Tensor mean = at::empty({geo.G}, x.options());
  at::Tensor invstd = at::empty({geo.G}, x.options());
  at::Tensor indices = at::empty({geo.n, geo.G, geo.Ho, geo.Wo}, x.options().dtype(at::kByte));
  const at::Tensor w = weight.contiguous(), b = bias.contiguous();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bn_lrelu_pool_forward_cuda", [&] {
    with_index_type(geo, [&](auto g) {
      forward_kernel<scalar_t, typename decltype(g)::index_type>
          <<<geo.G, kThreads, 0, current_stream(x)>>>(
              g, x.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(), b.data_ptr<scalar_t>(), eps,
              static_cast<scalar_t>(negative_slope), y.data_ptr<scalar_t>(),
              mean.data_ptr<scalar_t>(), invstd.data_ptr<scalar_t>(), indices.data_ptr<uint8_t>());
    });
  });
  check_launch(op);
  return {y, mean, invstd, indices};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_lrelu_pool_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& bias, const at::Tensor& mean, const at::Tensor& invstd,
    const at::Tensor& indices, double negative_slope) {
  constexpr const char* op = "bn_lrelu_pool_backward";
  check_bn_lrelu_pool_backward_args(op, grad_y, x, weight, bias, mean, invstd, indices);
  TORCH_INTERNAL_ASSERT(x.device().is_cuda());
  const c10::DeviceGuard guard(x.device());
  const Geo<int64_t> geo = geometry(x);
  const at::Tensor gy = grad_y.contiguous(), idx = indices.contiguous();
  const at::Tensor w = weight.contiguous(), b = bias.contiguous();
  const at::Tensor m = mean.contiguous(), r = invstd.contiguous();
  at::Tensor gx = at::empty_like(x), gw = at::empty_like(w), gb = at::empty_like(b);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bn_lrelu_pool_backward_cuda", [&] {
    with_index_type(geo, [&](auto g) {
      backward_kernel<scalar_t, typename decltype(g)::index_type>
          <<<geo.G, kThreads, 0, current_stream(x)>>>(
              g, gy.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(),
              b.data_ptr<scalar_t>(), m.data_ptr<scalar_t>(), r.data_ptr<scalar_t>(),
              idx.data_ptr<uint8_t>(), static_cast<scalar_t>(negative_slope),
              gx.data_ptr<scalar_t>(), gw.data_ptr<scalar_t>(), gb.data_ptr<scalar_t>());
    });
  });
  check_launch(op);
  return {gx, gw, gb};
}

at::Tensor optional_cotangent(const char* op, const char* name,
                              const std::optional<at::Tensor>& t, const at::Tensor& like) {
  if (!t.has_value() || !t->defined()) return at::Tensor();
  TORCH_CHECK(t->sizes() == like.sizes(), op, ": ", name, " must have shape ", like.sizes(),
              ", got ", t->sizes());
  TORCH_CHECK(t->scalar_type() == like.scalar_type(), op, ": ", name, " must have dtype ",
              like.scalar_type(), ", got ", t->scalar_type());
  TORCH_CHECK(t->device() == like.device(), op, ": ", name, " must be on device ", like.device(),
              ", got ", t->device());
  return t->contiguous();
}

template <typename scalar_t>
const scalar_t* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<scalar_t>() : nullptr;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_lrelu_pool_double_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& bias, const at::Tensor& mean, const at::Tensor& invstd,
    const at::Tensor& indices, const std::optional<at::Tensor>& grad_grad_x,
    const std::optional<at::Tensor>& grad_grad_weight,
    const std::optional<at::Tensor>& grad_grad_bias, double negative_slope) {
  constexpr const char* op = "bn_lrelu_pool_double_backward";
  check_bn_lrelu_pool_backward_args(op, grad_y, x, weight, bias, mean, invstd, indices);
  TORCH_INTERNAL_ASSERT(x.device().is_cuda());
  const c10::DeviceGuard guard(x.device());
  const Geo<int64_t> geo = geometry(x);
  const at::Tensor hx = optional_cotangent(op, "grad_grad_x", grad_grad_x, x);
  const at::Tensor hw = optional_cotangent(op, "grad_grad_weight", grad_grad_weight, weight);
  const at::Tensor hb = optional_cotangent(op, "grad_grad_bias", grad_grad_bias, bias);
  const at::Tensor gy = grad_y.contiguous(), idx = indices.contiguous();
  const at::Tensor w = weight.contiguous(), b = bias.contiguous();
  const at::Tensor m = mean.contiguous(), r = invstd.contiguous();
  at::Tensor d_gy = at::empty(gy.sizes(), x.options());
  at::Tensor d_x = at::empty_like(x), d_w = at::empty_like(w);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bn_lrelu_pool_double_backward_cuda", [&] {
    with_index_type(geo, [&](auto g) {
      double_backward_kernel<scalar_t, typename decltype(g)::index_type>
          <<<geo.G, kThreads, 0, current_stream(x)>>>(
              g, gy.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(),
              b.data_ptr<scalar_t>(), m.data_ptr<scalar_t>(), r.data_ptr<scalar_t>(),
              idx.data_ptr<uint8_t>(), ptr_or_null<scalar_t>(hx), ptr_or_null<scalar_t>(hw),
              ptr_or_null<scalar_t>(hb), static_cast<scalar_t>(negative_slope),
              d_gy.data_ptr<scalar_t>(), d_x.data_ptr<scalar_t>(), d_w.data_ptr<scalar_t>());
    });
  });
  check_launch(op);
  return {d_gy, d_x, d_w};
}

}  // namespace

TORCH_LIBRARY_IMPL(mamlpp_fast, CUDA, m) {
  m.impl("bn_lrelu_pool_forward", &bn_lrelu_pool_forward_cuda);
  m.impl("bn_lrelu_pool_backward", &bn_lrelu_pool_backward_cuda);
  m.impl("bn_lrelu_pool_double_backward", &bn_lrelu_pool_double_backward_cuda);
}

}  // namespace mamlpp_fast
