"""Your own model in the benchmark suite: its scan tracked over baerase releases.

``BAERASE_BENCH_SCAN`` holds the arguments you would give ``baerase scan`` (the model file, its
``--arch``, ``--data``, ``--normalize``, settings such as ``--steps``); this benchmark loads them
the way the command line does, scans once and records the model images per class and the flagged
classes in ``benchmark.extra_info``, where ``python -m benchmarks.compare`` reads them. Skipped
when the variable is unset. ``BAERASE_BENCH_NAME`` names the case (default ``custom``), so that
several models can share one baseline.

    export BAERASE_BENCH_SCAN="model.safetensors --arch resnet18 --arch-arg num_classes=43 --data clean/"
    python -m pytest benchmarks/bench_custom.py --benchmark-autosave --benchmark-storage=benchmarks/.history
    python -m benchmarks.compare --baseline my-baseline.json --update   # once, on the release you trust
    python -m benchmarks.compare --baseline my-baseline.json            # after every later release
"""

from __future__ import annotations

import os
import shlex

import pytest

import baerase
from baerase import cli

SCAN_ARGS = os.environ.get("BAERASE_BENCH_SCAN", "")
NAME = os.environ.get("BAERASE_BENCH_NAME", "custom")


@pytest.mark.skipif(not SCAN_ARGS.strip(), reason="set BAERASE_BENCH_SCAN to the arguments of `baerase scan`")
@pytest.mark.parametrize("name", [NAME])
def test_custom_scan(benchmark, name):
    args = cli.build_parser().parse_args(["scan", "--quiet", *shlex.split(SCAN_ARGS)])
    model, images, labels, normalize = cli._load_inputs(args)
    config = cli._config(args)
    benchmark.group = "scan custom"
    report = benchmark.pedantic(
        baerase.scan, args=(model, images, labels), kwargs={"normalize": normalize, "config": config}, rounds=1
    )
    k = report.num_classes
    benchmark.extra_info.update(
        images_per_class=round(report.cost.per_class(k), 1),
        flagged=report.flagged,
        phases=report.cost.to_dict()["phases"],
        settings=report.config,
        baerase=baerase.__version__,
    )
