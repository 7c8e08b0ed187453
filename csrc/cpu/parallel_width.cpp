// parallel_width: how many threads at::parallel_for really uses inside this library.
//
// at::parallel_for is header code. With torch's OpenMP backend it expands to a
// `#pragma omp parallel` in our own objects, so a build without -fopenmp compiles it to a plain
// loop and every CPU kernel silently runs on one thread (this happened: the fused stage ran 2x
// slower than it should on two cores). The op lets the tests and `describe_backends()` see it.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <cstdint>

namespace mamlpp_fast {
namespace {

int64_t parallel_width(int64_t work_items) {
  TORCH_CHECK(work_items > 0, "parallel_width: work_items must be positive, got ", work_items);
  std::atomic<int64_t> chunks{0};
  at::parallel_for(0, work_items, 1, [&](int64_t, int64_t) { chunks.fetch_add(1); });
  return chunks.load();
}

}  // namespace

// No tensor arguments, so no dispatch key: the kernel is registered for every key at once.
TORCH_LIBRARY_FRAGMENT(mamlpp_fast, m) {
  m.def("parallel_width(int work_items) -> int", &parallel_width);
}

}  // namespace mamlpp_fast
