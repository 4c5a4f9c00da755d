"""C++ CPU extension (``baerase._C``) against the torch reference, through the ``baerase.ops`` dispatch.

fp32 is compared with a tight tolerance; bf16 compares the kernel's error with torch's own error in
bf16, both against an fp32 reference on the same inputs. The batched optimiser is checked against K
separate ``torch.optim.Adam`` instances.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import requires_cpp
from fastpath import (
    apply_inputs,
    assert_as_good_as_torch,
    assert_close,
    check_trigger_apply,
    check_trigger_apply_low_precision,
    check_trigger_loss,
    check_trigger_loss_extreme_logits,
    check_trigger_loss_low_precision,
    grads,
    leaf,
    stats,
)

from baerase.errors import InputError
from baerase.ops import (
    BatchedAdam,
    backend_for,
    moving_average_,
    patch_apply,
    trigger_apply,
    trigger_loss,
    use_backend,
)
from baerase.ops.reference import (
    moving_average_ref,
    patch_apply_ref,
    trigger_apply_ref,
    trigger_loss_ref,
)

FP32 = (2e-6, 1e-5)  # (atol, rtol)
BF16 = torch.bfloat16

# (K, B, C, H, W): batch 1, single pixel, single channel, odd planes, one plane over the 512-pixel
# backward chunk so chunk edges are exercised.
APPLY_SHAPES = [(1, 1, 1, 1, 1), (2, 1, 3, 5, 7), (3, 4, 1, 6, 5), (2, 3, 3, 23, 29)]


# --- trigger_apply --------------------------------------------------------------------------------


@requires_cpp
@pytest.mark.parametrize("shape", APPLY_SHAPES)
@pytest.mark.parametrize("mask_channels", [1, "C"])
@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("normalize", [True, False])
def test_trigger_apply_fp32(shape, mask_channels, per_sample, normalize):
    with use_backend("cpp"):
        assert backend_for("trigger_apply", "cpu") == "cpp"
    check_trigger_apply("cpp", shape, mask_channels, per_sample, normalize, *FP32)


@requires_cpp
@pytest.mark.parametrize("mask_channels", [1, "C"])
@pytest.mark.parametrize("per_sample", [False, True])
def test_trigger_apply_bf16(mask_channels, per_sample):
    check_trigger_apply_low_precision("cpp", BF16, mask_channels, per_sample)


@requires_cpp
def test_trigger_apply_mixed_dtypes():
    # fp32 generator output stamped onto bf16 images: the output follows x, the gradients the leaves.
    x, m, p = apply_inputs((2, 3, 3, 5, 4), "C", True)
    xb = x.to(BF16)
    mean, std = stats(3)
    with use_backend("cpp"):
        out = trigger_apply(xb, m, p, mean, std)
    expected = trigger_apply_ref(xb, m, p, mean, std)
    assert out.dtype == BF16
    assert_close("out", out, expected, 2e-2, 1e-2)
    got = grads(out, (m, p), torch.ones_like(out))
    want = grads(expected, (m, p), torch.ones_like(expected))
    for g, w in zip(got, want):
        assert g.dtype == torch.float32
        assert_close("grad", g, w, 2e-2, 1e-2)


# --- patch_apply -----------------------------------------------------------------------------------


@requires_cpp
@pytest.mark.parametrize("shape", [(1, 1, 1, 4, 4, 1, 1), (2, 3, 3, 9, 7, 3, 2), (3, 2, 2, 5, 6, 5, 6)])
@pytest.mark.parametrize("shared_positions", [False, True])
def test_patch_apply_fp32(shape, shared_positions):
    k, b, c, h, w, ph, pw = shape
    x = torch.rand(b, c, h, w)
    patch = leaf(torch.rand(k, b, c, ph, pw))
    n = 1 if shared_positions else k
    rows = torch.randint(0, h - ph + 1, (n, b))
    cols = torch.randint(0, w - pw + 1, (n, b))
    rows, cols = (rows[0], cols[0]) if shared_positions else (rows, cols)
    mean, std = stats(c)
    expected = patch_apply_ref(x, patch, rows, cols, mean, std)
    grad_out = torch.randn_like(expected)
    with use_backend("cpp"):
        out = patch_apply(x, patch, rows, cols, mean, std)
    assert_close("out", out, expected, *FP32)
    assert_close("grad_patch", grads(out, patch, grad_out)[0], grads(expected, patch, grad_out)[0], *FP32)


@requires_cpp
def test_patch_apply_bf16():
    k, b, c, h, w, ph, pw = 2, 3, 3, 7, 6, 3, 2
    x = torch.rand(b, c, h, w).to(BF16)
    patch = leaf(torch.rand(k, b, c, ph, pw), BF16)
    rows, cols = torch.randint(0, h - ph + 1, (k, b)), torch.randint(0, w - pw + 1, (k, b))
    mean, std = stats(c)
    patch32 = leaf(patch, torch.float32)
    oracle = patch_apply_ref(x.float(), patch32, rows, cols, mean, std)
    grad_out = torch.randn_like(oracle).to(BF16)
    pasted = patch_apply_ref(x, patch, rows, cols)
    native = (pasted - mean.to(BF16).view(-1, 1, 1)) / std.to(BF16).view(-1, 1, 1)
    with use_backend("cpp"):
        out = patch_apply(x, patch, rows, cols, mean, std)
    assert out.dtype == BF16
    assert_as_good_as_torch("out", out, native, oracle)
    got = grads(out, patch, grad_out)[0]
    assert got.dtype == BF16
    want = grads(oracle, patch32, grad_out.float())[0]
    assert_as_good_as_torch("grad_patch", got, grads(native, patch, grad_out)[0], want)


# --- trigger_loss ----------------------------------------------------------------------------------


@requires_cpp
@pytest.mark.parametrize("m,kc", [(1, 1), (1, 10), (7, 13), (67, 10), (130, 100), (3, 1001)])
@pytest.mark.parametrize("beta", [0.5, 1.0])
def test_trigger_loss_fp32(m, kc, beta):
    check_trigger_loss("cpp", m, kc, beta, *FP32)


@requires_cpp
def test_trigger_loss_extreme_logits():
    check_trigger_loss_extreme_logits("cpp")


@requires_cpp
@pytest.mark.parametrize("m,kc", [(6, 10), (3, 1001)])
def test_trigger_loss_bf16(m, kc):
    check_trigger_loss_low_precision("cpp", BF16, m, kc)


@requires_cpp
def test_trigger_loss_single_output_gradient():
    # Only the hinge used: autograd hands the backward no gradient for nll.
    logits = leaf(torch.randn(4, 9))
    target = torch.randint(0, 9, (4,))
    with use_backend("cpp"):
        hinge, _ = trigger_loss(logits, target, 0.3)
    got = torch.autograd.grad(hinge.sum(), logits)[0]
    want = torch.autograd.grad(trigger_loss_ref(logits, target, 0.3)[0].sum(), logits)[0]
    assert_close("grad_logits", got, want, *FP32)


@requires_cpp
def test_extension_rejects_bad_inputs():
    from baerase.ops import cpp

    x = torch.rand(2, 3, 4, 4)
    mean, std = torch.zeros(3), torch.ones(3)
    m1, p1 = torch.zeros(1, 1, 4, 4), torch.zeros(1, 3, 4, 4)
    with pytest.raises(InputError, match="mask_logits"):
        cpp.trigger_apply_fwd(x, torch.zeros(1, 2, 4, 4), p1, mean, std)
    with pytest.raises(InputError, match="pattern"):
        cpp.trigger_apply_fwd(x, m1, torch.zeros(2, 3, 4, 4), mean, std)
    with pytest.raises(InputError, match="contiguous"):
        cpp.trigger_apply_fwd(x.transpose(2, 3), m1, p1, mean, std)
    with pytest.raises(InputError, match="floating"):
        cpp.trigger_apply_fwd(x.int(), m1, p1, mean, std)
    with pytest.raises(InputError, match="mean"):
        cpp.trigger_apply_fwd(x, m1, p1, mean[:2], std)
    positions = torch.zeros(1, 2, dtype=torch.int64)
    with pytest.raises(InputError, match="patch"):
        cpp.patch_apply_fwd(x, torch.zeros(1, 2, 3, 5, 5), positions, positions, mean, std)
    with pytest.raises(InputError, match="outside the image"):
        cpp.patch_apply_fwd(x, torch.zeros(1, 2, 3, 2, 2), positions + 3, positions, mean, std)
    with pytest.raises(InputError, match="rows"):
        cpp.patch_apply_fwd(x, torch.zeros(1, 2, 3, 2, 2), positions.float(), positions, mean, std)
    logits = torch.zeros(3, 5)
    with pytest.raises(InputError, match="target"):
        cpp.trigger_loss_fwd(logits, torch.zeros(2, dtype=torch.int64), 0.5)
    with pytest.raises(InputError, match="out of range"):
        cpp.trigger_loss_fwd(logits, torch.full((3,), 5, dtype=torch.int64), 0.5)
    with pytest.raises(InputError, match="class column"):
        cpp.trigger_loss_fwd(torch.zeros(3, 0), torch.zeros(3, dtype=torch.int64), 0.5)


# --- batched per-class recovery --------------------------------------------------------------------


def _stacked(k, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Odd sizes; one parameter over the 4096-element chunk of the C++ step.
    return [
        torch.randn(k, 5, 3, generator=g),
        torch.randn(k, 7, generator=g),
        torch.randn(k, 4100, generator=g),
    ]


def _run_batched(backend, k, steps, active_at, lr=2e-3, betas=(0.5, 0.999)):
    """Run BatchedAdam on stacked params with a fixed gradient schedule; returns params and optimizer."""
    params = [p.clone().requires_grad_(True) for p in _stacked(k)]
    opt = BatchedAdam(params, lr=lr, betas=betas)
    g = torch.Generator().manual_seed(1)
    with use_backend(backend):
        for i in range(steps):
            for p in params:
                p.grad = torch.randn(p.shape, generator=g)
            opt.step(active=active_at(i))
    return params, opt


def _run_separate(k, steps, active_at, lr=2e-3, betas=(0.5, 0.999)):
    """The same schedule with one torch.optim.Adam per class, stepping only the active ones."""
    stacked = _stacked(k)
    params = [[p[c].clone().requires_grad_(True) for p in stacked] for c in range(k)]
    opts = [torch.optim.Adam(ps, lr=lr, betas=betas) for ps in params]
    g = torch.Generator().manual_seed(1)
    for i in range(steps):
        grads = [torch.randn(p.shape, generator=g) for p in stacked]
        active = active_at(i)
        for c in range(k):
            if active is None or active[c]:
                for p, grad in zip(params[c], grads):
                    p.grad = grad[c].clone()
                opts[c].step()
    return [torch.stack([params[c][j].detach() for c in range(k)]) for j in range(len(stacked))]


def _schedule(k):
    # Class 1 stops after 2 steps, class k-1 is frozen from the start for 3 steps then resumes.
    def active_at(i):
        on = torch.ones(k, dtype=torch.bool)
        if i >= 2:
            on[1] = False
        if i < 3:
            on[k - 1] = False
        return on

    return active_at


@pytest.mark.parametrize("backend", ["ref", pytest.param("cpp", marks=requires_cpp)])
@pytest.mark.parametrize("k", [1, 3, 10])
def test_batched_adam_equals_separate_adams(backend, k):
    got, opt = _run_batched(backend, k, 6, lambda i: None)
    assert opt.backend == backend
    for j, (a, b) in enumerate(zip(got, _run_separate(k, 6, lambda i: None))):
        assert_close(f"param{j}", a, b, 1e-6, 1e-5)


@pytest.mark.parametrize("backend", ["ref", pytest.param("cpp", marks=requires_cpp)])
def test_batched_adam_freezes_inactive_classes(backend):
    k = 4
    schedule = _schedule(k)
    got, opt = _run_batched(backend, k, 6, schedule)
    for j, (a, b) in enumerate(zip(got, _run_separate(k, 6, schedule))):
        assert_close(f"param{j}", a, b, 1e-6, 1e-5)
    state = opt.state[opt.param_groups[0]["params"][0]]
    assert state["step"].tolist() == [6.0, 2.0, 6.0, 3.0]

    # A step with every class inactive changes nothing at all.
    before = {id(p): (p.detach().clone(), {n: s.clone() for n, s in opt.state[p].items()}) for p in got}
    for p in got:
        p.grad = torch.randn_like(p)
    with use_backend(backend):
        opt.step(active=torch.zeros(k, dtype=torch.bool))
    for p in got:
        value, st = before[id(p)]
        assert torch.equal(p.detach(), value)
        for name, s in opt.state[p].items():
            assert torch.equal(s, st[name]), name


@requires_cpp
def test_batched_adam_cpp_matches_ref_and_rejects_bad_mask():
    k = 5
    a, _ = _run_batched("cpp", k, 4, _schedule(k), betas=(0.9, 0.99))
    b, _ = _run_batched("ref", k, 4, _schedule(k), betas=(0.9, 0.99))
    for j, (x, y) in enumerate(zip(a, b)):
        assert_close(f"param{j}", x, y, 1e-6, 1e-5)
    params = [torch.zeros(k, 3, requires_grad=True)]
    params[0].grad = torch.ones(k, 3)
    opt = BatchedAdam(params, lr=0.1)
    with pytest.raises(InputError, match="active"):
        opt.step(active=torch.ones(k + 1, dtype=torch.bool))
    with pytest.raises(InputError, match="active"):
        opt.step(active=torch.ones(k))


def test_batched_adam_closure_and_default_backend():
    p = torch.zeros(2, 3, requires_grad=True)
    opt = BatchedAdam([p], lr=0.1)

    def closure():
        opt.zero_grad()
        loss = (p - 1).pow(2).sum()
        loss.backward()
        return loss

    assert opt.step(closure).item() == pytest.approx(6.0)
    # Adam's first step moves every coordinate by lr toward the minimum.
    assert_close("param", p, torch.full((2, 3), 0.1), 1e-6, 1e-5)


@pytest.mark.parametrize("backend", ["ref", pytest.param("cpp", marks=requires_cpp)])
def test_moving_average(backend):
    ma = torch.tensor([1.0, 2.0, 3.0])
    value = torch.tensor([2.0, 4.0, 6.0])
    expected = ma.clone()
    moving_average_ref(expected, value, 0.25, torch.tensor([True, False, True]))
    with use_backend(backend):
        out = moving_average_(ma, value, 0.25, torch.tensor([True, False, True]))
    assert out is ma
    assert_close("ma", ma, torch.tensor([1.25, 2.0, 3.75]), 1e-7, 1e-7)
    assert_close("ma", ma, expected, 1e-7, 1e-7)


# --- fallback --------------------------------------------------------------------------------------


def test_reference_serves_when_forced():
    x, m, p = apply_inputs((2, 3, 1, 5, 6), 1, False)
    logits, target = leaf(torch.randn(5, 7)), torch.randint(0, 7, (5,))
    with use_backend("ref"):
        assert backend_for("trigger_apply", "cpu") == "ref"
        out = trigger_apply(x, m, p)
        hinge, nll = trigger_loss(logits, target, 0.5)
        params = [torch.zeros(3, 2, requires_grad=True)]
        params[0].grad = torch.ones(3, 2)
        opt = BatchedAdam(params, lr=0.1)
        opt.step()
    assert opt.backend == "ref"
    assert_close("out", out, trigger_apply_ref(x, m, p), 0, 0)
    assert_close("nll", nll, trigger_loss_ref(logits, target, 0.5)[1], 0, 0)
    assert out.grad_fn is not None and hinge.grad_fn is not None
    assert_close("param", params[0], torch.full((3, 2), -0.1), 1e-6, 1e-5)


def test_fallback_when_extension_missing(monkeypatch):
    from baerase.errors import BackendError
    from baerase.ops import dispatch

    monkeypatch.setitem(dispatch._loaded, "cpp", None)
    monkeypatch.setitem(dispatch._load_errors, "cpp", "ImportError: no module named baerase._C")
    assert backend_for("trigger_loss", "cpu") == "ref"
    params = [torch.zeros(2, 2, requires_grad=True)]
    params[0].grad = torch.ones(2, 2)
    opt = BatchedAdam(params, lr=0.1)
    opt.step()
    assert opt.backend == "ref"
    with use_backend("cpp"), pytest.raises(BackendError, match="baerase._C"):
        opt.step()



@requires_cpp
@pytest.mark.parametrize("cap", ["avx2", "baseline"])
def test_every_simd_tier_matches_the_reference(cap):
    """BAERASE_CPU_ISA caps the SIMD tier: the narrower clones compute what the reference does."""
    allowed = ("baseline",) if cap == "baseline" else ("baseline", "avx2")
    script = f"""
import torch
from baerase import _C
from baerase.ops import cpp
from baerase.ops.reference import batched_adam_step_ref
import fastpath
assert _C.cpu_isa() in {allowed!r}, _C.cpu_isa()
for m, kc in [(67, 10), (130, 100), (3, 1001)]:
    fastpath.check_trigger_loss("cpp", m, kc, 0.5, *{FP32!r})
fastpath.check_trigger_loss_extreme_logits("cpp")
p, g = torch.randn(3, 5000), torch.randn(3, 5000)
states = [[t.clone()] for t in (p, p, torch.zeros_like(p), torch.zeros_like(p))]
m, v = [torch.zeros_like(p)], [torch.zeros_like(p)]
steps = [[torch.zeros(3)], [torch.zeros(3)]]
cpp.batched_adam_step([states[0][0]], [g], [m[0]], [v[0]], steps[0], None, 0.01, 0.5, 0.9, 1e-8)
batched_adam_step_ref(states[1], [g], states[2], states[3], steps[1], None, 0.01, 0.5, 0.9, 1e-8)
torch.testing.assert_close(states[0][0], states[1][0])
"""
    env = {**os.environ, "BAERASE_CPU_ISA": cap, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), *sys.path])}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 0, done.stderr
