"""trigger_loss on every backend against its reference (the recipe of tests/fastpath.py)."""

import pytest
import torch
import torch.nn.functional as F
from conftest import requires_cpp
from fastpath import BACKENDS, DTYPES, FAST_BACKENDS, assert_close, check_op, device_for, opcheck

from baerase import ops
from baerase.errors import InputError
from baerase.ops.reference import trigger_loss_ref

FP32 = (1e-5, 1e-5)


def inputs(m, kc, beta=0.5, dtype=torch.float32, device="cpu"):
    """(logits [M, Kc], target int64 [M], beta); row 0 confident so the hinge clips there."""
    logits = torch.randn(m, kc, device=device) * 4
    target = torch.randint(0, kc, (m,), device=device)
    if m > 1:
        logits[0, target[0]] += 30.0
    return logits.to(dtype), target, beta


def native(logits, target, beta):
    """torch in the logits' dtype: log_softmax returns, and backpropagates in, that dtype."""
    nll = -F.log_softmax(logits, dim=-1).gather(1, target.view(-1, 1)).squeeze(1)
    return torch.clamp(torch.exp(-nll), max=beta), nll


# (M, Kc): one row, one class, odd widths, many short rows per tile, and widths past one block
# (C++: 256 columns; Triton: 4096) so the online softmax rescales across blocks.
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("m", "kc"), [(1, 1), (1, 10), (7, 13), (67, 10), (130, 100), (5, 1000), (3, 5003)])
@pytest.mark.parametrize("beta", [0.5, 1.0])
def test_matches_reference(backend, m, kc, beta):
    check_op(backend, ops.trigger_loss, trigger_loss_ref, inputs(m, kc, beta, device=device_for(backend)), (0,), *FP32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("dtype", "atol", "rtol"), DTYPES)
@pytest.mark.parametrize(("m", "kc"), [(6, 10), (3, 1001)])
def test_dtypes(backend, dtype, atol, rtol, m, kc):
    args = inputs(m, kc, dtype=dtype, device=device_for(backend))
    check_op(backend, ops.trigger_loss, trigger_loss_ref, args, (0,), atol, rtol, native=native)


@pytest.mark.parametrize("backend", BACKENDS)
def test_extreme_logits(backend):
    # Far outside exp's fp32 range: a naive softmax overflows, the online one must not. The backward
    # recomputes p = exp(z - lse), whose error grows as |lse| * fp32 eps (6e-4 at 1e4).
    device = device_for(backend)
    logits = torch.tensor([[1000.0, -1000.0, 0.0], [-1e4, -1e4 + 1, -1e4 - 1], [88.0, 89.0, 90.0]], device=device)
    target = torch.tensor([1, 0, 2], device=device)
    check_op(backend, ops.trigger_loss, trigger_loss_ref, (logits, target, 0.9), (0,), 2e-3, 1e-5)
    with ops.use_backend(backend):
        _, nll = ops.trigger_loss(logits, target, 0.9)
    assert torch.isfinite(nll).all()
    assert_close("nll", nll, trigger_loss_ref(logits, target, 0.9)[1], 1e-4, 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_output_gradient_and_int32_target(backend):
    # Only the hinge used: autograd hands the backward zeros for nll.
    logits, target, _ = inputs(4, 9, device=device_for(backend))
    logits.requires_grad_()
    with ops.use_backend(backend):
        hinge, _ = ops.trigger_loss(logits, target.int(), 0.3)
        got = torch.autograd.grad(hinge.sum(), logits)[0]
    want = torch.autograd.grad(trigger_loss_ref(logits, target, 0.3)[0].sum(), logits)[0]
    assert_close("grad_logits", got, want, *FP32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    logits, target, beta = inputs(7, 13, device=device_for(backend))
    opcheck(backend, torch.ops.baerase.trigger_loss.default, (logits.requires_grad_(), target, beta))
    _, _, lse = torch.ops.baerase.trigger_loss(logits.detach(), target, beta)
    grads = torch.randn(7, device=logits.device), torch.randn(7, device=logits.device)
    opcheck(backend, torch.ops.baerase.trigger_loss_backward.default, (*grads, logits.detach(), target, lse, beta))


def test_compiles_without_graph_breaks():
    logits, target, beta = inputs(7, 13)
    logits.requires_grad_()
    fn = torch.compile(lambda *a: sum(t.sum() for t in ops.trigger_loss(*a)), fullgraph=True, backend="aot_eager")
    with ops.record_backends() as used:
        fn(logits, target, beta).backward()
    want = torch.autograd.grad(sum(t.sum() for t in trigger_loss_ref(logits, target, beta)), logits)[0]
    torch.testing.assert_close(logits.grad, want)
    assert set(used) == {"trigger_loss", "trigger_loss_backward"}


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_rejects_bad_inputs(backend):
    logits, target, beta = inputs(3, 5, device=device_for(backend))
    with ops.use_backend(backend):
        with pytest.raises(InputError, match="target"):
            ops.trigger_loss(logits, target[:2], beta)
        with pytest.raises(InputError, match="class column"):
            ops.trigger_loss(logits[:, :0], target, beta)


@requires_cpp
def test_cpp_rejects_out_of_range_targets():
    with ops.use_backend("cpp"), pytest.raises(InputError, match="out of range"):
        ops.trigger_loss(torch.zeros(3, 5), torch.full((3,), 5), 0.5)
