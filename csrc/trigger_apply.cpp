// CPU masked-trigger application: out[k,b] = normalize(x[b] + sigmoid(m[k]) * (p - x[b])).
//
// The sigmoid of the mask is computed once per candidate ([K, 1|C, H*W], small) so the per-pixel
// loops over the [K, B, C, H, W] output are pure multiply-adds that the compiler vectorises. The
// backward walks each candidate in pixel chunks and accumulates the batch (and, for a 1-channel
// mask, channel) reductions in registers-sized float buffers, so nothing of size K*B*C*H*W is
// materialised besides the gradient input itself.

#include <algorithm>
#include <vector>

#include "checks.h"

namespace baerase {
namespace {

// Pixels per backward work item: 512 fp32 accumulators (2 KiB) per buffer stay in L1.
constexpr int64_t kChunk = 512;

struct Geometry {
  int64_t K, B, C, Cm, HW;
  bool per_sample;  // pattern is [K, B, C, H, W]
};

Geometry check_trigger_inputs(const at::Tensor& x, const at::Tensor& mask_logits, const at::Tensor& pattern,
                              const at::Tensor& mean, const at::Tensor& std) {
  BAERASE_CHECK_INPUT(x);
  BAERASE_CHECK_INPUT(mask_logits);
  BAERASE_CHECK_INPUT(pattern);
  BAERASE_CHECK_INPUT(mean);
  BAERASE_CHECK_INPUT(std);
  BAERASE_CHECK_FLOATING(x);
  BAERASE_CHECK_FLOATING(mask_logits);
  BAERASE_CHECK_FLOATING(pattern);
  BAERASE_CHECK_DIM(x, 4);
  BAERASE_CHECK_DIM(mask_logits, 4);
  BAERASE_CHECK_DTYPE(mean, at::kFloat);
  BAERASE_CHECK_DTYPE(std, at::kFloat);
  Geometry g{mask_logits.size(0), x.size(0), x.size(1), mask_logits.size(1), x.size(2) * x.size(3),
             pattern.dim() == 5};
  TORCH_CHECK_VALUE(g.Cm == 1 || g.Cm == g.C, "mask_logits must have 1 or ", g.C, " channels, got ", g.Cm);
  BAERASE_CHECK_SIZE(mask_logits, 2, x.size(2));
  BAERASE_CHECK_SIZE(mask_logits, 3, x.size(3));
  TORCH_CHECK_VALUE(pattern.dim() == 4 || pattern.dim() == 5, "pattern must be [K,C,H,W] or [K,B,C,H,W]");
  BAERASE_CHECK_SIZE(pattern, 0, g.K);
  if (g.per_sample) BAERASE_CHECK_SIZE(pattern, 1, g.B);
  const int64_t o = g.per_sample ? 1 : 0;
  BAERASE_CHECK_SIZE(pattern, o + 1, g.C);
  BAERASE_CHECK_SIZE(pattern, o + 2, x.size(2));
  BAERASE_CHECK_SIZE(pattern, o + 3, x.size(3));
  BAERASE_CHECK_SIZE(mean, 0, g.C);
  BAERASE_CHECK_SIZE(std, 0, g.C);
  return g;
}

// A per-candidate pattern is small, so it is read as fp32; a per-sample pattern is as large as the
// output and is read in its own dtype when that matches x (no extra pass), else converted once.
at::Tensor pattern_for(const at::Tensor& pattern, const at::Tensor& x) {
  if (pattern.dim() == 5 && pattern.scalar_type() == x.scalar_type()) return pattern;
  return pattern.to(at::kFloat).contiguous();
}

template <typename T, typename P>
void trigger_fwd_kernel(const Geometry& g, const T* x, const float* s, const P* p, const float* mean,
                        const float* std, T* out) {
  const int64_t rows = g.K * g.B * g.C;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(g.HW, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t c = r % g.C, b = (r / g.C) % g.B, k = r / (g.B * g.C);
      const float* sr = s + (k * g.Cm + (g.Cm == 1 ? 0 : c)) * g.HW;
      const P* pr = p + (g.per_sample ? r : k * g.C + c) * g.HW;
      const T* xr = x + (b * g.C + c) * g.HW;
      T* o = out + r * g.HW;
      const float mu = mean[c], inv = 1.0f / std[c];
      for (int64_t i = 0; i < g.HW; ++i) {
        const float xv = static_cast<float>(xr[i]);
        o[i] = static_cast<T>((xv + sr[i] * (static_cast<float>(pr[i]) - xv) - mu) * inv);
      }
    }
  });
}

