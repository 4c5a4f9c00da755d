"""Checks shared by the fast-path tests (C++ and Triton): comparison against the PyTorch reference
with readable failures, and the inputs and gradients they compare."""
from __future__ import annotations

import pytest
import torch


def assert_close(name: str, actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float) -> None:
    """allclose with a message listing the first mismatching elements."""
    assert actual.shape == expected.shape, f"{name}: shape {list(actual.shape)} != {list(expected.shape)}"
    actual, expected = actual.detach().float().cpu(), expected.detach().float().cpu()
    bad = ~torch.isclose(actual, expected, atol=atol, rtol=rtol, equal_nan=True)
    if bad.any():
        idx = bad.nonzero()[:5].tolist()
        rows = "\n".join(
            f"  {i}: got {actual[tuple(i)].item():.7g}, want {expected[tuple(i)].item():.7g}" for i in idx
        )
        diff = (actual - expected).abs().max().item()
        pytest.fail(f"{name}: {int(bad.sum())}/{bad.numel()} mismatches (max abs diff {diff:.3g})\n{rows}")


def assert_as_good_as_torch(name: str, kernel: torch.Tensor, native: torch.Tensor, oracle: torch.Tensor) -> None:
    """Low precision: the kernel may not be much worse than torch computing in that dtype."""
    oracle = oracle.detach().float().cpu()
    err_kernel = (kernel.detach().float().cpu() - oracle).abs().max().item()
    err_torch = (native.detach().float().cpu() - oracle).abs().max().item()
    # One rounding of the largest value in the kernel's output dtype is always allowed.
    floor = oracle.abs().max().item() * torch.finfo(kernel.dtype).eps
    assert err_kernel <= 2 * err_torch + floor, f"{name}: kernel error {err_kernel:.3g} vs torch {err_torch:.3g}"


def grads(out, inputs, grad_out):
    return torch.autograd.grad(out, inputs, grad_out)


def loss_grads(hinge, nll, logits, grad_hinge, grad_nll):
    return torch.autograd.grad((hinge * grad_hinge + nll * grad_nll).sum(), logits)[0]


def leaf(t: torch.Tensor, dtype=None, device="cpu") -> torch.Tensor:
    return t.to(device, dtype or t.dtype).detach().requires_grad_(True)


def stats(c: int, device="cpu"):
    return torch.rand(c, device=device) * 0.5, torch.rand(c, device=device) + 0.2


def apply_inputs(shape, mask_channels, per_sample, dtype=torch.float32, device="cpu"):
    """(x [B, C, H, W], mask logits [K, 1|C, H, W], pattern [K, (B,) C, H, W]) for shape (K, B, C, H, W)."""
    k, b, c, h, w = shape
    x = torch.rand(b, c, h, w).to(device, dtype)
    m = leaf(torch.randn(k, 1 if mask_channels == 1 else c, h, w) * 2, dtype, device)
    p = leaf(torch.rand((k, b, c, h, w) if per_sample else (k, c, h, w)), dtype, device)
    return x, m, p


def apply_native(x, m, p, mean, std):
    """The reference formula evaluated entirely in the inputs' dtype: torch's own rounding."""
    p = p if p.dim() == 5 else p.unsqueeze(1)
    out = x.unsqueeze(0) + torch.sigmoid(m).unsqueeze(1) * (p - x.unsqueeze(0))
    return (out - mean.to(x.dtype).view(-1, 1, 1)) / std.to(x.dtype).view(-1, 1, 1)
