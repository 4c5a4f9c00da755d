"""Step 1 of BAERASE: train an entropy-maximising trigger generator for every candidate class.

All candidates of a chunk share each forward/backward pass of the (frozen) suspect model:
their triggered images are stacked into one [K * B, C, H, W] batch.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import cost, ops, rng
from ..config import Config
from ..errors import DivergenceError
from . import families, transforms
from .generator import mine_estimate
from .memory import plan_chunk_size, trigger_bytes
from .triggers import UNTARGETED, TriggerSet, reached

log = logging.getLogger(__name__)

_ENOUGH_EVERY = 10  # steps between checks of whether a class's question is answered
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
        for p, flag in zip(model.parameters(), flags, strict=False):
            p.requires_grad_(flag)
        model.train(training)


def plan_chunks(
    model: nn.Module,
    images: torch.Tensor,
    targets: list[int],
    config: Config,
    mean: torch.Tensor | None = None,
    parts: int = 1,
) -> list[list[int]]:
    """Split ``targets`` into chunks that fit ``config.recovery.memory_budget`` (or ``config.recovery.chunk_size``),
    at least ``parts`` of them when there are enough targets (one per distributed rank)."""
    r = config.recovery
    with torch.device("meta"):  # counted, never allocated
        per_class = sum(
            p.numel() for p in _new_triggers(targets[:1], images, config, torch.device("meta")).parameters()
        )
    chunk = r.chunk_size or plan_chunk_size(
        model,
        (images[:1] - (0 if mean is None else mean.view(-1, 1, 1))),
        r.batch_size,
        len(targets),
        r.memory_budget,
        trigger_bytes(per_class),
    )
    if parts > 1 and not config.recovery.chunk_size:
        chunk = min(chunk, -(-len(targets) // parts))
    return [targets[i : i + chunk] for i in range(0, len(targets), chunk)]


def chunk_seed(seed: int, targets: list[int]) -> int:
    """RNG seed of the chunk starting at ``targets[0]``: a chunk's result depends only on its own
    classes, so a resumed or sharded scan recomputes exactly what a single run would. The chunk
    that starts at class 0 uses ``seed`` itself."""
    return (seed + _SEED_STRIDE * int(targets[0])) % (2**63)


@dataclass
class RecoveryResult:
    """Recovered triggers of some candidate classes and their evidence.

    triggers: TriggerSet of ``targets`` in order (None on a rank other than 0 of a sharded run);
    success [K]: share of held-out images fresh triggers flip to the class; norms [K]: trigger
    mass (mask L1 norm or patch area); steps [K]: optimisation steps each class ran.
    """

    targets: list[int]
    triggers: TriggerSet | None
    success: torch.Tensor
    norms: torch.Tensor
    steps: torch.Tensor

    def rows(self, targets: list[int]) -> torch.Tensor:
        """Positions of ``targets`` in this recovery [len(targets)]."""
        where = {t: i for i, t in enumerate(self.targets)}
        return torch.tensor([where[t] for t in targets], dtype=torch.long)

    def updated(self, other: RecoveryResult) -> RecoveryResult:
        """This recovery with ``other``'s classes (a subset, recovered again) replacing their rows;
        the triggers are ``other``'s (a pre-screen keeps none)."""
        rows = self.rows(other.targets)
        success, norms, steps = self.success.clone(), self.norms.clone(), self.steps.clone()
        success[rows], norms[rows], steps[rows] = other.success, other.norms, other.steps
        return RecoveryResult(self.targets, other.triggers, success, norms, steps)


