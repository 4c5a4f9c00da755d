"""Scan cost as the number of classes K grows: batched recovery vs a per-class loop, 1 vs 2 ranks.

A scaling curve, not an accuracy claim: procedural colour images (``make_colour``) at 8 x 8 px, a
small CNN trained for one epoch, and a short recovery budget (10 steps, 8 images per class and
step), so that K = 1000 runs in well under a minute on 2 CPU cores. Every case scans the same way
except for what it measures:

- ``batched``: the default scan, every class of a memory-budgeted chunk in one forward/backward;
- ``loop``: the same budget one class at a time (``chunk_size=1``), what per-class tools do;
- ``2-rank``: ``torchrun --nproc_per_node 2`` sharding the classes (gloo), against ``1-rank``, the
  same script in one process; both time a second, warm scan inside the processes (start-up
  excluded). The 2 ranks split the classes into 2 chunks of 50, the single process runs 1 of 100.

Peak memory is the rise of the process's resident set during the scan (sampled every 2 ms). The
summary table is printed and written to ``benchmarks/results/scale.md``.

    pytest benchmarks/bench_scale.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import baerase
from baerase.data import make_colour
from baerase.models.nets import SmallCNN
from baerase.threads import using_threads

SIDE, PER_CLASS = 8, 6
CONFIG = {
    "steps": 10,
    "batch_size": 8,
    "hidden": 32,
    "mine_hidden": 32,
    "latent_dim": 16,
    "eval_samples": 64,
    "progress": False,
}
RESULTS_FILE = Path(__file__).parent / "results" / "scale.md"
_RESULTS: dict[str, dict] = {}


def _trained(k: int) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    x, y = make_colour(k, PER_CLASS, side=SIDE)
    model = SmallCNN(3, k, SIDE)
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    for i in torch.randperm(len(y)).split(64):
        opt.zero_grad()
        F.cross_entropy(model(x[i]), y[i]).backward()
        opt.step()
    return model.eval(), x, y


def _rss() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_rise(fn):
    """(fn's result, peak rise of the resident set in bytes while fn ran)."""
    base, peak, stop = _rss(), [0], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.002)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        result = fn()
    finally:
        stop.set()
        thread.join()
    return result, max(peak[0], _rss()) - base


@pytest.fixture(autouse=True)
def _one_thread():
    with using_threads(1):
        yield


@pytest.mark.parametrize(
    ("name", "k", "chunk"), [("batched", 10, None), ("batched", 100, None), ("batched", 1000, None), ("loop", 100, 1)]
)
def test_scan_scale(benchmark, name, k, chunk):
    model, x, y = _trained(k)
    config = baerase.Config(chunk_size=chunk, **CONFIG)
    benchmark.group = "scan scale"
    memory = []

    def run():
        report, rise = _peak_rss_rise(lambda: baerase.scan(model, x, y, config=config))
        memory.append(rise)
        return report

    report = benchmark.pedantic(run, rounds=1, iterations=1)
    assert len(report.classes) == k
    stats = getattr(benchmark, "stats", None)
    seconds = stats.stats.median if stats is not None else report.seconds
    _RESULTS[f"{name} K={k}"] = {"k": k, "seconds": seconds, "peak": memory[0]}


SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import torch
    torch.set_num_threads(1)
    import baerase
    from baerase.data import make_colour
    from baerase.models.nets import SmallCNN

    k, side, per_class, config = json.loads(sys.argv[2])
    model = SmallCNN(3, k, side)
    model.load_state_dict(torch.load(sys.argv[1], weights_only=True))
    x, y = make_colour(k, per_class, side=side)
    config = baerase.Config(**config)
    baerase.scan(model.eval(), x, y, config=config.replace(steps=1))  # warm-up: first-call costs aside
    report = baerase.scan(model.eval(), x, y, config=config)
    print(json.dumps(dict(seconds=report.seconds, flagged=report.flagged)))
    """
)


@pytest.mark.parametrize("ranks", [1, 2])
def test_ranks(benchmark, tmp_path, ranks):
    k = 100
    model, _, _ = _trained(k)
    torch.save(model.state_dict(), tmp_path / "model.pt")
    script = tmp_path / "scan.py"
    script.write_text(SCRIPT)
    args = [str(script), str(tmp_path / "model.pt"), json.dumps([k, SIDE, PER_CLASS, CONFIG])]
    launch = [sys.executable, *args]
    if ranks > 1:
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def run():
        done = subprocess.run(launch, check=True, capture_output=True, text=True, env=env, timeout=600)
        return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]

    benchmark.group = "scan ranks"
    outputs = benchmark.pedantic(run, rounds=1, iterations=1)
    assert len(outputs) == ranks and len({json.dumps(o["flagged"]) for o in outputs}) == 1
    _RESULTS[f"{ranks}-rank K={k}"] = {"k": k, "seconds": max(o["seconds"] for o in outputs), "peak": None}


def _table() -> list[str]:
    lines = [
        "| case | K | scan wall s | ms per class | peak RSS rise MiB |",
        "|---|---:|---:|---:|---:|",
    ]
    for case, row in _RESULTS.items():
        peak = "-" if row["peak"] is None else f"{row['peak'] / 2**20:.0f}"
        lines.append(f"| {case} | {row['k']} | {row['seconds']:.2f} | {1e3 * row['seconds'] / row['k']:.1f} | {peak} |")

    def ratio(a, b, what):
        if a in _RESULTS and b in _RESULTS:
            value = _RESULTS[a]["seconds"] / _RESULTS[b]["seconds"]
            if what.startswith("per-class"):
                value *= _RESULTS[b]["k"] / _RESULTS[a]["k"]
            lines.append(f"- {what}: {value:.2f}x")

    lines.append("")
    ratio("loop K=100", "batched K=100", "batched speed-up over a per-class loop, K=100")
    ratio("batched K=10", "batched K=1000", "per-class time, K=10 over K=1000")
    ratio("1-rank K=100", "2-rank K=100", "2 ranks speed-up over 1 rank, K=100")
    return lines


@pytest.fixture(scope="module", autouse=True)
def _summary(request):
    yield
    if not _RESULTS:
        return
    lines = _table()
    header = (
        f"# Scan scaling (CPU, 1 thread per process, {os.cpu_count()} cores, torch {torch.__version__})\n\n"
        f"make_colour {SIDE}x{SIDE} px, {PER_CLASS} images per class, SmallCNN trained one epoch; scan config "
        f"{CONFIG}.\nWritten by `pytest benchmarks/bench_scale.py`; load average at the end "
        f"{os.getloadavg()[0]:.1f} (other work on the machine slows the 2-rank case most).\n\n"
    )
    RESULTS_FILE.parent.mkdir(parents=True, exist_ok=True)
    RESULTS_FILE.write_text(header + "\n".join(lines) + "\n")
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():
            reporter.section("scan scale")
            for line in lines:
                reporter.write_line(line)
