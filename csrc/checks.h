// Input checks shared by the CPU kernels: every entry point validates through these macros, so a
// contract violation raises a Python ValueError naming the argument (baerase.ops.cpp turns it into
// InputError) instead of reading out of bounds.
#pragma once

// Per-op headers instead of ATen/ATen.h: a translation unit then compiles in a fraction of the time.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/sigmoid.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>

#define BAERASE_CHECK_CPU(t) TORCH_CHECK_VALUE((t).device().is_cpu(), #t " must be a CPU tensor")
#define BAERASE_CHECK_CONTIGUOUS(t) TORCH_CHECK_VALUE((t).is_contiguous(), #t " must be contiguous")
#define BAERASE_CHECK_INPUT(t) \
  BAERASE_CHECK_CPU(t);        \
  BAERASE_CHECK_CONTIGUOUS(t)
#define BAERASE_CHECK_DIM(t, n) \
  TORCH_CHECK_VALUE((t).dim() == (n), #t " must have " #n " dimensions, got ", (t).sizes())
#define BAERASE_CHECK_DTYPE(t, dt) \
  TORCH_CHECK_VALUE((t).scalar_type() == (dt), #t " must be ", (dt), ", got ", (t).scalar_type())
#define BAERASE_CHECK_FLOATING(t) \
  TORCH_CHECK_VALUE(at::isFloatingType((t).scalar_type()), #t " must be a floating-point tensor")
#define BAERASE_CHECK_SIZE(t, d, n) \
  TORCH_CHECK_VALUE((t).size(d) == (n), #t ".size(" #d ") must be ", (n), ", got ", (t).size(d))

// Hot loops are compiled twice: for the baseline ISA of the build flags and, on x86-64 with GCC or
// Clang, for AVX2+FMA (twice the SIMD width), picked at run time by cpu_has_avx2(). The row
// helpers are always_inline so each clone gets its own vectorised copy of them.
#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
#define BAERASE_AVX2_CLONE 1
#define BAERASE_TARGET_AVX2 __attribute__((target("avx2,fma")))
#define BAERASE_INLINE inline __attribute__((always_inline))
#else
#define BAERASE_AVX2_CLONE 0
#define BAERASE_TARGET_AVX2
#define BAERASE_INLINE inline
#endif

namespace baerase {

inline bool cpu_has_avx2() {
#if BAERASE_AVX2_CLONE
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
#else
  return false;
#endif
}

// exp for loops the compiler vectorises: Cephes' expf (range reduction by ln 2 and a degree-5
// polynomial, ~2 ulp), branch-free, so `#pragma omp simd` loops over it become SIMD code where
// std::exp would stay one scalar libm call per element. Below -87.3 (exp < FLT_MIN) it returns 0,
// as does exp(-inf).
BAERASE_INLINE float vexp(float x) {
  const float c = std::min(std::max(x, -87.33654f), 88.72283f);
  // Round to nearest by the 1.5 * 2^23 trick: std::floor would stay a libm call and block SIMD.
  const float fx = (c * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = (c - fx * 0.693359375f) + fx * 2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(fx) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x < -87.33654f ? 0.0f : y * scale;
}

// Largest of x[0..n): eight running maxima in one vector register where the compiler offers vector
// types, since a scalar max is a serial chain and GCC vectorises no float max reduction (NaN rules).
BAERASE_INLINE float block_max(const float* x, int64_t n) {
  float best = -std::numeric_limits<float>::infinity();
  int64_t i = 0;
#if defined(__GNUC__) || defined(__clang__)
  typedef float f8 __attribute__((vector_size(32)));
  f8 lanes = {best, best, best, best, best, best, best, best};
  for (; i + 8 <= n; i += 8) {
    f8 v;
    std::memcpy(&v, x + i, sizeof(v));
    lanes = v > lanes ? v : lanes;
  }
  for (int l = 0; l < 8; ++l) best = std::max(best, lanes[l]);
#endif
  for (; i < n; ++i) best = std::max(best, x[i]);
  return best;
}

}  // namespace baerase