template <typename T, typename P>
void trigger_bwd_kernel(const Geometry& g, const T* go, const T* x, const float* s, const P* p,
                        const float* std, float* gm, float* gp) {
  const int64_t chunks = (g.HW + kChunk - 1) / kChunk;
  at::parallel_for(0, g.K * chunks, 1, [&](int64_t begin, int64_t end) {
    float acc_m[kChunk], acc_p[kChunk];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t k = item / chunks, lo = (item % chunks) * kChunk;
      const int64_t n = std::min(kChunk, g.HW - lo);
      if (g.Cm == 1) std::fill(acc_m, acc_m + n, 0.0f);
      for (int64_t c = 0; c < g.C; ++c) {
        const float inv = 1.0f / std[c];
        const float* sr = s + (k * g.Cm + (g.Cm == 1 ? 0 : c)) * g.HW + lo;
        if (g.Cm != 1) std::fill(acc_m, acc_m + n, 0.0f);
        if (!g.per_sample) std::fill(acc_p, acc_p + n, 0.0f);
        for (int64_t b = 0; b < g.B; ++b) {
          const int64_t r = (k * g.B + b) * g.C + c;
          const T* gr = go + r * g.HW + lo;
          const T* xr = x + (b * g.C + c) * g.HW + lo;
          const P* pr = p + (g.per_sample ? r : k * g.C + c) * g.HW + lo;
          if (g.per_sample) {
            float* gpr = gp + r * g.HW + lo;
            for (int64_t i = 0; i < n; ++i) {
              const float gs = static_cast<float>(gr[i]) * inv;
              gpr[i] = sr[i] * gs;
              acc_m[i] += (static_cast<float>(pr[i]) - static_cast<float>(xr[i])) * gs;
            }
          } else {
            for (int64_t i = 0; i < n; ++i) {
              const float gs = static_cast<float>(gr[i]) * inv;
              acc_p[i] += gs;
              acc_m[i] += (static_cast<float>(pr[i]) - static_cast<float>(xr[i])) * gs;
            }
          }
        }
        if (!g.per_sample) {
          // sum_b s * g = s * sum_b g: one multiply per pixel instead of B.
          float* gpr = gp + (k * g.C + c) * g.HW + lo;
          for (int64_t i = 0; i < n; ++i) gpr[i] = sr[i] * acc_p[i];
        }
        if (g.Cm != 1) {
          float* gmr = gm + (k * g.Cm + c) * g.HW + lo;
          for (int64_t i = 0; i < n; ++i) gmr[i] = sr[i] * (1.0f - sr[i]) * acc_m[i];
        }
      }
      if (g.Cm == 1) {
        const float* sr = s + k * g.HW + lo;
        float* gmr = gm + k * g.HW + lo;
        for (int64_t i = 0; i < n; ++i) gmr[i] = sr[i] * (1.0f - sr[i]) * acc_m[i];
      }
    }
  });
}

}  // namespace

at::Tensor trigger_apply_fwd(const at::Tensor& x, const at::Tensor& mask_logits, const at::Tensor& pattern,
                             const at::Tensor& mean, const at::Tensor& std) {
  const Geometry g = check_trigger_inputs(x, mask_logits, pattern, mean, std);
  const at::Tensor s = at::sigmoid(mask_logits.to(at::kFloat)).contiguous();
  const at::Tensor p = pattern_for(pattern, x);
  auto out = at::empty({g.K, g.B, g.C, x.size(2), x.size(3)}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "trigger_apply_fwd", [&] {
    if (p.scalar_type() == at::kFloat) {
      trigger_fwd_kernel<scalar_t, float>(g, x.data_ptr<scalar_t>(), s.data_ptr<float>(), p.data_ptr<float>(),
                                          mean.data_ptr<float>(), std.data_ptr<float>(),
                                          out.data_ptr<scalar_t>());
    } else {
      trigger_fwd_kernel<scalar_t, scalar_t>(g, x.data_ptr<scalar_t>(), s.data_ptr<float>(),
                                             p.data_ptr<scalar_t>(), mean.data_ptr<float>(),
                                             std.data_ptr<float>(), out.data_ptr<scalar_t>());
    }
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> trigger_apply_bwd(const at::Tensor& grad_out, const at::Tensor& x,
                                                     const at::Tensor& mask_logits, const at::Tensor& pattern,
                                                     const at::Tensor& mean, const at::Tensor& std) {
  const Geometry g = check_trigger_inputs(x, mask_logits, pattern, mean, std);
  BAERASE_CHECK_INPUT(grad_out);
  BAERASE_CHECK_DIM(grad_out, 5);
  TORCH_CHECK_VALUE(grad_out.numel() == g.K * g.B * g.C * g.HW, "grad_out must be [K,B,C,H,W], got ",
              grad_out.sizes());
  const at::Tensor go = grad_out.scalar_type() == x.scalar_type() ? grad_out : grad_out.to(x.scalar_type());
  const at::Tensor s = at::sigmoid(mask_logits.to(at::kFloat)).contiguous();
  const at::Tensor p = pattern_for(pattern, x);
  auto gm = at::empty(mask_logits.sizes(), mask_logits.options().dtype(at::kFloat));
  auto gp = at::empty(pattern.sizes(), pattern.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "trigger_apply_bwd", [&] {
    if (p.scalar_type() == at::kFloat) {
      trigger_bwd_kernel<scalar_t, float>(g, go.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), s.data_ptr<float>(),
                                          p.data_ptr<float>(), std.data_ptr<float>(), gm.data_ptr<float>(),
                                          gp.data_ptr<float>());
    } else {
      trigger_bwd_kernel<scalar_t, scalar_t>(g, go.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(),
                                             s.data_ptr<float>(), p.data_ptr<scalar_t>(), std.data_ptr<float>(),
                                             gm.data_ptr<float>(), gp.data_ptr<float>());
    }
  });
  return {gm.to(mask_logits.scalar_type()), gp.to(pattern.scalar_type())};
}

}  // namespace baerase
