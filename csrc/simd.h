// Vector helpers for the CPU kernels: a run-time ISA dispatch, an exp the compiler vectorises, and
// a vector max.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>

// Hot loops are compiled once per ISA tier and picked at run time (with_best_isa): the baseline of
// the build flags and, on x86-64 with GCC or Clang, AVX2+FMA and AVX-512 (two and four times the
// SSE width). The loop bodies are always_inline so each tier gets its own vectorised copy.
#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
#define BAERASE_ISA_CLONES 1
#define BAERASE_INLINE inline __attribute__((always_inline))
#define BAERASE_LAMBDA_INLINE __attribute__((always_inline))
#else
#define BAERASE_ISA_CLONES 0
#define BAERASE_INLINE inline
#define BAERASE_LAMBDA_INLINE
#endif

namespace baerase {

#if BAERASE_ISA_CLONES
template <typename F>
__attribute__((target("avx512f,avx512dq,avx512vl,avx512bw,avx2,fma"))) void run_avx512(const F& f) {
  f();
}

template <typename F>
__attribute__((target("avx2,fma"))) void run_avx2(const F& f) {
  f();
}

// 2: AVX-512, 1: AVX2+FMA, 0: baseline. BAERASE_CPU_ISA=avx2 or =baseline caps it, so every tier
// can be compared and tested on one machine.
inline int cpu_isa_tier() {
  static const int tier = [] {
    const int have = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
                             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw")
                         ? 2
                     : __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? 1
                                                                                       : 0;
    const char* cap = std::getenv("BAERASE_CPU_ISA");
    if (cap && std::strcmp(cap, "avx2") == 0) return std::min(have, 1);
    if (cap && std::strcmp(cap, "baseline") == 0) return 0;
    return have;
  }();
  return tier;
}
#else
inline int cpu_isa_tier() { return 0; }
#endif

inline const char* cpu_isa_name() {
  static const char* names[] = {"baseline", "avx2", "avx512"};
  return names[cpu_isa_tier()];
}

// Calls f, compiled for the widest ISA tier this CPU offers. f must be an always_inline lambda
// (BAERASE_LAMBDA_INLINE) so its loops are generated inside the tier's target. n is the length of
// f's inner loops: below kAvx512MinLength, AVX-512 code runs mostly in its remainder loop and is
// slower than AVX2 (a 10-class row takes 1.7x as long), so short loops stay on AVX2.
constexpr int64_t kAvx512MinLength = 32;

template <typename F>
void with_best_isa(int64_t n, const F& f) {
#if BAERASE_ISA_CLONES
  const int tier = cpu_isa_tier();
  if (tier == 2 && n >= kAvx512MinLength) return run_avx512(f);
  if (tier >= 1) return run_avx2(f);
#endif
  f();
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

// Largest of x[0..n): sixteen running maxima in vector registers where the compiler offers vector
// types (one AVX-512 register, two AVX2 ones), since a scalar max is a serial chain and GCC
// vectorises no float max reduction (NaN rules).
BAERASE_INLINE float block_max(const float* x, int64_t n) {
  float best = -std::numeric_limits<float>::infinity();
  int64_t i = 0;
#if defined(__GNUC__) || defined(__clang__)
  typedef float f8 __attribute__((vector_size(32)));
  f8 lanes;
  for (int l = 0; l < 8; ++l) lanes[l] = best;
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
