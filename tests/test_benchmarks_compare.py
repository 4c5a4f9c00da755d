"""benchmarks.compare: a run within the baseline's tolerances passes; a slower one (a worse same-run
speed-up), a costlier one (more model images per class) or a changed verdict fails, naming the
benchmark and the figure. The runs here are pytest-benchmark JSON files written by the test."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from baerase.models import SmallCNN, save_model
from benchmarks import compare

ROOT = Path(__file__).resolve().parents[1]

OP = "test_trigger_apply[cpu-K4-B16-3x32x32-m1-float32-forward-cpp]"
REF = "test_trigger_apply[cpu-K4-B16-3x32x32-m1-float32-forward-ref]"
SCAN = "test_scan[cpu-mnist-cpp]"


def bench(name: str, params: dict, **extra_info) -> dict:
    """One benchmark entry as pytest-benchmark saves it (the fields compare reads, and stats)."""
    stats = {"min": 0.001, "median": 0.0012, "mean": 0.0013, "rounds": 20}
    return {"group": None, "name": name, "fullname": f"benchmarks/bench.py::{name}", "params": params,
            "extra_info": extra_info, "stats": stats}  # fmt: skip


def make_run(speedup: float = 2.5, images: float = 1450.0, flagged=(0,)) -> dict:
    return {
        "machine_info": {"cpu": {"brand_raw": "test CPU", "count": 2}},
        "benchmarks": [
            bench(REF, {"provider": "ref"}, provider="ref", speedup_vs_ref=1.0),
            bench(OP, {"provider": "cpp"}, provider="cpp", speedup_vs_ref=speedup),
            bench(SCAN, {"backend": "cpp"}, images_per_class=images, flagged=list(flagged), speedup_vs_ref=1.3),
        ],
        "version": "5.3.1",
    }


def write(path, data) -> str:
    path.write_text(json.dumps(data))
    return str(path)


@pytest.fixture
def baseline(tmp_path):
    """A baseline accepted from a fresh run (``--update``)."""
    path = tmp_path / "baseline.json"
    assert compare.main([write(tmp_path / "fresh.json", make_run()), "--baseline", str(path), "--update"]) == 0
    return path


def run_compare(capsys, run_path, baseline) -> tuple[int, str]:
    code = compare.main([run_path, "--baseline", str(baseline)])
    out = capsys.readouterr()
    return code, out.out + out.err


def test_update_writes_each_figure_with_its_tolerance_and_skips_the_references_own_ratio(baseline):
    data = json.loads(baseline.read_text())["benchmarks"]
    assert set(data) == {OP, SCAN}, "the reference's speed-up over itself is not a figure"
    assert data[OP] == {"speedup_vs_ref": {"value": 2.5, "tolerance": compare.TOLERANCES["ratio"]}}
    assert data[SCAN]["images_per_class"] == {"value": 1450.0, "tolerance": compare.TOLERANCES["count"]}
    assert data[SCAN]["flagged"] == {"value": [0]}


def test_a_fresh_like_run_within_the_tolerances_passes(baseline, tmp_path, capsys):
    # A noisier machine: the ratio 20% lower, 2% more images; same verdict.
    code, out = run_compare(capsys, write(tmp_path / "run.json", make_run(speedup=2.0, images=1479.0)), baseline)
    assert code == 0, out
    assert "4 figures compared, 0 outside their tolerance" in out


def test_a_slowed_run_fails_naming_the_benchmark_and_the_figure(baseline, tmp_path, capsys):
    code, out = run_compare(capsys, write(tmp_path / "slow.json", make_run(speedup=1.2)), baseline)
    assert code == 1
    failures = [line for line in out.splitlines() if line.startswith("FAIL")]
    assert failures == [f"FAIL {OP} speedup_vs_ref: 1.2, wanted >= 1.5 (baseline 2.5 - 40%)"]


def test_more_model_images_per_class_or_a_changed_verdict_fail(baseline, tmp_path, capsys):
    code, out = run_compare(capsys, write(tmp_path / "costly.json", make_run(images=1600.0)), baseline)
    assert code == 1 and f"FAIL {SCAN} images_per_class: 1600" in out
    code, out = run_compare(capsys, write(tmp_path / "blind.json", make_run(flagged=())), baseline)
    assert code == 1 and f"FAIL {SCAN} flagged: [], wanted == [0]" in out


def test_a_tolerance_stated_in_the_baseline_is_the_one_applied(baseline, tmp_path, capsys):
    data = json.loads(baseline.read_text())
    data["benchmarks"][OP]["speedup_vs_ref"]["tolerance"] = 0.6
    baseline.write_text(json.dumps(data))
    code, out = run_compare(capsys, write(tmp_path / "slow.json", make_run(speedup=1.2)), baseline)
    assert code == 0, out
    # --update keeps a stated tolerance and the benchmarks the run does not hold.
    only_op = make_run(speedup=3.0)
    only_op["benchmarks"] = only_op["benchmarks"][:2]
    assert compare.main([write(tmp_path / "op.json", only_op), "--baseline", str(baseline), "--update"]) == 0
    data = json.loads(baseline.read_text())["benchmarks"]
    assert data[OP]["speedup_vs_ref"] == {"value": 3.0, "tolerance": 0.6} and SCAN in data


def test_a_baseline_from_several_runs_takes_each_figure_at_its_worst(tmp_path):
    runs = [write(tmp_path / "a.json", make_run(speedup=3.0, images=1400.0)), write(tmp_path / "b.json", make_run())]
    path = tmp_path / "baseline.json"
    assert compare.main([*runs, "--baseline", str(path), "--update"]) == 0
    data = json.loads(path.read_text())["benchmarks"]
    assert data[OP]["speedup_vs_ref"]["value"] == 2.5 and data[SCAN]["images_per_class"]["value"] == 1450.0
    disagree = write(tmp_path / "c.json", make_run(flagged=(3,)))
    assert compare.main([*runs, disagree, "--baseline", str(path), "--update"]) == 2, "verdicts differ between runs"
    assert compare.main([*runs, "--baseline", str(path)]) == 2, "a comparison takes one run"


def test_default_run_is_the_latest_in_the_history_folder(baseline, tmp_path, capsys):
    history = tmp_path / "history" / "Linux-CPython-3.11-64bit"
    history.mkdir(parents=True)
    old = write(history / "0001_fresh.json", make_run())
    new = write(history / "0002_slow.json", make_run(speedup=1.0))
    os.utime(old, (1_000, 1_000))
    code = compare.main(["--history", str(tmp_path / "history"), "--baseline", str(baseline)])
    assert code == 1 and "0002_slow.json" in capsys.readouterr().out
    os.utime(new, (500, 500))
    assert compare.main(["--history", str(tmp_path / "history"), "--baseline", str(baseline)]) == 0


def test_no_run_or_a_run_sharing_no_figure_is_an_error(baseline, tmp_path, capsys):
    assert compare.main(["--history", str(tmp_path / "empty"), "--baseline", str(baseline)]) == 2
    assert "no saved benchmark run under" in capsys.readouterr().err
    other = {"benchmarks": [bench("test_other[x]", {}, speedup_vs_ref=2.0)]}
    code, out = run_compare(capsys, write(tmp_path / "other.json", other), baseline)
    assert code == 2 and "holds none of the baseline's figures" in out
    code, out = run_compare(capsys, write(tmp_path / "junk.json", ["not", "a", "run"]), baseline)
    assert code == 2 and "is not a JSON object" in out


def test_the_committed_baseline_passes_its_own_figures_and_fails_a_halved_ratio(tmp_path, capsys):
    committed = json.loads(compare.BASELINE.read_text())["benchmarks"]
    assert committed, "benchmarks/baseline.json holds no benchmark"
    entries = [bench(name, {}, **{f: e["value"] for f, e in figures.items()}) for name, figures in committed.items()]
    code, out = run_compare(capsys, write(tmp_path / "same.json", {"benchmarks": entries}), compare.BASELINE)
    assert code == 0, out
    name = next(n for n, figures in committed.items() if "speedup_vs_ref" in figures)
    slowed = next(e for e in entries if e["name"] == name)
    slowed["extra_info"]["speedup_vs_ref"] /= 2
    code, out = run_compare(capsys, write(tmp_path / "slowed.json", {"benchmarks": entries}), compare.BASELINE)
    assert code == 1 and f"FAIL {name} speedup_vs_ref" in out


def test_a_users_own_model_is_benchmarked_then_tracked_against_its_own_baseline(tmp_path):
    torch.manual_seed(0)
    model = save_model(SmallCNN(1, 4, 8), tmp_path / "model.safetensors")
    rng = np.random.default_rng(0)
    data = tmp_path / "clean.npz"
    np.savez(data, images=rng.random((40, 1, 8, 8), dtype=np.float32), labels=np.arange(40) % 4)
    arch = "--arch small_cnn --arch-arg in_channels=1 --arch-arg num_classes=4 --arch-arg side=8"
    env = dict(os.environ, BAERASE_BENCH_SCAN=f"{model} {arch} --data {data} --steps 5 --threads 1")
    env["BAERASE_BENCH_NAME"] = "tiny"
    history, baseline = tmp_path / "history", tmp_path / "mine.json"
    command = [sys.executable, "-m", "pytest", "benchmarks/bench_custom.py", "-q", "-p", "no:cacheprovider"]
    command += ["--benchmark-autosave", f"--benchmark-storage={history}"]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0 and "1 passed" in done.stdout, done.stdout[-3000:] + done.stderr[-3000:]
    assert compare.main(["--history", str(history), "--baseline", str(baseline), "--update"]) == 0
    figures = json.loads(baseline.read_text())["benchmarks"]["test_custom_scan[tiny]"]
    assert set(figures) == {"images_per_class", "flagged"} and figures["images_per_class"]["value"] > 0
    assert compare.main(["--history", str(history), "--baseline", str(baseline)]) == 0
