// Batched per-class Adam: one call updates the parameters of all K candidate generators (stacked
// on a leading K dimension) instead of K Python-level optimiser steps.
//
// Adam follows torch.optim.Adam's single-tensor arithmetic (lerp for the first moment, bias
// corrections in double from a per-class step count) so a batched step matches K separate
// optimisers. Classes whose `active` entry is false are frozen: parameters, moments and step
// count stay as they are, so an early-stopped candidate resumes exactly where it stopped.

#include <cmath>
#include <vector>

#include "checks.h"
#include "simd.h"

namespace baerase {
namespace {

constexpr int64_t kChunk = 4096;

const bool* active_ptr(const c10::optional<at::Tensor>& active, int64_t K) {
  if (!active.has_value()) return nullptr;
  BAERASE_CHECK_INPUT(*active);
  BAERASE_CHECK_DTYPE(*active, at::kBool);
  TORCH_CHECK_VALUE(active->numel() == K, "active must have one entry per class (", K, "), got ", active->numel());
  return active->data_ptr<bool>();
}

BAERASE_INLINE void adam_span(float* __restrict p, float* __restrict m, float* __restrict v,
                              const float* __restrict g, int64_t n, float w1, float b2, float w2, float ss, float bs,
                              float e) {
  for (int64_t j = 0; j < n; ++j) {
    const float mj = m[j] + w1 * (g[j] - m[j]);
    const float vj = v[j] * b2 + w2 * g[j] * g[j];
    m[j] = mj;
    v[j] = vj;
    p[j] -= ss * (mj / (std::sqrt(vj) / bs + e));
  }
}

}  // namespace

void adam_step(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                       const std::vector<at::Tensor>& exp_avgs, const std::vector<at::Tensor>& exp_avg_sqs,
                       const std::vector<at::Tensor>& steps, const c10::optional<at::Tensor>& active, double lr,
                       double beta1, double beta2, double eps) {
  const size_t n = params.size();
  TORCH_CHECK_VALUE(grads.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n && steps.size() == n,
              "params, grads, exp_avgs, exp_avg_sqs and steps must have the same length");
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor &p = params[i], &g = grads[i], &m = exp_avgs[i], &v = exp_avg_sqs[i], &st = steps[i];
    BAERASE_CHECK_INPUT(p);
    BAERASE_CHECK_INPUT(g);
    BAERASE_CHECK_INPUT(m);
    BAERASE_CHECK_INPUT(v);
    BAERASE_CHECK_INPUT(st);
    BAERASE_CHECK_DTYPE(p, at::kFloat);
    BAERASE_CHECK_DTYPE(g, at::kFloat);
    BAERASE_CHECK_DTYPE(m, at::kFloat);
    BAERASE_CHECK_DTYPE(v, at::kFloat);
    BAERASE_CHECK_DTYPE(st, at::kFloat);
    TORCH_CHECK_VALUE(p.dim() >= 1, "parameters must have a leading class dimension");
    TORCH_CHECK_VALUE(g.sizes() == p.sizes() && m.sizes() == p.sizes() && v.sizes() == p.sizes(),
                "grad and moments must match the parameter shape ", p.sizes());
    const int64_t K = p.size(0);
    TORCH_CHECK_VALUE(st.numel() == K, "step must have one entry per class (", K, ")");
    const bool* act = active_ptr(active, K);
    const int64_t per = K == 0 ? 0 : p.numel() / K;
    float* sp = st.data_ptr<float>();
    // Per-class step sizes; computed serially because K is small (candidate classes).
    std::vector<float> step_size(K), bc2_sqrt(K);
    for (int64_t k = 0; k < K; ++k) {
      if (act && !act[k]) continue;
      sp[k] += 1.0f;
      const double s = sp[k];
      const double bc1 = 1.0 - std::pow(beta1, s), bc2 = 1.0 - std::pow(beta2, s);
      step_size[k] = static_cast<float>(lr / bc1);
      bc2_sqrt[k] = static_cast<float>(std::sqrt(bc2));
    }
    float *pp = p.data_ptr<float>(), *mp = m.data_ptr<float>(), *vp = v.data_ptr<float>();
    const float* gp = g.data_ptr<float>();
    const float w1 = static_cast<float>(1.0 - beta1), b2 = static_cast<float>(beta2),
                w2 = static_cast<float>(1.0 - beta2), e = static_cast<float>(eps);
    const int64_t chunks = (per + kChunk - 1) / kChunk;
    at::parallel_for(0, K * chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t item = begin; item < end; ++item) {
        const int64_t k = item / chunks, lo = k * per + (item % chunks) * kChunk;
        if (act && !act[k]) continue;
        const int64_t hi = std::min(lo + kChunk, (k + 1) * per);
        with_best_isa(hi - lo, [&]() BAERASE_LAMBDA_INLINE {
          adam_span(pp + lo, mp + lo, vp + lo, gp + lo, hi - lo, w1, b2, w2, step_size[k], bc2_sqrt[k], e);
        });
      }
    });
  }
}

}  // namespace baerase
