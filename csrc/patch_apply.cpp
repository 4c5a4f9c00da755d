// CPU patch stamping: out[k,b] = normalize(x[b] with patch[k,b] pasted at (rows[k,b], cols[k,b])).
//
// One task per (candidate, sample, channel) row writes the normalised image, then overwrites the
// patch cells. Corners are checked up front, so no write leaves the image. The backward gathers
// grad_out under each patch, scaled by 1/std.

#include <algorithm>

#include "checks.h"

namespace baerase {
namespace {

void check_positions(const at::Tensor& rows, const at::Tensor& cols, int64_t K, int64_t B, int64_t h, int64_t w,
                     int64_t H, int64_t W) {
  BAERASE_CHECK_INPUT(rows);
  BAERASE_CHECK_INPUT(cols);
  BAERASE_CHECK_DTYPE(rows, at::kLong);
  BAERASE_CHECK_DTYPE(cols, at::kLong);
  TORCH_CHECK_VALUE(rows.dim() == 2 && rows.size(0) == K && rows.size(1) == B && cols.sizes() == rows.sizes(),
                    "rows and cols must be [K, B] = [", K, ", ", B, "], got ", rows.sizes(), " and ", cols.sizes());
  const int64_t* rp = rows.data_ptr<int64_t>();
  const int64_t* cp = cols.data_ptr<int64_t>();
  for (int64_t i = 0; i < K * B; ++i) {
    TORCH_CHECK_VALUE(rp[i] >= 0 && rp[i] + h <= H && cp[i] >= 0 && cp[i] + w <= W, "patch corner (", rp[i], ", ",
                      cp[i], ") puts the patch outside the image");
  }
}

}  // namespace

at::Tensor patch_apply_fwd(const at::Tensor& x, const at::Tensor& patch, const at::Tensor& rows,
                           const at::Tensor& cols, const at::Tensor& mean, const at::Tensor& std) {
  BAERASE_CHECK_INPUT(x);
  BAERASE_CHECK_INPUT(patch);
  BAERASE_CHECK_INPUT(mean);
  BAERASE_CHECK_INPUT(std);
  BAERASE_CHECK_FLOATING(x);
  BAERASE_CHECK_FLOATING(patch);
  BAERASE_CHECK_DIM(x, 4);
  BAERASE_CHECK_DIM(patch, 5);
  BAERASE_CHECK_DTYPE(mean, at::kFloat);
  BAERASE_CHECK_DTYPE(std, at::kFloat);
  const int64_t K = patch.size(0), B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t h = patch.size(3), w = patch.size(4);
  BAERASE_CHECK_SIZE(patch, 1, B);
  BAERASE_CHECK_SIZE(patch, 2, C);
  TORCH_CHECK_VALUE(h <= H && w <= W, "patch ", h, "x", w, " does not fit a ", H, "x", W, " image");
  BAERASE_CHECK_SIZE(mean, 0, C);
  BAERASE_CHECK_SIZE(std, 0, C);
  check_positions(rows, cols, K, B, h, w, H, W);
  const int64_t* rp = rows.data_ptr<int64_t>();
  const int64_t* cp = cols.data_ptr<int64_t>();
  const at::Tensor pf = patch.to(at::kFloat).contiguous();
  const float* pa = pf.data_ptr<float>();
  const float *mu = mean.data_ptr<float>(), *sd = std.data_ptr<float>();
  auto out = at::empty({K, B, C, H, W}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "patch_apply_fwd", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, K * B * C, std::max<int64_t>(1, 16384 / std::max<int64_t>(H * W, 1)),
                     [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t c = r % C, kb = r / C, b = kb % B;
        const float m = mu[c], inv = 1.0f / sd[c];
        const scalar_t* xr = xp + (b * C + c) * H * W;
        scalar_t* o = op + r * H * W;
        for (int64_t i = 0; i < H * W; ++i) o[i] = static_cast<scalar_t>((static_cast<float>(xr[i]) - m) * inv);
        const float* pr = pa + r * h * w;
        for (int64_t i = 0; i < h; ++i) {
          scalar_t* orow = o + (rp[kb] + i) * W + cp[kb];
          for (int64_t j = 0; j < w; ++j) orow[j] = static_cast<scalar_t>((pr[i * w + j] - m) * inv);
        }
      }
    });
  });
  return out;
}

at::Tensor patch_apply_bwd(const at::Tensor& grad_out, const at::Tensor& rows, const at::Tensor& cols,
                           const at::Tensor& std, int64_t h, int64_t w) {
  BAERASE_CHECK_INPUT(grad_out);
  BAERASE_CHECK_INPUT(std);
  BAERASE_CHECK_FLOATING(grad_out);
  BAERASE_CHECK_DIM(grad_out, 5);
  BAERASE_CHECK_DTYPE(std, at::kFloat);
  const int64_t K = grad_out.size(0), B = grad_out.size(1), C = grad_out.size(2), H = grad_out.size(3),
                W = grad_out.size(4);
  BAERASE_CHECK_SIZE(std, 0, C);
  check_positions(rows, cols, K, B, h, w, H, W);
  const int64_t* rp = rows.data_ptr<int64_t>();
  const int64_t* cp = cols.data_ptr<int64_t>();
  const float* sd = std.data_ptr<float>();
  auto grad_patch = at::empty({K, B, C, h, w}, grad_out.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad_out.scalar_type(), "patch_apply_bwd", [&] {
    const scalar_t* gp = grad_out.data_ptr<scalar_t>();
    scalar_t* dp = grad_patch.data_ptr<scalar_t>();
    at::parallel_for(0, K * B * C, 256, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t c = r % C, kb = r / C;
        const float inv = 1.0f / sd[c];
        for (int64_t i = 0; i < h; ++i) {
          const scalar_t* g = gp + r * H * W + (rp[kb] + i) * W + cp[kb];
          scalar_t* d = dp + (r * h + i) * w;
          for (int64_t j = 0; j < w; ++j) d[j] = static_cast<scalar_t>(static_cast<float>(g[j]) * inv);
        }
      }
    });
  });
  return grad_patch;
}

}  // namespace baerase
