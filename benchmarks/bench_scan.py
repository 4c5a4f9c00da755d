"""Whole-scan wall time per backend: the fast ops against the PyTorch reference in one run.

    pytest benchmarks/bench_scan.py -s     # prints the speed-up of each backend over ref

``cpp+compile`` is the C++ ops with ``Config(compile=True)`` (the model itself under torch.compile;
its one-off compile time falls in the warm-up round).
"""

from __future__ import annotations

import pytest
import torch

import baerase
from baerase.models import SmallCNN
from baerase.ops import available_backends

CASES = {  # name: (device, model, image shape, classes)
    "cpu-mnist": ("cpu", lambda: SmallCNN(1, 10, 28), (1, 28, 28), 10),
    "cuda-colour100": ("cuda", lambda: SmallCNN(3, 100, 32), (3, 32, 32), 100),
}
_times: dict[tuple[str, str], float] = {}
_fastest: dict[tuple[str, str], float] = {}


@pytest.mark.parametrize("backend", ["ref", "cpp", "cpp+compile", "triton"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_scan(benchmark, case, backend):
    device, make_model, shape, k = CASES[case]
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    ops_backend, _, compiled = backend.partition("+")
    if ops_backend not in available_backends(device):
        pytest.skip(f"backend {ops_backend} unavailable on {device}")
    torch.manual_seed(0)
    model = make_model().to(device).eval()
    images = torch.rand(400, *shape, device=device)
    labels = torch.arange(400, device=device) % k
    config = baerase.Config(steps=30, backend=ops_backend, compile=bool(compiled), progress=False)
    report = benchmark.pedantic(
        baerase.scan, args=(model, images, labels), kwargs={"config": config}, rounds=3, warmup_rounds=1
    )
    _times[(case, backend)] = benchmark.stats.stats.median
    base = _times.get((case, "ref"))
    _fastest[(case, backend)] = benchmark.stats.stats.min  # compare.py's ratio: fastest round over fastest
    benchmark.extra_info.update(images_per_class=round(report.cost.per_class(k), 1), flagged=report.flagged)
    if (case, "ref") in _fastest:
        benchmark.extra_info["speedup_vs_ref"] = round(_fastest[(case, "ref")] / benchmark.stats.stats.min, 3)
    if base is not None and backend != "ref":
        print(
            f"\n{case}: {backend} {benchmark.stats.stats.median:.2f}s vs ref {base:.2f}s "
            f"-> {base / benchmark.stats.stats.median:.2f}x"
        )
