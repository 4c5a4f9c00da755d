// Python bindings of baerase._C; baerase/ops/cpp.py is the only importer.
// torch/csrc/utils/pybind.h carries the Tensor casters without the whole C++ frontend that
// torch/extension.h pulls in, which dominates compile time.
#include <torch/csrc/utils/pybind.h>

#include "simd.h"

namespace baerase {
at::Tensor trigger_apply_fwd(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                             const at::Tensor&);
std::tuple<at::Tensor, at::Tensor> trigger_apply_bwd(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                     const at::Tensor&, const at::Tensor&, const at::Tensor&);
at::Tensor patch_apply_fwd(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const at::Tensor&, const at::Tensor&);
at::Tensor patch_apply_bwd(const at::Tensor&, const at::Tensor&, const at::Tensor&, at::IntArrayRef,
                           const at::Tensor&);
std::tuple<at::Tensor, at::Tensor, at::Tensor> trigger_loss_fwd(const at::Tensor&, const at::Tensor&, double);
at::Tensor trigger_loss_bwd(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const at::Tensor&, double);
void batched_adam_step(const std::vector<at::Tensor>&, const std::vector<at::Tensor>&,
                       const std::vector<at::Tensor>&, const std::vector<at::Tensor>&,
                       const std::vector<at::Tensor>&, const c10::optional<at::Tensor>&, double, double, double,
                       double);
void moving_average_(at::Tensor&, const at::Tensor&, double, const c10::optional<at::Tensor>&);
}  // namespace baerase

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "baerase CPU kernels: fused trigger application, trigger loss and batched per-class Adam";
  m.def("trigger_apply_fwd", &baerase::trigger_apply_fwd, "normalize(x + sigmoid(m) * (p - x)) -> [K,B,C,H,W]");
  m.def("trigger_apply_bwd", &baerase::trigger_apply_bwd, "(grad_mask_logits, grad_pattern)");
  m.def("patch_apply_fwd", &baerase::patch_apply_fwd, "paste patches [K,B,C,h,w] at (rows, cols), normalise");
  m.def("patch_apply_bwd", &baerase::patch_apply_bwd, "grad_patch [K,B,C,h,w]");
  m.def("trigger_loss_fwd", &baerase::trigger_loss_fwd, "(hinge, nll, lse), fp32 [M] each");
  m.def("trigger_loss_bwd", &baerase::trigger_loss_bwd, "grad_logits [M, N]");
  m.def("batched_adam_step", &baerase::batched_adam_step, "in-place Adam over [K, ...] params with an active mask",
        py::arg("params"), py::arg("grads"), py::arg("exp_avgs"), py::arg("exp_avg_sqs"), py::arg("steps"),
        py::arg("active"), py::arg("lr"), py::arg("beta1"), py::arg("beta2"), py::arg("eps"));
  m.def("moving_average_", &baerase::moving_average_, "in-place ma = (1-rate)*ma + rate*value for active classes",
        py::arg("ma"), py::arg("value"), py::arg("rate"), py::arg("active"));
  m.def("cpu_isa", &baerase::cpu_isa_name, "the SIMD tier the kernels run: avx512, avx2 or baseline");
}
