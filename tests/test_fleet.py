"""Fleets: ``baerase.audit_many`` / ``baerase audit-many`` on Ray and in this process.

The fast tests audit a few tiny random models with tiny settings (the fleet's bookkeeping: outputs,
summaries, errors, resuming). The slow ones audit six trained MNIST models (three backdoored, three
clean) and a broken file, in this process and on a local Ray cluster of 2 CPU workers, and check
every verdict and that both engines write the same summary.
"""

from __future__ import annotations

import csv
import functools
import json
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import baerase
from baerase import Config, cli
from baerase.fleet import ERROR, OK, RESUMED, TIMING_FIELDS, ModelSpec, read_models
from baerase.models import SmallCNN, save_model

TINY = Config(steps=5, hidden=16, mine_hidden=8, batch_size=8, eval_samples=32, unlearn_epochs=1, seed=3)
TINY_ARCH = {"in_channels": 1, "num_classes": 4, "side": 8}


def untimed(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMING_FIELDS} for row in rows]


def csv_untimed(path) -> list[dict]:
    with open(path, newline="") as f:
        return untimed(list(csv.DictReader(f)))


def statuses(result) -> dict[str, str]:
    return {row["name"]: row["status"] for row in result.rows}


def tiny_model(path, seed: int) -> None:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        save_model(SmallCNN(**TINY_ARCH), path, arch="small_cnn", arch_kwargs=TINY_ARCH)


@pytest.fixture
def tiny_fleet(tmp_path):
    """A folder of three tiny models, a file that is no model, one with NaN weights; random 8x8 data."""
    folder = tmp_path / "models"
    folder.mkdir()
    for i in range(3):
        tiny_model(folder / f"net{i}.safetensors", seed=i)
    (folder / "broken.safetensors").write_bytes(b"not a model at all")
    nan = SmallCNN(**TINY_ARCH)
    with torch.no_grad():
        nan.out.weight.fill_(float("nan"))
    save_model(nan, folder / "nan.safetensors", arch="small_cnn", arch_kwargs=TINY_ARCH)
    rng = np.random.default_rng(0)
    data = tmp_path / "clean.npz"
    np.savez(data, images=rng.random((40, 1, 8, 8), dtype=np.float32), labels=np.arange(40) % 4)
    return folder, data


def run_tiny(folder, data, out, **options):
    return baerase.audit_many(folder, out, data=str(data), config=TINY, engine="local", progress=False, **options)


def test_local_fleet_writes_an_audit_per_model_and_summaries_with_errors_last(tiny_fleet, tmp_path):
    folder, data = tiny_fleet
    out = tmp_path / "out"
    result = run_tiny(folder, data, out)
    assert statuses(result) == {"net0": OK, "net1": OK, "net2": OK, "broken": ERROR, "nan": ERROR}
    assert [row["status"] for row in result.rows][-2:] == [ERROR, ERROR]  # sorted by suspicion, errors last
    reasons = {row["name"]: row["reason"] for row in result.rows}
    assert "broken.safetensors" in reasons["broken"] and "NaN" in reasons["nan"]
    for row in result.rows[:3]:
        report = json.loads((out / row["name"] / "report.json").read_text())
        assert (out / row["name"] / "model.safetensors").is_file()
        assert report["scan"]["provenance"]["model_file_sha256"] == row["sha256"]
        assert row["flagged"] == report["scan"]["flagged"] and row["num_classes"] == 4
        assert row["asr_before"] == report["erase"]["trigger_asr_before"]
        assert row["scan_images_per_class"] == round(report["scan"]["cost"]["forward"] / 4, 1) > 0
    assert not (out / "broken").exists() and not (out / "nan").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["models"] == result.rows and summary["counts"] == {OK: 3, RESUMED: 0, ERROR: 2}
    assert [row["name"] for row in csv_untimed(out / "summary.csv")] == [row["name"] for row in result.rows]
    markdown = (out / "summary.md").read_text()
    assert all(row["name"] in markdown for row in result.rows) and "## Errors" in markdown


