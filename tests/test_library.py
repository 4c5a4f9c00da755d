"""baerase as a library inside a scanner service: logs instead of prints, scans in threads, budgets
that end an audit cleanly, and a report.json that a shipped JSON Schema describes."""

from __future__ import annotations

import ast
import json
import logging
import threading
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import torch
from helpers import assert_same_state, snapshot, tiny_model

import baerase
from baerase import cli, threads
from baerase.models import save_model
from baerase.report import SCHEMA_VERSION
from baerase.schema import report_schema

# The tiny data sets leave erase's guard too few images, and its unlearning nothing to keep: both warn.
pytestmark = pytest.mark.filterwarnings("ignore:erase holds out", "ignore:erase could not unlearn")

# The mask family alone (no warp fallback): these tests count and cut its model calls.
TINY = {"steps": 10, "hidden": 16, "mine_hidden": 8, "batch_size": 8, "eval_samples": 32, "fallback": ()}
ERASE = {**TINY, "unlearn_epochs": 1, "min_steps": 10}
SCHEMA = report_schema()
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)


def images(n: int = 60, channels: int = 1, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(n, channels, 8, 8, generator=generator), torch.arange(n) % 4


def valid(document: dict, part: str | None = None) -> dict:
    """``document`` after checking it against report.schema.json (``part``: one of its ``$defs``)."""
    schema = SCHEMA if part is None else {"$defs": SCHEMA["$defs"], "$ref": f"#/$defs/{part}"}
    jsonschema.Draft202012Validator(schema).validate(document)
    return document


def evidence(report: baerase.ScanReport) -> list[tuple]:
    return [(c.target, c.attack_success, c.trigger_norm, c.anomaly_index, c.flagged) for c in report.classes]


@pytest.fixture(scope="module")
def flagged_report():
    """A scan of the tiny model with class 0 marked flagged, so that erase has something to unlearn."""
    x, y = images()
    report = baerase.scan(tiny_model(), x, y, config=baerase.Config(**TINY))
    report.classes[0].flagged = True
    return report


# ---- logging and progress ----------------------------------------------------------------------------


def test_library_code_never_prints():
    """Only the command line writes to stdout; the library logs under the ``baerase`` logger."""
    package = Path(baerase.__file__).parent
    printing = [
        f"{path.relative_to(package)}:{node.lineno}"
        for path in package.rglob("*.py")
        if path.name != "cli.py"
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print"
    ]
    assert printing == []
    assert any(isinstance(h, logging.NullHandler) for h in logging.getLogger("baerase").handlers)


def test_progress_bars_are_off_unless_asked():
    assert baerase.Config().run.progress is False
    parsed = cli.build_parser().parse_args(["scan", "model.pt", "--data", "mnist"])
    assert cli._config(parsed).run.progress is False  # stderr is not a terminal under pytest


def test_the_cli_shows_library_logs_on_stderr_while_it_runs(tmp_path, capsys, monkeypatch):
    def scan_that_logs(*args, **kwargs):
        logging.getLogger("baerase.recover").info("a note")
        logging.getLogger("baerase.ops").warning("a warning")
        raise baerase.InputError("stop here")

    monkeypatch.setattr(baerase.api, "scan", scan_that_logs)
    model, data = save_model(tiny_model(), tmp_path / "model.safetensors"), tmp_path / "data.npz"
    np.savez(data, images=images()[0].numpy(), labels=images()[1].numpy())
    argv = ["scan", str(model), "--arch", "helpers:TinyNet", "--data", str(data)]
    assert cli.main(argv) == 2
    assert capsys.readouterr().err.splitlines() == [
        "a note",
        "baerase: warning: a warning",
        "baerase: error: stop here",
    ]
    assert cli.main([*argv, "--quiet"]) == 2
    assert capsys.readouterr().err.splitlines() == ["baerase: warning: a warning", "baerase: error: stop here"]
    logger = logging.getLogger("baerase")
    assert logger.level == logging.NOTSET and all(isinstance(h, logging.NullHandler) for h in logger.handlers)


# ---- threads -----------------------------------------------------------------------------------------


def _two_scans():
    """Two different seeded scans: a 1-channel mask-family and a 3-channel patch-family model."""
    first = (tiny_model(seed=0), *images(seed=0), baerase.Config(**TINY, chunk_size=2, seed=5))
    second = (tiny_model(3, seed=1), *images(channels=3, seed=1), baerase.Config(**TINY, family="patch", seed=7))
    return [first, second]


def _in_threads(jobs, together: bool) -> list:
    """``baerase.scan`` of each job, each in its own thread: started at once, or one after the other."""
    results, barrier = [None] * len(jobs), threading.Barrier(len(jobs) if together else 1)

    def run(i: int, model, x, y, config) -> None:
        barrier.wait()
        results[i] = baerase.scan(model, x, y, config=config)

    workers = [threading.Thread(target=run, args=(i, *job)) for i, job in enumerate(jobs)]
    for worker in workers:
        worker.start()
        if not together:
            worker.join()
    for worker in workers:
        worker.join()
    return results


def test_two_scans_in_two_threads_match_the_same_scans_one_after_the_other():
    rng_state, thread_count = torch.get_rng_state(), torch.get_num_threads()
    alone = _in_threads(_two_scans(), together=False)
    together = _in_threads(_two_scans(), together=True)
    assert [evidence(r) for r in together] == [evidence(r) for r in alone]
    assert [r.flagged for r in together] == [r.flagged for r in alone]
    assert [r.cost.forward for r in together] == [r.cost.forward for r in alone]
    # No process-wide state was touched: the caller's RNG stream and torch's thread count.
    assert torch.equal(torch.get_rng_state(), rng_state) and torch.get_num_threads() == thread_count


def test_scan_and_erase_leave_the_global_rng_alone(flagged_report):
    x, y = images()
    state = torch.get_rng_state()
    baerase.scan(tiny_model(), x, y, config=baerase.Config(**TINY, family="patch"))
    baerase.erase(tiny_model(), x, y, flagged_report, config=baerase.Config(**ERASE))
    assert torch.equal(torch.get_rng_state(), state)  # nothing drew from it or reseeded it


def test_overriding_threads_from_two_threads_at_once_warns(caplog):
    inside, leave = threading.Event(), threading.Event()

    def hold() -> None:
        with threads.using_threads(1):
            inside.set()
            leave.wait(10)

    worker = threading.Thread(target=hold)
    worker.start()
    inside.wait(10)
    with caplog.at_level(logging.WARNING, logger="baerase"), threads.using_threads(1):
        pass
    leave.set()
    worker.join()
    assert "leave threads=None for concurrent scans" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="baerase"), threads.using_threads(1):
        pass
    assert caplog.text == ""  # alone again


