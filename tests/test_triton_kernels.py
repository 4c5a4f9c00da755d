"""Triton kernels against the torch reference, through the ``baerase.ops`` dispatch.

On a CPU-only machine the kernels run under ``TRITON_INTERPRET=1`` (set in conftest.py), so the
shapes stay small; with a GPU the same tests run natively on CUDA. fp32 is compared with a tight
tolerance; bf16/fp16 compare the kernel's error with torch's own error in that dtype, both measured
against an fp32 reference on the same (exactly representable) inputs.
"""

from __future__ import annotations

import functools

import fastpath
import pytest
import torch
from conftest import HAS_CUDA, requires_triton
from fastpath import (
    assert_as_good_as_torch,
    assert_close,
    check_trigger_apply,
    check_trigger_apply_low_precision,
    check_trigger_loss,
    check_trigger_loss_extreme_logits,
    check_trigger_loss_low_precision,
    grads,
)

from baerase.errors import InputError
from baerase.ops import patch_apply, trigger_apply, trigger_loss, use_backend
from baerase.ops.reference import patch_apply_ref, trigger_apply_ref, trigger_loss_ref

pytestmark = requires_triton

DEVICE = "cuda" if HAS_CUDA else "cpu"
FP32 = (torch.float32, 2e-6, 1e-5)  # (dtype, atol, rtol)
LOW = [torch.bfloat16, torch.float16]
# Inputs on the kernels' device.
leaf = functools.partial(fastpath.leaf, device=DEVICE)
stats = functools.partial(fastpath.stats, device=DEVICE)
apply_inputs = functools.partial(fastpath.apply_inputs, device=DEVICE)

# (K, B, C, H, W): batch 1, single channel, non-power-of-two planes, a plane over one 128-wide block.
APPLY_SHAPES = [(1, 1, 1, 1, 1), (2, 1, 3, 5, 7), (3, 4, 1, 6, 5), (2, 3, 3, 13, 11)]


# --- trigger_apply --------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", APPLY_SHAPES)
@pytest.mark.parametrize("mask_channels", [1, "C"])
@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("normalize", [True, False])
def test_trigger_apply_fp32(shape, mask_channels, per_sample, normalize):
    check_trigger_apply("triton", shape, mask_channels, per_sample, normalize, *FP32[1:], device=DEVICE)


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("mask_channels", [1, "C"])
@pytest.mark.parametrize("per_sample", [False, True])
def test_trigger_apply_low_precision(dtype, mask_channels, per_sample):
    check_trigger_apply_low_precision("triton", dtype, mask_channels, per_sample, DEVICE)


def test_trigger_apply_non_contiguous_inputs():
    # The dispatch makes inputs contiguous; the result must not depend on the input layout.
    x = torch.rand(2, 5, 6, 3, device=DEVICE).permute(0, 3, 1, 2)  # [2, 3, 5, 6], channels-last
    m = leaf(torch.randn(2, 1, 6, 5)).transpose(-1, -2)
    p = leaf(torch.rand(2, 3, 6, 5)).transpose(-1, -2)
    mean, std = stats(3)
    with use_backend("triton"):
        out = trigger_apply(x, m, p, mean, std)
    assert_close("out", out, trigger_apply_ref(x, m, p, mean, std), *FP32[1:])


# --- patch_apply -----------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 1, 1, 4, 4, 1, 1), (2, 3, 3, 9, 7, 3, 2), (3, 2, 2, 5, 6, 5, 6)])
@pytest.mark.parametrize("shared_positions", [False, True])
def test_patch_apply_fp32(shape, shared_positions):
    k, b, c, h, w, ph, pw = shape
    x = torch.rand(b, c, h, w, device=DEVICE)
    patch = leaf(torch.rand(k, b, c, ph, pw))
    n = 1 if shared_positions else k
    rows = torch.randint(0, h - ph + 1, (n, b), device=DEVICE)
    cols = torch.randint(0, w - pw + 1, (n, b), device=DEVICE)
    rows, cols = (rows[0], cols[0]) if shared_positions else (rows, cols)
    mean, std = stats(c)
    expected = patch_apply_ref(x, patch, rows, cols, mean, std)
    grad_out = torch.randn_like(expected)
    with use_backend("triton"):
        out = patch_apply(x, patch, rows, cols, mean, std)
    assert_close("out", out, expected, *FP32[1:])
    assert_close("grad_patch", grads(out, patch, grad_out)[0], grads(expected, patch, grad_out)[0], *FP32[1:])


