"""trigger_loss: ref vs compile vs cpp vs triton (harness: benchmarks/conftest.py).

CUDA shapes: logits [K * B, Kc] for Kc in {10, 1000, 100000} (rows = candidates x batch, fewer
rows as Kc grows so the reference still fits). The issue's targets: >= 3x eager at Kc = 1000 and
no OOM at Kc = 100,000. CPU shapes are small so the CPU backends are measured by the same file.
"""

from __future__ import annotations

import pytest
import torch
from conftest import MODES, PROVIDERS, Case, case_params

from baerase.ops import trigger_loss
from baerase.ops.reference import trigger_loss_ref

BETA = 0.5


def _loss_case(device: str, m: int, kc: int, dtype=torch.float32) -> Case:
    es = torch.finfo(dtype).bits // 8
    logits, small = m * kc * es, m * (8 + 3 * 4)  # target in, hinge / nll / lse out

    def make():
        # Scaled so the softmax is peaked and the hinge clips on some rows, as in a trained model.
        z = (torch.randn(m, kc, device=device) * 4).to(dtype).requires_grad_(True)
        t = torch.randint(0, kc, (m,), device=device)
        return (z, t, BETA), (0,)

    moved = {"forward": logits + small, "backward": 2 * logits + small, "full": 3 * logits + 2 * small}
    # The reference keeps log_softmax and its gradient in fp32: ~3 fp32 copies of the logits.
    return Case(device, f"M{m}-Kc{kc}-{str(dtype)[6:]}", make, moved.__getitem__, footprint=3 * m * kc * 4)


CASES = [
    _loss_case("cpu", 512, 10),
    _loss_case("cpu", 256, 1000),
    _loss_case("cpu", 8, 100_000),
    _loss_case("cuda", 128_000, 10),
    _loss_case("cuda", 12_800, 1000),
    _loss_case("cuda", 12_800, 1000, torch.bfloat16),
    _loss_case("cuda", 4096, 100_000),
]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", case_params(CASES))
def test_trigger_loss(run_op, case, mode, provider):
    run_op("trigger_loss", case, provider, mode, trigger_loss_ref, trigger_loss)
