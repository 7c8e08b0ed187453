// Vector code for the CPU kernels without giving up portability.
//
// The extension is built for the baseline x86-64 ISA so that one wheel runs everywhere, but the
// hot per-plane loops of the kernels are worth 2-4x more with AVX2/AVX-512. MAMLPP_FAST_SIMD_CLONES
// asks gcc for one copy of a function per ISA level plus an ifunc resolver that picks the best
// copy for the running CPU at load time (function multi-versioning). Loops inside are written for
// the auto-vectoriser, with `#pragma omp simd` (-fopenmp-simd) where a reduction must be allowed
// to reassociate. The build adds -fno-trapping-math: without it gcc keeps every select whose arms
// hold a floating-point operation (leaky ReLU, the argmax) as a branch, and the loop scalar.
//
// Note on rounding: the x86-64-v3/v4 copies contract a*b+c into FMAs. Every kernel computes the
// batch-norm pre-activation z in such a function, so the forward and the backward passes always
// agree on the sign of z on one machine; results differ from the scalar copy only by rounding.
#pragma once

#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11 && defined(__x86_64__) && \
    defined(__linux__) && !defined(MAMLPP_FAST_NO_SIMD_CLONES)
#define MAMLPP_FAST_SIMD_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MAMLPP_FAST_SIMD_CLONES
#endif

// Helpers called from a cloned function must be always_inline: gcc does not inline a function of
// the default target into a clone for another -march (and a call in a loop stops vectorisation).
#if defined(__GNUC__)
#define MAMLPP_FAST_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define MAMLPP_FAST_ALWAYS_INLINE inline
#endif

#define MAMLPP_FAST_PRAGMA(x) _Pragma(#x)
#define MAMLPP_FAST_SIMD_REDUCE(...) MAMLPP_FAST_PRAGMA(omp simd reduction(+ : __VA_ARGS__))
#define MAMLPP_FAST_SIMD MAMLPP_FAST_PRAGMA(omp simd)