@pytest.mark.parametrize("dtype", LOW)
def test_patch_apply_low_precision(dtype):
    k, b, c, h, w, ph, pw = 2, 3, 3, 7, 6, 3, 2
    x = torch.rand(b, c, h, w).to(DEVICE, dtype)
    patch = leaf(torch.rand(k, b, c, ph, pw), dtype)
    rows = torch.randint(0, h - ph + 1, (k, b), device=DEVICE)
    cols = torch.randint(0, w - pw + 1, (k, b), device=DEVICE)
    mean, std = stats(c)
    patch32 = leaf(patch, torch.float32)
    oracle = patch_apply_ref(x.float(), patch32, rows, cols, mean, std)
    grad_out = torch.randn_like(oracle).to(dtype)
    # torch in the low dtype: paste, then normalise with low-precision statistics.
    pasted = patch_apply_ref(x, patch, rows, cols)
    native = (pasted - mean.to(dtype).view(-1, 1, 1)) / std.to(dtype).view(-1, 1, 1)
    with use_backend("triton"):
        out = patch_apply(x, patch, rows, cols, mean, std)
    assert out.dtype == dtype
    assert_as_good_as_torch("out", out, native, oracle)
    got = grads(out, patch, grad_out)[0]
    assert got.dtype == dtype
    assert_as_good_as_torch(
        "grad_patch", got, grads(native, patch, grad_out)[0], grads(oracle, patch32, grad_out.float())[0]
    )


# --- trigger_loss ----------------------------------------------------------------------------------


# (M, Kc): one row, one class, non-power-of-two widths, many short rows packed per tile, and a width
# over the 4096-column tile so the online softmax crosses blocks.
@pytest.mark.parametrize("m,kc", [(1, 1), (1, 10), (7, 13), (67, 10), (5, 1000), (3, 5003)])
@pytest.mark.parametrize("beta", [0.5, 1.0])
def test_trigger_loss_fp32(m, kc, beta):
    check_trigger_loss("triton", m, kc, beta, *FP32[1:], device=DEVICE)


def test_trigger_loss_extreme_logits():
    check_trigger_loss_extreme_logits("triton", DEVICE)


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("m,kc", [(6, 10), (3, 1001)])
def test_trigger_loss_low_precision(dtype, m, kc):
    check_trigger_loss_low_precision("triton", dtype, m, kc, DEVICE)


def test_trigger_loss_single_output_gradient():
    # Only the hinge used: autograd hands the backward a None / zero gradient for nll.
    logits = leaf(torch.randn(4, 9))
    target = torch.randint(0, 9, (4,), device=DEVICE)
    with use_backend("triton"):
        hinge, _ = trigger_loss(logits, target, 0.3)
    got = torch.autograd.grad(hinge.sum(), logits)[0]
    want = torch.autograd.grad(trigger_loss_ref(logits, target, 0.3)[0].sum(), logits)[0]
    assert_close("grad_logits", got, want, *FP32[1:])


# --- errors ----------------------------------------------------------------------------------------


