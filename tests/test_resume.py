"""A scan killed with SIGKILL mid-way resumes from its checkpoints: same result, no corrupt file."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import colour_scan_script

import baerase
from baerase.errors import InputError

K, STEPS = 8, 60

SCRIPT = colour_scan_script(
    K,
    steps=STEPS,
    chunk_size=1,
    body="""
    report = baerase.scan(model, x, y, config=config, checkpoint=sys.argv[1])
    print(json.dumps([[c.trigger_norm, c.attack_success] for c in report.classes] + [report.flagged]))
    """,
)


def _run(script: Path, ckpt: Path, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(script), str(ckpt)], stdout=subprocess.PIPE, text=True, **kwargs)


def test_sigkill_then_resume(tmp_path):
    script = tmp_path / "scan.py"
    script.write_text(SCRIPT)
    ckpt = tmp_path / "ckpt"
    full = _run(script, tmp_path / "uninterrupted")
    victim = _run(script, ckpt)
    deadline = time.monotonic() + 60
    while len(list(ckpt.glob("chunk-*.safetensors"))) < 2:
        assert victim.poll() is None, "the scan finished before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL
    done = {p: p.stat().st_mtime_ns for p in ckpt.glob("chunk-*.safetensors")}
    assert 2 <= len(done) < K, "the kill must land mid-scan"

    resumed = _run(script, ckpt)
    out, _ = resumed.communicate(timeout=120)
    expected, _ = full.communicate(timeout=120)
    assert resumed.returncode == 0 and full.returncode == 0
    assert json.loads(out) == json.loads(expected)  # same per-class numbers, hence same verdict
    # Finished chunks were loaded, not recomputed, and every file on disk is whole.
    assert all(p.stat().st_mtime_ns == t for p, t in done.items())
    from safetensors.torch import load_file

    chunks = sorted(ckpt.glob("chunk-*.safetensors"))
    assert len(chunks) == K
    for path in chunks:
        assert "attack_success" in load_file(str(path))
    assert json.loads((ckpt / "scan.json").read_text())["fingerprint"]["targets"] == list(range(K))


def test_checkpoint_of_another_scan_is_refused(tmp_path):
    torch.set_num_threads(1)
    from baerase.data import make_colour
    from baerase.models.nets import SmallCNN

    model = SmallCNN(3, 3, 8).eval()
    x, y = make_colour(3, 8, side=8)
    config = baerase.Config(steps=2, batch_size=4, eval_samples=8, progress=False)
    first = baerase.scan(model, x, y, config=config, checkpoint=tmp_path)
    again = baerase.scan(model, x, y, config=config, checkpoint=tmp_path)
    assert [c.trigger_norm for c in first.classes] == [c.trigger_norm for c in again.classes]
    with pytest.raises(InputError, match="another scan"):
        baerase.scan(model, x, y, config=config.replace(steps=3), checkpoint=tmp_path)
    meta = tmp_path / "scan.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "format": 1}))  # written by an older baerase
    with pytest.raises(InputError, match="baerase version"):
        baerase.scan(model, x, y, config=config, checkpoint=tmp_path)


def test_truncated_chunk_is_recomputed(tmp_path):
    torch.set_num_threads(1)
    from baerase.data import make_colour
    from baerase.models.nets import SmallCNN

    model = SmallCNN(3, 3, 8).eval()
    x, y = make_colour(3, 8, side=8)
    config = baerase.Config(steps=2, batch_size=4, eval_samples=8, chunk_size=1, progress=False)
    first = baerase.scan(model, x, y, config=config, checkpoint=tmp_path)
    victim = sorted(tmp_path.glob("chunk-*.safetensors"))[1]
    victim.write_bytes(victim.read_bytes()[:40])
    again = baerase.scan(model, x, y, config=config, checkpoint=tmp_path)
    assert [c.trigger_norm for c in first.classes] == [c.trigger_norm for c in again.classes]
    assert os.path.getsize(victim) > 40
