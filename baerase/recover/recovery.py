"""Step 1 of BAERASE: train an entropy-maximising trigger generator for every candidate class.

All candidates of a chunk share each forward/backward pass of the (frozen) suspect model:
their triggered images are stacked into one [K * B, C, H, W] batch.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .. import ops
from ..config import Config
from ..errors import DivergenceError
from .generator import mine_estimate
from .memory import plan_chunk_size
from .triggers import TriggerSet

log = logging.getLogger("baerase")

_PATIENCE = 5  # steps of (un)successful attack before the mask cost moves (Neural Cleanse's rule)
_COST_UP, _COST_DOWN = 1.5, 1.5**1.5
_MAX_BAD_STEPS = 20  # non-finite steps tolerated (each skipped) before giving up
_SEED_STRIDE = 1_000_003  # a prime: chunk seeds of nearby classes never collide for K < 10^6


@contextmanager
def frozen(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode and no parameter gradients for the duration; the caller's flags are restored."""
    flags = [p.requires_grad for p in model.parameters()]
    training = model.training
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)
        model.train(training)


def plan_chunks(model: nn.Module, images: torch.Tensor, targets: list[int], config: Config,
                mean: torch.Tensor | None = None, parts: int = 1) -> list[list[int]]:
    """Split ``targets`` into chunks that fit ``config.memory_budget`` (or ``config.chunk_size``),
    at least ``parts`` of them when there are enough targets (one per distributed rank)."""
    chunk = config.chunk_size or plan_chunk_size(
        model, (images[:1] - (0 if mean is None else mean.view(-1, 1, 1))), config.batch_size,
        len(targets), config.memory_budget)
    if parts > 1 and not config.chunk_size:
        chunk = min(chunk, -(-len(targets) // parts))
    return [targets[i:i + chunk] for i in range(0, len(targets), chunk)]


def chunk_seed(seed: int, targets: list[int]) -> int:
    """RNG seed of the chunk starting at ``targets[0]``: a chunk's result depends only on its own
    classes, so a resumed or sharded scan recomputes exactly what a single run would. The chunk
    that starts at class 0 uses ``seed`` itself."""
    return (seed + _SEED_STRIDE * int(targets[0])) % (2**63)


def recover_scored(
    model: nn.Module,
    fit: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    chunks: list[list[int]],
    config: Config,
    mean: torch.Tensor | None = None,
    std: torch.Tensor | None = None,
    on_step: Callable[[int], None] | None = None,
    store=None,
) -> tuple[TriggerSet | None, torch.Tensor]:
    """Recover and score every chunk: (TriggerSet of all chunk targets in order, success [K]).

    Each chunk is seeded from ``chunk_seed`` and scored on ``val`` right after its recovery, and,
    with a ``ChunkStore``, saved once finished and loaded instead of recomputed. A CUDA OOM splits
    the chunk in two. Returns (None, empty) when ``chunks`` is empty (a rank with nothing to do).
    """
    device = fit[0].device
    queue, parts, scores = [list(c) for c in chunks], [], []
    forward = _forward_fn(model, config, device)
    while queue:
        piece = queue.pop(0)
        saved = store.load(piece) if store is not None else None
        if saved is not None:
            triggers, success = saved[0].to(device), saved[1].to(device)
            if on_step is not None:
                on_step(len(piece) * config.steps)
        else:
            try:
                torch.manual_seed(chunk_seed(config.seed, piece))
                # Re-stacked as ``recover`` returns it (building a TriggerSet draws initial weights), so a
                # one-chunk scan reproduces the random stream, and the verdicts, of ``recover`` + scoring.
                triggers = TriggerSet.concat([_recover_chunk(forward, *fit, piece, config, mean, std, on_step)])
                success = attack_success(triggers, forward, *val, mean, std)
            except torch.cuda.OutOfMemoryError:
                if len(piece) == 1:
                    raise
                half = len(piece) // 2
                queue[:0] = [piece[:half], piece[half:]]
                torch.cuda.empty_cache()
                log.warning("out of GPU memory: retrying with %d candidate classes per chunk", half)
                continue
            if store is not None:
                store.save(triggers, success)
        parts.append(triggers)
        scores.append(success)
    if not parts:
        return None, torch.zeros(0, device=device)
    return TriggerSet.concat(parts), torch.cat(scores)


def _forward_fn(model: nn.Module, config: Config, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """The model call used for recovery: optionally compiled, channels-last, bf16 autocast on CUDA."""
    run = torch.compile(model) if config.compile else model
    amp = config.amp and device.type == "cuda"
    channels_last = config.channels_last

    def forward(x: torch.Tensor) -> torch.Tensor:
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if amp:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return run(x).float()  # the hinge and softmax stay in fp32
        return run(x)

    return forward


def recover(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    targets: list[int],
    config: Config,
    mean: torch.Tensor | None = None,
    std: torch.Tensor | None = None,
    on_step: Callable[[int], None] | None = None,
) -> TriggerSet:
    """Recover a trigger distribution for each class in ``targets``.

    images [N, C, H, W] in [0, 1] and labels [N] on the model's device; ``mean``/``std`` [C]
    normalise inside. Returns the TriggerSet holding, per class, the smallest trigger that still
    flipped ``config.success_threshold`` of a batch (mask family) or the final one (patch family).
    """
    chunk = len(plan_chunks(model, images, targets, config, mean)[0])
    parts, start = [], 0
    while start < len(targets):
        piece = targets[start:start + chunk]
        try:
            parts.append(_recover_chunk(model, images, labels, piece, config, mean, std, on_step))
            start += len(piece)
        except torch.cuda.OutOfMemoryError:
            if chunk == 1:
                raise
            chunk = max(1, chunk // 2)
            torch.cuda.empty_cache()
            log.warning("out of GPU memory: retrying with %d candidate classes per chunk", chunk)
    return TriggerSet.concat(parts)


def _recover_chunk(model, images, labels, targets, config, mean, std, on_step) -> TriggerSet:
    device = images.device
    triggers = TriggerSet(targets, tuple(images.shape[1:]), family=config.family, patch_size=config.patch_size,
                          latent_dim=config.latent_dim, hidden=config.hidden,
                          mine_hidden=config.mine_hidden).to(device)
    groups = [{"params": list(triggers.generator.parameters()) + list(triggers.stats.parameters()), "lr": config.lr}]
    if config.family == "mask":
        groups.append({"params": [triggers.mask_logits], "lr": config.mask_lr})
    # One fused update for all K stacked generators; classes stopped by halving are frozen in it.
    optimizer = ops.BatchedAdam(groups, betas=config.betas)

    k, b = len(triggers), config.batch_size
    area = images.shape[-1] * images.shape[-2]
    target_rows = triggers.targets.repeat_interleave(b)
    tracker = _MaskCostTracker(k, config, device)
    best = {name: t.detach().clone() for name, t in triggers.state_dict().items()}
    bad_steps = 0
    # Successive halving: after a third of the budget, classes that are hopeless stop using the model.
    halve_at = config.steps // 3 if config.halving and config.family == "mask" else -1
    active = torch.ones(k, dtype=torch.bool, device=device)
    peak = torch.zeros(k, device=device)
    halved = False
    for step in range(config.steps):
        if step == halve_at and k > 1:
            stopped = _hopeless(peak, triggers.norms().detach(), config.success_threshold)
            if stopped.any():
                active, halved = ~stopped, True
                log.info("halving: %d of %d candidate classes stop early", int(stopped.sum()), k)
        batch = torch.randint(0, len(labels), (b,), device=device)
        x, y = images[batch], labels[batch]
        # A class's own images prove nothing about its trigger: they carry no weight in its loss.
        weight = (y.unsqueeze(0) != triggers.targets.unsqueeze(1)).float()
        weight_sum = weight.sum(1).clamp(min=1)

        z, g = triggers.sample(b, config.noise_std)
        stamped = triggers.stamp(x, g, mean, std).flatten(0, 1)
        if not halved:
            logits, rows = model(stamped), target_rows
        else:
            keep = active.repeat_interleave(b)
            logits, rows = model(stamped[keep]), target_rows[keep]
        hinge, _ = ops.trigger_loss(logits, rows, config.beta)
        attack = (_rows(hinge, active, k, b) * weight).sum(1) / weight_sum
        surrogate, _ = mine_estimate(triggers.stats, z, g, triggers.moving_avg, config.mine_ma_rate)
        norm = triggers.norms() / area
        loss = (-attack - config.alpha * surrogate + tracker.cost * norm).sum()
        if not torch.isfinite(loss):
            bad_steps += 1
            if bad_steps > _MAX_BAD_STEPS:
                raise DivergenceError("trigger recovery kept producing NaN/inf losses; check the model and data")
            continue

        with torch.no_grad():
            flipped = _rows((logits.argmax(1) == rows).float(), active, k, b)
            success = (flipped * weight).sum(1) / weight_sum
            peak = torch.maximum(peak, success)
            if config.family == "mask":
                improved = tracker.update(success, norm.detach())
                _keep_where(best, triggers.state_dict(), improved)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step(active=active if halved else None)
        if on_step is not None:
            on_step(k)

    if config.family == "mask":
        # Classes that never reached the success threshold keep their last state; for a class that
        # halving stopped (it never came near the threshold) that is its state when it stopped.
        _keep_where(best, triggers.state_dict(), ~tracker.found_any)
        triggers.load_state_dict(best)
    return triggers


def _rows(values: torch.Tensor, active: torch.Tensor, k: int, b: int) -> torch.Tensor:
    """Per-row values of the active classes [A * b] -> [K, b], zero for stopped classes."""
    if bool(active.all()):
        return values.view(k, b)
    full = values.new_zeros(k, b)
    full[active] = values.view(-1, b)
    return full


def _hopeless(peak: torch.Tensor, norms: torch.Tensor, threshold: float) -> torch.Tensor:
    """Classes to stop: their trigger never flipped half of what counts as working (peak [K]) and
    their mask is larger than the chunk's median (norms [K]). Detection flags only a working trigger
    whose mask is an outlier *below* the median: such a class is far from it on both counts."""
    return (peak < 0.5 * threshold) & (norms > norms.median())


def _keep_where(best: dict, current: dict, rows: torch.Tensor) -> None:
    """Copy ``current`` into ``best`` for the candidate rows selected by bool [K] ``rows``."""
    if not rows.any():
        return
    index = torch.nonzero(rows).flatten()  # usually a few classes: copy only their rows
    for name, value in current.items():
        if value.dim() == 0 or value.shape[0] != rows.shape[0]:
            continue
        best[name].index_copy_(0, index, value.detach().index_select(0, index))


class _MaskCostTracker:
    """Per-class weight of the mask-mass penalty, adapted as Neural Cleanse does: zero until the
    trigger first works, then up while it keeps working and down while it fails, so each class
    ends at the smallest mask that still flips the model. Also tracks each class's best mask."""

    def __init__(self, k: int, config: Config, device: torch.device) -> None:
        self.cost = torch.zeros(k, device=device)
        self.initial, self.threshold = config.mask_cost, config.success_threshold
        self.up = torch.zeros(k, device=device)
        self.down = torch.zeros(k, device=device)
        self.found_any = torch.zeros(k, dtype=torch.bool, device=device)
        self.best_norm = torch.full((k,), float("inf"), device=device)

    def update(self, success: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
        works = success >= self.threshold
        self.cost = torch.where(works & ~self.found_any, torch.full_like(self.cost, self.initial), self.cost)
        self.found_any |= works
        self.up = torch.where(works, self.up + 1, torch.zeros_like(self.up))
        self.down = torch.where(works, torch.zeros_like(self.down), self.down + 1)
        raise_cost = self.found_any & (self.up >= _PATIENCE)
        lower_cost = self.found_any & (self.down >= _PATIENCE)
        self.cost = torch.where(raise_cost, self.cost * _COST_UP, self.cost)
        self.cost = torch.where(lower_cost, self.cost / _COST_DOWN, self.cost)
        self.up = torch.where(raise_cost, torch.zeros_like(self.up), self.up)
        self.down = torch.where(lower_cost, torch.zeros_like(self.down), self.down)
        improved = works & (norm < self.best_norm)
        self.best_norm = torch.where(improved, norm, self.best_norm)
        return improved


@torch.no_grad()
def attack_success(
    triggers: TriggerSet,
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    mean: torch.Tensor | None = None,
    std: torch.Tensor | None = None,
    batch_size: int = 64,
    shift: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Share of images (label != target) that fresh triggers of each class flip to it: [K].
    ``shift`` (rows, cols) first moves mask-family triggers (see ``TriggerSet.stamp``)."""
    k = len(triggers)
    hits = torch.zeros(k, device=images.device)
    counts = torch.zeros(k, device=images.device)
    for start in range(0, len(labels), batch_size):
        x, y = images[start:start + batch_size], labels[start:start + batch_size]
        if len(y) < 2:  # the generator's batch statistics need two samples
            x, y = images[-2:], labels[-2:]
        _, g = triggers.sample(len(y))
        logits = model(triggers.stamp(x, g, mean, std, shift=shift).flatten(0, 1))
        pred = logits.argmax(1).view(k, -1)
        # A NaN/inf output proves nothing about the trigger: count it as a success, never as erased.
        broken = ~torch.isfinite(logits).all(1).view(k, -1)
        valid = y.unsqueeze(0) != triggers.targets.unsqueeze(1)
        hits += (((pred == triggers.targets.unsqueeze(1)) | broken) & valid).sum(1)
        counts += valid.sum(1)
    return hits / counts.clamp(min=1)
