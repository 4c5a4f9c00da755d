"""Models audited per hour by ``baerase.audit_many``: the local engine beside Ray with 1 and 2 workers.

    python -m pytest benchmarks/bench_fleet.py -s -p no:cacheprovider

A fleet of small MNIST models (12x12 digits, ``SmallCNN``; half with a 2x2 BadNets corner
backdoor, half clean; ``BAERASE_BENCH_FLEET_MODELS``, default 4) is audited with default settings
but 100 unlearning steps, once per engine, each time into a fresh output folder: in this process
one model after another (1 thread, and every CPU's thread), and as Ray tasks of 1 CPU each with 1
and 2 in flight (one GPU per task where the cluster has GPUs, so one task per GPU). The Ray cluster
is started once, before the timings; its start-up is reported on its own. Each run appends its
figures to benchmarks/results/fleet.md.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import baerase
from baerase.attacks import BadNets, train_backdoored, train_classifier
from baerase.data import load_mnist, split
from baerase.fleet import has_ray
from baerase.models import SmallCNN, save_model
from baerase.threads import available_cpus

RESULTS = Path(__file__).parent / "results" / "fleet.md"
MODELS = int(os.environ.get("BAERASE_BENCH_FLEET_MODELS", "4"))
ARCH = {"in_channels": 1, "num_classes": 10, "side": 12}
CONFIG = baerase.Config(min_steps=100)
CPUS = available_cpus()
# (engine, Ray tasks in flight, threads per task)
CASES = [("local", None, 1), ("local", None, CPUS), ("ray", 1, 1), ("ray", 2, 1)]
_figures: list[dict] = []
_ray_start: dict[str, float] = {}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    """(folder of MODELS model files, clean data file)."""
    images, labels = load_mnist()
    images = F.avg_pool2d(images[:, :, 2:26, 2:26], 2)
    train, (x, y), _ = split(images, labels, [0.5, 0.1, 0.2], seed=0)
    folder = tmp_path_factory.mktemp("fleet")
    torch.set_num_threads(1)
    for i in range(MODELS):
        torch.manual_seed(i)
        model = SmallCNN(**ARCH)
        if i % 2 == 0:
            target = (3 * i + 1) % 10
            model = train_backdoored(model, *train, BadNets(2, "corner", seed=1), target, rate=0.1, epochs=6, seed=i)
        else:
            model = train_classifier(model, *train, epochs=6, seed=i)
        save_model(model, folder / f"model{i:02d}.safetensors", arch="small_cnn", arch_kwargs=ARCH)
    data = folder.parent / "clean.npz"
    np.savez(data, images=x.numpy(), labels=y.numpy())
    return folder, data


@pytest.fixture(scope="module")
def ray_cluster():
    if not has_ray():
        pytest.skip("Ray is not installed (pip install 'baerase[ray]')")
    import ray

    start = time.perf_counter()
    ray.init(include_dashboard=False, log_to_driver=False)
    _ray_start["seconds"] = time.perf_counter() - start
    yield
    ray.shutdown()


@pytest.mark.parametrize(("engine", "workers", "threads"), CASES, ids=[f"{e}-{w or t}" for e, w, t in CASES])
def test_fleet_throughput(benchmark, request, fleet, tmp_path, engine, workers, threads):
    if engine == "ray":
        request.getfixturevalue("ray_cluster")
    folder, data = fleet
    options = {"data": str(data), "config": CONFIG, "engine": engine, "workers": workers, "cpus_per_task": threads}
    result = benchmark.pedantic(
        baerase.audit_many, args=(folder, tmp_path), kwargs={**options, "progress": False}, rounds=1
    )
    assert result.counts["ok"] == MODELS
    figures = {
        "engine": engine,
        "workers": workers or 1,
        "threads": threads,
        "seconds": result.seconds,
        "models_per_hour": result.models_per_hour,
        "flagged": sum(bool(row["flagged"]) for row in result.rows),
    }
    benchmark.extra_info.update(figures)
    _figures.append(figures)
    print(f"\n{engine} ({workers or 1} in flight, {threads} threads each): {result.models_per_hour:.0f} models/hour")
    if len(_figures) == len(CASES):
        _write()


def _write() -> None:
    base = next(f for f in _figures if f["engine"] == "local" and f["threads"] == 1)["seconds"]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {CPUS} cores"
    rows = [
        f"\n### {time.strftime('%Y-%m-%d %H:%M')} ({device}, {MODELS} models, baerase {baerase.__version__}, "
        f"load average {os.getloadavg()[0]:.1f} at the end)",
        "| engine | tasks in flight | threads per task | seconds | models per hour | speed over local, 1 thread "
        "| models flagged |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for f in _figures:
        rows.append(
            f"| {f['engine']} | {f['workers']} | {f['threads']} | {f['seconds']:.1f} | {f['models_per_hour']:.0f} "
            f"| {base / f['seconds']:.2f} | {f['flagged']} of {MODELS} |"
        )
    if "seconds" in _ray_start:
        rows.append(f"\nRay cluster start-up (not in the timings above): {_ray_start['seconds']:.1f}s")
    with RESULTS.open("a") as f:
        f.write("\n".join(rows) + "\n")
