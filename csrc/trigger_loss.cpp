// CPU fused trigger loss: per row of logits [M, N], the clipped target probability
// min(softmax_t, beta) and the cross-entropy lse - logit_t, from one online-softmax pass (running
// max and rescaled sum), so the softmax matrix is never stored. The backward recomputes
// softmax_j = exp(logit_j - lse) from the saved lse.

#include <cmath>
#include <limits>

#include "checks.h"

namespace baerase {
namespace {

// Rows per task: a row of a 10-100 class head is a few hundred flops, so batch them.
constexpr int64_t kRowGrain = 64;

void check_loss_inputs(const at::Tensor& logits, const at::Tensor& target) {
  BAERASE_CHECK_INPUT(logits);
  BAERASE_CHECK_INPUT(target);
  BAERASE_CHECK_FLOATING(logits);
  BAERASE_CHECK_DIM(logits, 2);
  BAERASE_CHECK_DTYPE(target, at::kLong);
  BAERASE_CHECK_DIM(target, 1);
  BAERASE_CHECK_SIZE(target, 0, logits.size(0));
  TORCH_CHECK_VALUE(logits.size(1) > 0, "logits must have at least one class column");
  const int64_t* t = target.data_ptr<int64_t>();
  for (int64_t i = 0; i < target.numel(); ++i) {
    TORCH_CHECK_VALUE(t[i] >= 0 && t[i] < logits.size(1), "target ", t[i], " out of range for ", logits.size(1),
                " classes");
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> trigger_loss_fwd(const at::Tensor& logits, const at::Tensor& target,
                                                                double beta) {
  check_loss_inputs(logits, target);
  const int64_t M = logits.size(0), N = logits.size(1);
  auto opts = logits.options().dtype(at::kFloat);
  auto hinge = at::empty({M}, opts), nll = at::empty({M}, opts), lse = at::empty({M}, opts);
  const int64_t* t = target.data_ptr<int64_t>();
  float *hp = hinge.data_ptr<float>(), *np = nll.data_ptr<float>(), *lp = lse.data_ptr<float>();
  const float b = static_cast<float>(beta);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "trigger_loss_fwd", [&] {
    const scalar_t* lg = logits.data_ptr<scalar_t>();
    at::parallel_for(0, M, kRowGrain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* row = lg + r * N;
        float mx = -std::numeric_limits<float>::infinity(), sum = 0.0f;
        for (int64_t j = 0; j < N; ++j) {
          const float v = static_cast<float>(row[j]);
          if (v > mx) {
            sum = sum * std::exp(mx - v) + 1.0f;
            mx = v;
          } else {
            sum += std::exp(v - mx);
          }
        }
        const float log_sum = std::log(sum);
        // (max - z_t) + log(sum), not lse - z_t: lse's rounding (|lse| * 6e-8) would leak into
        // the loss for large logits.
        const float n = (mx - static_cast<float>(row[t[r]])) + log_sum;
        lp[r] = mx + log_sum;
        np[r] = n;
        hp[r] = std::min(std::exp(-n), b);
      }
    });
  });
  return {hinge, nll, lse};
}

at::Tensor trigger_loss_bwd(const at::Tensor& grad_hinge, const at::Tensor& grad_nll, const at::Tensor& logits,
                            const at::Tensor& target, const at::Tensor& lse, double beta) {
  check_loss_inputs(logits, target);
  const int64_t M = logits.size(0), N = logits.size(1);
  BAERASE_CHECK_INPUT(grad_hinge);
  BAERASE_CHECK_INPUT(grad_nll);
  BAERASE_CHECK_INPUT(lse);
  BAERASE_CHECK_DTYPE(grad_hinge, at::kFloat);
  BAERASE_CHECK_DTYPE(grad_nll, at::kFloat);
  BAERASE_CHECK_DTYPE(lse, at::kFloat);
  TORCH_CHECK_VALUE(grad_hinge.numel() == M && grad_nll.numel() == M && lse.numel() == M,
              "grad_hinge, grad_nll and lse must have one entry per row of logits");
  auto grad = at::empty_like(logits);
  const int64_t* t = target.data_ptr<int64_t>();
  const float *gh = grad_hinge.data_ptr<float>(), *gn = grad_nll.data_ptr<float>(), *lp = lse.data_ptr<float>();
  const float b = static_cast<float>(beta);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "trigger_loss_bwd", [&] {
    const scalar_t* lg = logits.data_ptr<scalar_t>();
    scalar_t* gp = grad.data_ptr<scalar_t>();
    at::parallel_for(0, M, kRowGrain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* row = lg + r * N;
        scalar_t* out = gp + r * N;
        const float l = lp[r];
        const float pt = std::exp(static_cast<float>(row[t[r]]) - l);
        // d nll = softmax - onehot; d min(p_t, beta) = p_t * (onehot - softmax) while p_t <= beta
        // (torch's clamp passes the gradient at equality), so both share one coefficient.
        const float coef = gn[r] - (pt <= b ? gh[r] * pt : 0.0f);
        float rest = 0.0f;
        for (int64_t j = 0; j < N; ++j) {
          const float pj = std::exp(static_cast<float>(row[j]) - l);
          rest += j == t[r] ? 0.0f : pj;
          out[j] = static_cast<scalar_t>(coef * pj);
        }
        // p_t - 1 as minus the other classes' mass: for a confident row p_t rounds to 1 and
        // the direct difference would lose the whole gradient of the target logit.
        out[t[r]] = static_cast<scalar_t>(-coef * rest);
      }
    });
  });
  return grad;
}

}  // namespace baerase
