"""How many candidate classes fit in one batched computation."""

from __future__ import annotations

import os

import torch
from torch import nn

_CPU_BUDGET_CAP = 4 << 30  # bytes: beyond this, bigger chunks stop paying off on CPU caches


def default_budget(device: torch.device) -> int:
    """Bytes one chunk's activations may take: half the free GPU memory, or a quarter of RAM."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free // 2
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        ram = 8 << 30
    return min(_CPU_BUDGET_CAP, ram // 4)


@torch.no_grad()
def activation_bytes_per_image(model: nn.Module, image: torch.Tensor) -> int:
    """Bytes of activations one image keeps for backward (sum of every leaf module's output)."""
    total = [image.numel() * image.element_size()]

    def hook(_module, _inputs, output):
        if isinstance(output, torch.Tensor):
            total[0] += output.numel() * output.element_size()

    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    try:
        model(image)
    finally:
        for handle in handles:
            handle.remove()
    return 2 * total[0]  # outputs plus the gradients flowing back through them


def plan_chunk_size(
    model: nn.Module, image: torch.Tensor, batch_size: int, candidates: int, budget: int | None, trigger_bytes: int = 0
) -> int:
    """Largest number of candidates whose [chunk * batch_size] images, and whose own trigger
    networks (``trigger_bytes`` each), fit in ``budget`` bytes."""
    budget = default_budget(image.device) if budget is None else budget
    per_candidate = activation_bytes_per_image(model, image[:1]) * batch_size + trigger_bytes
    return int(max(1, min(candidates, budget // max(per_candidate, 1))))


def trigger_bytes(parameters: int) -> int:
    """Bytes one candidate's trigger networks take while trained: fp32 weights, gradients and
    Adam's two moments."""
    return 16 * parameters
