"""Pre-screening many classes: a short recovery of every class, the full one for a few, a sampled reference."""

from __future__ import annotations

import torch
from helpers import tiny_model

import baerase
from baerase.recover import RecoveryResult
from baerase.recover.screen import pick

K = 12
FAST = {"steps": 12, "batch_size": 4, "eval_samples": 16, "progress": False, "hidden": 16, "mine_hidden": 8}


def _data(n: int = 96):
    generator = torch.Generator().manual_seed(0)
    return torch.rand(n, 1, 8, 8, generator=generator), torch.arange(n) % K


def test_many_classes_get_a_short_recovery_and_only_the_chosen_a_full_one():
    images, labels = _data()
    config = baerase.Config(
        prescreen_above=4, prescreen_steps=3, prescreen_batch=2, prescreen_keep=2, reference_sample=3, **FAST
    )
    report = baerase.scan(tiny_model(num_classes=K), images, labels, config=config.replace(fallback=()))
    full = [c for c in report.classes if not c.screened_out]
    assert len(report.classes) == K and len(full) == 2 + 3
    assert all(c.steps == 3 and not c.flagged for c in report.classes if c.screened_out)
    assert all(c.steps == 12 for c in full)
    assert sorted(report.triggers.targets.tolist()) == sorted(c.target for c in full)  # none kept for the rest
    # Every class pays the short recovery; five of twelve pay the full one (plus scoring).
    assert report.cost.phases["recovery"].forward == K * 3 * 2 + 5 * (12 * 4 + 16)


def test_pick_ranks_by_how_easily_a_class_is_reached_and_samples_the_rest():
    reach = torch.tensor([0.1, 0.45, 0.2, 0.05, 0.3, 0.0, 0.15, 0.25])
    screening = RecoveryResult(list(range(8)), None, reach, torch.ones(8), torch.full((8,), 3))
    keep, sample = pick(screening, baerase.Config(prescreen_keep=2, reference_sample=3))
    assert keep == [1, 4]
    assert len(sample) == 3 and not set(sample) & set(keep)
    assert pick(screening, baerase.Config(prescreen_keep=2, reference_sample=3)) == (keep, sample)  # seeded