# ---- budgets -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("knobs", "words"),
    [
        ({"max_seconds": 0}, "max_seconds must be a positive"),
        ({"max_seconds": True}, "max_seconds must be a positive"),
        ({"max_seconds": float("inf")}, "max_seconds must be a positive"),
        ({"max_model_images": 0}, "max_model_images must be a positive integer"),
        ({"max_model_images": 1.5}, "max_model_images must be a positive integer"),
    ],
)
def test_bad_budgets_are_refused(knobs, words):
    with pytest.raises(baerase.ConfigError, match=words):
        baerase.Config(**knobs)


def test_image_budget_ends_the_scan_with_the_classes_it_finished(tmp_path):
    x, y = images()
    config = baerase.Config(**TINY, chunk_size=1)
    full = baerase.scan(tiny_model(), x, y, config=config)
    limit = full.cost.forward // 2
    cut = baerase.scan(tiny_model(), x, y, config=config.replace(max_model_images=limit))
    assert cut.cut_short.startswith(f"model-image budget (max_model_images={limit:,}) spent during recovery")
    assert cut.cost.forward <= limit
    assert 0 < len(cut.classes) < len(full.classes) and cut.flagged == []
    # Each chunk's result depends only on its own classes: the finished ones are the full scan's.
    done = [c.target for c in cut.classes]
    assert [(c.attack_success, c.trigger_norm) for c in cut.classes] == [
        (c.attack_success, c.trigger_norm) for c in full.classes if c.target in done
    ]
    assert "INCONCLUSIVE" in cut.summary() and "no backdoor found" not in cut.summary()
    assert baerase.ScanReport.load(baerase.write_outputs(tmp_path / "cut", cut, x)).cut_short == cut.cut_short
    valid(json.loads((tmp_path / "cut" / "report.json").read_text()))


def test_time_budget_ends_the_scan_before_its_first_model_call():
    x, y = images()
    report = baerase.scan(tiny_model(), x, y, config=baerase.Config(**TINY, max_seconds=1e-9))
    assert report.cut_short == "time budget (max_seconds=1e-09) spent during recovery"
    assert report.classes == [] and report.cost.forward == 0 and report.triggers is None
    valid(report.to_dict(), "scan")


def test_a_cut_scan_resumes_from_its_checkpoints_under_a_larger_budget(tmp_path):
    x, y = images()
    config = baerase.Config(**TINY, chunk_size=1)
    full = baerase.scan(tiny_model(), x, y, config=config)
    cut = baerase.scan(tiny_model(), x, y, config=config.replace(max_model_images=200), checkpoint=tmp_path)
    resumed = baerase.scan(tiny_model(), x, y, config=config, checkpoint=tmp_path)
    assert cut.cut_short and resumed.cut_short is None
    assert evidence(resumed) == evidence(full)
    assert resumed.cost.forward < full.cost.forward  # the finished chunks were loaded, not recomputed