def recover(
    model: nn.Module,
    fit: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    targets: list[int],
    config: Config,
    mean: torch.Tensor | None = None,
    std: torch.Tensor | None = None,
    *,
    seed_offset: int = 0,
    steps: int | None = None,
    on_step: Callable[[int], None] | None = None,
    store=None,
    sharded: bool = False,
    enough: Callable[[torch.Tensor], torch.Tensor] | None = None,
    keep_triggers: bool = True,
) -> RecoveryResult:
    """Recover a trigger distribution for each class in ``targets`` and score it on ``val``.

    fit, val: (images [N, C, H, W] in [0, 1], labels [N]) on the model's device (val None: success
    is the mean target probability, clipped at beta, over the steps: a pre-screen's measure of how
    easily the class is reached); ``mean``/``std``
    [C] normalise inside. Targets run in memory-budgeted chunks, each seeded by ``chunk_seed``
    (shifted by ``seed_offset`` for an independent re-recovery), through the model as ``config``
    asks (amp, channels_last, compile). A CUDA OOM splits the chunk in two; a ``ChunkStore`` saves
    finished chunks and loads them instead of recomputing. ``steps`` overrides ``config.recovery.steps``.
    ``sharded``: under torchrun, ranks split the chunks and every rank gets every class's evidence.
    ``enough``: maps the smallest working trigger masses [k] (inf: none yet) to the classes whose
    question is answered (bool [k]); those stop early. ``keep_triggers=False`` drops each chunk's
    triggers once scored (a pre-screen of many classes keeps only their evidence).
    """
    from .. import distributed

    device = fit[0].device
    sharded = sharded and distributed.enabled()
    rank, world = distributed.setup(device) if sharded else (0, 1)
    chunks = plan_chunks(model, fit[0], targets, config, mean, parts=world)
    mine = distributed.shard(chunks, rank, world)
    forward = _forward_fn(model, config, device)
    steps = config.recovery.steps if steps is None else steps

    def run(piece: list[int]) -> tuple:
        triggers, success, ran = _recover_scored_chunk(
            forward, fit, val, piece, config, mean, std, seed_offset, steps, on_step, store, enough
        )
        return triggers if keep_triggers else None, success, ran, triggers.norms().detach()

    parts = _each_chunk(mine, run)
    success, ran, norms = (
        torch.cat([p[i] for p in parts]) if parts else torch.zeros(0, device=device) for i in (1, 2, 3)
    )
    triggers = families.concat([p[0] for p in parts]) if parts and keep_triggers else None
    if sharded:
        if keep_triggers:
            triggers = distributed.gather(chunks, mine, triggers, success, device)[0]
        success, ran, norms = (distributed.gather_values(chunks, mine, v, device) for v in (success, ran, norms))
    return RecoveryResult(targets, triggers, success.cpu(), norms.cpu(), ran.cpu())


