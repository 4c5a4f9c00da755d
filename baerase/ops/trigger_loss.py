"""Fused softmax / clipped target probability / cross-entropy over logits."""
from __future__ import annotations

import torch

from .dispatch import backend_for, implementation
from .reference import trigger_loss_ref


class TriggerLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, beta, impl):
        hinge, nll, lse = impl.trigger_loss_fwd(logits, target, beta)
        ctx.save_for_backward(logits, target, lse)
        ctx.beta, ctx.impl = beta, impl
        return hinge, nll

    @staticmethod
    def backward(ctx, grad_hinge, grad_nll):
        logits, target, lse = ctx.saved_tensors
        zeros = torch.zeros(logits.shape[0], device=logits.device)
        grad_hinge = zeros if grad_hinge is None else grad_hinge.float().contiguous()
        grad_nll = zeros if grad_nll is None else grad_nll.float().contiguous()
        grad = ctx.impl.trigger_loss_bwd(grad_hinge, grad_nll, logits, target, lse, ctx.beta)
        return grad, None, None, None


def trigger_loss(logits: torch.Tensor, target: torch.Tensor, beta: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row ``(min(softmax(logits)_t, beta), CE(logits, t))`` for logits [M, Kc], target [M].

    Both outputs are fp32 [M]; the softmax matrix is never materialised by the fast backends.
    """
    name = backend_for("trigger_loss", logits.device)
    if name == "ref":
        return trigger_loss_ref(logits, target, beta)
    return TriggerLossFunction.apply(logits.contiguous(), target.contiguous(), float(beta), implementation(name))