def test_a_budget_spent_during_confirmation_confirms_nothing(backdoored):
    x, y = backdoored.clean
    config = baerase.Config(steps=100, batch_size=12)
    full = baerase.scan(backdoored.model, x, y, config=config)
    assert full.flagged == [backdoored.target]
    limit = full.cost.phases["recovery"].forward + 1
    cut = baerase.scan(backdoored.model, x, y, config=config.replace(max_model_images=limit))
    assert cut.flagged == [] and cut.cut_short.endswith(
        f"during confirmation; unconfirmed suspects: classes [{backdoored.target}]"
    )
    assert [c.anomaly_index for c in cut.classes] == [c.anomaly_index for c in full.classes]
    valid(cut.to_dict(), "scan")


def test_image_budget_ends_the_erase_with_the_guard_best_so_far(flagged_report):
    x, y = images()
    model = tiny_model()
    before = snapshot(model)
    result = baerase.erase(model, x, y, flagged_report, config=baerase.Config(**ERASE, max_model_images=100))
    assert result.cut_short == "model-image budget (max_model_images=100) spent during unlearning"
    assert not result.verified and result.erased == [0] and result.evidence == []
    assert "Cut short" in result.summary() and "NOT verified" in result.summary()
    assert_same_state(before, model, "input model")
    if not result.changed:
        assert_same_state(before, result.model, "returned model")
    valid(result.to_dict(), "erase")


def test_an_audit_shares_one_budget_and_a_cut_scan_is_not_erased(tmp_path):
    x, y = images()
    model = tiny_model()
    report, result = baerase.audit(model, x, y, config=baerase.Config(**ERASE, max_model_images=300))
    assert report.cut_short.startswith("model-image budget (max_model_images=300) spent during recovery")
    assert result.cut_short == f"the scan was cut short: {report.cut_short}"
    assert result.erased == [] and not result.verified and not result.changed
    assert_same_state(model, result.model, "returned model")
    assert result.summary().startswith("Nothing erased: the scan was cut short")
    valid(json.loads((baerase.write_outputs(tmp_path / "audit", report, x, result) / "report.json").read_text()))


def test_the_cli_budget_options_cut_short_and_exit_4(tmp_path, capsys):
    model = save_model(tiny_model(), tmp_path / "model.safetensors")
    data = tmp_path / "data.npz"
    x, y = images()
    np.savez(data, images=x.numpy(), labels=y.numpy())
    out = tmp_path / "out"
    argv = ["scan", model, "--arch", "helpers:TinyNet", "--data", data, "--steps", 5, "--out", out]
    assert cli.main([str(a) for a in [*argv, "--max-model-images", 50, "--quiet"]]) == 4
    assert "INCONCLUSIVE" in capsys.readouterr().out
    document = valid(json.loads((out / "report.json").read_text()))
    assert "max_model_images=50" in document["scan"]["cut_short"]


# ---- report.json schema ------------------------------------------------------------------------------


def test_the_schema_is_valid_and_names_the_current_version():
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    assert SCHEMA["$defs"]["scan"]["properties"]["schema_version"] == {"const": SCHEMA_VERSION}


def test_scan_erase_and_written_reports_match_the_schema(tmp_path, flagged_report):
    x, y = images()
    valid(flagged_report.to_dict(), "scan")
    patch = baerase.scan(tiny_model(), x, y, config=baerase.Config(**TINY, family="patch"))
    valid(patch.to_dict(), "scan")
    result = baerase.erase(tiny_model(), x, y, flagged_report, config=baerase.Config(**ERASE))
    valid(result.to_dict(), "erase")
    for name, written in (("scan", (flagged_report, x)), ("erase", (flagged_report, x, result))):
        document = valid(json.loads((baerase.write_outputs(tmp_path / name, *written) / "report.json").read_text()))
        assert document["scan"]["schema_version"] == SCHEMA_VERSION and ("erase" in document) == (name == "erase")


def test_the_schema_rejects_what_a_report_never_holds(flagged_report):
    document = {"scan": flagged_report.to_dict()}
    bad = [
        {**document, "scan": {**document["scan"], "schema_version": SCHEMA_VERSION - 1}},
        {**document, "scan": {**document["scan"], "cut_short": "time budget", "flagged": [0]}},  # a verdict after a cut
        {**document, "scan": {k: v for k, v in document["scan"].items() if k != "classes"}},
        {**document, "extra": 1},
    ]
    for each in bad:
        assert not VALIDATOR.is_valid(each)
