// task_conv_weight_grad (CPU): the weight and bias gradients of the task-batched 3x3 convolution
// (stride 1, zero padding 1) in one pass over grad_out, for layers with few input channels per
// task.
//
// Why: MAML++'s first layer sees 1 (Omniglot) or 3 (mini-ImageNet) input channels per task, so
// its weight gradient is 9 or 27 multiply-adds per element of grad_out: it is bound by reading
// grad_out, the largest activation of the network. oneDNN's grouped weight-gradient kernel runs
// far from that bound there (mini-ImageNet's 75-image target set: 24.5 ms against 5.7 ms for one
// read of its 203 MB grad_out), and the bias gradient, an ATen channel sum, reads it again at
// about half the memory bandwidth. Here both come from one read.
//
// Layout: channels-last (NHWC) x [n, H, W, B*C_in] and grad_out [n, H, W, B*C_out], MetaLearner's
// CPU layout (other layouts are converted first). For every output row (image, h) the three input
// rows it reads are copied, zero-padded, into a small buffer; then for each task, input channel
// and block of output channels, the nine taps' sums over the row's W pixels stay in nine vector
// registers (acc[k] += x[tap k] * gy[w, block]): one load of grad_out feeds nine FMAs.
//
// Determinism: rows are summed per fixed chunk (the chunking depends on the shape only) into the
// chunk's own partials, which are then added in chunk order in double, so the result does not
// depend on the number of threads.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <tuple>
#include <vector>

#include "checks.h"
#include "cpu/simd.h"

