// CPU fused trigger loss: per row of logits [M, N], the clipped target probability
// min(softmax_t, beta) and the cross-entropy lse - logit_t, from one online-softmax pass (running
// max and rescaled sum), so the softmax matrix is never stored. The backward recomputes
// softmax_j = exp(logit_j - lse) from the saved lse.

#include <cmath>
#include <limits>
#include <type_traits>

#include "checks.h"
#include "simd.h"

namespace baerase {
namespace {

// Rows per task: a row of a 10-100 class head is a few hundred flops, so batch them.
constexpr int64_t kRowGrain = 64;
// Logits per online-softmax block: 1 KiB of fp32 stays in L1 between the max and the sum pass.
constexpr int64_t kBlock = 256;

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

// Online softmax over L1-sized blocks: the running sum is rescaled when a block raises the
// running max, so each logit is read from memory once.
template <typename T>
BAERASE_INLINE void loss_fwd_row(const T* row, int64_t tr, int64_t N, float b, float* buf, float* hinge, float* nll,
                  float* lse) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  float mx = kNegInf, sum = 0.0f;
  for (int64_t lo = 0; lo < N; lo += kBlock) {
    const int64_t n = std::min(kBlock, N - lo);
    // fp32 rows are read in place; other dtypes are widened once into the L1 buffer.
    const float* block = buf;
    if constexpr (std::is_same_v<T, float>) {
      block = row + lo;
    } else {
      for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(row[lo + i]);
    }
    const float bm = block_max(block, n);
    if (bm > mx) {
      sum *= vexp(mx - bm);
      mx = bm;
    }
    if (mx == kNegInf) continue;  // every logit so far is -inf: nothing to add yet
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < n; ++i) s += vexp(block[i] - mx);
    sum += s;
  }
  const float log_sum = std::log(sum);
  // (max - z_t) + log(sum), not lse - z_t: lse's rounding (|lse| * 6e-8) would leak into the
  // loss for large logits.
  const float n = (mx - static_cast<float>(row[tr])) + log_sum;
  *lse = mx + log_sum;
  *nll = n;
  *hinge = std::min(std::exp(-n), b);
}

template <typename T>
BAERASE_INLINE void loss_bwd_row(const T* row, T* out, int64_t tr, int64_t N, float l, float gh, float gn, float b) {
  const float pt = std::exp(static_cast<float>(row[tr]) - l);
  // d nll = softmax - onehot; d min(p_t, beta) = p_t * (onehot - softmax) while p_t <= beta
  // (torch's clamp passes the gradient at equality), so both share one coefficient.
  const float coef = gn - (pt <= b ? gh * pt : 0.0f);
  // The target column is skipped and summed apart: p_t - 1 is minus the other classes' mass,
  // exact for a confident row where p_t itself rounds to 1.
  float rest = 0.0f;
#pragma omp simd reduction(+ : rest)
  for (int64_t j = 0; j < tr; ++j) {
    const float pj = vexp(static_cast<float>(row[j]) - l);
    rest += pj;
    out[j] = static_cast<T>(coef * pj);
  }
#pragma omp simd reduction(+ : rest)
  for (int64_t j = tr + 1; j < N; ++j) {
    const float pj = vexp(static_cast<float>(row[j]) - l);
    rest += pj;
    out[j] = static_cast<T>(coef * pj);
  }
  out[tr] = static_cast<T>(-coef * rest);
}

template <typename T>
BAERASE_INLINE void loss_fwd_rows(const T* lg, const int64_t* t, int64_t N, float b, float* hp, float* np, float* lp,
                                  int64_t begin, int64_t end) {
  float buf[kBlock];
  for (int64_t r = begin; r < end; ++r) loss_fwd_row(lg + r * N, t[r], N, b, buf, hp + r, np + r, lp + r);
}

template <typename T>
BAERASE_INLINE void loss_bwd_rows(const T* lg, T* gp, const int64_t* t, int64_t N, const float* lp, const float* gh,
                                  const float* gn, float b, int64_t begin, int64_t end) {
  for (int64_t r = begin; r < end; ++r) loss_bwd_row(lg + r * N, gp + r * N, t[r], N, lp[r], gh[r], gn[r], b);
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
    at::parallel_for(0, M, std::max<int64_t>(1, kRowGrain * 16 / std::min<int64_t>(N, kBlock)),
                     [&](int64_t begin, int64_t end) {
      with_best_isa(N, [&]() BAERASE_LAMBDA_INLINE { loss_fwd_rows(lg, t, N, b, hp, np, lp, begin, end); });
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
    at::parallel_for(0, M, std::max<int64_t>(1, kRowGrain * 16 / std::min<int64_t>(N, kBlock)),
                     [&](int64_t begin, int64_t end) {
      with_best_isa(N, [&]() BAERASE_LAMBDA_INLINE { loss_bwd_rows(lg, gp, t, N, lp, gh, gn, b, begin, end); });
    });
  });
  return grad;
}

}  // namespace baerase
