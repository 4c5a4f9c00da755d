"""Neural Cleanse (Wang et al. 2019): reverse-engineer one minimal mask + pattern per class, flag
classes whose mask is an outlier by the median absolute deviation, and unlearn by fine-tuning on
clean images stamped with the recovered trigger under their true labels."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from baerase.attacks.train import Normalize, _check_data

from .common import device_and_normalizer, finish, prepare, train_epochs

_MAD_TO_STD = 1.4826


@dataclass
class NCReport:
    """Per-class reverse-engineered triggers and the MAD verdict."""

    masks: torch.Tensor  # [K, H, W] in [0, 1]
    patterns: torch.Tensor  # [K, C, H, W] in [0, 1]
    norms: torch.Tensor  # [K] L1 norm of each mask
    success: torch.Tensor  # [K] share of non-class images the trigger flips to the class
    anomaly_index: torch.Tensor  # [K], low side
    flagged: list[int] = field(default_factory=list)
    seconds: float = 0.0

    targets: list[int] = field(default_factory=list)  # class of each row above

    def stamp(self, x: torch.Tensor, t: int) -> torch.Tensor:
        j = self.targets.index(t) if self.targets else t
        m, p = self.masks[j].to(x.device), self.patterns[j].to(x.device)
        return x + m * (p - x)


def _reverse_all(model, x, y, targets, norm, *, steps, batch_size, lr, init_cost, target_success, g):
    """NC's optimisation for every target at once (one forward of K * batch images per step):
    min CE(f(x'), t) + cost_t * |m_t|_1 with NC's cost schedule per class (raise the cost while the
    trigger works, lower it while it does not); keeps each class's smallest working mask."""
    device = x.device
    k, (c, h, w) = len(targets), x.shape[1:]
    tt = torch.tensor(targets, device=device)
    mask_logit = torch.empty(k, 1, h, w, device=device).uniform_(-1, 1).requires_grad_(True)
    pattern_logit = torch.empty(k, c, h, w, device=device).uniform_(-1, 1).requires_grad_(True)
    opt = torch.optim.Adam([mask_logit, pattern_logit], lr=lr, betas=(0.5, 0.9))
    cost = torch.full((k,), init_cost, device=device)
    up, down = torch.zeros(k, dtype=torch.long), torch.zeros(k, dtype=torch.long)
    best_norm = torch.full((k,), float("inf"))
    best_m, best_p = torch.sigmoid(mask_logit).detach().clone(), torch.sigmoid(pattern_logit).detach().clone()
    for _ in range(steps):
        i = torch.randint(len(x), (batch_size,), generator=g).to(device)
        xb, yb = x[i], y[i]
        m, p = torch.sigmoid(mask_logit), torch.sigmoid(pattern_logit)  # [K, 1|C, H, W]
        stamped = xb[None] + m[:, None] * (p[:, None] - xb[None])  # [K, B, C, H, W]
        logits = model(norm(stamped.flatten(0, 1))).view(k, batch_size, -1)
        keep = (yb[None] != tt[:, None]).float()  # images already of class t say nothing about its trigger
        ce = F.cross_entropy(logits.flatten(0, 1), tt.repeat_interleave(batch_size), reduction="none")
        ce = (ce.view(k, batch_size) * keep).sum(1) / keep.sum(1).clamp(min=1)
        l1 = m.flatten(1).sum(1)
        opt.zero_grad(set_to_none=True)
        (ce + cost * l1).sum().backward()
        opt.step()
        with torch.no_grad():
            hit = ((logits.argmax(2) == tt[:, None]).float() * keep).sum(1) / keep.sum(1).clamp(min=1)
            works = (hit >= target_success).cpu()
            better = works & (l1.cpu() < best_norm)
            best_norm = torch.where(better, l1.cpu(), best_norm)
            best_m[better.to(device)] = m[better.to(device)]
            best_p[better.to(device)] = p[better.to(device)]
            up, down = torch.where(works, up + 1, 0), torch.where(works, 0, down + 1)
            raise_, lower = (up >= 5).to(device), (down >= 5).to(device)
            cost = torch.where(raise_, cost * 1.5, torch.where(lower, cost / 1.5**1.5, cost))
            up, down = torch.where(up >= 5, 0, up), torch.where(down >= 5, 0, down)
    # A class that never reached the target success keeps its last trigger; its large mask says so.
    never = torch.isinf(best_norm).to(device)
    best_m[never], best_p[never] = (
        torch.sigmoid(mask_logit).detach()[never],
        torch.sigmoid(pattern_logit).detach()[never],
    )
    return best_m[:, 0], best_p


def reverse_engineer(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    normalize: Normalize = None,
    classes: list[int] | None = None,
    steps: int = 300,
    batch_size: int = 32,
    lr: float = 0.1,
    init_cost: float = 1e-3,
    target_success: float = 0.99,
    threshold: float = 2.0,
    seed: int = 0,
) -> NCReport:
    """NC detection: one (mask [H, W], pattern [C, H, W]) per class, flagged by MAD anomaly index > ``threshold``
    on the low side of the mask L1 norms. ``model`` is not modified."""
    import time

    _check_data(x, y, "reverse_engineer")
    start = time.perf_counter()
    device, norm = device_and_normalizer(model, x, normalize)
    was_training = model.training
    model.eval()
    grads = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    x, y = x.to(device), y.to(device)
    try:
        with torch.no_grad():
            k = model(norm(x[:2])).shape[1]
        targets = list(range(k)) if classes is None else list(classes)
        g = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        masks, patterns = _reverse_all(
            model,
            x,
            y,
            targets,
            norm,
            steps=steps,
            batch_size=batch_size,
            lr=lr,
            init_cost=init_cost,
            target_success=target_success,
            g=g,
        )
        success = []
        with torch.no_grad():
            for j, t in enumerate(targets):
                xs = x[y != t][:512]
                success.append((model(norm(xs + masks[j] * (patterns[j] - xs))).argmax(1) == t).float().mean().item())
    finally:
        for p, r in zip(model.parameters(), grads, strict=True):
            p.requires_grad_(r)
        model.train(was_training)
    masks_t, patterns_t = masks.cpu(), patterns.cpu()
    norms = masks_t.flatten(1).sum(1)
    median = norms.median()
    mad = ((norms - median).abs().median() * _MAD_TO_STD).clamp(min=1e-6)
    index = ((median - norms) / mad).clamp(min=0)
    flagged = [t for t, a in zip(targets, index.tolist(), strict=True) if a > threshold]
    return NCReport(
        masks=masks_t,
        patterns=patterns_t,
        norms=norms,
        success=torch.tensor(success),
        anomaly_index=index,
        flagged=flagged,
        targets=targets,
        seconds=time.perf_counter() - start,
    )


def neural_cleanse(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    normalize: Normalize = None,
    report: NCReport | None = None,
    stamp_ratio: float = 0.2,
    epochs: int = 10,
    lr: float = 0.01,
    batch_size: int = 64,
    seed: int = 0,
    **detect_options,
) -> nn.Module:
    """A copy of ``model`` with the backdoors NC finds unlearned.

    ``report`` from :func:`reverse_engineer` (computed here with ``detect_options`` when None). In
    every fine-tuning batch a ``stamp_ratio`` share of the images gets a flagged class's trigger and
    keeps its true label. Nothing flagged: a plain copy (NC repairs only what it detects).
    """
    out = prepare(model, x, y, "neural_cleanse")
    if report is None:
        report = reverse_engineer(model, x, y, normalize=normalize, seed=seed, **detect_options)
    out.nc_report = report
    if not report.flagged:
        return finish(out)
    g = torch.Generator().manual_seed(seed + 1)
    flagged = report.flagged

    def stamp(xb: torch.Tensor, yb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = round(stamp_ratio * len(xb))
        if n == 0:
            return xb, yb
        xb = xb.clone()
        pick = torch.randperm(len(xb), generator=g)[:n]
        which = torch.randint(len(flagged), (n,), generator=g)
        for j, t in enumerate(flagged):
            rows = pick[which == j].to(xb.device)
            xb[rows] = report.stamp(xb[rows], t)
        return xb, yb

    train_epochs(
        out,
        x,
        y,
        normalize=normalize,
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        seed=seed,
        batch_transform=stamp,
    )
    return finish(out)
