"""Checks shared by the fast-path tests (C++ and Triton): comparison against the PyTorch reference
with readable failures, the inputs and gradients they compare, and the per-op checks each backend
runs."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from baerase.ops import trigger_apply, trigger_loss, use_backend
from baerase.ops.reference import trigger_apply_ref, trigger_loss_ref


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


# --- checks each fast path runs through its backend ------------------------------------------------


def check_trigger_apply(backend, shape, mask_channels, per_sample, normalize, atol, rtol, device="cpu"):
    """fp32 trigger_apply and its gradients equal the reference's."""
    x, m, p = apply_inputs(shape, mask_channels, per_sample, device=device)
    mean, std = stats(shape[2], device) if normalize else (None, None)
    expected = trigger_apply_ref(x, m, p, mean, std)
    grad_out = torch.randn_like(expected)
    with use_backend(backend):
        out = trigger_apply(x, m, p, mean, std)
    assert_close("out", out, expected, atol, rtol)
    want_m, want_p = grads(expected, (m, p), grad_out)
    got_m, got_p = grads(out, (m, p), grad_out)
    assert_close("grad_mask_logits", got_m, want_m, atol * shape[1] * shape[2], rtol)
    assert_close("grad_pattern", got_p, want_p, atol * shape[1], rtol)


def check_trigger_apply_low_precision(backend, dtype, mask_channels, per_sample, device="cpu"):
    """Low-precision trigger_apply stays in the inputs' dtype and is about as exact as torch in it."""
    shape = (2, 3, 3, 6, 5)
    x, m, p = apply_inputs(shape, mask_channels, per_sample, dtype, device)
    mean, std = stats(shape[2], device)
    m32, p32 = leaf(m, torch.float32, device), leaf(p, torch.float32, device)
    oracle = trigger_apply_ref(x.float(), m32, p32, mean, std)
    grad_out = torch.randn_like(oracle).to(dtype)
    native = apply_native(x, m, p, mean, std)
    with use_backend(backend):
        out = trigger_apply(x, m, p, mean, std)
    assert out.dtype == dtype
    assert_as_good_as_torch("out", out, native, oracle)
    oracle_grads = grads(oracle, (m32, p32), grad_out.float())
    native_grads = grads(native, (m, p), grad_out)
    kernel_grads = grads(out, (m, p), grad_out)
    for name, got, nat, want in zip(("grad_mask_logits", "grad_pattern"), kernel_grads, native_grads, oracle_grads):
        assert got.dtype == dtype
        assert_as_good_as_torch(name, got, nat, want)


def check_trigger_loss(backend, m, kc, beta, atol, rtol, device="cpu"):
    """fp32 hinge, cross-entropy and logit gradients equal the reference's."""
    logits = leaf(torch.randn(m, kc) * 4, device=device)
    target = torch.randint(0, kc, (m,), device=device)
    if m > 1:  # one confident row so the hinge clips (p_t > beta), the others not
        with torch.no_grad():
            logits[0, target[0]] += 30.0
    grad_hinge, grad_nll = torch.randn(m, device=device), torch.randn(m, device=device)
    hinge_ref, nll_ref = trigger_loss_ref(logits, target, beta)
    with use_backend(backend):
        hinge, nll = trigger_loss(logits, target, beta)
    assert hinge.dtype == nll.dtype == torch.float32
    assert_close("hinge", hinge, hinge_ref, atol, rtol)
    assert_close("nll", nll, nll_ref, 1e-5, rtol)
    got = loss_grads(hinge, nll, logits, grad_hinge, grad_nll)
    assert_close("grad_logits", got, loss_grads(hinge_ref, nll_ref, logits, grad_hinge, grad_nll), atol, rtol)


def check_trigger_loss_extreme_logits(backend, device="cpu"):
    """Logits far outside exp's fp32 range: a naive softmax overflows, the online one must not."""
    logits = leaf(torch.tensor([[1000.0, -1000.0, 0.0], [-1e4, -1e4 + 1, -1e4 - 1], [88.0, 89.0, 90.0]]),
                  device=device)
    target = torch.tensor([1, 0, 2], device=device)
    hinge_ref, nll_ref = trigger_loss_ref(logits, target, 0.9)
    with use_backend(backend):
        hinge, nll = trigger_loss(logits, target, 0.9)
    assert torch.isfinite(nll).all()
    assert_close("hinge", hinge, hinge_ref, 1e-6, 1e-5)
    assert_close("nll", nll, nll_ref, 1e-4, 1e-5)
    # The backward recomputes p = exp(z - lse), whose error grows as |lse| * fp32 eps (6e-4 at 1e4).
    got = torch.autograd.grad(nll.sum() + hinge.sum(), logits)[0]
    want = torch.autograd.grad(nll_ref.sum() + hinge_ref.sum(), logits)[0]
    assert_close("grad_logits", got, want, 2e-3, 1e-5)


def check_trigger_loss_low_precision(backend, dtype, m, kc, device="cpu"):
    """Low-precision logits: the loss is about as exact as torch's, the gradient keeps the dtype."""
    logits = leaf(torch.randn(m, kc) * 3, dtype, device)
    target = torch.randint(0, kc, (m,), device=device)
    logits32 = leaf(logits, torch.float32, device)
    grad_hinge, grad_nll = torch.randn(m, device=device), torch.randn(m, device=device)
    hinge_o, nll_o = trigger_loss_ref(logits32, target, 0.5)
    # torch in the low dtype: log_softmax returns (and its backward works in) that dtype.
    nll_n = -F.log_softmax(logits, dim=-1).gather(1, target.view(-1, 1)).squeeze(1)
    hinge_n = torch.clamp(torch.exp(-nll_n), max=0.5)
    with use_backend(backend):
        hinge, nll = trigger_loss(logits, target, 0.5)
    assert_as_good_as_torch("hinge", hinge.to(dtype), hinge_n, hinge_o)
    assert_as_good_as_torch("nll", nll.to(dtype), nll_n, nll_o)
    got = loss_grads(hinge, nll, logits, grad_hinge, grad_nll)
    assert got.dtype == dtype
    native = loss_grads(hinge_n, nll_n, logits, grad_hinge.to(dtype), grad_nll.to(dtype))
    assert_as_good_as_torch("grad_logits", got, native, loss_grads(hinge_o, nll_o, logits32, grad_hinge, grad_nll))