namespace mamlpp_fast {
namespace {

constexpr const char* kOp = "task_conv_weight_grad";
constexpr int kTaps = 9;
// Enough chunks to keep a few threads busy; each costs a zeroed partial and its share of the
// final (serial) sum.
constexpr int64_t kMaxChunks = 16;

// 64-byte vectors (one AVX-512 register; gcc splits them on narrower ISAs) of the accumulation
// type: float for float32 and bfloat16 inputs, double for float64.
typedef float VecF __attribute__((vector_size(64)));
typedef double VecD __attribute__((vector_size(64)));
template <typename A> struct VecOf;
template <> struct VecOf<float> { using type = VecF; static constexpr int64_t lanes = 16; };
template <> struct VecOf<double> { using type = VecD; static constexpr int64_t lanes = 8; };

template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };

// Unaligned vector loads and stores as memcpy (which compiles to one vmovups). They are written
// at the call sites, not as helpers: a helper taking or returning a 64-byte vector changes the
// calling convention between the ISA clones (gcc's -Wpsabi).

// For one output row and one task: the nine taps' sums over the row's W pixels, for CI input
// channels at once and NB full blocks of output channels, added to
// out[((ci * 9 + k) * c_out) + block * lanes + lane]. x0/x1/x2 point at the task's first input
// channel in the padded rows above, at and below the output row (pixel w's tap kw of channel ci
// at x{kh}[(w + kw) * xs + ci]); gy at the first block's first channel of pixel 0 (pixel w at
// gy[w * gs]). The CI * 9 * NB accumulators (at most 27) and NB gy vectors stay in registers, so
// each gy vector loaded feeds 9 * CI FMAs.
template <typename A, int CI, int NB>
MAMLPP_FAST_SIMD_CLONES void tap_sums_block(const A* __restrict__ x0, const A* __restrict__ x1,
                                            const A* __restrict__ x2, int64_t xs,
                                            const A* __restrict__ gy, int64_t gs, int64_t W,
                                            A* __restrict__ out, int64_t c_out) {
  using V = typename VecOf<A>::type;
  constexpr int64_t L = VecOf<A>::lanes;
  V acc[CI * kTaps * NB];
#pragma GCC unroll 32
  for (int i = 0; i < CI * kTaps * NB; ++i) acc[i] = V{};
  for (int64_t w = 0; w < W; ++w) {
    V g[NB];
#pragma GCC unroll 4
    for (int b = 0; b < NB; ++b) std::memcpy(&g[b], gy + w * gs + b * L, sizeof(V));
    const A* rows[3] = {x0 + w * xs, x1 + w * xs, x2 + w * xs};
#pragma GCC unroll 4
    for (int ci = 0; ci < CI; ++ci) {
#pragma GCC unroll 9
      for (int k = 0; k < kTaps; ++k) {
        const A xv = rows[k / 3][(k % 3) * xs + ci];
#pragma GCC unroll 4
        for (int b = 0; b < NB; ++b) acc[(ci * kTaps + k) * NB + b] += xv * g[b];
      }
    }
  }
#pragma GCC unroll 4
  for (int ci = 0; ci < CI; ++ci) {
#pragma GCC unroll 9
    for (int k = 0; k < kTaps; ++k) {
#pragma GCC unroll 4
      for (int b = 0; b < NB; ++b) {
        A* o = out + (ci * kTaps + k) * c_out + b * L;
        V sum;
        std::memcpy(&sum, o, sizeof(V));
        sum += acc[(ci * kTaps + k) * NB + b];
        std::memcpy(o, &sum, sizeof(V));
      }
    }
  }
}

// The same for a last, partial block of `width` < lanes channels (C_out not a multiple of the
// vector width): plain loops, correct rather than fast (no MAML++ setting has one).
template <typename A>
void tap_sums_tail(const A* x0, const A* x1, const A* x2, int64_t xs, const A* gy, int64_t gs,
                   int64_t W, int64_t width, A* out, int64_t out_stride) {
  const A* rows[3] = {x0, x1, x2};
  for (int64_t w = 0; w < W; ++w) {
    for (int kh = 0; kh < 3; ++kh) {
      for (int kw = 0; kw < 3; ++kw) {
        const A xv = rows[kh][(w + kw) * xs];
        A* o = out + (kh * 3 + kw) * out_stride;
        for (int64_t c = 0; c < width; ++c) o[c] += xv * gy[w * gs + c];
      }
    }
  }
}

// bias[c] += sum over the row's W pixels of gy[w * G + c].
template <typename A>
MAMLPP_FAST_SIMD_CLONES void row_channel_sums(const A* __restrict__ gy, int64_t W, int64_t G,
                                              A* __restrict__ bias) {
  for (int64_t w = 0; w < W; ++w) {
    const A* g = gy + w * G;
    MAMLPP_FAST_SIMD
    for (int64_t c = 0; c < G; ++c) bias[c] += g[c];
  }
}

// dst[i] = src[i] in the accumulation type. bfloat16 is the top half of a float32, so widening is
// a 16-bit shift, which vectorises (c10::BFloat16's conversion operator, called from here, did not).
template <typename T, typename A>
MAMLPP_FAST_SIMD_CLONES void widen(const T* __restrict__ src, A* __restrict__ dst, int64_t len) {
  if constexpr (std::is_same<T, c10::BFloat16>::value) {
    const uint16_t* bits = reinterpret_cast<const uint16_t*>(src);
    MAMLPP_FAST_SIMD
    for (int64_t i = 0; i < len; ++i) dst[i] = __builtin_bit_cast(float, static_cast<uint32_t>(bits[i]) << 16);
  } else {
    MAMLPP_FAST_SIMD
    for (int64_t i = 0; i < len; ++i) dst[i] = static_cast<A>(src[i]);
  }
}

struct Geometry {
  int64_t n, H, W, tasks, c_in, c_out;
  int64_t xc() const { return tasks * c_in; }   // x's channels per pixel
  int64_t gc() const { return tasks * c_out; }  // grad_out's channels per pixel
  int64_t weight_numel() const { return tasks * c_in * kTaps * c_out; }
};

// A chunk's partial sums: the weight gradient as [B][C_in][9][C_out] (output channels innermost,
// so each tap's block is one vector), then the bias gradient [B * C_out].
template <typename T, typename A>
void accumulate_rows(const Geometry& g, const T* x, const T* gy, int64_t row_begin, int64_t row_end,
                     A* partial) {
  using Vec = VecOf<A>;
  const int64_t xc = g.xc(), gc = g.gc(), padded = (g.W + 2) * xc;
  std::vector<A> xpad(3 * padded, A(0));
  std::vector<A> gy_row(std::is_same<T, A>::value ? 0 : g.W * gc);
  A* bias = partial + g.weight_numel();
  for (int64_t row = row_begin; row < row_end; ++row) {
    const int64_t img = row / g.H, h = row % g.H;
    // The three input rows this output row reads, zero-padded by one pixel on each side (and
    // all zero above the first row and below the last).
    for (int kh = 0; kh < 3; ++kh) {
      A* dst = xpad.data() + kh * padded;
      const int64_t hin = h + kh - 1;
      if (hin < 0 || hin >= g.H) {
        std::fill(dst, dst + padded, A(0));
        continue;
      }
      widen<T, A>(x + (img * g.H + hin) * g.W * xc, dst + xc, g.W * xc);
    }
    const T* gy_src = gy + row * g.W * gc;
    const A* grow;
    if constexpr (std::is_same<T, A>::value) {
      grow = gy_src;
    } else {
      widen<T, A>(gy_src, gy_row.data(), g.W * gc);
      grow = gy_row.data();
    }
    row_channel_sums<A>(grow, g.W, gc, bias);
    for (int64_t t = 0; t < g.tasks; ++t) {
      const A* x0 = xpad.data() + t * g.c_in;
      const A* gt = grow + t * g.c_out;
      A* out = partial + t * g.c_in * kTaps * g.c_out;
      if (g.c_in == 2 || g.c_in == 3) {
        // All input channels at once: 18 or 27 accumulators.
        for (int64_t c = 0; c + Vec::lanes <= g.c_out; c += Vec::lanes) {
          if (g.c_in == 2) {
            tap_sums_block<A, 2, 1>(x0, x0 + padded, x0 + 2 * padded, xc, gt + c, gc, g.W, out + c, g.c_out);
          } else {
            tap_sums_block<A, 3, 1>(x0, x0 + padded, x0 + 2 * padded, xc, gt + c, gc, g.W, out + c, g.c_out);
          }
        }
      } else {
        // One input channel at a time, two blocks of output channels at once: 18 accumulators.
        for (int64_t ci = 0; ci < g.c_in; ++ci) {
          int64_t c = 0;
          for (; c + 2 * Vec::lanes <= g.c_out; c += 2 * Vec::lanes) {
            tap_sums_block<A, 1, 2>(x0 + ci, x0 + ci + padded, x0 + ci + 2 * padded, xc, gt + c, gc, g.W,
                                    out + ci * kTaps * g.c_out + c, g.c_out);
          }
          for (; c + Vec::lanes <= g.c_out; c += Vec::lanes) {
            tap_sums_block<A, 1, 1>(x0 + ci, x0 + ci + padded, x0 + ci + 2 * padded, xc, gt + c, gc, g.W,
                                    out + ci * kTaps * g.c_out + c, g.c_out);
          }
        }
      }
      const int64_t full = g.c_out - g.c_out % Vec::lanes;
      if (full < g.c_out) {
        for (int64_t ci = 0; ci < g.c_in; ++ci) {
          tap_sums_tail<A>(x0 + ci, x0 + ci + padded, x0 + ci + 2 * padded, xc, gt + full, gc, g.W,
                           g.c_out - full, out + ci * kTaps * g.c_out + full, g.c_out);
        }
      }
    }
  }
}

template <typename T>
void weight_grad_kernel(const Geometry& g, const T* x, const T* gy, T* grad_w, T* grad_b) {
  using A = typename AccOf<T>::type;
  const int64_t rows = g.n * g.H;
  const int64_t chunks = std::min(rows, kMaxChunks);
  const int64_t per_chunk = g.weight_numel() + g.gc();
  std::vector<A> partials(chunks * per_chunk, A(0));
  at::parallel_for(0, chunks, 1, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      // Chunk k holds rows [k * rows / chunks, (k + 1) * rows / chunks).
      accumulate_rows<T, A>(g, x, gy, k * rows / chunks, (k + 1) * rows / chunks,
                            partials.data() + k * per_chunk);
    }
  });
  // Chunks added in order, in double; the weight transposed from [B][C_in][9][C_out] to the
  // convolution's [B][C_out][C_in][9].
  for (int64_t t = 0; t < g.tasks; ++t) {
    for (int64_t ci = 0; ci < g.c_in; ++ci) {
      for (int64_t k = 0; k < kTaps; ++k) {
        for (int64_t co = 0; co < g.c_out; ++co) {
          const int64_t src = ((t * g.c_in + ci) * kTaps + k) * g.c_out + co;
          double total = 0;
          for (int64_t chunk = 0; chunk < chunks; ++chunk) total += partials[chunk * per_chunk + src];
          grad_w[((t * g.c_out + co) * g.c_in + ci) * kTaps + k] = static_cast<T>(total);
        }
      }
    }
  }
  for (int64_t c = 0; c < g.gc(); ++c) {
    double total = 0;
    for (int64_t chunk = 0; chunk < chunks; ++chunk) total += partials[chunk * per_chunk + g.weight_numel() + c];
    grad_b[c] = static_cast<T>(total);
  }
}

