"""Recovery of the whole-image families (warp, blend): a few parameters per class, no generator.

Each class's transformation shrinks under Neural Cleanse's adaptive cost on its ``size()`` to the
smallest that still flips ``success_threshold`` of a batch, all classes stacked in one model call.
"""

from __future__ import annotations

import torch

from .. import cost, ops, rng
from .blend import BlendSet, new_blends
from .warp import WarpSet, new_warps

Transforms = WarpSet | BlendSet
_BUILDERS = {"warp": new_warps, "blend": new_blends}
WHOLE_IMAGE_FAMILIES = tuple(_BUILDERS)


def new_set(targets: list[int], images: torch.Tensor, config, device: torch.device) -> Transforms:
    return _BUILDERS[config.recovery.family](targets, images, config, device)


def recover_chunk(forward, images, labels, targets, config, mean, std, steps, on_step, budget, tracker):
    """Fit one chunk's transformations: (the set holding, per class, the smallest that flipped
    ``success_threshold`` of a batch (else the last), steps each class ran [k], mean clipped target
    probability [k]). ``budget``: which classes still run (``recovery._Budget``); ``tracker``: the
    adaptive size cost (``recovery._MaskCostTracker``)."""
    r = config.recovery
    found = new_set(targets, images, config, images.device)
    params = list(found.parameters())
    lr = r.warp_lr if found.family == "warp" else r.blend_lr
    optimizer = torch.optim.Adam(params, lr=lr, betas=r.betas)
    best = [p.detach().clone() for p in params]
    for step in range(steps):
        active = budget.active(step, tracker, found)
        if active is None:
            break
        loss, success, attack = _step(forward, images, labels, found, active, config, mean, std)
        size = found.size()
        with torch.no_grad():
            improved = tracker.update(success, size.detach())
            best = [_where(improved, p.detach(), kept) for p, kept in zip(params, best, strict=True)]
            budget.record(success, attack, active)
        optimizer.zero_grad(set_to_none=True)
        (loss + (tracker.cost * size * active).sum()).backward()
        optimizer.step()
        if on_step is not None:
            on_step(int(active.sum()))
    if on_step is not None:
        on_step(int((steps - budget.ran).sum()))
    with torch.no_grad():
        for p, kept in zip(params, best, strict=True):
            p.copy_(_where(tracker.found_any, kept, p))
        found.found.copy_(tracker.found_any)
    return found, budget.ran.cpu(), budget.reach / budget.ran.clamp(min=1)


def _where(rows: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per class (dim 0): ``a`` where ``rows`` [k], else ``b``."""
    return torch.where(rows.view(-1, *[1] * (a.dim() - 1)), a, b)


def _step(forward, images, labels, found, active, config, mean, std):
    """(summed clipped-hinge loss of the active classes, batch success [k], clipped target probability [k])."""
    k, b = len(found), config.recovery.batch_size
    batch = torch.randint(0, len(labels), (b,), device=images.device, generator=rng.generator(images.device))
    x, y = images[batch], labels[batch]
    weight = (y.unsqueeze(0) != found.targets.unsqueeze(1)).float() * active.unsqueeze(1)
    _, g = found.sample(b)
    stamped = found.stamp(x, g[active], mean, std).flatten(0, 1)
    rows = found.targets[active].repeat_interleave(b)
    logits = cost.forward(forward, stamped)
    hinge, _ = ops.trigger_loss(logits, rows, config.recovery.beta)
    full = torch.zeros(k, b, device=images.device)
    full[active] = hinge.view(-1, b)
    attack = (full * weight).sum(1) / weight.sum(1).clamp(min=1)
    with torch.no_grad():
        flipped = torch.zeros(k, b, device=images.device)
        flipped[active] = (logits.argmax(1) == rows).float().view(-1, b)
        success = (flipped * weight).sum(1) / weight.sum(1).clamp(min=1)
    return -attack.sum(), success, attack.detach()
