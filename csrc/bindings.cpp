// Python bindings of baerase._C: the CPU kernels of the baerase::<op> custom ops. The ops' CPU
// kernel (baerase/ops/dispatch.py::routed_op) calls these when the C++ backend is chosen.
// torch/csrc/utils/pybind.h carries the Tensor casters without the whole C++ frontend that
// torch/extension.h pulls in, which dominates compile time.
#include <torch/csrc/utils/pybind.h>
#include <torch/version.h>

#include <string>

#include "simd.h"

namespace baerase {
at::Tensor trigger_apply_fwd(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                             const at::Tensor&);
std::tuple<at::Tensor, at::Tensor> trigger_apply_bwd(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                     const at::Tensor&, const at::Tensor&, const at::Tensor&);
at::Tensor patch_apply_fwd(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const at::Tensor&, const at::Tensor&);
at::Tensor patch_apply_bwd(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
                           int64_t);
std::tuple<at::Tensor, at::Tensor, at::Tensor> trigger_loss_fwd(const at::Tensor&, const at::Tensor&, double);
at::Tensor trigger_loss_bwd(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const at::Tensor&, double);
void adam_step(const std::vector<at::Tensor>&, const std::vector<at::Tensor>&, const std::vector<at::Tensor>&,
               const std::vector<at::Tensor>&, const std::vector<at::Tensor>&, const c10::optional<at::Tensor>&,
               double, double, double, double);
}  // namespace baerase

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "baerase CPU kernels: trigger and patch application, trigger loss, batched per-class Adam";
  // The kernels touch no Python object: release the GIL so other Python threads run meanwhile.
  using release = py::call_guard<py::gil_scoped_release>;
  // The ABI is only stable within a torch minor release: dispatch refuses a module built for another.
  m.attr("torch_version") = std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR);
  m.def("trigger_apply_fwd", &baerase::trigger_apply_fwd, release(),
        "normalize(x + sigmoid(m) * (p - x)) -> [K,B,C,H,W]");
  m.def("trigger_apply_bwd", &baerase::trigger_apply_bwd, release(), "(grad_mask_logits, grad_pattern)");
  m.def("patch_apply_fwd", &baerase::patch_apply_fwd, release(),
        "paste patches [K,B,C,h,w] at (rows, cols), normalise");
  m.def("patch_apply_bwd", &baerase::patch_apply_bwd, release(), "grad_patch [K,B,C,h,w]");
  m.def("trigger_loss_fwd", &baerase::trigger_loss_fwd, release(), "(hinge, nll, lse), fp32 [M] each");
  m.def("trigger_loss_bwd", &baerase::trigger_loss_bwd, release(), "grad_logits [M, N]");
  m.def("adam_step", &baerase::adam_step, release(), "in-place Adam over [K, ...] params with an active mask",
        py::arg("params"), py::arg("grads"), py::arg("exp_avgs"), py::arg("exp_avg_sqs"), py::arg("steps"),
        py::arg("active"), py::arg("lr"), py::arg("beta1"), py::arg("beta2"), py::arg("eps"));
  m.def("cpu_isa", &baerase::cpu_isa_name, "the SIMD tier the kernels run: avx512, avx2 or baseline");
}