std::tuple<at::Tensor, at::Tensor> task_conv_weight_grad_cpu(const at::Tensor& x, const at::Tensor& grad_out,
                                                             int64_t num_tasks) {
  MAMLPP_CHECK_DIM("task_conv_weight_grad", x, 4);
  MAMLPP_CHECK_DIM("task_conv_weight_grad", grad_out, 4);
  TORCH_CHECK(num_tasks > 0, kOp, ": num_tasks must be positive, got ", num_tasks);
  TORCH_CHECK(x.scalar_type() == grad_out.scalar_type(), kOp,
              ": x and grad_out must share one dtype, got ", x.scalar_type(), " and ", grad_out.scalar_type());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble || x.scalar_type() == at::kBFloat16,
              kOp, ": x must be float32, float64 or bfloat16, got ", x.scalar_type());
  MAMLPP_CHECK_SAME_DEVICE("task_conv_weight_grad", x, grad_out);
  TORCH_CHECK(x.size(0) == grad_out.size(0) && x.size(2) == grad_out.size(2) && x.size(3) == grad_out.size(3),
              kOp, ": x [n, B*C_in, H, W] and grad_out [n, B*C_out, H, W] must agree in n, H and W, got ",
              x.sizes(), " and ", grad_out.sizes());
  TORCH_CHECK(x.size(1) % num_tasks == 0 && grad_out.size(1) % num_tasks == 0 && x.size(1) > 0 &&
                  grad_out.size(1) > 0,
              kOp, ": the channels of x (", x.size(1), ") and of grad_out (", grad_out.size(1),
              ") must be positive multiples of num_tasks (", num_tasks, ")");
  const Geometry g{x.size(0), x.size(2), x.size(3), num_tasks, x.size(1) / num_tasks,
                   grad_out.size(1) / num_tasks};
  auto grad_w = at::empty({g.tasks, g.c_out, g.c_in, 3, 3}, x.options());
  auto grad_b = at::empty({g.tasks, g.c_out}, x.options());
  if (g.n * g.H * g.W == 0) {
    grad_w.zero_();
    grad_b.zero_();
    return {grad_w, grad_b};
  }
  // The kernel reads NHWC; MetaLearner's CPU activations already are (no copy then).
  const auto x_nhwc = x.contiguous(at::MemoryFormat::ChannelsLast);
  const auto gy_nhwc = grad_out.contiguous(at::MemoryFormat::ChannelsLast);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "task_conv_weight_grad_cpu", [&] {
    weight_grad_kernel<scalar_t>(g, x_nhwc.const_data_ptr<scalar_t>(), gy_nhwc.const_data_ptr<scalar_t>(),
                                 grad_w.mutable_data_ptr<scalar_t>(), grad_b.mutable_data_ptr<scalar_t>());
  });
  return {grad_w, grad_b};
}

}  // namespace

TORCH_LIBRARY_IMPL(mamlpp_fast, CPU, m) {
  m.impl("task_conv_weight_grad", &task_conv_weight_grad_cpu);
}

}  // namespace mamlpp_fast
