"""How small a universal additive signal reaches each class: the yardstick a clean-label SIG backdoor must beat.

    python -m benchmarks.effectiveness.reach colour10/sig_clean/0 colour10/clean/0 ...

Each argument names a grid cell (data/attack/seed; ``clean`` for a clean model). Per class it fits one
image-independent additive signal on the defender's images, the smallest (RMS, pixel scale) that still
sends ``GOAL`` of a batch of other-class images to the class (Neural Cleanse's adaptive cost), in five
forms: free, zero mean per channel (no colour cast), without its 8 x 8 block means (no smooth colour
regions), and the stripes of a SIG signal: one value per column repeated down the rows (``columns``)
or per row across the columns (``rows``). It prints each class's RMS, the success of the signal on
the test split, and the median over the smallest: a trigger-size test can flag a class only when the
backdoor makes it that much cheaper than on a clean model.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from .grid import Cell, beyond_cell
from .run import splits, train

GOAL, STEPS, BATCH, LR = 0.9, 300, 64, 0.01
FORMS = ("free", "zero_mean", "no_block_means", "columns", "rows")


def _shape(signal: torch.Tensor, form: str) -> torch.Tensor:
    """``signal`` [K, C, H, W] restricted to ``form``."""
    if form == "zero_mean":
        return signal - signal.mean((2, 3), keepdim=True)
    if form == "no_block_means":
        blocks = F.avg_pool2d(signal, 8)
        return signal - F.interpolate(blocks, size=signal.shape[-2:], mode="bilinear", align_corners=False)
    if form == "columns":
        return signal.mean(2, keepdim=True).expand_as(signal)
    if form == "rows":
        return signal.mean(3, keepdim=True).expand_as(signal)
    return signal


def _sent(pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per class k [K], the share of the images of other classes (labels ``y`` [N]) predicted k in ``pred`` [K, N]."""
    aim = torch.arange(len(pred)).view(-1, 1)
    other = y.view(1, -1) != aim
    return ((pred == aim) & other).sum(1) / other.sum(1).clamp(min=1)


def _success(model, x, y, signal) -> torch.Tensor:
    """Per class [K], the share of images of other classes that ``signal`` [K, C, H, W] sends to the class."""
    with torch.no_grad():
        pred = model((x.unsqueeze(0) + signal.unsqueeze(1)).clamp(0, 1).flatten(0, 1)).argmax(1)
    return _sent(pred.view(len(signal), -1), y)


def smallest_signals(model, x, y, form: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMS [K] of each class's smallest signal that reached ``GOAL`` of a batch (inf: none did), the signals)."""
    g = torch.Generator().manual_seed(seed)
    k = int(y.max()) + 1
    raw = torch.zeros(k, *x.shape[1:], requires_grad=True)
    optimizer = torch.optim.Adam([raw], lr=LR)
    cost = torch.full((k,), 1.0)
    best, best_signal = torch.full((k,), float("inf")), torch.zeros_like(raw)
    aim = torch.arange(k).view(k, 1).expand(k, BATCH)
    for _ in range(STEPS):
        idx = torch.randint(len(y), (BATCH,), generator=g)
        signal = _shape(raw, form)
        stamped = (x[idx].unsqueeze(0) + signal.unsqueeze(1)).clamp(0, 1)
        logits = model(stamped.flatten(0, 1)).view(k, BATCH, -1)
        other = (y[idx].view(1, -1) != aim).float()
        ce = F.cross_entropy(logits.flatten(0, 1), aim.flatten(), reduction="none").view(k, BATCH)
        rms = (signal.pow(2).mean((1, 2, 3)) + 1e-10).sqrt()
        loss = ((ce * other).sum(1) / other.sum(1).clamp(min=1) + cost * rms).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            reached = _sent(logits.argmax(2), y[idx]) >= GOAL
            better = reached & (rms < best)
            best = torch.where(better, rms, best)
            best_signal[better] = signal[better]
            cost = torch.where(reached, cost * 1.3, cost / 1.3).clamp(1e-2, 1e3)
    return best, best_signal


def _cell(spec: str) -> Cell:
    data, attack, seed = spec.split("/")
    return Cell(data, seed=int(seed)) if attack == "clean" else beyond_cell(data, attack, seed=int(seed))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.effectiveness.reach", description=__doc__)
    ap.add_argument("cells", nargs="+", help="data/attack/seed, e.g. colour10/sig_clean/0 or colour10/clean/1")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    try:
        cells = [(spec, _cell(spec)) for spec in args.cells]
    except ValueError as exc:
        ap.error(f"cells are data/attack/seed, e.g. colour10/sig_clean/0 or colour10/clean/1 ({exc})")
    for spec, cell in cells:
        train_xy, (x, y), (tx, ty) = splits(cell)
        model, _ = train(cell, train_xy, int(train_xy[1].max()) + 1)
        model.eval().requires_grad_(False)
        for form in FORMS:
            rms, signal = smallest_signals(model, x, y, form)
            finite = torch.where(rms.isinf(), rms.new_tensor(1.0), rms)
            shown = " ".join("-" if r.isinf() else f"{r:.3f}" for r in rms)
            test = " ".join(f"{s:.2f}" for s in _success(model, tx, ty, signal))
            print(
                f"{spec} {form}: rms {shown} | test success {test} | smallest {int(finite.argmin())}, "
                f"median / smallest {float(finite.median() / finite.min()):.2f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
