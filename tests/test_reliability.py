"""Reliability: every bad input fails with a baerase error naming the problem, outputs are
all-or-nothing, divergence never yields a broken model, scans are deterministic and auditable."""

import json
import math

import pytest
import torch
from conftest import requires_cuda
from helpers import TinyNet, assert_same_state, snapshot, tiny_model
from torch import nn
from torch.nn.utils import parameters_to_vector

import baerase
from baerase import Config, DivergenceError, InputError
from baerase import unlearn as unlearn_module
from baerase.report import write_outputs

torch.set_num_threads(1)

CFG = Config(steps=5, hidden=16, mine_hidden=8, batch_size=8, eval_samples=32, unlearn_epochs=1, progress=False, seed=3)
K = 4


def data(n: int = 40, channels: int = 1):
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, channels, 8, 8, generator=g), torch.arange(n) % K


def model() -> TinyNet:
    return tiny_model(num_classes=K)  # same weights every time, without touching the RNG under test


def _scan(m=None, x=None, y=None, **kw):
    xd, yd = data()
    return baerase.scan(
        model() if m is None else m,
        xd if x is None else x,
        yd if y is None else y,
        config=kw.pop("config", CFG),
        **kw,
    )


class _Out(TinyNet):
    """Wraps the tiny model's logits through ``fn`` to simulate broken models."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(super().forward(x))


def _with_nan(x, at):
    x = x.clone()
    x[3, 0, 2, 2] = at
    return x


X, Y = data()
BAD_INPUTS = {
    "image rank 3": (lambda: _scan(x=X[:, 0]), "[N, C, H, W]"),
    "image rank 5": (lambda: _scan(x=X[None]), "[N, C, H, W]"),
    "3 channels, 1-channel model": (lambda: _scan(x=X.repeat(1, 3, 1, 1)), "channel"),
    "pixels 0-255": (lambda: _scan(x=X * 255), "divide by 255"),
    "uint8 pixels": (lambda: _scan(x=(X * 255).to(torch.uint8)), "divide uint8 pixels by 255"),
    "labels >= K": (lambda: _scan(y=Y + K), "labels go up to 7"),
    "negative labels": (lambda: _scan(y=Y - 1), "labels must be >= 0"),
    "labels too short": (lambda: _scan(y=Y[:-1]), "one per image"),
    "float labels": (lambda: _scan(y=Y.float()), "labels must be integers"),
    "labels as list": (lambda: _scan(y=Y.tolist()), "labels must be an int64 tensor"),
    "no images": (lambda: _scan(x=X[:0], y=Y[:0]), "need at least 20"),
    "5 images": (lambda: _scan(x=X[:5], y=Y[:5]), "need at least 20"),
    "NaN pixel": (lambda: _scan(x=_with_nan(X, math.nan)), "NaN or inf"),
    "inf pixel": (lambda: _scan(x=_with_nan(X, math.inf)), "NaN or inf"),
    "model returns NaN": (lambda: _scan(m=_Out(lambda z: z * math.nan)), "NaN or inf logits"),
    "model returns 1 logit": (lambda: _scan(m=_Out(lambda z: z[:, :1])), "at least 2 classes"),
    "model returns 3 logits, labels to 3": (lambda: _scan(m=TinyNet(num_classes=3)), "returns 3 logits"),
    "model returns a tuple": (lambda: _scan(m=_Out(lambda z: (z,))), "logits [N, K]"),
    "model returns numpy": (lambda: _scan(m=_Out(lambda z: z.detach().numpy())), "logits [N, K]"),
    "model returns [N]": (lambda: _scan(m=_Out(lambda z: z[:, 0])), "logits [N, K]"),
    "model is a function": (lambda: _scan(m=lambda z: z), "torch.nn.Module"),
    "model on meta device": (lambda: _scan(m=TinyNet().to("meta")), "'meta' device"),
    "config.run.device not a device": (lambda: _scan(config=CFG.replace(device="gpu0")), "not a torch device"),
    "config is a dict": (lambda: _scan(config={}), "baerase.Config"),
    "normalize 3 channels, 1-channel data": (
        lambda: _scan(normalize=([0.5] * 3, [0.2] * 3)),
        "normalize needs 1 means and stds",
    ),
    "normalize std 0": (lambda: _scan(normalize=(0.5, 0.0)), "std values must be > 0"),
    "normalize not numbers": (lambda: _scan(normalize=("a", "b")), "normalize must be (mean, std)"),
    "config.recovery.classes out of range": (
        lambda: _scan(config=CFG.replace(classes=(9,))),
        "config.recovery.classes",
    ),
    "config.unlearning.guard_fraction 1": (lambda: CFG.replace(guard_fraction=1.0), "guard_fraction must be in (0, 1)"),
    "config.unlearning.universal_eps 2": (lambda: CFG.replace(universal_eps=2.0), "universal_eps must be in [0, 1]"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_raises_a_baerase_error_naming_it(case):
    call, words = BAD_INPUTS[case]
    with pytest.raises(baerase.BaeraseError) as info:
        call()
    assert words in str(info.value), str(info.value)


def test_erase_guards_on_its_whole_guard_split_and_scan_scores_on_at_most_eval_samples(monkeypatch):
    from baerase import validate

    prepared = []

    def recording(*args, **kwargs):
        prepared.append(validate.prepare(*args, **kwargs))
        return prepared[-1]

    monkeypatch.setattr(baerase.api, "prepare", recording)
    config = CFG.replace(eval_samples=8)
    report = baerase.scan(model(), X, Y, config=config)
    for c in report.classes:  # nothing to unlearn: erase still splits its inputs, then returns
        c.flagged = False
    baerase.erase(model(), X, Y, report, config=config)
    scan_side, erase_side = prepared
    assert len(scan_side.held_out[1]) == 8
    assert len(scan_side.fit[1]) + round(config.detection.val_fraction * len(Y)) == len(Y)
    assert len(erase_side.fit[1]) + len(erase_side.held_out[1]) == len(Y)
    assert abs(len(erase_side.held_out[1]) - config.unlearning.guard_fraction * len(Y)) <= 1


def test_erase_warns_when_its_guard_split_is_too_small_to_bound_the_drop():
    report = _scan()
    report.classes[1].flagged = True  # force an erase whatever this random model scored
    with pytest.warns(UserWarning, match="holds out 20 clean images for its accuracy guard"):
        baerase.erase(model(), X, Y, report, config=CFG)


@pytest.mark.filterwarnings("ignore:erase holds out")  # 40 images: the small-guard warning is expected
def test_erase_that_no_step_fits_the_guard_says_so_and_returns_the_model_unchanged(monkeypatch):
    m = model()
    report = _scan(m=m)
    report.classes[1].flagged = True  # force an erase whatever this random model scored
    # A floor above 100%: no step can meet it.
    monkeypatch.setattr(unlearn_module.rounds, "allowed_drop", lambda *a: -1.0)
    with pytest.warns(UserWarning, match="returned unchanged"):
        result = baerase.erase(m, X, Y, report, config=CFG)
    assert not result.changed and not result.to_dict()["changed"] and "returned unchanged" in result.summary()
    assert_same_state(m, result.model)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CPU build of torch: no second device")
def test_config_device_other_than_the_models_is_refused():
    with pytest.raises(InputError, match=r"the model is on cpu but config\.run\.device is cuda"):
        _scan(config=CFG.replace(device="cuda"))


def test_cuda_device_without_cuda_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(InputError, match="no CUDA device is available"):
        _scan(config=CFG.replace(device="cuda"))


@requires_cuda
def test_data_on_cpu_model_on_cuda_runs_on_the_models_device():
    report = _scan(m=model().cuda())
    assert report.provenance["device"].startswith("cuda") and len(report.classes) == K


def test_scan_restores_train_mode_and_grad_flags_and_leaves_weights_alone():
    m = model().train()
    m.fc.weight.requires_grad_(False)
    before = snapshot(m)
    x = X.clone().requires_grad_(True)
    _scan(m=m, x=x)
    assert m.training and not m.fc.weight.requires_grad and m.conv.weight.requires_grad
    assert_same_state(before, m)
    assert x.grad is None  # nothing flowed back into the caller's tensor


def test_erase_with_a_report_from_another_model_is_refused():
    report = _scan()
    with pytest.raises(InputError, match="4-class model but this model has 3"):
        baerase.erase(TinyNet(num_classes=3), X, Y % 3, report, config=CFG)
    with pytest.raises(InputError, match="ScanReport"):
        baerase.erase(model(), X, Y, report.to_dict(), config=CFG)


# ---- outputs ----------------------------------------------------------------------------------


def test_write_outputs_refuses_an_existing_dir_without_overwrite(tmp_path):
    report = _scan()
    out = write_outputs(tmp_path / "out", report, X)
    assert (out / "report.json").is_file() and any((out / "triggers").iterdir())
    with pytest.raises(InputError, match="already exists"):
        write_outputs(out, report, X)
    assert write_outputs(out, report, X, overwrite=True) == out


@pytest.mark.parametrize("existing", [False, True])
def test_failure_midway_leaves_no_partial_dir_and_keeps_the_old_one(tmp_path, monkeypatch, existing):
    import baerase.report as report_module

    report = _scan()
    out = tmp_path / "out"
    if existing:
        write_outputs(out, report, X)
        (out / "marker").write_text("old")
    listing = sorted(p.name for p in tmp_path.iterdir())

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(report_module, "_png", fail)
    with pytest.raises(OSError, match="disk full"):
        write_outputs(out, report, X, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == listing  # no staging or retired folder left
    assert (out / "marker").read_text() == "old" if existing else not out.exists()


def test_failed_final_rename_puts_the_old_dir_back(tmp_path, monkeypatch):
    import baerase.report as report_module

    report = _scan()
    out = write_outputs(tmp_path / "out", report, X)
    (out / "marker").write_text("old")
    real = report_module.os.replace

    def replace(src, dst):
        if ".tmp" in str(src):  # the staged output: fail as a full disk or a crash would
            raise OSError("rename failed")
        return real(src, dst)

    monkeypatch.setattr(report_module.os, "replace", replace)
    with pytest.raises(OSError, match="rename failed"):
        write_outputs(out, report, X, overwrite=True)
    assert (out / "marker").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_overwrite_never_replaces_a_directory_that_is_not_a_baerase_output(tmp_path):
    report = _scan()
    (tmp_path / "precious.txt").write_text("keep")
    with pytest.raises(InputError, match="not an earlier baerase output"):
        write_outputs(tmp_path, report, X, overwrite=True)
    (tmp_path / "file").write_text("keep")
    with pytest.raises(InputError, match="not a directory"):
        write_outputs(tmp_path / "file", report, X, overwrite=True)
    assert (tmp_path / "precious.txt").read_text() == "keep" and (tmp_path / "file").read_text() == "keep"


def test_a_model_with_nan_weights_is_never_saved(tmp_path):
    report = _scan()
    broken = model()
    with torch.no_grad():
        broken.fc.bias[0] = math.nan
    result = baerase.EraseResult(
        model=broken,
        history=[],
        erased=[0],
        verified=False,
        evidence=[],
        accuracy_before=0.0,
        accuracy_after=0.0,
        trigger_asr_before=0.0,
        trigger_asr_after=0.0,
        rounds=1,
        seconds=0.0,
    )
    with pytest.raises(DivergenceError, match="NaN/inf weights"):
        write_outputs(tmp_path / "out", report, X, result)
    assert list(tmp_path.iterdir()) == []


# ---- divergence -------------------------------------------------------------------------------


class NaNOnTriggered(TinyNet):
    """Finite logits on the clean images it was given, NaN on anything else (triggered inputs),
    once ``honest_calls`` forward calls have passed (so that it can slip past the input probe)."""

    def __init__(self, clean, honest_calls: int = 0):
        super().__init__()
        self.register_buffer("clean", clean.flatten(1))
        self.honest_calls = honest_calls

    def forward(self, x):
        logits = super().forward(x)
        self.honest_calls -= 1
        if self.honest_calls >= 0:
            return logits
        known = (x.flatten(1)[:, None] - self.clean[None]).abs().amax(2).min(1).values < 1e-6
        return torch.where(known[:, None], logits, torch.full_like(logits, math.nan))


def test_model_with_nan_on_altered_inputs_is_refused_up_front():
    with pytest.raises(InputError, match="NaN or inf logits on slightly altered clean images"):
        _scan(m=NaNOnTriggered(X))


def test_recovery_on_nan_for_triggered_inputs_raises_divergence():
    m = NaNOnTriggered(X, honest_calls=1)  # passes the input probe, then diverges
    with pytest.raises(DivergenceError, match="NaN/inf"):
        _scan(m=m, config=CFG.replace(steps=25))  # more non-finite steps than recovery tolerates


@pytest.mark.filterwarnings("ignore:erase holds out")  # 40 images: the small-guard warning is expected
def test_erase_on_nan_for_triggered_inputs_never_returns_a_broken_model(tmp_path):
    m = NaNOnTriggered(X, honest_calls=10**6)
    report = _scan(m=m)
    report.classes[1].flagged = True  # force an erase whatever this random model scored
    m.honest_calls = 1
    before = snapshot(m)
    # Every unlearning step is non-finite and rolled back; the verification re-scan's 5 recovery steps
    # stay under the non-finite steps recovery tolerates, so the erase returns the input unchanged.
    with pytest.warns(UserWarning, match="returned unchanged"):
        result = baerase.erase(m, X, Y, report, config=CFG)
    assert_same_state(before, m)
    assert not result.changed and result.rolled_back > 0
    assert_same_state(before, result.model, "returned model")
    assert all(torch.isfinite(p).all() for p in result.model.state_dict().values())
    write_outputs(tmp_path / "out", report, X, result)
    assert (tmp_path / "out" / "model.safetensors").is_file()


class _NaNEveryOtherStep(nn.Module):
    """``net`` whose every other forward with gradients (an unlearning step's) answers NaN."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net, self.calls = net, 0

    def forward(self, x):
        out = self.net(x)
        if torch.is_grad_enabled():
            self.calls += 1
            if self.calls % 2:
                out = out * math.nan
        return out


def test_unlearn_rolls_back_non_finite_steps_and_counts_them():
    m = model()
    triggers = _scan(m=m).triggers.select([1])
    fit, val = (X[:32], Y[:32]), (X[32:], Y[32:])
    # copy_weight 0: one forward with gradients per step (the copies would add a second)
    cfg = CFG.replace(unlearn_epochs=4, unlearn_batch_size=8, asr_stop=0.0, min_steps=40, copy_weight=0.0)
    outcome = unlearn_module.unlearn(_NaNEveryOtherStep(m), triggers, fit, val, cfg, num_classes=K)
    # 4 epochs of 4 batches, raised to the minimum step budget; every other step is non-finite
    assert outcome.steps == max(16, cfg.unlearning.min_steps)
    assert outcome.rolled_back == outcome.steps // 2
    assert all(torch.isfinite(p).all() for p in outcome.model.parameters())


class _Shared(list):
    """A list every deep copy shares."""

    def __deepcopy__(self, memo):
        return self


class _WrongWhenFar(nn.Module):
    """``net`` whose answers without gradients (the guard's) all turn wrong beyond a third of the
    distance the first guard evaluation finds it moved from its start."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net, self.radius = net, _Shared()
        self.start = parameters_to_vector(net.parameters()).detach().clone()

    def forward(self, x):
        logits = self.net(x)
        if torch.is_grad_enabled():
            return logits
        moved = (parameters_to_vector(self.net.parameters()).detach() - self.start).norm().item()
        if moved > 0 and not self.radius:
            self.radius.append(moved / 3)
        return -logits if self.radius and moved > self.radius[0] else logits


@pytest.mark.parametrize("bisections", [0, 3])
def test_a_checkpoint_outside_the_bounds_gives_way_to_a_point_part_way_back_within_them(bisections):
    m = model()
    triggers = _scan(m=m).triggers.select([1])
    far = _WrongWhenFar(m)
    fit, val = (X[:32], Y[:32]), (X[32:], Y[32:])
    cfg = CFG.replace(
        unlearn_batch_size=8, asr_stop=1.0, min_steps=40, bisections=bisections, eval_every=10, final_lr_share=1
    )
    outcome = unlearn_module.unlearn(far, triggers, fit, val, cfg, num_classes=K)
    moved = (parameters_to_vector(outcome.model.parameters()) - far.start).norm().item()
    if bisections == 0:  # every checkpoint is far: nothing is kept
        assert outcome.kept_step == 0 and moved == 0
    else:
        shares = [row["share"] for row in outcome.history if "share" in row]
        assert outcome.kept_step > 0 and 0 < moved <= far.radius[0] * (1 + 1e-4)
        assert shares and all(0 < s < 1 for s in shares)


def test_universal_eps_unlearns_a_perturbed_copy_of_every_batch():
    m = model()
    triggers = _scan(m=m).triggers.select([1])
    fit, val = (X[:32], Y[:32]), (X[32:], Y[32:])
    cfg = CFG.replace(unlearn_epochs=1, unlearn_batch_size=8, min_steps=8)
    for eps, per_batch in ((0.0, 8), (0.1, 16)):  # one trigger row per image, and one perturbed row
        batches = unlearn_module.TriggeredBatches(triggers, m, fit, val, cfg.replace(universal_eps=eps))
        generator = torch.Generator().manual_seed(0)
        rows = {len(batches.build(b, step, generator).triggered) for step, b in enumerate(batches.epoch(generator))}
        assert rows == {per_batch}
        outcome = unlearn_module.unlearn(m, triggers, fit, val, cfg.replace(universal_eps=eps), num_classes=K)
        assert all(torch.isfinite(p).all() for p in outcome.model.parameters())
        evaluated = [row for row in outcome.history[1:] if "share" not in row]  # a point part-way back has no loss
        assert evaluated and all(math.isfinite(row["loss_total"]) for row in evaluated)


# ---- determinism and audit trail --------------------------------------------------------------


def test_seeded_scans_agree_and_leave_the_global_rng_alone():
    import random

    import numpy as np

    torch.manual_seed(1234)
    random.seed(5)
    np.random.seed(5)
    states = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()
    first, second = _scan(), _scan()
    assert torch.equal(torch.get_rng_state(), states[0])
    assert random.getstate() == states[1] and (np.random.get_state()[1] == states[2]).all()
    assert first.flagged == second.flagged
    assert [vars(c) for c in first.classes] == [vars(c) for c in second.classes]
    other = _scan(config=CFG.replace(seed=CFG.run.seed + 1))
    assert [c.trigger_norm for c in other.classes] != [c.trigger_norm for c in first.classes]


def test_report_records_versions_backend_config_seed_and_hashes(tmp_path):
    from baerase.models import load_model, save_model, sha256_file

    path = save_model(model(), tmp_path / "m.safetensors")
    m = load_model(path, "helpers:TinyNet")
    report = _scan(m=m)
    prov = report.provenance
    for key in (
        "baerase",
        "torch",
        "python",
        "device",
        "backends",
        "seed",
        "config",
        "model_sha256",
        "data_sha256",
        "model_file",
        "model_file_sha256",
    ):
        assert key in prov, key
    assert prov["baerase"] == baerase.__version__ and prov["torch"] == torch.__version__
    assert (
        prov["backends"]["trigger_apply"] == report.backend
        and prov["seed"] == CFG.run.seed
        and prov["config"]["recovery"]["steps"] == CFG.recovery.steps
        and prov["config"] == report.config == CFG.to_dict()
    )
    assert prov["model_file_sha256"] == sha256_file(path)
    assert prov["data_sha256"] == _scan(m=model()).provenance["data_sha256"]
    assert prov["data_sha256"] != _scan(x=X.flip(0)).provenance["data_sha256"]
    saved = json.loads((write_outputs(tmp_path / "out", report, X) / "report.json").read_text())
    assert saved["scan"]["provenance"]["config"]["recovery"]["betas"] == list(CFG.recovery.betas)
    assert Config.from_dict(report.config) == CFG  # the recorded settings rebuild the run's config