def test_rerun_skips_finished_audits_and_redoes_changed_models(tiny_fleet, tmp_path):
    folder, data = tiny_fleet
    out = tmp_path / "out"
    first = run_tiny(folder, data, out)
    again = run_tiny(folder, data, out)
    assert statuses(again) == {"net0": RESUMED, "net1": RESUMED, "net2": RESUMED, "broken": ERROR, "nan": ERROR}
    # A resumed model's row is read back from its report: the same as when it was audited.
    ignore = {"status", *TIMING_FIELDS}
    assert [{k: v for k, v in r.items() if k not in ignore} for r in again.rows] == [
        {k: v for k, v in r.items() if k not in ignore} for r in first.rows
    ]
    tiny_model(folder / "net1.safetensors", seed=10)  # the file changed: its old report no longer applies
    changed = run_tiny(folder, data, out)
    assert statuses(changed)["net1"] == OK and statuses(changed)["net0"] == RESUMED
    assert changed.counts == {OK: 1, RESUMED: 2, ERROR: 2}
    assert run_tiny(folder, data, out, overwrite=True).counts[OK] == 3


class SimulatedKillError(Exception):
    """Stands in for the fleet process being killed."""


def kill_after(count: int):
    audited = []

    def on_result(row: dict) -> None:
        if row["status"] == OK:
            audited.append(row["name"])
            if len(audited) == count:
                raise SimulatedKillError

    return on_result


def test_killed_run_audits_only_the_rest_when_started_again(tiny_fleet, tmp_path):
    folder, data = tiny_fleet
    out = tmp_path / "out"
    with pytest.raises(SimulatedKillError):
        run_tiny(folder, data, out, on_result=kill_after(2))
    assert not (out / "summary.json").exists()
    result = run_tiny(folder, data, out)
    assert result.counts == {OK: 1, RESUMED: 2, ERROR: 2}


