"""adam_step / BatchedAdam on every backend against K separate torch.optim.Adam and the reference.

Triton has no Adam kernel: under ``use_backend("triton")`` the reference serves it, which the
``triton`` cases check. The tensors stay on CPU for every backend (there is no GPU kernel to test).
"""

import pytest
import torch
from conftest import requires_cpp
from fastpath import BACKENDS, assert_close, opcheck

from baerase import ops
from baerase.errors import InputError
from baerase.ops.reference import adam_step_ref, moving_average_ref

FP32 = (1e-6, 1e-5)


def stacked(k: int) -> list[torch.Tensor]:
    """Odd per-class shapes; one parameter over the 4096-element chunk of the C++ step."""
    g = torch.Generator().manual_seed(0)
    return [torch.randn(k, 5, 3, generator=g), torch.randn(k, 7, generator=g), torch.randn(k, 4100, generator=g)]


def run_batched(backend, k, steps, active_at, lr=2e-3, betas=(0.5, 0.999)):
    """BatchedAdam on stacked params with a fixed gradient schedule; returns (params, optimizer)."""
    params = [p.clone().requires_grad_(True) for p in stacked(k)]
    opt = ops.BatchedAdam(params, lr=lr, betas=betas)
    g = torch.Generator().manual_seed(1)
    with ops.use_backend(backend):
        for i in range(steps):
            for p in params:
                p.grad = torch.randn(p.shape, generator=g)
            opt.step(active=active_at(i))
    return params, opt


def run_separate(k, steps, active_at, lr=2e-3, betas=(0.5, 0.999)):
    """The same schedule with one torch.optim.Adam per class, stepping only the active ones."""
    params = [[p[c].clone().requires_grad_(True) for p in stacked(k)] for c in range(k)]
    opts = [torch.optim.Adam(ps, lr=lr, betas=betas) for ps in params]
    g = torch.Generator().manual_seed(1)
    for i in range(steps):
        grads = [torch.randn(p.shape, generator=g) for p in stacked(k)]
        active = active_at(i)
        for c in range(k):
            if active is None or active[c]:
                for p, grad in zip(params[c], grads, strict=True):
                    p.grad = grad[c].clone()
                opts[c].step()
    return [torch.stack([ps[j].detach() for ps in params]) for j in range(len(params[0]))]


def schedule(k):
    """Class 1 stops after 2 steps; class k-1 is frozen for the first 3 steps, then resumes."""

    def active_at(i):
        on = torch.ones(k, dtype=torch.bool)
        on[1] = i < 2
        on[k - 1] = i >= 3
        return on

    return active_at


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [1, 3, 10])
def test_equals_separate_adams(backend, k):
    got, opt = run_batched(backend, k, 6, lambda i: None)
    assert opt.backend == ("ref" if backend == "triton" else backend)
    for j, (a, b) in enumerate(zip(got, run_separate(k, 6, lambda i: None), strict=True)):
        assert_close(f"param{j}", a, b, *FP32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_freezes_inactive_classes(backend):
    k = 4
    got, opt = run_batched(backend, k, 6, schedule(k), betas=(0.9, 0.99))
    for j, (a, b) in enumerate(zip(got, run_separate(k, 6, schedule(k), betas=(0.9, 0.99)), strict=True)):
        assert_close(f"param{j}", a, b, *FP32)
    assert opt.state[got[0]]["step"].tolist() == [6.0, 2.0, 6.0, 3.0]
    # A step with every class inactive changes nothing at all.
    before = [(p.detach().clone(), {n: s.clone() for n, s in opt.state[p].items()}) for p in got]
    for p in got:
        p.grad = torch.randn_like(p)
    with ops.use_backend(backend):
        opt.step(active=torch.zeros(k, dtype=torch.bool))
    for p, (value, state) in zip(got, before, strict=True):
        assert torch.equal(p.detach(), value)
        assert all(torch.equal(s, state[n]) for n, s in opt.state[p].items())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("masked", [False, True])
def test_opcheck(backend, masked):
    params = stacked(3)
    grads = [torch.randn_like(p) for p in params]
    state = [[torch.rand_like(p) for p in params] for _ in range(2)]
    active = torch.tensor([True, False, True]) if masked else None
    args = (params, grads, *state, [torch.full((3,), 2.0) for _ in params], active, 1e-3, 0.5, 0.999, 1e-8)
    opcheck(backend, torch.ops.baerase.adam_step.default, args)


def test_compiles_without_graph_breaks():
    params, grads = stacked(3), [torch.randn_like(p) for p in stacked(3)]
    state = [[torch.zeros_like(p) for p in params] for _ in range(2)] + [[torch.zeros(3) for _ in params]]
    want = [[t.clone() for t in ts] for ts in (params, *state)]
    active = torch.tensor([True, False, True])
    fn = torch.compile(ops.adam_step, fullgraph=True, backend="aot_eager")
    with ops.record_backends() as used:
        fn(params, grads, *state, active, 1e-3, 0.5, 0.999, 1e-8)
    adam_step_ref(want[0], grads, *want[1:], active, 1e-3, 0.5, 0.999, 1e-8)
    torch.testing.assert_close([params, *state], want)
    assert set(used) == {"adam_step"}


def test_rejects_bad_inputs():
    params = [torch.zeros(5, 3, requires_grad=True)]
    params[0].grad = torch.ones(5, 3)
    opt = ops.BatchedAdam(params, lr=0.1)
    for active in (torch.ones(6, dtype=torch.bool), torch.ones(5)):
        with pytest.raises(InputError, match="active"):
            opt.step(active=active)
    with pytest.raises(InputError, match="fp32"):
        ops.BatchedAdam([torch.zeros(5, 3, dtype=torch.float64)])


@requires_cpp
def test_cpp_checks_its_contract():
    p = torch.zeros(3, 4, dtype=torch.float64)
    with ops.use_backend("cpp"), pytest.raises(InputError, match="must be Float"):
        ops.adam_step([p], [p], [p.clone()], [p.clone()], [torch.zeros(3)], None, 0.1, 0.5, 0.9, 0.0)


def test_closure_and_default_backend():
    p = torch.zeros(2, 3, requires_grad=True)
    opt = ops.BatchedAdam([p], lr=0.1)

    def closure():
        opt.zero_grad()
        loss = (p - 1).pow(2).sum()
        loss.backward()
        return loss

    assert opt.step(closure).item() == pytest.approx(6.0)
    # Adam's first step moves every coordinate by lr toward the minimum.
    assert_close("param", p, torch.full((2, 3), 0.1), *FP32)


def test_moving_average():
    # MINE's other per-class update (not a custom op): frozen classes keep their value.
    ma, value, active = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([2.0, 4.0, 6.0]), torch.tensor([True, False, True])
    expected = ma.clone()
    moving_average_ref(expected, value, 0.25, active)
    assert ops.moving_average_(ma, value, 0.25, active) is ma
    assert_close("ma", ma, torch.tensor([1.25, 2.0, 3.75]), 1e-7, 1e-7)
    assert_close("ma", ma, expected, 1e-7, 1e-7)
    with pytest.raises(InputError, match="active"):
        ops.moving_average_(ma, value, 0.25, active[:2])
