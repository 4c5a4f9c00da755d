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

namespace baerase {

// exp for loops the compiler vectorises: Cephes' expf (range reduction by ln 2 and a degree-5
// polynomial, ~2 ulp), branch-free, so `#pragma omp simd` loops over it become SIMD code where
// std::exp would stay one scalar libm call per element. Below -87.3 (exp < FLT_MIN) it returns 0,
// as does exp(-inf).
inline float vexp(float x) {
  const float c = std::min(std::max(x, -87.33654f), 88.72283f);
  const float fx = std::floor(c * 1.44269504088896341f + 0.5f);
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

}  // namespace baerase
