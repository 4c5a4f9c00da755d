"""CPU thread count for a scan step: 1 thread vs torch's default vs :func:`baerase.threads.available_cpus`.

The workload is one recovery step's model work on CPU: a frozen ``SmallCNN(1, 10, 28)`` forward and
backward (gradient to the input images, as when triggers are optimised) on a ``[K * B, 1, 28, 28]``
batch, K = 10 classes, B = 32 images per class. Every thread setting is timed in the same run, and
the end of the module prints each one's speed over 1 thread.

``torch``'s default is read when this module is imported, so run with ``OMP_NUM_THREADS`` unset
(or empty) to measure the real default. ``BAERASE_BENCH_BUSY=N`` runs N CPU-bound busy-loop
processes for the duration of the timing, to measure beside another job.

    OMP_NUM_THREADS= pytest benchmarks/bench_threads.py -s -p no:cacheprovider
"""

from __future__ import annotations

import multiprocessing
import os

import pytest
import torch
import torch.nn.functional as F

from baerase.models import SmallCNN
from baerase.threads import available_cpus, using_threads

K, B, SIDE = 10, 32, 28
ROUNDS, WARMUP = 40, 5
TORCH_DEFAULT = torch.get_num_threads()
SETTINGS = {"1 thread": 1, "torch default": TORCH_DEFAULT, "available_cpus": available_cpus()}
_medians: dict[str, float] = {}


def _spin() -> None:
    while True:
        pass


@pytest.fixture(scope="module", autouse=True)
def busy_neighbours():
    """Start ``BAERASE_BENCH_BUSY`` busy-loop processes for the module, then print the ratios."""
    count = int(os.environ.get("BAERASE_BENCH_BUSY", "0"))
    procs = [multiprocessing.Process(target=_spin, daemon=True) for _ in range(count)]
    for proc in procs:
        proc.start()
    load = os.getloadavg()[0]
    yield
    for proc in procs:
        proc.terminate()
        proc.join()
    _print_summary(len(procs), load)


def _step_fn():
    """One scan step's model work: forward + gradient to the input through a frozen model."""
    torch.manual_seed(0)
    model = SmallCNN(1, K, SIDE).eval().requires_grad_(False)
    images = torch.rand(K * B, 1, SIDE, SIDE, requires_grad=True)
    labels = torch.arange(K).repeat_interleave(B)

    def step():
        loss = F.cross_entropy(model(images), labels)
        return torch.autograd.grad(loss, images)

    return step


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_threads(benchmark, setting):
    n = SETTINGS[setting]
    benchmark.group = "threads: SmallCNN fwd+bwd [320, 1, 28, 28]"
    benchmark.extra_info["threads"] = n
    step = _step_fn()
    with using_threads(n):
        benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=WARMUP, iterations=1)
    stats = getattr(benchmark, "stats", None)
    if stats is not None:
        _medians[setting] = stats.stats.median


def _print_summary(busy: int, load_at_start: float) -> None:
    if "1 thread" not in _medians:
        return
    base = _medians["1 thread"]
    print(
        f"\nthreads: torch {torch.__version__}, os.cpu_count() {os.cpu_count()}, available_cpus() "
        f"{SETTINGS['available_cpus']}, torch default {TORCH_DEFAULT}, busy neighbours {busy}, "
        f"load average {load_at_start:.2f} at start, {os.getloadavg()[0]:.2f} at end"
    )
    print(f"{'setting':<16}{'threads':>8}{'median ms':>11}{'steps/s':>9}{'x 1 thread':>12}")
    for setting, median in _medians.items():
        print(f"{setting:<16}{SETTINGS[setting]:>8}{median * 1e3:>11.2f}{1 / median:>9.1f}{base / median:>12.2f}")
