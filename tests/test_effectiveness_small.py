"""The effectiveness benchmark runs end to end: one quick cell always, the whole small grid when slow tests run."""

import json

import pytest
import torch

from benchmarks.effectiveness import __main__ as cli
from benchmarks.effectiveness.grid import Cell, drawn_grid, full_grid, small_grid
from benchmarks.effectiveness.report import markdown, write
from benchmarks.effectiveness.run import BAR_ASR, make_trigger, run_cell
from benchmarks.effectiveness.trajectory import find


def test_grids_cover_the_issue():
    small, full = small_grid(), full_grid()
    assert {c.attack for c in small} == {None, "badnets3", "blended", "badnets3_fixed"}
    assert {c.data for c in full} == {"mnist", "colour10", "colour43", "colour100"}
    assert {c.attack for c in full} >= {"badnets3", "badnets5", "badnets7", "badnets3_fixed", "trojan", "imc"}
    assert {c.rate for c in full} == {0.05, 0.1} and {c.budget for c in full} == {0.01, 0.05, 0.1}
    assert sum(c.attack is None and c.data == "mnist" for c in full) >= 5


def test_drawn_cells_are_the_same_every_run_and_each_trigger_stamps():
    cells = drawn_grid()
    assert cells == drawn_grid() and len({c.attack for c in cells}) > 6
    x = torch.rand(2, 3, 32, 32)
    for cell in cells:
        if cell.attack is not None:
            assert not torch.equal(make_trigger(cell.attack)(x), x), cell.name


def test_a_trajectory_takes_any_grid_cell_by_the_name_the_runner_prints():
    for grid in (small_grid, full_grid, drawn_grid):
        for cell in grid()[::7]:
            assert find(cell.name).name == cell.name
    with pytest.raises(ValueError, match="no grid cell is called 'mnist/nope'"):
        find("mnist/nope")


def test_one_cell_and_report(tmp_path):
    torch.set_num_threads(1)
    cell = Cell("mnist", attack="badnets3_fixed", epochs=1, defenses=("fine_tune", "neural_cleanse", "art_nc"))
    row = run_cell(cell, log=lambda s: None, only={"fine_tune", "art_nc"})
    assert row["defense_images"] == 350 and row["asr_before"] > 0.9 and not row["weak_attack"]
    res = row["defenses"]["fine_tune"]
    assert 0 <= res["ca_after"] <= 1 and 0 <= res["asr_after"] <= 1
    # Fine-tuning on 350 clean digits weakens the fixed-corner backdoor (ASR 0.98 -> about 0.5) but
    # leaves far more than the bar's 1%: the cell is a miss for fine_tune.
    assert res["asr_after"] < row["asr_before"] and res["asr_after"] > BAR_ASR
    assert res["bar"] is False
    assert "skipped" in row["defenses"]["art_nc"]  # ART's Neural Cleanse takes Keras models only
    paths = write([row], {"grid": "test", "threads": 1, "machine": "cpu", "seconds": 1.0}, tmp_path, "eff")
    assert json.loads((tmp_path / "eff.json").read_text())["rows"][0]["cell"] == cell.name
    assert "| fine_tune |" in (tmp_path / "eff.md").read_text()
    assert len(paths) >= 2


def test_report_counts_the_backdoored_models_baerase_passes():
    def row(attack, bar, weak=False):
        res = {"ca_after": 1.0, "asr_after": 0.0, "seconds": 1.0, "bar": bar}
        return {
            "cell": "c",
            "attack": attack,
            "weak_attack": weak,
            "ca_before": 1.0,
            "asr_before": 0.9,
            "defenses": {"baerase": res, "fine_tune": dict(res, bar=False)},
        }

    rows = [row("badnets3", True), row("badnets3", False, weak=True), row("imc", False), row(None, True)]
    text = markdown(rows, {"grid": "test", "threads": 1, "machine": "cpu", "seconds": 1.0})
    assert (
        "baerase meets the bar on 1 of 3 backdoored models; weak attacks (ASR before < 50%) among its misses: 1."
        in text
    )


@pytest.mark.slow
def test_small_grid(tmp_path):
    assert cli.main(["--grid", "small", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "effectiveness.json").read_text())["rows"]
    assert len(rows) == len(small_grid())
    for row in rows:
        assert set(row["defenses"]) == {"baerase", "fine_tune", "neural_cleanse"}
        assert all("ca_after" in r for r in row["defenses"].values())
