"""A torchrun-launched scan over 2 CPU ranks (gloo) equals the single-process scan."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from helpers import colour_scan_script

import baerase
from baerase import distributed

K = 6

SCRIPT = colour_scan_script(
    K,
    steps=8,
    chunk_size=2,
    body="""
    report = baerase.scan(model, x, y, config=config)
    rank = int(os.environ["RANK"])
    out = dict(classes=[[c.target, c.trigger_norm, c.attack_success, c.anomaly_index] for c in report.classes],
               flagged=report.flagged, triggers=None if report.triggers is None else report.triggers.targets.tolist(),
               mask=None if report.triggers is None else report.triggers.mask_logits.sum().item())
    with open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w") as handle:
        json.dump(out, handle)
    """,
)


def _single():
    from baerase.data import make_colour
    from baerase.models.nets import SmallCNN

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = SmallCNN(3, K, 8).eval()
    x, y = make_colour(K, 12, side=8)
    config = baerase.Config(steps=8, batch_size=8, eval_samples=32, chunk_size=2, progress=False)
    return baerase.scan(model, x, y, config=config)


def test_two_ranks_equal_one(tmp_path):
    script = tmp_path / "scan.py"
    script.write_text(SCRIPT)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(script),
        str(tmp_path),
    ]
    done = subprocess.run(
        cmd,
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]

    single = _single()
    want = [[c.target, c.trigger_norm, c.attack_success, c.anomaly_index] for c in single.classes]
    for rank in ranks:  # every rank reaches the single-process verdict and numbers
        assert rank["classes"] == want
        assert rank["flagged"] == single.flagged
    assert ranks[0]["triggers"] == list(range(K)) and ranks[1]["triggers"] is None
    assert ranks[0]["mask"] == pytest.approx(single.triggers.mask_logits.sum().item(), rel=1e-6)


def test_shard_is_round_robin_and_complete():
    chunks = [[0, 1], [2, 3], [4, 5], [6]]
    parts = [distributed.shard(chunks, r, 3) for r in range(3)]
    assert parts == [[[0, 1], [6]], [[2, 3]], [[4, 5]]]
    assert sorted(t for p in parts for c in p for t in c) == list(range(7))


def test_not_enabled_in_a_single_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert not dist.is_initialized() and not distributed.enabled()
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert distributed.enabled()