def test_kernels_reject_bad_inputs(monkeypatch):
    from baerase import kernels

    x = torch.rand(2, 3, 4, 4, device=DEVICE)
    mean, std = torch.zeros(3, device=DEVICE), torch.ones(3, device=DEVICE)
    with pytest.raises(InputError, match="mask_logits"):
        kernels.trigger_apply_fwd(
            x, torch.zeros(1, 2, 4, 4, device=DEVICE), torch.zeros(1, 3, 4, 4, device=DEVICE), mean, std
        )
    with pytest.raises(InputError, match="pattern"):
        kernels.trigger_apply_fwd(
            x, torch.zeros(1, 1, 4, 4, device=DEVICE), torch.zeros(2, 3, 4, 4, device=DEVICE), mean, std
        )
    with pytest.raises(InputError, match="contiguous"):
        kernels.trigger_apply_fwd(
            x.transpose(2, 3),
            torch.zeros(1, 1, 4, 4, device=DEVICE),
            torch.zeros(1, 3, 4, 4, device=DEVICE),
            mean,
            std,
        )
    with pytest.raises(InputError, match="float"):
        kernels.trigger_apply_fwd(
            x.int(), torch.zeros(1, 1, 4, 4, device=DEVICE), torch.zeros(1, 3, 4, 4, device=DEVICE), mean, std
        )
    with pytest.raises(InputError, match="mean"):
        kernels.trigger_apply_fwd(
            x, torch.zeros(1, 1, 4, 4, device=DEVICE), torch.zeros(1, 3, 4, 4, device=DEVICE), mean[:2], std
        )
    positions = torch.zeros(1, 2, dtype=torch.int64, device=DEVICE)
    with pytest.raises(InputError, match="patch"):
        kernels.patch_apply_fwd(x, torch.zeros(1, 2, 3, 5, 5, device=DEVICE), positions, positions, mean, std)
    with pytest.raises(InputError, match="rows"):
        kernels.patch_apply_fwd(
            x, torch.zeros(1, 2, 3, 2, 2, device=DEVICE), positions.float(), positions, mean, std
        )
    logits = torch.zeros(3, 5, device=DEVICE)
    with pytest.raises(InputError, match="target"):
        kernels.trigger_loss_fwd(logits, torch.zeros(2, dtype=torch.int64, device=DEVICE), 0.5)
    with pytest.raises(InputError, match="class column"):
        kernels.trigger_loss_fwd(
            torch.zeros(3, 0, device=DEVICE), torch.zeros(3, dtype=torch.int64, device=DEVICE), 0.5
        )
    with pytest.raises(InputError, match="one device"):
        kernels.trigger_loss_fwd(logits, torch.zeros(3, dtype=torch.int64, device="meta"), 0.5)
    # CPU tensors need the interpreter.
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(InputError, match="CUDA"):
        kernels.trigger_loss_fwd(logits.cpu(), torch.zeros(3, dtype=torch.int64), 0.5)


def test_dispatch_routes_to_triton():
    from baerase.ops import backend_for

    with use_backend("triton"):
        assert backend_for("trigger_apply", DEVICE) == "triton"
        with pytest.raises(InputError):
            trigger_apply(
                torch.rand(2, 3, 4, 4, device=DEVICE),
                torch.zeros(1, 2, 4, 4, device=DEVICE),
                torch.zeros(1, 3, 4, 4, device=DEVICE),
            )


def test_kernels_accept_empty_inputs():
    from baerase import kernels

    mean, std = torch.zeros(3, device=DEVICE), torch.ones(3, device=DEVICE)
    x = torch.rand(0, 3, 4, 5, device=DEVICE)
    m, p = torch.zeros(2, 1, 4, 5, device=DEVICE), torch.rand(2, 3, 4, 5, device=DEVICE)
    assert kernels.trigger_apply_fwd(x, m, p, mean, std).shape == (2, 0, 3, 4, 5)
    grad_m, grad_p = kernels.trigger_apply_bwd(torch.zeros(2, 0, 3, 4, 5, device=DEVICE), x, m, p, mean, std)
    assert not grad_m.any() and not grad_p.any()
    hinge, nll, lse = kernels.trigger_loss_fwd(
        torch.zeros(0, 7, device=DEVICE), torch.zeros(0, dtype=torch.int64, device=DEVICE), 0.5
    )
    assert hinge.shape == nll.shape == lse.shape == (0,)