def _each_chunk(chunks: list[list[int]], run: Callable[[list[int]], tuple]) -> list[tuple]:
    """``run(chunk)`` for every chunk, in order; a chunk that runs out of GPU memory is split in two."""
    queue, done = [list(c) for c in chunks], []
    while queue:
        piece = queue.pop(0)
        try:
            done.append(run(piece))
        except torch.cuda.OutOfMemoryError:
            if len(piece) == 1:
                raise
            queue[:0] = [piece[: len(piece) // 2], piece[len(piece) // 2 :]]
            torch.cuda.empty_cache()
            log.warning("out of GPU memory: retrying with %d candidate classes per chunk", len(piece) // 2)
    return done


def _recover_scored_chunk(forward, fit, val, piece, config, mean, std, seed_offset, steps, on_step, store, enough):
    """(triggers, success [k], steps run [k]) of one chunk: loaded from ``store`` or computed."""
    saved = store.load(piece) if store is not None else None
    if saved is not None:
        if on_step is not None:
            on_step(len(piece) * steps)
        triggers, success = saved[0].to(fit[0].device), saved[1].to(fit[0].device)
        return triggers, success, torch.full((len(piece),), steps, dtype=torch.long)
    rng.manual_seed(chunk_seed(config.run.seed + seed_offset, piece))
    if config.recovery.family in transforms.WHOLE_IMAGE_FAMILIES:
        tracker = _MaskCostTracker(len(piece), config, fit[0].device)
        budget = _Budget(len(piece), steps, config, fit[0].device, enough)
        args = (forward, *fit, piece, config, mean, std, steps, on_step, budget, tracker)
        triggers, ran, reach = transforms.recover_chunk(*args)
    else:
        triggers, ran, reach = _recover_chunk(forward, *fit, piece, config, mean, std, steps, on_step, enough)
    success = reach if val is None else attack_success(triggers, forward, *val, mean, std)
    if store is not None:
        store.save(triggers, success)
    return triggers, success, ran


def _forward_fn(model: nn.Module, config: Config, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """The model call used for recovery: optionally compiled, channels-last, bf16 autocast on CUDA."""
    run = torch.compile(model) if config.run.compile else model
    amp = config.run.amp and device.type == "cuda"
    channels_last = config.run.channels_last

    def forward(x: torch.Tensor) -> torch.Tensor:
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if amp:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return run(x).float()  # the hinge and softmax stay in fp32
        return run(x)

    return forward


def _recover_chunk(
    forward, images, labels, targets, config, mean, std, steps, on_step, enough=None
) -> tuple[TriggerSet, torch.Tensor]:
    """Train one chunk's stacked generators: (TriggerSet holding, per class, the smallest trigger
    that still flipped ``config.recovery.success_threshold`` of a batch (mask family) or the final one
    (patch family), steps each class ran [k], mean clipped target probability of its batches [k])."""
    device = images.device
    # Re-stacked (building a TriggerSet draws initial weights) so chunk results keep their random stream.
    triggers = TriggerSet.concat([_new_triggers(targets, images, config, device)])
    groups = [
        {"params": list(triggers.generator.parameters()) + list(triggers.stats.parameters()), "lr": config.recovery.lr}
    ]
    if config.recovery.family == "mask":
        groups.append({"params": [triggers.mask_logits], "lr": config.recovery.mask_lr})
        groups.append({"params": [triggers.pattern_logits], "lr": config.recovery.pattern_lr})
    # One fused update for all K stacked generators; stopped classes are frozen in it.
    optimizer = ops.BatchedAdam(groups, betas=config.recovery.betas)
    tracker = _MaskCostTracker(len(triggers), config, device, triggers.targets)
    budget = _Budget(len(triggers), steps, config, device, enough, _area(images))
    best = {name: t.detach().clone() for name, t in triggers.state_dict().items()}
    diversity = config.recovery.untargeted_diversity if UNTARGETED in targets else 0.0  # decided once, not per step
    bad_steps = 0
    for step in range(steps):
        active = budget.active(step, tracker, triggers)
        if active is None:
            break
        result = _step(forward, images, labels, triggers, tracker, active, config, mean, std, diversity)
        if result is None:
            bad_steps += 1
            if bad_steps > _MAX_BAD_STEPS:
                raise DivergenceError("trigger recovery kept producing NaN/inf losses; check the model and data")
            continue
        loss, success, attack, mass = result
        with torch.no_grad():
            budget.record(success, attack, active)
            if config.recovery.family == "mask":
                _keep_where(best, triggers.state_dict(), tracker.update(success, mass))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step(active=None if bool(active.all()) else active)
        if on_step is not None:
            on_step(int(active.sum()))
    if on_step is not None:
        on_step(int((steps - budget.ran).sum()))  # the steps saved, so a bar still ends full
    if config.recovery.family == "mask":
        # A class that never reached the success threshold keeps its last state.
        _keep_where(best, triggers.state_dict(), ~tracker.found_any)
        triggers.load_state_dict(best)
    return triggers, budget.ran.cpu(), budget.reach / budget.ran.clamp(min=1)


def _new_triggers(targets, images, config, device) -> families.Triggers:
    if config.recovery.family in transforms.WHOLE_IMAGE_FAMILIES:
        return transforms.new_set(targets, images, config, device)
    return TriggerSet(
        targets,
        tuple(images.shape[1:]),
        family=config.recovery.family,
        patch_size=config.recovery.patch_size,
        latent_dim=config.recovery.latent_dim,
        hidden=config.recovery.hidden,
        mine_hidden=config.recovery.mine_hidden,
        mask_init=config.recovery.mask_init,
    ).to(device)


def _area(images: torch.Tensor) -> int:
    return images.shape[-1] * images.shape[-2]


def _step(forward, images, labels, triggers, tracker, active, config, mean, std, diversity=0.0):
    """(loss, batch success [k] (0 for stopped classes), clipped target probability [k], mask mass
    per pixel [k]) of one optimisation step, or None when the loss is not finite. ``diversity``: the
    weight of an untargeted trigger's spread over the classes (0: the chunk has none)."""
    k, b = len(triggers), config.recovery.batch_size
    batch = torch.randint(0, len(labels), (b,), device=images.device, generator=rng.generator(images.device))
    x, y = images[batch], labels[batch]
    # A class's own images prove nothing about its trigger: they carry no weight in its loss.
    weight = (y.unsqueeze(0) != triggers.targets.unsqueeze(1)).float()
    weight_sum = weight.sum(1).clamp(min=1)
    z, g = triggers.sample(b, config.recovery.noise_std)
    stamped = triggers.stamp(x, g, mean, std).flatten(0, 1)
    rows = triggers.targets.repeat_interleave(b)
    if not bool(active.all()):
        keep = active.repeat_interleave(b)
        stamped, rows = stamped[keep], rows[keep]
    logits = cost.forward(forward, stamped)
    hinge = _attack(logits, rows, y.repeat(len(rows) // b), config.recovery.beta)
    attack = (_rows(hinge, active, k, b) * weight).sum(1) / weight_sum
    spread = diversity * _spread_over_classes(logits, rows, active, b) if diversity else 0.0
    surrogate, _ = mine_estimate(triggers.stats, z, g, triggers.moving_avg, config.recovery.mine_ma_rate)
    mass = triggers.norms() / _area(images)
    loss = (-attack - spread - config.recovery.alpha * surrogate + tracker.cost * mass).sum()
    if not torch.isfinite(loss):
        return None
    with torch.no_grad():
        flipped = _rows(reached(logits.argmax(1), rows, y.repeat(len(rows) // b)).float(), active, k, b)
        success = (flipped * weight).sum(1) / weight_sum
    return loss, success, attack.detach(), mass.detach()


def _attack(logits: torch.Tensor, rows: torch.Tensor, labels: torch.Tensor, beta: float) -> torch.Tensor:
    """Per triggered row: its target's probability, or for an untargeted row that of any class but
    its own label, clipped at ``beta``."""
    untargeted = rows == UNTARGETED
    hinge, _ = ops.trigger_loss(logits, torch.where(untargeted, labels, rows), beta)
    if not bool(untargeted.any()):
        return hinge
    away = 1 - F.softmax(logits.float(), 1).gather(1, labels.unsqueeze(1)).squeeze(1)
    return torch.where(untargeted, away.clamp(max=beta), hinge)


def _spread_over_classes(logits: torch.Tensor, rows: torch.Tensor, active: torch.Tensor, b: int) -> torch.Tensor:
    """Per trigger [K]: for an untargeted one, the entropy of its batch's mean prediction over log K
    (an all-to-all backdoor sends each class on to its own target; a universal perturbation sends all
    to one class); 0 for a targeted one."""
    p = F.softmax(logits.float(), 1).view(-1, b, logits.shape[1]).mean(1)
    entropy = -(p * p.clamp(min=1e-12).log()).sum(1) / math.log(logits.shape[1])
    full = entropy.new_zeros(len(active))
    full[active] = torch.where(rows.view(-1, b)[:, 0] == UNTARGETED, entropy, 0.0)
    return full


def _rows(values: torch.Tensor, active: torch.Tensor, k: int, b: int) -> torch.Tensor:
    """Per-row values of the active classes [A * b] -> [K, b], zero for stopped classes."""
    if bool(active.all()):
        return values.view(k, b)
    full = values.new_zeros(k, b)
    full[active] = values.view(-1, b)
    return full


class _Budget:
    """Which candidate classes still pass images through the model, step by step.

    - Answered (``enough``): a class whose question is answered (a confirmation that found the
      trigger again) stops.
    - Halving (``config.recovery.halving``): at a third of the steps, a class whose trigger never
      flipped half the success threshold and whose mask is above the chunk's median stops;
      detection only flags a working trigger far below the median.
    - Convergence (``config.recovery.converge_window``): a class whose smallest working mask shrank
      by less than ``converge_tol`` over the last window stops.
    - Giving up (warp and blend families, ``config.recovery.give_up_share``): at a third of the steps,
      a class whose transformation never flipped that share of the success threshold stops; it would
      end at the family's limit anyway.
    """

    def __init__(self, k: int, steps: int, config: Config, device: torch.device, enough=None, area: int = 1) -> None:
        r = config.recovery
        mask, whole_image = r.family == "mask", r.family in transforms.WHOLE_IMAGE_FAMILIES
        self.enough, self.area = (enough if mask or whole_image else None), area
        self.halve_at = steps // 3 if r.halving and mask and k > 1 else -1
        self.give_up_at = steps // 3 if r.give_up_share > 0 and whole_image and k > 1 else -1
        self.give_up_share = r.give_up_share
        self.window = r.converge_window if mask else 0
        self.tol, self.threshold = r.converge_tol, r.success_threshold
        self.stopped = torch.zeros(k, dtype=torch.bool, device=device)
        self.peak = torch.zeros(k, device=device)
        self.ran = torch.zeros(k, dtype=torch.long, device=device)
        self.reach = torch.zeros(k, device=device)
        self.last_best: torch.Tensor | None = None

    def active(self, step: int, tracker: _MaskCostTracker, triggers: TriggerSet) -> torch.Tensor | None:
        """bool [k] of the classes that run this step; None once every class has stopped."""
        if step == self.halve_at:
            norms = triggers.norms().detach()
            hopeless = (self.peak < 0.5 * self.threshold) & (norms > norms.median()) & ~self.stopped
            self.stopped |= hopeless
            log.info("halving: %d of %d candidate classes stop early", int(hopeless.sum()), len(norms))
        if self.enough is not None and step and step % _ENOUGH_EVERY == 0:
            self.stopped |= self.enough(tracker.best_norm * self.area).to(self.stopped.device)
        if step == self.give_up_at:
            self.stopped |= ~tracker.found_any & (self.peak < self.give_up_share * self.threshold)
        if self.window and step and step % self.window == 0:
            best = tracker.best_norm.clone()
            if self.last_best is not None:
                self.stopped |= tracker.found_any & (best > self.last_best * (1 - self.tol))
            self.last_best = best
        if bool(self.stopped.all()):
            return None
        self.ran += ~self.stopped
        return ~self.stopped

    def record(self, success: torch.Tensor, attack: torch.Tensor, active: torch.Tensor) -> None:
        """One step's batch success and clipped target probability [k] of the classes ``active``."""
        self.peak = torch.maximum(self.peak, success)
        self.reach += attack * active


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

    def __init__(self, k: int, config: Config, device: torch.device, targets: torch.Tensor | None = None) -> None:
        self.cost = torch.zeros(k, device=device)
        r = config.recovery
        self.initial, self.threshold = r.mask_cost, torch.full((k,), r.success_threshold, device=device)
        if targets is not None:  # an untargeted trigger answers its own bar
            self.threshold[targets.to(device) == UNTARGETED] = r.untargeted_success
        self.patience, self.factor_up, self.factor_down = (
            config.recovery.cost_patience,
            config.recovery.cost_up,
            config.recovery.cost_down,
        )
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
        raise_cost = self.found_any & (self.up >= self.patience)
        lower_cost = self.found_any & (self.down >= self.patience)
        self.cost = torch.where(raise_cost, self.cost * self.factor_up, self.cost)
        self.cost = torch.where(lower_cost, self.cost / self.factor_down, self.cost)
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
    """Share of images (label != target) that fresh triggers of each class flip to it (an untargeted
    trigger: away from their own label): [K].
    ``shift`` (rows, cols) first moves mask-family triggers (see ``TriggerSet.stamp``)."""
    k = len(triggers)
    hits = torch.zeros(k, device=images.device)
    counts = torch.zeros(k, device=images.device)
    for start in range(0, len(labels), batch_size):
        x, y = images[start : start + batch_size], labels[start : start + batch_size]
        if len(y) < 2:  # the generator's batch statistics need two samples
            x, y = images[-2:], labels[-2:]
        _, g = triggers.sample(len(y))
        logits = cost.forward(model, triggers.stamp(x, g, mean, std, shift=shift).flatten(0, 1))
        pred = logits.argmax(1).view(k, -1)
        # A NaN/inf output proves nothing about the trigger: count it as a success, never as erased.
        broken = ~torch.isfinite(logits).all(1).view(k, -1)
        valid = y.unsqueeze(0) != triggers.targets.unsqueeze(1)
        hits += ((reached(pred, triggers.targets.unsqueeze(1), y.unsqueeze(0)) | broken) & valid).sum(1)
        counts += valid.sum(1)
    return hits / counts.clamp(min=1)


@torch.no_grad()
def sent_to(
    triggers: TriggerSet, model: nn.Module, images: torch.Tensor, mean=None, std=None, batch_size: int = 64
) -> torch.Tensor:
    """The class a fresh trigger of each class sends each image to: [K, N]."""
    sent = []
    for start in range(0, len(images), batch_size):
        x = images[start : start + batch_size]
        _, g = triggers.sample(max(len(x), 2))  # the generator's batch statistics need two samples
        logits = cost.forward(model, triggers.stamp(x, g[:, : len(x)], mean, std).flatten(0, 1))
        sent.append(logits.argmax(1).view(len(triggers), -1))
    return torch.cat(sent, 1)
