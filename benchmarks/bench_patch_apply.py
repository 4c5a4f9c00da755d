"""patch_apply: ref vs compile vs cpp vs triton (harness: benchmarks/conftest.py).

CUDA shapes are a patch-family scan's (K candidates x B = 128 images of 3x32x32, 3x3 and 5x5
patches); the CPU shape is small so the C++ backend is measured by the same file in seconds.
"""

from __future__ import annotations

import pytest
import torch
from conftest import MODES, PROVIDERS, Case, case_params

from baerase.ops import patch_apply
from baerase.ops.reference import patch_apply_ref


def _patch_case(device: str, k: int, b: int, c: int, h: int, w: int, ph: int, pw: int) -> Case:
    es = 4
    image, patch, out = b * c * h * w * es, k * b * c * ph * pw * es, k * b * c * h * w * es

    def make():
        x = torch.rand(b, c, h, w, device=device)
        p = torch.rand(k, b, c, ph, pw, device=device, requires_grad=True)
        rows = torch.randint(0, h - ph + 1, (k, b), device=device)
        cols = torch.randint(0, w - pw + 1, (k, b), device=device)
        mean, std = torch.full((c,), 0.5, device=device), torch.full((c,), 0.25, device=device)
        return (x, p, rows, cols, mean, std), (1,)

    moved = {"forward": image + patch + out, "backward": out + patch, "full": image + 2 * patch + 2 * out}
    return Case(device, f"K{k}-B{b}-{c}x{h}x{w}-p{ph}x{pw}", make, moved.__getitem__, footprint=4 * out)


CASES = [
    _patch_case("cpu", 4, 16, 3, 32, 32, 3, 3),
    _patch_case("cuda", 100, 128, 3, 32, 32, 3, 3),
    _patch_case("cuda", 1000, 128, 3, 32, 32, 5, 5),
]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", case_params(CASES))
def test_patch_apply(run_op, case, mode, provider):
    run_op("patch_apply", case, provider, mode, patch_apply_ref, patch_apply)
