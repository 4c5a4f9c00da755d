"""Batched per-class Adam: BatchedAdam (C++ and reference) vs a loop of K torch.optim.Adam vs torch's
foreach Adam over the K * P per-class tensors.

The case is one step of K candidate trigger generators with the recovery's parameter layout (a
small MLP per class, stacked on a leading K dimension). Every provider starts from the same
parameters and gradients; the timed call is ``optimizer.step()`` alone. The summary prints each
provider's median and its speed-up over the K-optimiser loop, the way a scan would otherwise run.

    pytest benchmarks/bench_batched_adam.py
"""

from __future__ import annotations

import pytest
import torch

from baerase.ops import BatchedAdam, available_backends, use_backend

# (K, per-class shapes): the CPU generator default (z 64 -> 256 -> 256 -> 256 -> 3*3*3 patch) and a
# wider one; K = 10 classes as in an MNIST / CIFAR-10 scan, 100 for CIFAR-100.
CASES = {
    "K10-mlp256": (10, [(256, 16), (256,), (256, 272), (256,), (256, 272), (256,), (27, 272), (27,)]),
    "K100-mlp256": (100, [(256, 16), (256,), (256, 272), (256,), (256, 272), (256,), (27, 272), (27,)]),
    "K10-mlp1024": (10, [(1024, 16), (1024,), (1024, 1040), (1024,), (27, 1040), (27,)]),
}
PROVIDERS = ("loop", "foreach", "ref", "cpp")
_RESULTS: dict[str, dict[str, float]] = {}


def _stacked(k: int, shapes) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    params = [torch.randn((k, *s), generator=g).mul_(0.05).requires_grad_(True) for s in shapes]
    grads = [torch.randn((k, *s), generator=g) for s in shapes]
    return params, grads


def _make_step(provider: str, k: int, shapes):
    params, grads = _stacked(k, shapes)
    if provider in ("ref", "cpp"):
        for p, g in zip(params, grads):
            p.grad = g
        opt = BatchedAdam(params, lr=2e-4, betas=(0.5, 0.999))
        active = torch.ones(k, dtype=torch.bool)

        def step():
            with use_backend(provider):
                opt.step(active=active)

        return step
    # K independent optimisers (or one foreach optimiser) over the per-class slices.
    per_class = [[p[c].detach().clone().requires_grad_(True) for p in params] for c in range(k)]
    for c, ps in enumerate(per_class):
        for p, g in zip(ps, grads):
            p.grad = g[c].clone()
    if provider == "loop":
        opts = [torch.optim.Adam(ps, lr=2e-4, betas=(0.5, 0.999), foreach=False) for ps in per_class]

        def step():
            for opt in opts:
                opt.step()

        return step
    flat = [p for ps in per_class for p in ps]
    opt = torch.optim.Adam(flat, lr=2e-4, betas=(0.5, 0.999), foreach=True)
    return opt.step


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", list(CASES))
def test_batched_adam(benchmark, case, provider):
    if provider == "cpp" and "cpp" not in available_backends("cpu"):
        pytest.skip("backend 'cpp' unavailable on cpu")
    k, shapes = CASES[case]
    step = _make_step(provider, k, shapes)
    for _ in range(3):
        step()
    benchmark.group = f"batched_adam {case}"
    benchmark.pedantic(step, rounds=30, warmup_rounds=0, iterations=1)
    stats = getattr(benchmark, "stats", None)
    if stats is not None:
        _RESULTS.setdefault(case, {})[provider] = stats.stats.median


@pytest.fixture(scope="module", autouse=True)
def _summary(request):
    yield
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None or not _RESULTS:
        return
    # Module teardown runs under output capture; the table is meant to be seen.
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled():
        reporter.section("batched_adam: median ms per step, speed-up over a loop of K torch.optim.Adam")
        for case, by_provider in _RESULTS.items():
            loop = by_provider.get("loop")
            for provider in PROVIDERS:
                if provider in by_provider:
                    median = by_provider[provider]
                    ratio = f"{loop / median:.2f}" if loop else "-"
                    reporter.write_line(f"{case:<14}{provider:<10}{median * 1e3:>10.3f} ms{ratio:>8}x")
