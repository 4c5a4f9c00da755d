"""Masked-trigger and patch application for many candidate classes at once."""
from __future__ import annotations

import torch

from .dispatch import backend_for, implementation
from .reference import patch_apply_ref, trigger_apply_ref


def _stats(mean: torch.Tensor | None, std: torch.Tensor | None, channels: int, device) -> tuple:
    if mean is None:
        return torch.zeros(channels, device=device), torch.ones(channels, device=device)
    return mean.float().contiguous(), std.float().contiguous()


class TriggerApplyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, mask_logits, pattern, mean, std, impl):
        ctx.save_for_backward(x, mask_logits, pattern, mean, std)
        ctx.impl = impl
        return impl.trigger_apply_fwd(x, mask_logits, pattern, mean, std)

    @staticmethod
    def backward(ctx, grad_out):
        grad_mask, grad_pattern = ctx.impl.trigger_apply_bwd(grad_out.contiguous(), *ctx.saved_tensors)
        return None, grad_mask, grad_pattern, None, None, None


class PatchApplyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, patch, rows, cols, mean, std, impl):
        ctx.save_for_backward(rows, cols, std)
        ctx.patch_shape, ctx.impl = patch.shape, impl
        return impl.patch_apply_fwd(x, patch, rows, cols, mean, std)

    @staticmethod
    def backward(ctx, grad_out):
        rows, cols, std = ctx.saved_tensors
        grad_patch = ctx.impl.patch_apply_bwd(grad_out.contiguous(), rows, cols, ctx.patch_shape, std)
        return None, grad_patch, None, None, None, None, None


def trigger_apply(
    x: torch.Tensor,
    mask_logits: torch.Tensor,
    pattern: torch.Tensor,
    mean: torch.Tensor | None = None,
    std: torch.Tensor | None = None,
) -> torch.Tensor:
    """``normalize(x + sigmoid(m) * (p - x))`` for K candidates: [B,C,H,W] -> [K,B,C,H,W].

    mask_logits: [K, 1|C, H, W]; pattern: [K, C, H, W] or [K, B, C, H, W]; mean/std: [C] or None.
    Gradients flow to ``mask_logits`` and ``pattern``.
    """
    name = backend_for("trigger_apply", x.device)
    if name == "ref":
        return trigger_apply_ref(x, mask_logits, pattern, mean, std)
    mean, std = _stats(mean, std, x.shape[1], x.device)
    return TriggerApplyFunction.apply(
        x.contiguous(), mask_logits.contiguous(), pattern.contiguous(), mean, std, implementation(name)
    )


def patch_apply(
    x: torch.Tensor,
    patch: torch.Tensor,
    rows: torch.Tensor,
    cols: torch.Tensor,
    mean: torch.Tensor | None = None,
    std: torch.Tensor | None = None,
) -> torch.Tensor:
    """Paste patch [K,B,C,h,w] at (rows, cols) ([B] or [K,B]) into x [B,C,H,W] -> [K,B,C,H,W]."""
    name = backend_for("patch_apply", x.device)
    if name == "ref":
        return patch_apply_ref(x, patch, rows, cols, mean, std)
    k, b = patch.shape[:2]
    rows = rows.expand(k, b).contiguous() if rows.dim() == 1 else rows.contiguous()
    cols = cols.expand(k, b).contiguous() if cols.dim() == 1 else cols.contiguous()
    mean, std = _stats(mean, std, x.shape[1], x.device)
    return PatchApplyFunction.apply(x.contiguous(), patch.contiguous(), rows, cols, mean, std, implementation(name))
