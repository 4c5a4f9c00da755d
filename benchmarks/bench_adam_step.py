"""adam_step (the fused update behind BatchedAdam): ref vs compile vs cpp (harness: benchmarks/conftest.py).

One step of K candidate trigger generators with the recovery's parameter layout (a small MLP per
class, stacked on a leading K dimension); K = 10 classes as in an MNIST / CIFAR-10 scan, 100 for
CIFAR-100. There is no backward, so only the ``forward`` mode (the step itself) is timed.
"""

from __future__ import annotations

import pytest
import torch
from conftest import PROVIDERS, Case, case_params

from baerase.ops import adam_step
from baerase.ops.reference import adam_step_ref

# Per-class shapes: the CPU generator default (z 64 -> 256 -> 256 -> 256 -> 3*3*3 patch) and a wider one.
MLP256 = [(256, 16), (256,), (256, 272), (256,), (256, 272), (256,), (27, 272), (27,)]
MLP1024 = [(1024, 16), (1024,), (1024, 1040), (1024,), (27, 1040), (27,)]


def _adam_case(device: str, k: int, shapes: list[tuple[int, ...]], name: str) -> Case:
    numel = k * sum(torch.Size(s).numel() for s in shapes)

    def make():
        params = [torch.randn((k, *s), device=device) * 0.05 for s in shapes]
        grads, exp_avgs = [torch.randn_like(p) for p in params], [torch.zeros_like(p) for p in params]
        exp_avg_sqs, steps = [torch.rand_like(p) for p in params], [torch.ones(k, device=device) for _ in params]
        active = torch.ones(k, dtype=torch.bool, device=device)
        return (params, grads, exp_avgs, exp_avg_sqs, steps, active, 2e-4, 0.5, 0.999, 1e-8), ()

    # Reads params, grads and both moments; writes params and both moments.
    return Case(device, f"K{k}-{name}", make, lambda mode: 7 * numel * 4, rounds=30)


CASES = [
    _adam_case("cpu", 10, MLP256, "mlp256"),
    _adam_case("cpu", 100, MLP256, "mlp256"),
    _adam_case("cpu", 10, MLP1024, "mlp1024"),
    _adam_case("cuda", 100, MLP256, "mlp256"),
]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", case_params(CASES))
def test_adam_step(run_op, case, provider):
    run_op("adam_step", case, provider, "forward", adam_step_ref, adam_step)
