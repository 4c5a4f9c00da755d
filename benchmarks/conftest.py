"""Shared harness for the op benchmarks (pytest-benchmark).

Every ``bench_<op>.py`` parametrises cases (device, shape, dtype), a mode (``forward``,
``backward``, ``full``; ops without autograd only ``forward``) and a provider:

- ``ref``: the pure-PyTorch reference ``<op>_ref``, eager (autograd derives its backward);
- ``compile``: ``torch.compile`` of the reference (on CPU only with ``BAERASE_BENCH_COMPILE=1``:
  inductor's C++ build takes longer than the CPU cases themselves);
- ``cpp`` / ``triton``: the library op (the ``baerase::<op>`` custom op) with that backend forced,
  run where the backend serves the device and has a kernel for the op (Triton is never timed
  through its CPU interpreter).

Providers that cannot run are skipped with the reason. At the end of the session a table gives, per
case and mode, each provider's median time, its speed-up over ``ref`` measured in the same run, and
the achieved bandwidth (bytes an ideal kernel must move / median time) beside the GPU's peak.

    pytest benchmarks/                                  # every case this machine can run
    pytest benchmarks/bench_trigger_loss.py -k cuda     # one op, GPU cases only
    pytest benchmarks/ --benchmark-autosave             # also store the runs for --benchmark-compare
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pytest
import torch

from baerase.ops import available_backends, backend_for, use_backend

PROVIDERS = ("ref", "compile", "cpp", "triton")
MODES = ("forward", "backward", "full")
HAS_CUDA = torch.cuda.is_available()
DEVICES = ("cpu", "cuda")

# Peak DRAM bandwidth in GB/s (vendor figures), matched as substrings of the device name; the
# first match wins, so more specific names come first.
PEAK_GBPS = (
    ("H200", 4800.0),
    ("H100 PCIe", 2000.0),
    ("H100", 3350.0),
    ("GH200", 4000.0),
    ("A100-PCIE-40GB", 1555.0),
    ("A100-SXM4-40GB", 1555.0),
    ("A100", 2039.0),
    ("L40S", 864.0),
    ("L4", 300.0),
    ("A10G", 600.0),
    ("A10", 600.0),
    ("V100", 900.0),
    ("T4", 320.0),
    ("RTX 4090", 1008.0),
    ("RTX 3090", 936.0),
)


def peak_gbps(device: str) -> float | None:
    if device != "cuda" or not HAS_CUDA:
        return None
    name = torch.cuda.get_device_name()
    return next((gbps for key, gbps in PEAK_GBPS if key in name), None)


def pytest_collect_file(file_path, parent):
    # bench_*.py are not test_*.py: collect them when a folder is given (explicit paths already are).
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


@dataclass
class Case:
    """One benchmark shape. ``make`` builds (inputs, indices of the inputs that get gradients)."""

    device: str
    name: str
    make: Callable[[], tuple[tuple, tuple[int, ...]]]
    bytes_moved: Callable[[str], int]  # mode -> bytes an ideal implementation reads + writes
    footprint: int = 0  # rough peak bytes of the reference in ``full`` mode, to skip what cannot fit
    rounds: int = 0  # 0: as many as fit in ~0.5 s

    @property
    def id(self) -> str:
        return f"{self.device}-{self.name}"


def case_params(cases: Sequence[Case]) -> list:
    """pytest params, CUDA cases marked to skip cleanly without a GPU."""
    return [
        pytest.param(c, id=c.id, marks=[pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")])
        if c.device == "cuda"
        else pytest.param(c, id=c.id)
        for c in cases
    ]


def _skip_reason(op: str, provider: str, case: Case) -> str | None:
    if provider == "compile" and case.device == "cpu" and os.environ.get("BAERASE_BENCH_COMPILE") != "1":
        return "torch.compile on CPU is opt-in (BAERASE_BENCH_COMPILE=1)"
    if provider == "triton" and case.device == "cpu":
        return "Triton on CPU runs only through its interpreter; not a benchmark"
    if provider in ("cpp", "triton") and provider not in available_backends(case.device):
        return f"backend {provider!r} unavailable on {case.device}"
    if provider in ("cpp", "triton"):
        with use_backend(provider):
            if backend_for(op, case.device) != provider:
                return f"backend {provider!r} has no kernel for {op}"
    if case.device == "cuda" and case.footprint:
        free, _ = torch.cuda.mem_get_info()
        if case.footprint > 0.8 * free:
            return f"needs ~{case.footprint / 2**30:.0f} GiB, {free / 2**30:.0f} GiB free"
    return None


def _callable(provider: str, ref_fn: Callable, op_fn: Callable) -> Callable:
    if provider == "ref":
        return ref_fn
    if provider == "compile":
        return torch.compile(ref_fn, dynamic=False)

    def run(*args):
        with use_backend(provider):
            return op_fn(*args)

    return run


def _step(fn: Callable, inputs: tuple, grad_idx: tuple[int, ...], mode: str) -> Callable[[], object]:
    """The closure to time for one mode; ``backward`` times only the backward of a kept graph."""
    leaves = [inputs[i] for i in grad_idx]
    if mode == "forward":

        def forward():
            with torch.no_grad():
                return fn(*inputs)

        return forward
    outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    grads = [torch.randn_like(o) for o in outs]
    if mode == "backward":
        return lambda: torch.autograd.grad(outs, leaves, grads, retain_graph=True)

    def full():
        o = fn(*inputs)
        return torch.autograd.grad(o if isinstance(o, tuple) else (o,), leaves, grads)

    return full


# (op, case id, mode) -> provider -> (median seconds, bytes moved, device)
_RESULTS: dict[tuple[str, str, str], dict[str, tuple[float, int, str]]] = defaultdict(dict)
_FASTEST: dict[tuple[str, str, str, str], float] = {}  # (op, case id, mode, provider) -> fastest round, s


@pytest.fixture
def run_op(benchmark):
    """``run_op(op, case, provider, mode, ref_fn, op_fn)``: time one provider on one case."""

    def _run(op: str, case: Case, provider: str, mode: str, ref_fn: Callable, op_fn: Callable) -> None:
        reason = _skip_reason(op, provider, case)
        if reason:
            pytest.skip(reason)
        torch.manual_seed(0)
        inputs, grad_idx = case.make()
        step = _step(_callable(provider, ref_fn, op_fn), inputs, grad_idx, mode)
        if case.device == "cuda":
            inner = step

            def step():
                inner()
                torch.cuda.synchronize()

        benchmark.group = f"{op} {case.id} {mode}"
        # Warm-up absorbs Triton / inductor compilation and the allocator's first growth; then as
        # many rounds as fit in ~0.5 s (5 to 200), so small cases get a stable median.
        for _ in range(2):
            step()
        start = time.perf_counter()
        step()
        rounds = case.rounds or max(5, min(200, int(0.5 / max(time.perf_counter() - start, 1e-6))))
        benchmark.pedantic(step, rounds=rounds, warmup_rounds=0, iterations=1)
        stats = getattr(benchmark, "stats", None)
        if stats is not None:
            _RESULTS[(op, case.id, mode)][provider] = (
                stats.stats.median,
                case.bytes_moved(mode),
                case.device,
            )
            # The same-run ratio benchmarks/compare.py tracks, fastest round over fastest round: a busy
            # neighbour only adds time, and on a loaded 2-core CPU median ratios swung 4-12x between runs.
            _FASTEST[(op, case.id, mode, provider)] = stats.stats.min
            ref_fastest = _FASTEST.get((op, case.id, mode, "ref"))
            benchmark.extra_info.update(op=op, case=case.id, mode=mode, provider=provider)
            if ref_fastest is not None:
                benchmark.extra_info["speedup_vs_ref"] = round(ref_fastest / stats.stats.min, 3)

    return _run


def pytest_terminal_summary(terminalreporter):
    if not _RESULTS:
        return
    write = terminalreporter.write_line
    terminalreporter.section("baerase ops: median time, speed-up over ref, achieved bandwidth")
    write(f"{'op':<14}{'case':<34}{'mode':<10}{'provider':<10}{'median ms':>11}{'x ref':>8}{'GB/s':>9}{'% peak':>8}")
    for (op, case_id, mode), by_provider in sorted(_RESULTS.items()):
        ref = by_provider.get("ref")
        for provider in PROVIDERS:
            if provider not in by_provider:
                continue
            median, nbytes, device = by_provider[provider]
            speedup = f"{ref[0] / median:.2f}" if ref else "-"
            gbps = nbytes / median / 1e9
            peak = peak_gbps(device)
            share = f"{100 * gbps / peak:.0f}%" if peak else "-"
            write(
                f"{op:<14}{case_id:<34}{mode:<10}{provider:<10}{median * 1e3:>11.3f}{speedup:>8}{gbps:>9.1f}{share:>8}"
            )
    if HAS_CUDA:
        peak = peak_gbps("cuda")
        write(f"device: {torch.cuda.get_device_name()}, peak {peak or 'unknown'} GB/s")