def test_manifests_give_each_model_its_own_settings(tmp_path):
    (tmp_path / "a.pt").write_bytes(b"")
    (tmp_path / "b.pt").write_bytes(b"")
    rows = [
        {"model": "a.pt", "arch": "small_cnn", "data": "mnist", "arch_kwargs": {"side": 12}},
        {"model": "b.pt", "name": "second", "normalize": "0.5:0.25", "arch_kwargs": "num_classes=4;side=8"},
    ]
    (tmp_path / "fleet.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n# a comment\n")
    specs = read_models(tmp_path / "fleet.jsonl", data="colour10", arch="resnet18")
    assert specs == [
        ModelSpec(str(tmp_path / "a.pt"), "mnist", "small_cnn", {"side": 12}, None, "a"),
        ModelSpec(
            str(tmp_path / "b.pt"), "colour10", "resnet18", {"num_classes": 4, "side": 8}, ((0.5,), (0.25,)), "second"
        ),
    ]
    with open(tmp_path / "fleet.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["model", "arch", "data", "normalize", "arch_kwargs"])
        writer.writeheader()
        writer.writerow({"model": "a.pt", "arch": "small_cnn", "arch_kwargs": '{"side": 12}'})
        writer.writerow({"model": "b.pt", "data": "mnist", "normalize": "0.1,0.2,0.3:1,1,1"})
    specs = read_models(tmp_path / "fleet.csv", data="colour10")
    assert [(s.name, s.data, s.arch, s.arch_kwargs) for s in specs] == [
        ("a", "colour10", "small_cnn", {"side": 12}),
        ("b", "mnist", None, {}),
    ]
    assert specs[1].normalize == ((0.1, 0.2, 0.3), (1.0, 1.0, 1.0))


@pytest.mark.parametrize(
    ("rows", "words"),
    [
        ([{"model": "a.pt"}], "no clean data"),
        ([{"model": "a.pt", "data": "mnist"}, {"model": "x/a.pt", "data": "mnist"}], "two models are named"),
        ([{"model": "a.pt", "data": "mnist", "normalize": "0.5"}], "MEAN:STD"),
        ([{"model": "a.pt", "data": "mnist", "name": "../up"}], "cannot name a folder"),
        ([{"model": "a.pt", "data": "mnist", "colour": 3}], "unknown keys"),
    ],
)
def test_bad_fleet_descriptions_are_refused_with_the_reason(rows, words):
    with pytest.raises(baerase.InputError, match=words):
        read_models(rows)


def test_cli_audit_many_without_ray(tiny_fleet, tmp_path, capsys, monkeypatch):
    tiny = functools.partial(Config, hidden=16, mine_hidden=8, batch_size=8, eval_samples=32, unlearn_epochs=1)
    monkeypatch.setattr(cli, "PRESETS", {"fast": tiny, "paper": tiny, "short-erase": tiny})
    folder, data = tiny_fleet
    os.remove(folder / "broken.safetensors")
    os.remove(folder / "nan.safetensors")
    out = tmp_path / "out"
    argv = ["audit-many", str(folder), "--data", str(data), "--out", str(out), "--no-ray", "--quiet", "--steps", "5"]
    assert cli.main(argv) == 0
    assert "3 models (3 ok)" in capsys.readouterr().out
    (folder / "broken.safetensors").write_bytes(b"junk")
    assert cli.main(argv) == 3  # some model failed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"] == {OK: 0, RESUMED: 3, ERROR: 1} and summary["run"]["engine"] == "local"
    assert all(r["num_classes"] == 4 for r in summary["models"] if r["status"] != ERROR)


def test_without_ray_the_fleet_runs_here_and_asking_for_ray_says_how_to_get_it(tiny_fleet, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    folder, data = tiny_fleet
    result = baerase.audit_many(folder, tmp_path / "out", data=str(data), config=TINY, progress=False)
    assert result.engine == "local" and result.counts[OK] == 3
    with pytest.raises(baerase.InputError, match=r"baerase\[ray\]"):
        baerase.audit_many(folder, tmp_path / "other", data=str(data), config=TINY, engine="ray")


# ---- Ray -------------------------------------------------------------------------------------------------


class ExitingNet(nn.Module):
    """An architecture whose construction ends the process, as a worker killed by the machine; each
    attempt first adds a line to ``tally``."""

    def __init__(self, tally: str) -> None:
        super().__init__()
        with open(tally, "a") as f:
            f.write("attempt\n")
        os._exit(1)


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray cluster of 2 CPUs; its workers find this module (the ExitingNet architecture)."""
    ray = pytest.importorskip("ray")
    here = os.path.dirname(os.path.abspath(__file__))
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=100 * 2**20,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))}},
    )
    yield ray
    ray.shutdown()


def test_ray_fleet_writes_the_same_summary_as_the_local_one(ray_cluster, tiny_fleet, tmp_path):
    folder, data = tiny_fleet
    local = run_tiny(folder, data, tmp_path / "local")
    on_ray = baerase.audit_many(folder, tmp_path / "ray", data=str(data), config=TINY, engine="ray", progress=False)
    assert on_ray.engine == "ray" and untimed(on_ray.rows) == untimed(local.rows)
    assert csv_untimed(tmp_path / "ray" / "summary.csv") == csv_untimed(tmp_path / "local" / "summary.csv")


@pytest.mark.slow
def test_a_dead_ray_worker_is_retried_once_then_reported(ray_cluster, tiny_fleet, tmp_path):
    folder, data = tiny_fleet
    save_model(SmallCNN(**TINY_ARCH), tmp_path / "dies.safetensors")
    tally = tmp_path / "attempts.txt"
    dies = {
        "model": str(tmp_path / "dies.safetensors"),
        "arch": "test_fleet:ExitingNet",
        "arch_kwargs": {"tally": str(tally)},
    }
    models = [dies, str(folder / "net0.safetensors")]
    result = baerase.audit_many(models, tmp_path / "out", data=str(data), config=TINY, engine="ray", progress=False)
    assert statuses(result) == {"net0": OK, "dies": ERROR}
    assert tally.read_text().count("attempt") == 2  # the first try and one retry
    assert "worker failed twice" in result.rows[1]["reason"]


# ---- six trained MNIST models (slow) ------------------------------------------------------------------------

BACKDOORED = {"badnets_t1": (1, 0), "badnets_t4": (4, 1), "badnets_t7": (7, 2)}  # name: (target, seed)
CLEAN = {"clean_s0": 0, "clean_s1": 1, "clean_s2": 2}
MNIST_ARCH = {"in_channels": 1, "num_classes": 10, "side": 12}
# Default settings but 100 unlearning steps (default 800): enough to erase a 2x2 corner patch on these models.
FLEET = Config(min_steps=100)


def mnist12():
    """The embedded MNIST digits at 12x12 (centre 24x24, averaged 2x2): train, clean and test splits."""
    from baerase.data import load_mnist, split

    images, labels = load_mnist()
    images = F.avg_pool2d(images[:, :, 2:26, 2:26], 2)
    return split(images, labels, [0.5, 0.1, 0.2], seed=0)


def train_mnist(train, target: int | None, seed: int) -> nn.Module:
    """A SmallCNN on 12x12 digits, with a 2x2 BadNets corner backdoor into ``target`` unless it is None."""
    from baerase.attacks import BadNets, train_backdoored, train_classifier

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = SmallCNN(**MNIST_ARCH)
            if target is None:
                return train_classifier(model, *train, epochs=6, seed=seed)
            return train_backdoored(model, *train, BadNets(2, "corner", seed=1), target, rate=0.1, epochs=6, seed=seed)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def mnist_fleet(tmp_path_factory):
    """(folder of 6 models and a broken file, clean data file, expected flags per model name)."""
    train, (x, y), _ = mnist12()
    folder = tmp_path_factory.mktemp("mnist_fleet")
    expected = {}
    for name, (target, seed) in BACKDOORED.items():
        save_model(
            train_mnist(train, target, seed), folder / f"{name}.safetensors", arch="small_cnn", arch_kwargs=MNIST_ARCH
        )
        expected[name] = [target]
    for name, seed in CLEAN.items():
        save_model(
            train_mnist(train, None, seed), folder / f"{name}.safetensors", arch="small_cnn", arch_kwargs=MNIST_ARCH
        )
        expected[name] = []
    (folder / "truncated.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    data = folder.parent / "mnist12_clean.npz"
    np.savez(data, images=x.numpy(), labels=y.numpy())
    return folder, data, expected


@pytest.fixture(scope="module")
def local_fleet(mnist_fleet, tmp_path_factory):
    folder, data, _ = mnist_fleet
    out = tmp_path_factory.mktemp("local_out")
    return baerase.audit_many(folder, out, data=str(data), config=FLEET, engine="local", progress=False)


def check_verdicts(result, expected: dict) -> None:
    rows = {row["name"]: row for row in result.rows}
    assert rows.pop("truncated")["status"] == ERROR
    assert {name: row["flagged"] for name, row in rows.items()} == expected
    assert all(row["status"] in (OK, RESUMED) and row["verified"] for row in rows.values())
    for name in BACKDOORED:  # the recovered triggers worked before the erase and hardly after it
        assert rows[name]["asr_before"] > 0.5 and rows[name]["asr_after"] < 0.05, rows[name]
    assert [row["name"] for row in result.rows[:3]] == sorted(BACKDOORED, key=lambda n: -rows[n]["max_anomaly_index"])


@pytest.mark.slow
def test_local_fleet_gets_every_verdict_right(local_fleet, mnist_fleet):
    check_verdicts(local_fleet, mnist_fleet[2])
    assert local_fleet.counts == {OK: 6, RESUMED: 0, ERROR: 1}


@pytest.mark.slow
def test_ray_fleet_of_two_workers_writes_the_same_summary(ray_cluster, local_fleet, mnist_fleet, tmp_path):
    folder, data, expected = mnist_fleet
    result = baerase.audit_many(folder, tmp_path, data=str(data), config=FLEET, engine="ray", workers=2, progress=False)
    check_verdicts(result, expected)
    assert untimed(result.rows) == untimed(local_fleet.rows)
    assert csv_untimed(tmp_path / "summary.csv") == csv_untimed(local_fleet.out / "summary.csv")


@pytest.mark.slow
def test_killed_ray_fleet_audits_only_the_rest(ray_cluster, mnist_fleet, tmp_path):
    folder, data, expected = mnist_fleet
    options = {"data": str(data), "config": FLEET, "engine": "ray", "workers": 2, "progress": False}
    with pytest.raises(SimulatedKillError):
        baerase.audit_many(folder, tmp_path, on_result=kill_after(2), **options)
    # Tasks in flight when the driver stopped were cancelled; those that had written their report count.
    written = {p.name for p in tmp_path.iterdir() if (p / "report.json").is_file()}
    assert 2 <= len(written) < 6
    result = baerase.audit_many(folder, tmp_path, **options)
    assert {n for n, s in statuses(result).items() if s == RESUMED} == written
    assert result.counts == {OK: 6 - len(written), RESUMED: len(written), ERROR: 1}
    check_verdicts(result, expected)
