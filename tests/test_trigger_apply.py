"""trigger_apply on every backend against its reference (the recipe of tests/fastpath.py)."""

import pytest
import torch
from fastpath import BACKENDS, DTYPES, FAST_BACKENDS, check_op, device_for, opcheck

from baerase import ops
from baerase.errors import InputError
from baerase.ops.reference import trigger_apply_ref

# (K, B, C, H, W): batch 1, one pixel, one channel, odd planes, and a plane over Triton's 128-pixel
# block and the C++ backward's 512-pixel chunk.
SHAPES = [(1, 1, 1, 1, 1), (2, 1, 3, 5, 7), (3, 4, 1, 6, 5), (2, 3, 3, 23, 29)]
FP32 = (1e-5, 1e-5)


def inputs(shape, mask_channels=1, per_sample=False, dtype=torch.float32, device="cpu", normalize=True):
    """(x [B, C, H, W], mask_logits [K, 1|C, H, W], pattern [K, (B,) C, H, W], mean, std)."""
    k, b, c, h, w = shape
    x = torch.rand(b, c, h, w, device=device).to(dtype)
    m = (torch.randn(k, 1 if mask_channels == 1 else c, h, w, device=device) * 2).to(dtype)
    p = torch.rand((k, b, c, h, w) if per_sample else (k, c, h, w), device=device).to(dtype)
    if not normalize:
        return x, m, p, None, None
    return x, m, p, torch.rand(c, device=device) * 0.5, torch.rand(c, device=device) + 0.2


def native(x, m, p, mean, std):
    """The reference formula evaluated by torch in the inputs' dtype."""
    p = p if p.dim() == 5 else p.unsqueeze(1)
    out = x.unsqueeze(0) + torch.sigmoid(m).unsqueeze(1) * (p - x.unsqueeze(0))
    return (out - mean.to(x.dtype).view(-1, 1, 1)) / std.to(x.dtype).view(-1, 1, 1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mask_channels", [1, "C"])
@pytest.mark.parametrize("per_sample", [False, True])
def test_matches_reference(backend, shape, mask_channels, per_sample):
    args = inputs(shape, mask_channels, per_sample, device=device_for(backend))
    check_op(backend, ops.trigger_apply, trigger_apply_ref, args, (1, 2), *FP32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("dtype", "atol", "rtol"), DTYPES)
@pytest.mark.parametrize(("mask_channels", "per_sample"), [(1, False), ("C", True)])
def test_dtypes(backend, dtype, atol, rtol, mask_channels, per_sample):
    args = inputs((2, 3, 3, 6, 5), mask_channels, per_sample, dtype, device_for(backend))
    check_op(backend, ops.trigger_apply, trigger_apply_ref, args, (1, 2), atol, rtol, native=native)


@pytest.mark.parametrize("backend", BACKENDS)
def test_identity_normalisation_and_empty_batch(backend):
    device = device_for(backend)
    for args in (inputs((2, 3, 1, 5, 6), device=device, normalize=False), inputs((2, 0, 3, 4, 5), device=device)):
        check_op(backend, ops.trigger_apply, trigger_apply_ref, args, (1, 2), *FP32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_dtypes_and_layouts(backend):
    # An fp32 generator's output stamped onto bf16 images, and non-contiguous (channels-last) inputs:
    # the output follows x's dtype, each gradient its tensor's.
    x, m, p, mean, std = inputs((2, 3, 3, 5, 4), "C", True, device=device_for(backend))
    check_op(backend, ops.trigger_apply, trigger_apply_ref, (x.bfloat16(), m, p, mean, std), (1, 2), 1e-2, 1e-2)
    x = x.to(memory_format=torch.channels_last)
    m, p = (t.transpose(-1, -2).contiguous().transpose(-1, -2) for t in (m, p))
    assert not (x.is_contiguous() or m.is_contiguous() or p.is_contiguous())
    check_op(backend, ops.trigger_apply, trigger_apply_ref, (x, m, p, mean, std), (1, 2), *FP32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    # Registration checks (schema, fake kernel, autograd, AOT dispatch); test_matches_reference covers the math.
    x, m, p, mean, std = inputs((2, 3, 3, 5, 4), 1, True, device=device_for(backend))
    opcheck(backend, torch.ops.baerase.trigger_apply.default, (x, m.requires_grad_(), p.requires_grad_(), mean, std))
    grad_out = torch.randn((2, *x.shape), device=x.device)
    opcheck(backend, torch.ops.baerase.trigger_apply_backward.default, (grad_out, x, m.detach(), p.detach(), mean, std))


def test_compiles_without_graph_breaks():
    x, m, p, mean, std = inputs((2, 3, 3, 5, 4))
    m.requires_grad_()
    fn = torch.compile(lambda *a: ops.trigger_apply(*a).square().sum(), fullgraph=True, backend="aot_eager")
    with ops.record_backends() as used:
        fn(x, m, p, mean, std).backward()
    want = torch.autograd.grad(trigger_apply_ref(x, m, p, mean, std).square().sum(), m)[0]
    torch.testing.assert_close(m.grad, want)
    assert set(used) == {"trigger_apply", "trigger_apply_backward"}


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_rejects_bad_inputs(backend):
    x, m, p, mean, std = inputs((1, 2, 3, 4, 4), device=device_for(backend))
    bad = {
        "mask_logits": (x, m.expand(1, 2, 4, 4).contiguous(), p, mean, std),
        "pattern": (x, m, p.expand(2, 3, 4, 4), mean, std),
        "float": (x.int(), m, p, mean, std),
        "mean": (x, m, p, mean[:2], std),
    }
    with ops.use_backend(backend):
        for match, args in bad.items():
            with pytest.raises(InputError, match=match):
                ops.trigger_apply(*args)
